"""Rematerialization of the transformer blocks: keep each block's input, recompute its activations backward.

A rematerialized block keeps only its input for the backward pass and
recomputes its activations there: at sequence length 1024 the attention
scores of one GPT-2 block are heads x 1024 x 1024 per row, which is most of
what a training step holds on to.

Why not `keras.RematScope(mode="list_of_layers")` as it is: Keras 3.15 hands
every keyword of the block's call to `keras.remat`, which on JAX turns
`training=True` and `use_causal_mask=True` into traced values (the block
then fails on `if training`), and a dropout inside the remat leaks its seed
update out of the `jax.checkpoint` trace. Here the Python-valued keywords
stay static, and on JAX the block's state (its dropout seeds) goes in and
comes out of the rematerialized function explicitly, so the recomputation
draws the same masks and the run's losses equal those without remat.

On JAX the recomputation is a `jax.custom_vjp` whose backward first makes
the block's inputs depend on the incoming gradient (a select on whether its
first element is NaN): `jax.checkpoint`'s recomputation depends only on
saved inputs, and XLA's CPU compiler merges it back into the forward pass
(measured: the same buffers as without remat), so neither the CPU's plan
nor a CPU run would show the saving. With the dependency the recomputation
can only run in the backward pass, on every XLA backend.
On TensorFlow it is `keras.remat` (`tf.recompute_grad`), which redraws
dropout masks in the recomputation, so there remat is refused on a model
with dropout.
"""

from __future__ import annotations

import functools

from pitchkeras.errors import UsageError

GATED = "_pitchkeras_gradient_gate"  # set on a block whose input gradient is gated (so it is gated once)


def gate_block_gradients(backbone) -> bool:
    """On JAX on a CPU, make each transformer block's input gradient a buffer of its own; whether it did.

    The residual stream's gradient is a chain of elementwise adds through the
    blocks, and XLA's CPU fusion copies cheap elementwise producers into each
    consumer: the fusion that feeds block k's weight gradients recomputed the
    chain from the top (fusions growing by one chain link per block; the cost
    is measured in BUILD_NOTES.md). `jax.lax.optimization_barrier`
    does not stop it (the CPU pipeline removes barriers before fusing); a
    conditional does: the gradient leaves each block through a `lax.cond` on
    whether its first element is NaN (then every element is NaN, as the step's
    loss already is, and the run stops on it). The values are otherwise those
    of the plain gradient. Elsewhere (GPU, TPU, TensorFlow) nothing changes: a
    GPU reads a conditional's predicate back to the host, a sync per block.

    Args:
        backbone: keras_hub.models.GPT2Backbone. Its blocks' `call` are wrapped in place.
    """
    import keras

    if keras.config.backend() != "jax":
        return False
    import jax

    if jax.default_backend() != "cpu":
        return False
    for block in backbone.transformer_layers:
        if not getattr(block, GATED, False):
            block.call = _gated(block.call)
            setattr(block, GATED, True)
    return True


def _gated(call):
    def gated_call(*args, **kwargs):
        if args:
            return call(_gradient_gate(args[0]), *args[1:], **kwargs)
        kwargs["decoder_sequence"] = _gradient_gate(kwargs["decoder_sequence"])  # keras-hub's name for it
        return call(**kwargs)

    return gated_call


def _gradient_gate(x):
    """The identity, whose gradient goes through a `lax.cond` (a fusion boundary on XLA's CPU backend)."""
    return _gate_function()(x)


