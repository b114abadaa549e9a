"""The engine's compiled programs and the state they run on: `_Program` (step and prefill/insert, per shape, on
TensorFlow or JAX) and `_DeviceState` (the caches and the per-row arrays, resident on the device)."""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from pitchkeras.errors import FailedPrecondition
from pitchkeras.sampling.config import MAX_TOP_LOGPROBS, SamplerConfig
from pitchkeras.sampling.counter_rng import row_keys
from pitchkeras.sampling.decode import flat_projections, forward, sample_next


_PROGRAMS_ATTRIBUTE = "_pitchkeras_engine_programs"


def _program_for(generator, slots: int) -> "_Program":
    """The compiled programs an engine of `slots` rows runs on this generator's model, shared by every engine
    and every `Generator` on the same backbone: a second Generator on a loaded model (another length, batch
    size, post-processing, tokens per call or end-token setting) compiles no shape the first one compiled.

    They live on the backbone object itself (not in a module-level table), so dropping the model frees them
    with it. The key holds the backbone's variables, so a model whose layers were replaced since (quantized in
    place) gets programs of its own, never ones traced on the old weights. The end token is an argument of the
    step, not part of the program, and the prefill does not depend on the tokens per call: engines that differ
    only in those share every prefill, and every step of the same tokens per call.
    """
    backbone = generator._backbone
    xla = generator.uses_xla(slots)
    weights = tuple(id(v) for v in backbone.variables)
    key = (xla, generator._pad_id, weights)  # the shapes (rows, length) and tokens per call key the traces
    programs = backbone.__dict__.setdefault(_PROGRAMS_ATTRIBUTE, {})
    if key not in programs:
        programs[key] = _Program(backbone, xla=xla, pad_id=generator._pad_id)
    return programs[key]


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

    def call(caches, arrays, *args):
        tensors = [tf.constant(a) for a in args]
        key = (tuple(caches[0][0].shape),) + tuple(tuple(t.shape) for t in tensors)
        if key not in concrete:
            concrete[key] = function.get_concrete_function(caches, arrays, *tensors)
        return concrete[key](caches, arrays, *tensors)

    call.function = function  # for its compiler IR (`_Program.step_ir`)
    return call


def _in_place(body):
    """A TensorFlow program over resident variables: `body(caches, arrays, *args)` (the variables' values)
    returns (new caches, new arrays, result); every new value that is not the value read is assigned to its
    variable inside the same compiled function (XLA aliases them: no copy per call), and the result is
    returned."""
    def run(caches, arrays, *args):
        cache_values = [(k.value(), v.value()) for k, v in caches]
        array_values = tuple(a.value() for a in arrays)
        new_caches, new_arrays, result = body(cache_values, array_values, *args)
        for (k, v), (new_k, new_v) in zip(caches, new_caches):
            k.assign(new_k)
            v.assign(new_v)
        for variable, old, new in zip(arrays, array_values, new_arrays):
            if new is not old:
                variable.assign(new)
        return result

    return run


# The decode state's per-row arrays, resident on the device beside the caches (in this order), with the value
# a free row holds. token_ids is (rows, length); the others (rows,) but keys (rows, 2). The sampler's per-token
# settings come from its one table (`SamplerConfig.token_options()`): a new setting needs no edit here.
_SETTINGS = SamplerConfig.token_options()
ARRAYS = ("token_ids", "positions", "limits", "keys") + tuple(option.name for option in _SETTINGS)
_DTYPES = (np.int32, np.int32, np.int32, np.uint32) + tuple(np.dtype(option.dtype) for option in _SETTINGS)
_NEUTRAL = (None, 0, 0, 0) + tuple(option.neutral for option in _SETTINGS)  # token_ids: the pad id


