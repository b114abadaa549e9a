"""The engine's compiled programs and the state they run on: `_Program` (step and prefill, per shape, on
TensorFlow or JAX) and `_DeviceState` (the caches, resident on the device, and the per-row step inputs)."""

from __future__ import annotations

import numpy as np

from pitchkeras.errors import FailedPrecondition
from pitchkeras.sampling.config import MAX_TOP_LOGPROBS, SamplerConfig
from pitchkeras.sampling.counter_rng import row_keys
from pitchkeras.sampling.decode import forward, sample_next


def _program_for(generator, slots: int, tokens: int) -> "_Program":
    """The compiled programs for `slots` rows of this generator's model, shared by every engine on it.

    They live on the generator (not in a module-level table), so dropping it frees the model.
    """
    xla = generator.uses_xla(slots)
    programs = generator.__dict__.setdefault("_engine_programs", {})
    if (slots, xla, tokens) not in programs:
        programs[slots, xla, tokens] = _Program(generator._backbone, xla=xla, tokens=tokens)
    return programs[slots, xla, tokens]


def _row_buckets(smallest: int, slots: int) -> tuple:
    """The rows a step may run: `smallest`, the powers of two above it below `slots`, and `slots`."""
    buckets, rows = [], smallest
    while rows < slots:
        buckets.append(rows)
        rows *= 2
    return tuple(buckets) + (slots,)


def _concrete_per_shape(function):
    """Call a `tf.function` through its concrete function for the arguments' shapes, found once per shape.

    A step is short on a small model, and the `tf.function` call itself
    matched the argument structure against its traces every time, a
    Python cost per call worth avoiding (profiled: BUILD_NOTES.md).
    """
    import tensorflow as tf

    concrete: dict = {}

    def call(caches, *args):
        tensors = [tf.constant(a) for a in args]
        key = (tuple(caches[0][0].shape),) + tuple(tuple(t.shape) for t in tensors)
        if key not in concrete:
            concrete[key] = function.get_concrete_function(caches, *tensors)
        return concrete[key](caches, *tensors)

    return call


def _in_place(body):
    """A TensorFlow step or prefill over cache variables: `body(cache values, *args)` returns (new caches,
    result); the new caches are assigned to the variables inside the same compiled function (XLA aliases
    them: no cache-sized copy per call), and the result is returned."""
    def run(variables, *args):
        caches, result = body([(k.value(), v.value()) for k, v in variables], *args)
        for (k, v), (new_k, new_v) in zip(variables, caches):
            k.assign(new_k)
            v.assign(new_v)
        return result

    return run


class _DeviceState:
    """The engine's arrays: the caches (device tensors, the first `rows` slots) and the per-row inputs of a
    step (numpy, every slot; a step gets the first `rows`)."""

    def __init__(self, slots: int, pad_id: int):
        self.slots, self.pad_id = slots, pad_id
        self.rows = 0  # slots the caches hold (the row bucket)
        self.length = 0  # cache positions; 0 = no cache allocated
        self.caches = None
        self.token_ids = np.zeros((slots, 0), np.int32)
        self.positions = np.zeros((slots,), np.int32)
        self.keys = np.zeros((slots, 2), np.uint32)
        self.temperature = np.ones((slots,), np.float32)
        self.top_k = np.zeros((slots,), np.int32)
        self.top_p = np.ones((slots,), np.float32)
        self.repetition_penalty = np.ones((slots,), np.float32)
        self.no_repeat_ngram_size = np.zeros((slots,), np.int32)

    def reset_row(self, slot: int, ids: list, seed: int, config: SamplerConfig) -> None:
        self.token_ids[slot] = self.pad_id
        self.token_ids[slot, : len(ids)] = ids
        self.keys[slot] = row_keys([seed])[0]
        self.temperature[slot] = config.temperature
        self.top_k[slot] = config.top_k
        self.top_p[slot] = config.top_p
        self.repetition_penalty[slot] = config.repetition_penalty
        self.no_repeat_ngram_size[slot] = config.no_repeat_ngram_size

    def clear_row(self, slot: int) -> None:
        """Neutral settings, so a free row never switches a processor on for the others."""
        self.positions[slot] = 0
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = 1.0, 0, 1.0
        self.repetition_penalty[slot], self.no_repeat_ngram_size[slot] = 1.0, 0

    def resize(self, rows: int, length: int, program: "_Program") -> None:
        """Pad or cut the caches to `rows` slots (those cut are free) and `length` positions."""
        old = self.length
        self.caches = program.resize_caches(self.caches, rows, length)
        if length != old:
            ids = np.full((self.slots, length), self.pad_id, np.int32)
            keep = min(old, length)
            ids[:, :keep] = self.token_ids[:, :keep]
            self.token_ids = ids
        self.rows, self.length = rows, length

    def release(self) -> None:
        """Drop the cache while idle: the next request allocates the rows and length it needs."""
        self.caches, self.rows, self.length = None, 0, 0
        self.token_ids = np.zeros((self.slots, 0), np.int32)

    def step_inputs(self) -> tuple:
        return tuple(a[: self.rows] for a in (self.token_ids, self.positions, self.keys, self.temperature,
                                              self.top_k, self.top_p, self.repetition_penalty,
                                              self.no_repeat_ngram_size))