@functools.lru_cache(maxsize=None)
def _gate_function():
    """The one `jax.custom_vjp` behind `_gradient_gate` (built once, not at every block of every trace)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def gate(value):
        return value

    def backward(_, cotangent):
        poisoned = jnp.isnan(cotangent.reshape(-1)[0])
        return (jax.lax.cond(poisoned, lambda g: jnp.full_like(g, jnp.nan), lambda g: g, cotangent),)

    gate.defvjp(lambda value: (value, None), backward)
    return gate


def remat_transformer_blocks(backbone) -> None:
    """Rematerialize each transformer block of a keras-hub GPT-2 `backbone` from now on.

    Args:
        backbone: keras_hub.models.GPT2Backbone. Changed in place (its blocks' `call`).

    Raises:
        UsageError: on TensorFlow, a backbone with dropout (the recomputation would draw other masks).
    """
    import keras

    if keras.config.backend() == "tensorflow" and float(getattr(backbone, "dropout", 0.0) or 0.0) > 0:
        raise UsageError(f"--remat on TensorFlow needs a model without dropout (this one has {backbone.dropout}): "
                         "tf.recompute_grad redraws dropout masks; use KERAS_BACKEND=jax")
    for block in backbone.transformer_layers:
        block.call = _rematerialized(block, block.call)


def _rematerialized(layer, call):
    """`call` of `layer` through `keras.remat`, tensors traced, every other argument static."""
    import keras

    def call_with_remat(*args, **kwargs):
        names = [name for name, value in kwargs.items() if keras.ops.is_tensor(value)]
        static = {name: value for name, value in kwargs.items() if name not in names}
        tensors = [*args, *(kwargs[name] for name in names)]
        count = len(args)

        def run(flat):
            return call(*flat[:count], **dict(zip(names, flat[count:count + len(names)])), **static)

        state = _traced_state(layer)
        if state is None:  # TensorFlow: real variables, which tf.recompute_grad tracks itself
            return keras.remat(lambda *flat: run(flat))(*tensors)
        variables, values = state
        seeds = [variable for variable in variables if _is_seed(variable)]  # chosen once: every trace alike
        # The activations and the dropout seeds wait for the gradient (a mask drawn from a seed alone would
        # be merged with the forward pass's and kept alive, heads x T x T per block).
        seed_ids = {id(seed) for seed in seeds}
        seed_positions = {len(tensors) + i for i, v in enumerate(variables) if id(v) in seed_ids}
        outputs, updated = _late_remat(lambda *flat: _stateless(variables, flat[len(tensors):], seeds,
                                                                lambda: run(flat)), seed_positions)(*tensors, *values)
        for variable, after in zip(seeds, updated):
            variable.assign(after)  # a dropout's seed, advanced
        return outputs

    return call_with_remat


def _traced_state(layer):
    """On JAX inside a stateless call: the layer's variables and their current traced values, else None."""
    import keras
    from keras.src.backend.common.stateless_scope import get_stateless_scope  # the JAX trainer's state mapping

    scope = get_stateless_scope() if keras.config.backend() == "jax" else None
    if scope is None:
        return None
    variables = list(layer.variables)
    values = []
    for variable in variables:
        value = scope.get_current_value(variable)
        values.append(variable.value if value is None else value)
    return variables, values


def _stateless(variables, values, seeds, fn):
    """Run `fn` with `variables` read from `values`; return its outputs and the values of `seeds` after it."""
    import keras

    with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
        outputs = fn()
    return outputs, [scope.get_current_value(variable) for variable in seeds]


def _is_seed(variable) -> bool:
    """Whether `variable` is state a GPT-2 block changes when called: a dropout's (integer) seed.

    The block's float variables (weights, LoRA-frozen kernels included) are only read. (Under a mixed
    policy `variable.dtype` reads as the compute dtype inside the block: hence the test for integers.)
    """
    import keras

    return not variable.trainable and keras.backend.is_int_dtype(variable.dtype)


def _late_remat(fn, seeds: set):
    """`fn` whose backward recomputes it from its inputs once the output's gradient exists (JAX).

    Every input waits for the gradient in the backward pass, the weights too: otherwise what depends on weights
    alone (their bfloat16 casts under a mixed policy) is merged with the forward pass's and kept alive from one
    to the other. A dropout's bits depend on its seed only, which is known long before the block runs, so a
    scheduler may draw every block's masks at the start of the pass and keep them all: the seeds also wait for
    the block's input in the forward pass.

    Args:
        fn: callable. A pure function of arrays.
        seeds: set of int. Positions of the dropout seeds among the inputs.
    """
    import jax

    def forward_order(inputs):
        return _wait_for(next(x for x in inputs if _is_float(x)), inputs, seeds)

    @jax.custom_vjp
    def rematerialized(*inputs):
        return fn(*forward_order(inputs))

    def forward(*inputs):
        return fn(*forward_order(inputs)), inputs  # only the inputs are kept

    def backward(inputs, cotangent):
        first = next(leaf for leaf in jax.tree.leaves(cotangent) if _is_float(leaf))
        _, pullback = jax.vjp(fn, *_wait_for(first, inputs, set(range(len(inputs)))))
        return pullback(cotangent)

    rematerialized.defvjp(forward, backward)
    return rematerialized


def _is_float(x) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(x.dtype, jnp.floating)


def _wait_for(anchor, inputs, positions: set) -> list:
    """`inputs`, those at `positions` made to depend on `anchor` (a select on whether its first element is NaN)."""
    import jax.numpy as jnp

    waiting = jnp.isnan(anchor.reshape(-1)[0])  # unknown until `anchor` exists; a NaN poisons the step anyway
    return [jnp.where(waiting, jnp.zeros_like(x), x) if i in positions else x for i, x in enumerate(inputs)]