class _DeviceState:
    """The engine's decode state: the caches and the per-row arrays (`ARRAYS`: token buffer, positions,
    limits, RNG keys, sampler settings), resident on the device for the first `rows` slots between calls.

    The host writes a request's row once, when it joins: `reset_row` stages its values and the next
    `_Program.prefill` sends them with the prompts and inserts them into the row on the device. `active` (host
    side, one flag per slot) says which rows hold a request; a step passes it along (a free row's settings are
    neutralised on the device, and its tokens ignored). `done` flags live in the step's device-side loop.
    """

    def __init__(self, slots: int, pad_id: int):
        self.slots, self.pad_id = slots, pad_id
        self.rows = 0  # slots the device state holds (the row bucket)
        self.length = 0  # cache positions; 0 = nothing allocated
        self.caches = None  # [(keys, values)] per layer: tf.Variables (TensorFlow) or arrays (JAX)
        self.arrays = None  # ARRAYS, the same kind
        self.active = np.zeros((slots,), bool)
        # A joining request's row, staged on the host until its prefill inserts it (rows, not the token buffer).
        self.staged = [np.full((slots,) + ((2,) if name == "keys" else ()), _NEUTRAL[i], _DTYPES[i])
                       for i, name in enumerate(ARRAYS) if i > 0]

    def reset_row(self, slot: int, ids: list, seed: int, config: SamplerConfig,
                  limit: Optional[int] = None) -> None:
        """Stage a joining request's row: its last prompt position, position limit (the row is done on the device
        once its next position would reach it; None: never, the host ends it), key and settings (the next
        `prefill` into `slot` inserts them)."""
        limit = np.iinfo(np.int32).max if limit is None else limit
        values = (len(ids) - 1, limit, row_keys([seed])[0]) + tuple(getattr(config, o.name) for o in _SETTINGS)
        for array, value in zip(self.staged, values):
            array[slot] = value
        self.active[slot] = True

    def clear_row(self, slot: int) -> None:
        """The row is free: the next step neutralises its settings and ignores its tokens."""
        self.active[slot] = False

    def resize(self, rows: int, length: int, program: "_Program") -> None:
        """Pad or cut the device state to `rows` slots (those cut are free) and `length` positions."""
        self.caches = program.resize_caches(self.caches, rows, length)
        self.arrays = program.make_arrays(self._host_arrays(rows, length))
        self.rows, self.length = rows, length

    def _host_arrays(self, rows: int, length: int) -> list:
        """The per-row arrays as numpy, read back from the device (when held) and padded or cut to the shape."""
        out = []
        for i, name in enumerate(ARRAYS):
            shape = (rows,) + ((length,) if name == "token_ids" else (2,) if name == "keys" else ())
            array = np.full(shape, self.pad_id if i == 0 else _NEUTRAL[i], _DTYPES[i])
            if self.arrays is not None:
                old = np.asarray(self.arrays[i])[:rows]
                out_view = array[: old.shape[0]]
                if name == "token_ids":
                    keep = min(old.shape[1], length)
                    out_view[:, :keep] = old[:, :keep]
                else:
                    out_view[...] = old
            out.append(array)
        return out

    def release(self) -> None:
        """Drop the device state while idle: the next request allocates the rows and length it needs."""
        self.caches = self.arrays = None
        self.rows = self.length = 0

    def fresh(self) -> "_DeviceState":
        """A throwaway state of the same slots (compiling a shape off the engine thread never touches this one)."""
        return _DeviceState(self.slots, self.pad_id)


