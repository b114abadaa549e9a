"""The closed-batch decode loop the engine replaced, kept here only to compare against (benchmarks).

A copy of what `pitchkeras.sampling` ran before the decode engine became the
one decode path: `DecodeLoop` (prefill, then a `keras.ops.while_loop` until
every row of a batch has ended, caches sized prompt bucket + new tokens) and
`Generator._complete` (batches sorted by prompt length, each run as long as
its longest row). `closed_generate(generator, requests, ...)` gives the
`Sample`s the old `Generator.generate` gave.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pitchkeras.errors import FailedPrecondition
from pitchkeras.sampling import SamplerConfig, prompt_bucket, row_keys
from pitchkeras.sampling.decode import check_gpt2_layers, forward, sample_next


def closed_generate(generator, requests, *, config=None, max_new_tokens=None) -> list:
    """The old `Generator.generate`: closed batches of `generator.batch_size` rows on `DecodeLoop`."""
    config = (config or SamplerConfig()).validate()
    new_tokens = generator.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    prepared = [generator.prepare(request) for request in requests]
    with generator._lock:
        completions = closed_complete(generator, [p.ids for p in prepared], [int(p.request.seed) for p in prepared],
                                      config, new_tokens)
    return [generator.finish(p, generator.detokenize(c), config) for p, c in zip(prepared, completions)]


def _loop_for(generator) -> "DecodeLoop":
    loop = generator.__dict__.get("_closed_loop")
    if loop is None:
        loop = generator._closed_loop = DecodeLoop(
            generator._backbone, pad_id=generator._pad_id, end_id=generator._end_id,
            stop_at_end_token=generator.stop_at_end_token, uses_xla=generator.uses_xla)
    return loop


def closed_complete(generator, prompts: list[list[int]], seeds: list[int], config, new_tokens: int) -> list[list[int]]:
    """New token ids per prompt (cut at the end token and at `new_tokens`)."""
    # Similar lengths together: fewer wasted prompt positions per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), generator.batch_size):
        rows = order[start:start + generator.batch_size]
        shape = generator._batch_shape(len(rows))
        rows_padded = rows + [rows[0]] * (shape - len(rows))  # copies of row 0 finish with it
        lengths = [len(prompts[i]) for i in rows_padded]
        bucket = min(prompt_bucket(max(lengths), generator.prompt_buckets), generator._max_length - 1)
        total = min(bucket + new_tokens, generator._max_length)
        token_ids = np.full((shape, bucket), generator._pad_id, dtype=np.int32)
        mask = np.zeros((shape, bucket), dtype=bool)
        for r, i in enumerate(rows_padded):
            token_ids[r, : len(prompts[i])] = prompts[i]
            mask[r, : len(prompts[i])] = True
        output = _loop_for(generator)(
            token_ids,
            mask,
            row_keys([seeds[i] for i in rows_padded]),
            np.full((shape,), config.temperature, np.float32),
            np.full((shape,), config.top_k, np.int32),
            np.full((shape,), config.top_p, np.float32),
            np.full((shape,), config.repetition_penalty, np.float32),
            np.full((shape,), config.no_repeat_ngram_size, np.int32),
            total - bucket,
        )
        for r, i in enumerate(rows):
            new = output[r, lengths[r]: lengths[r] + new_tokens].tolist()
            if generator.stop_at_end_token and generator._end_id in new:
                new = new[: new.index(generator._end_id)]
            results[i] = new
    return results


class DecodeLoop:
    """The compiled, cached decode loop over a keras-hub GPT-2 backbone.

    Args:
        backbone: keras_hub GPT2Backbone. Its layers run the loop.
        pad_id: int. The token that pads prompts and the new positions.
        end_id: int. `<|endoftext|>`: a row that draws it is done.
        stop_at_end_token: bool. Stop a row at `end_id` (True); False always
            runs every new position.
        uses_xla: callable. Batch size -> whether the TensorFlow loop is
            XLA-compiled for that shape (see `Generator.jit_compile`).

    Call it with numpy inputs `(prompt_ids, prompt_mask, keys, temperature,
    top_k, top_p, repetition_penalty, no_repeat_ngram_size, new_tokens)`; it
    returns the (batch, bucket + new_tokens) int32 token ids as numpy.
    """

    def __init__(self, backbone, *, pad_id: int, end_id: int, stop_at_end_token: bool,
                 uses_xla: Callable[[int], bool]):
        check_gpt2_layers(backbone)
        self._backbone = backbone
        self._pad_id = int(pad_id)
        self._end_id = int(end_id)
        self.stop_at_end_token = bool(stop_at_end_token)
        self.uses_xla = uses_xla
        self.trace_count = 0  # how many times the loop was traced (= compiled shapes)
        self._function = None  # the compiled loop, built by _compiled()
        self._sample = self._sample_step  # token selection as the loop calls it; _compiled() picks the backend's

    def __call__(self, *args) -> np.ndarray:
        return self._compiled()(*args)

    def _compiled(self):
        """The decode loop compiled for the Keras backend; each input shape is traced (and compiled) once.

        Returns a function of numpy inputs returning a numpy (batch, total) int32 array.
        TensorFlow: a `tf.function` (XLA or graph per batch shape, see `Generator.jit_compile`). JAX:
        `jax.jit` over a stateless call, the weights passed in as arguments (as
        keras-hub's own generate does), so they are not baked in as constants.
        """
        if self._function is None:
            import keras

            backend = keras.config.backend()
            if backend == "tensorflow":
                import tensorflow as tf

                # Token selection is always XLA-compiled: in a graph-mode loop its 31-step
                # bisection would otherwise pay the executor's per-op cost at every step.
                self._sample = tf.function(self._sample_step, jit_compile=True)
                compiled = {xla: tf.function(self._decode_loop, jit_compile=xla, reduce_retracing=False)
                            for xla in (True, False)}

                def run(*args):
                    loop = compiled[self.uses_xla(args[0].shape[0])]
                    return loop(*(tf.constant(a) for a in args[:-1]), args[-1]).numpy()

            elif backend == "jax":
                import jax

                from pitchkeras import compile_cache

                compile_cache.apply_to_jax()

                variables = list(self._backbone.variables)

                def stateless(values, *args):
                    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                        return self._decode_loop(*args)

                compiled = jax.jit(stateless, static_argnums=(9,))

                def run(*args):
                    return np.asarray(compiled([v.value for v in variables], *args))

            else:
                raise FailedPrecondition(
                    f"Generator runs on the tensorflow and jax Keras backends, not {backend!r}; "
                    "set KERAS_BACKEND=tensorflow or jax")
            self._function = run
        return self._function

    def _decode_loop(self, prompt_ids, prompt_mask, keys, temperature, top_k, top_p, repetition_penalty,
                     no_repeat_ngram_size, new_tokens: int):
        """Prefill the caches with the prompt bucket, then sample until every row has ended.

        Written in `keras.ops`, so one loop serves the TensorFlow and JAX backends.
        """
        from keras import ops

        self.trace_count += 1  # Python side effect: runs once per trace, not per call
        backbone = self._backbone
        batch, bucket = prompt_ids.shape  # static: each shape is its own trace
        total = bucket + new_tokens
        token_ids = ops.pad(prompt_ids, [[0, 0], [0, new_tokens]], constant_values=self._pad_id)
        mask = ops.pad(ops.cast(prompt_mask, "int32"), [[0, 0], [0, new_tokens]], constant_values=0)
        heads = backbone.num_heads
        head_dim = backbone.hidden_dim // heads
        caches = [
            tuple(ops.zeros([batch, heads, total, head_dim], dtype=backbone.compute_dtype) for _ in "kv")
            for _ in backbone.transformer_layers
        ]
        # Prefill: one pass over the whole bucket fills every layer's cache
        # (no logits: the loop recomputes the last prompt position itself).
        _, caches = self._forward(prompt_ids, caches, 0)
        start = ops.min(ops.sum(mask, axis=-1))  # the shortest prompt: sampling starts there

        def column(tensor, index):
            return ops.slice(tensor, (0, index), (batch, 1))

        def cond(index, token_ids, caches, done):
            return ops.logical_and(index < total, ops.logical_not(ops.all(done)))

        def body(index, token_ids, caches, done):
            hidden, caches = self._forward(column(token_ids, index - 1), caches, index - 1)
            logits = backbone.token_embedding(hidden[:, -1, :], reverse=True)
            chosen = self._sample(logits, token_ids, keys, index, temperature, top_k, top_p, repetition_penalty,
                                  no_repeat_ngram_size)
            chosen = ops.reshape(chosen, (batch,))
            in_prompt = column(mask, index)[:, 0] > 0
            chosen = ops.where(in_prompt, column(token_ids, index)[:, 0], ops.cast(chosen, token_ids.dtype))
            token_ids = ops.slice_update(token_ids, (0, index), chosen[:, None])
            if self.stop_at_end_token:
                done = ops.logical_or(done, ops.logical_and(ops.logical_not(in_prompt), chosen == self._end_id))
            return index + 1, token_ids, caches, done

        _, token_ids, _, _ = ops.while_loop(
            cond, body, (start, token_ids, caches, ops.zeros([batch], "bool")),
            maximum_iterations=total,
        )
        return token_ids

    def _sample_step(self, *args):
        return sample_next(*args)

    def _forward(self, token_ids, caches, index):
        return forward(self._backbone, token_ids, caches, index)