class _Program:
    """The engine's compiled programs, one per shape: `step` and `prefill`, on TensorFlow or JAX."""

    def __init__(self, backbone, *, xla: bool, tokens: int = 1):
        import keras

        self.backbone = backbone
        self.xla = xla
        # TensorFlow: the caches are `tf.Variable`s read and assigned inside the compiled step, so XLA updates
        # them in place (aliased) instead of copying every cache in and out of each call. JAX donates them.
        self.resident = keras.config.backend() == "tensorflow"
        self.tokens = tokens  # decode steps per call
        self.traces = 0  # programs traced (= compiled shapes)
        self._steps = self._prefill = None  # {logprobs: step}, prefill

    # The traced bodies, in keras.ops. -------------------------------------------------------
    def _step_body(self, caches, token_ids, positions, keys, *settings, logprobs: bool = False):
        """`tokens` decode steps: the caches, and each row's next `tokens` tokens (slots, tokens).

        Each step feeds every row's last token at its own position and draws
        the next; within a call, a row's new token is written to its context
        for the next step (positions past the cache stay on its last slot: the
        host drops tokens of rows that have ended). With `logprobs`, also each
        chosen token's log-probability under the model's raw logits (slots,
        tokens) and the MAX_TOP_LOGPROBS most likely tokens' ids and
        log-probabilities (slots, tokens, MAX_TOP_LOGPROBS).
        """
        from keras import ops

        self.traces += 1  # Python side effect: once per trace
        token_ids, positions = ops.cast(token_ids, "int32"), ops.cast(positions, "int32")
        slots, length = token_ids.shape
        top = min(MAX_TOP_LOGPROBS, self.backbone.vocabulary_size)

        def one(i, carry):
            caches, token_ids, positions, outs = carry
            last = ops.take_along_axis(token_ids, positions[:, None], axis=1)
            hidden, caches = forward(self.backbone, last, caches, positions)
            logits = self.backbone.token_embedding(hidden[:, -1, :], reverse=True)
            chosen = ops.cast(sample_next(logits, token_ids, keys, positions + 1, *settings), "int32")
            positions = ops.minimum(positions + 1, length - 1)
            token_ids = ops.where(ops.arange(length)[None, :] == positions[:, None], chosen[:, None], token_ids)
            new = [chosen[:, None]]
            if logprobs:
                scores = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
                best, best_ids = ops.top_k(scores, top)
                new += [ops.take_along_axis(scores, chosen[:, None], axis=1), ops.cast(best_ids, "int32")[:, None],
                        best[:, None]]
            outs = [ops.slice_update(out, (0, i) + (0,) * (len(out.shape) - 2), item) for out, item in zip(outs, new)]
            return caches, token_ids, positions, outs

        outs = [ops.zeros((slots, self.tokens), "int32")]
        if logprobs:
            outs += [ops.zeros((slots, self.tokens), "float32"), ops.zeros((slots, self.tokens, top), "int32"),
                     ops.zeros((slots, self.tokens, top), "float32")]
        if self.tokens == 1:
            caches, _, _, outs = one(0, (caches, token_ids, positions, outs))
        else:
            caches, _, _, outs = ops.fori_loop(0, self.tokens, one, (caches, token_ids, positions, outs))
        return caches, outs

    def _prefill_body(self, caches, slots, prompt_ids):
        """Run prompts (n, bucket) through the model into rows `slots` (n,) of the caches (a slot repeated
        gets the same row written again)."""
        from keras import ops

        self.traces += 1
        backbone = self.backbone
        size = prompt_ids.shape[0]
        fresh = [tuple(ops.zeros((size,) + tuple(k.shape[1:]), k.dtype) for _ in "kv") for k, _ in caches]
        _, fresh = forward(backbone, prompt_ids, fresh, 0)
        out = []
        for (k, v), (fk, fv) in zip(caches, fresh):
            for i in range(size):
                start = (slots[i], 0, 0, 0)
                k = ops.slice_update(k, start, fk[i:i + 1])
                v = ops.slice_update(v, start, fv[i:i + 1])
            out.append((k, v))
        return out

    # Compiled, per backend. --------------------------------------------------------------------
    def step(self, state: _DeviceState, logprobs: bool = False) -> tuple:
        """Run a step: the chosen tokens (slots, tokens), and (chosen logprobs, top ids, top logprobs) or None."""
        self._compile()
        if self.resident:  # the caches are variables, updated in place inside the compiled step
            outs = self._steps[logprobs](state.caches, *state.step_inputs())
        else:
            state.caches, outs = self._steps[logprobs](state.caches, *state.step_inputs())
        outs = [np.asarray(out) for out in outs]
        return outs[0], (tuple(outs[1:]) if logprobs else None)

    def prefill(self, state: _DeviceState, slots: np.ndarray, prompts: np.ndarray) -> None:
        """Prefill `prompts` (n, bucket) into rows `slots` (n,) of the caches."""
        self._compile()
        if self.resident:
            self._prefill(state.caches, slots, prompts)
        else:
            state.caches = self._prefill(state.caches, slots, prompts)

    def resize_caches(self, caches, slots: int, length: int):
        """New zero caches of `slots` rows and `length` positions, or the old ones padded or cut to them."""
        from keras import ops

        backbone = self.backbone
        heads = backbone.num_heads
        shape = (slots, heads, length, backbone.hidden_dim // heads)
        if caches is None:
            caches = [tuple(ops.zeros(shape, backbone.compute_dtype) for _ in "kv") for _ in backbone.transformer_layers]
        else:
            old_slots, _, old, _ = caches[0][0].shape
            pad = [[0, max(slots - old_slots, 0)], [0, 0], [0, max(length - old, 0)], [0, 0]]
            caches = [tuple(ops.pad(ops.convert_to_tensor(c)[:slots, :, :length], pad) for c in kv) for kv in caches]
        if self.resident:
            import tensorflow as tf

            caches = [tuple(tf.Variable(c, trainable=False) for c in kv) for kv in caches]
        return caches

    def _step_with(self, logprobs: bool):
        """The step body with its `logprobs` flag fixed (positional arguments only, as the tracers want)."""
        def step(caches, *args):
            return self._step_body(caches, *args, logprobs=logprobs)

        return step

    def _compile(self) -> None:
        if self._steps is not None:
            return
        import keras

        backend = keras.config.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            self._steps = {flag: _concrete_per_shape(tf.function(_in_place(self._step_with(flag)),
                                                                 jit_compile=self.xla)) for flag in (False, True)}
            self._prefill = _concrete_per_shape(tf.function(
                _in_place(lambda caches, *args: (self._prefill_body(caches, *args), ())), jit_compile=self.xla))
        elif backend == "jax":
            self._steps, self._prefill = self._jax_functions()
        else:
            raise FailedPrecondition(
                f"DecodeEngine runs on the tensorflow and jax Keras backends, not {backend!r}; "
                "set KERAS_BACKEND=tensorflow or jax")

    def _jax_functions(self):
        """`jax.jit` over stateless calls with the weights as arguments; the caches are donated (updated in place)."""
        import jax
        import keras

        from pitchkeras import compile_cache

        compile_cache.apply_to_jax()
        variables = list(self.backbone.variables)

        def stateless(body):
            def run(values, caches, *args):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    return body(caches, *args)

            return jax.jit(run, donate_argnums=(1,))

        def bind(function):
            return lambda caches, *args: function([v.value for v in variables], caches, *args)

        steps = {flag: bind(stateless(self._step_with(flag))) for flag in (False, True)}
        return steps, bind(stateless(self._prefill_body))