class _Program:
    """The engine's compiled programs, one per shape, on TensorFlow or JAX: `step` (up to `tokens` tokens for
    every row, in a device-side loop; one program per tokens per call) and `prefill` (prompts into rows, with
    their settings: the insert)."""

    def __init__(self, backbone, *, xla: bool, pad_id: int = 0):
        import keras

        self.backbone = backbone
        self.xla = xla
        # TensorFlow: the state is `tf.Variable`s read and assigned inside the compiled programs, so XLA updates
        # them in place (aliased) instead of copying them in and out of each call. JAX donates them.
        self.resident = keras.config.backend() == "tensorflow"
        self.pad_id = pad_id
        self.traces = 0  # programs traced (= compiled shapes)
        self._steps: dict = {}  # (tokens per call, logprobs) -> step
        self._prefill = None
        self._lock = threading.Lock()  # an engine compiles off its thread while its own thread steps

    # The traced bodies, in keras.ops. -------------------------------------------------------
    def _step_body(self, caches, arrays, active, waiting, end_id, *flat, tokens: int, logprobs: bool = False):
        """Up to `tokens` decode steps for every row: new caches, new arrays, and (tokens (rows, tokens),
        [scores,] steps run).

        Each step feeds every row's last token at its own position and draws
        the next into its token buffer. A row is done once it draws `end_id`
        (a scalar; < 0: none) or reaches its limit; it then stays where it is (its later
        columns are to be ignored). The loop ends after `tokens` steps, or
        early once `waiting` (> 0) rows are done: requests wait for their slots. With
        `logprobs`, also each chosen token's log-probability under the model's
        raw logits (rows, tokens) and the MAX_TOP_LOGPROBS most likely tokens'
        ids and log-probabilities (rows, tokens, MAX_TOP_LOGPROBS). `flat`: empty, or every layer's
        query, key and value kernels as 2-D tensors (`flat_projections`), in order.
        """
        from keras import ops

        self.traces += 1  # Python side effect: once per trace
        token_ids, positions, limits, keys, *settings = arrays
        rows, length = token_ids.shape
        top = min(MAX_TOP_LOGPROBS, self.backbone.vocabulary_size)
        active = ops.cast(active, "bool")
        # A free row never switches a processor on for the others.
        settings = [ops.where(active, value, ops.cast(neutral, value.dtype))
                    for value, neutral in zip(settings, _NEUTRAL[4:])]
        named = {option.name: value for option, value in zip(_SETTINGS, settings)}  # sample_next's keywords
        columns = ops.arange(length, dtype="int32")[None, :]
        projections = [flat[i:i + 3] for i in range(0, len(flat), 3)] if flat else None

        def one(i, caches, token_ids, positions, last, done, outs):
            hidden, caches = forward(self.backbone, last, caches, positions, projections)
            logits = self.backbone.token_embedding(hidden[:, -1, :], reverse=True)
            chosen = ops.cast(sample_next(logits, token_ids, keys, positions + 1, **named), "int32")
            moving = ops.logical_not(done)
            positions = ops.where(moving, ops.minimum(positions + 1, length - 1), positions)
            token_ids = ops.where(ops.logical_and(columns == positions[:, None], moving[:, None]),
                                  chosen[:, None], token_ids)
            ended = ops.logical_or(positions + 1 >= limits, chosen == end_id)  # a token id is never < 0
            done = ops.logical_or(done, ended)
            new = [chosen[:, None]]
            if logprobs:
                scores = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
                best, best_ids = ops.top_k(scores, top)
                new += [ops.take_along_axis(scores, chosen[:, None], axis=1), ops.cast(best_ids, "int32")[:, None],
                        best[:, None]]
            outs = [ops.slice_update(out, (0, i) + (0,) * (len(out.shape) - 2), item) for out, item in zip(outs, new)]
            return i + 1, caches, token_ids, positions, ops.where(moving, chosen, last[:, 0])[:, None], done, outs

        outs = [ops.zeros((rows, tokens), "int32")]
        if logprobs:
            outs += [ops.zeros((rows, tokens), "float32"), ops.zeros((rows, tokens, top), "int32"),
                     ops.zeros((rows, tokens, top), "float32")]
        last = ops.take_along_axis(token_ids, positions[:, None], axis=1)
        carry = (ops.zeros((), "int32"), caches, token_ids, positions, last, ops.logical_not(active), outs)
        waiting = ops.cast(waiting, "int32")
        end_id = ops.cast(end_id, "int32")
        if tokens == 1:
            carry = one(*carry)
        else:
            def more(i, caches, token_ids, positions, last, done, outs):
                # Go on unless `waiting` rows (> 0) have finished since the call began: requests wait for them.
                finished = ops.sum(ops.cast(ops.logical_and(done, active), "int32"))
                joinable = ops.logical_and(waiting > 0, finished >= waiting)
                return ops.logical_and(i < tokens, ops.logical_not(joinable))

            carry = ops.while_loop(more, one, carry)
        steps, caches, token_ids, positions, _, _, outs = carry
        new_arrays = (token_ids, positions) + tuple(arrays[2:])
        return caches, new_arrays, tuple(outs) + (steps,)

    def _prefill_body(self, caches, arrays, slots, prompt_ids, *rows):
        """Run prompts (n, bucket) through the model into rows `slots` (n,) of the caches and insert each
        request's row: its prompt in the token buffer and its values (`rows`: ARRAYS but the token buffer,
        each (n, ...)) in the other arrays. A slot repeated gets the same row written again."""
        from keras import ops

        self.traces += 1
        backbone = self.backbone
        size, bucket = prompt_ids.shape
        token_ids = arrays[0]
        # The prompts' own caches are as long as their bucket (the attention runs over it alone), then written
        # into the first `bucket` positions of their rows.
        fresh = [tuple(ops.zeros((size, k.shape[1], bucket, k.shape[3]), k.dtype) for _ in "kv") for k, _ in caches]
        _, fresh = forward(backbone, prompt_ids, fresh, 0)
        out = []
        for (k, v), (fk, fv) in zip(caches, fresh):
            for i in range(size):
                start = (slots[i], 0, 0, 0)
                k = ops.slice_update(k, start, fk[i:i + 1])
                v = ops.slice_update(v, start, fv[i:i + 1])
            out.append((k, v))
        padded = ops.pad(ops.cast(prompt_ids, "int32"), [[0, 0], [0, token_ids.shape[1] - bucket]],
                         constant_values=self.pad_id)
        for i in range(size):
            token_ids = ops.slice_update(token_ids, (slots[i], 0), padded[i:i + 1])
        where = ops.reshape(ops.cast(slots, "int32"), (-1, 1))
        inserted = [ops.scatter_update(array, where, ops.cast(values, array.dtype))
                    for array, values in zip(arrays[1:], rows)]
        return out, (token_ids,) + tuple(inserted), ()

    # Compiled, per backend. --------------------------------------------------------------------
    def step(self, state: _DeviceState, logprobs: bool = False, waiting: int = 0, *, tokens: int = 1,
             end_id: int = -1) -> tuple:
        """Run a step call: the chosen tokens (rows, n) of the n steps it ran (1 <= n <= `tokens`; fewer once
        `waiting` rows (> 0) have finished: requests wait for their slots), and (chosen logprobs, top ids, top
        logprobs), each cut to n steps, or None. A row that draws `end_id` (< 0: none) is done."""
        step = self._step_function(int(tokens), bool(logprobs))
        args = (state.active[: state.rows], np.asarray(waiting, np.int32), np.asarray(end_id, np.int32),
                *self._flat(state.rows))
        if self.resident:
            outs = step(state.caches, state.arrays, *args)
        else:
            state.caches, state.arrays, outs = step(state.caches, state.arrays, *args)
        steps = int(outs[-1])
        outs = [np.asarray(out)[:, :steps] for out in outs[:-1]]
        return outs[0], (tuple(outs[1:]) if logprobs else None)

    def step_ir(self, state: _DeviceState, *, tokens: int = 1, logprobs: bool = False,
                stage: str = "optimized_hlo") -> str:
        """The step's compiler IR for `state`'s shape (TensorFlow with XLA): where the proof is read that XLA
        updates the decode state in place (`input_output_alias`) instead of copying it (tests/test_engine.py)."""
        import keras

        if keras.config.backend() != "tensorflow" or not self.xla:
            raise FailedPrecondition("step_ir reads XLA's IR of a TensorFlow program; this one is not")
        import tensorflow as tf

        step = self._step_function(int(tokens), bool(logprobs))
        args = [tf.constant(a) for a in (state.active[: state.rows], np.int32(0), np.int32(-1), *self._flat(state.rows))]
        return step.function.experimental_get_compiler_ir(state.caches, state.arrays, *args)(stage=stage)

    def prefill(self, state: _DeviceState, slots: np.ndarray, prompts: np.ndarray) -> None:
        """Prefill `prompts` (n, bucket) into rows `slots` (n,) and insert the rows `reset_row` staged there."""
        if self._prefill is None:
            with self._lock:
                if self._prefill is None:
                    self._prefill = self._compiled(self._prefill_body)
        slots = np.asarray(slots, np.int32)
        rows = [array[slots] for array in state.staged]
        if self.resident:
            self._prefill(state.caches, state.arrays, slots, prompts, *rows)
        else:
            state.caches, state.arrays, _ = self._prefill(state.caches, state.arrays, slots, prompts, *rows)

    def compile(self, state: _DeviceState, rows: int, length: int, prompt_bucket: int,
                group_sizes=(1,), logprobs=(False,), tokens: int = 1) -> None:
        """Compile (and run once, on throwaway arrays) the prefills of `group_sizes` prompts of `prompt_bucket`
        tokens and the steps of `tokens` per call for `rows` rows and `length` positions, on `state.fresh()`:
        safe from another thread while the engine steps `state` (nothing of it is touched)."""
        scratch = state.fresh()
        scratch.resize(rows, length, self)
        for size in group_sizes:
            self.prefill(scratch, np.zeros((size,), np.int32), np.full((size, prompt_bucket), self.pad_id, np.int32))
        for flag in logprobs:
            self.step(scratch, flag, tokens=tokens)
        scratch.release()

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
        return [tuple(self._resident(c) for c in kv) for kv in caches]

    def make_arrays(self, host: list) -> tuple:
        """The per-row arrays on the device from numpy (`ARRAYS` order)."""
        from keras import ops

        return tuple(self._resident(ops.convert_to_tensor(a)) for a in host)

    def _resident(self, value):
        if self.resident:
            import tensorflow as tf

            return tf.Variable(value, trainable=False)
        return value

    def _flat(self, rows: int) -> list:
        """The q/k/v kernels as 2-D views for a one-row step on TensorFlow with XLA (`flat_projections`), read
        from the weights at every call; empty where they do not apply. Only a one-row product is fused with its
        kernel's reshape; steps of more rows keep the layers' own calls."""
        projections = flat_projections(self.backbone) if self.xla and rows == 1 else None
        return [kernel for layer in projections or () for kernel in layer]

    def _step_function(self, tokens: int, logprobs: bool):
        """The compiled step of `tokens` per call with its `logprobs` flag, made on first use."""
        key = (tokens, logprobs)
        if key not in self._steps:
            with self._lock:
                if key not in self._steps:
                    def step(caches, arrays, *args):  # positional arguments only, as the tracers want
                        return self._step_body(caches, arrays, *args, tokens=tokens, logprobs=logprobs)

                    self._steps[key] = self._compiled(step)
        return self._steps[key]

    def _compiled(self, body):
        """`body(caches, arrays, *args)` compiled for this backend: on TensorFlow a `jit_compile` function over
        the resident variables (`_in_place`); on JAX `jax.jit` over a stateless call with the weights as
        arguments and the decode state (caches and arrays) donated (updated in place)."""
        import keras

        backend = keras.config.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            return _concrete_per_shape(tf.function(_in_place(body), autograph=False, jit_compile=self.xla))
        if backend != "jax":
            raise FailedPrecondition(
                f"DecodeEngine runs on the tensorflow and jax Keras backends, not {backend!r}; "
                "set KERAS_BACKEND=tensorflow or jax")
        import jax

        from pitchkeras import compile_cache

        compile_cache.apply_to_jax()
        variables = list(self.backbone.variables)

        def run(values, caches, arrays, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return body(caches, arrays, *args)

        function = jax.jit(run, donate_argnums=(1, 2))
        return lambda caches, arrays, *args: function([v.value for v in variables], caches, arrays, *args)
