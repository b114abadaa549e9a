"""The cached decode loop: prefill, then one token per step, in `keras.ops` for TensorFlow and JAX.

`DecodeLoop` runs a `keras.ops.while_loop` over the keras-hub GPT-2 layers
with a key cache and a value cache per layer, each (batch, heads, positions,
head_dim), sized prompt bucket + new tokens only, and stops when every row has
produced `<|endoftext|>`. Each decoder block calls the layer's own norms and
projections (so int8-quantized layers run as Keras quantized them) but does
its attention here, on that cache layout: keras-hub's cached attention keeps
one stacked (batch, 2, positions, heads, head_dim) cache per layer, which it
slices, re-stacks and transposes at every step; on GPT-2 124M at batch 8 that
shuffling was 22 of the 67 ms per step (profiled, see BUILD_NOTES.md).
Sampling parameters are tensors, so a new temperature, top-k or top-p never
recompiles; each input shape is traced once: a `tf.function` on TensorFlow
(XLA or a graph per batch shape), `jax.jit` on JAX.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pitchkeras.errors import FailedPrecondition
from pitchkeras.sampling.counter_rng import counter_uniform
from pitchkeras.sampling.selection import ban_repeated_ngrams, penalize_repetition, scaled_probabilities, select_tokens


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


def sample_next(logits, token_ids, keys, index, temperature, top_k, top_p, repetition_penalty,
                no_repeat_ngram_size):
    """The token at `index` per row: logits processors, then temperature, top-k, top-p (transformers' order).

    `index` is a scalar (every row samples the same position) or a (batch,)
    vector; the context of a row is its tokens before `index`, and its random
    number comes from (row key, `index`), so a row's draw never depends on
    its neighbours.
    """
    from keras import ops

    logits = ops.cast(logits, "float32")
    # Each processor runs only when some row asks for it: off, it costs one `any` per step.
    logits = ops.cond(ops.any(repetition_penalty != 1.0),
                      lambda: penalize_repetition(logits, token_ids, index, repetition_penalty), lambda: logits)
    logits = ops.cond(ops.any(no_repeat_ngram_size > 0),
                      lambda: ban_repeated_ngrams(logits, token_ids, index, no_repeat_ngram_size), lambda: logits)
    probabilities = scaled_probabilities(logits, temperature)
    return select_tokens(probabilities, counter_uniform(keys, index), top_k, top_p)


def forward(backbone, token_ids, caches, index):
    """GPT-2 hidden states for `token_ids` at positions `index, index + 1, ...`, and the updated caches.

    The same computation as `GPT2CausalLM.call_with_cache` (embeddings,
    then each `TransformerDecoder` block, then the final norm), with the
    caches as one (keys, values) pair per layer, each (batch, heads,
    positions, head_dim).

    Args:
        backbone: keras_hub GPT2Backbone.
        token_ids: int tensor (batch, length).
        caches: list of (keys, values) per layer.
        index: int tensor. A scalar: every row's first position (`DecodeLoop`);
            or a (batch,) vector: each row's own position, with `length` 1
            (`DecodeEngine`, whose rows are at different positions).
    """
    from keras import ops

    index = ops.convert_to_tensor(index, dtype="int32")
    x = backbone.token_embedding(token_ids)
    if len(index.shape) == 1:
        positions = backbone.position_embedding(x, positions=ops.reshape(index, (-1, 1)))
    else:
        positions = backbone.position_embedding(x, start_index=index)
    x = backbone.embeddings_add((x, positions))
    new_caches = []
    for layer, (keys, values) in zip(backbone.transformer_layers, caches):
        x, keys, values = decoder_block(layer, x, keys, values, index)
        new_caches.append((keys, values))
    return backbone.layer_norm(x), new_caches


def check_gpt2_layers(backbone) -> None:
    """Raise FailedPrecondition unless `backbone` is a GPT-2 backbone whose every block is a pre-norm,
    self-attention-only keras-hub decoder (what `DecodeLoop` runs)."""
    if not hasattr(backbone, "transformer_layers") or not hasattr(backbone, "position_embedding"):
        raise FailedPrecondition(f"{type(backbone).__name__} is not a GPT-2 backbone; Generator needs one")
    for layer in backbone.transformer_layers:
        attention = getattr(layer, "_self_attention_layer", None)
        missing = [name for name in _BLOCK_PARTS if getattr(layer, name, None) is None] + [
            name for name in _ATTENTION_PARTS if getattr(attention, name, None) is None]
        if missing or not getattr(layer, "normalize_first", False) or getattr(layer, "_cross_attention_layer", None):
            raise FailedPrecondition(
                f"{layer.name} is not a pre-norm keras-hub TransformerDecoder without cross-attention "
                f"(missing: {', '.join(missing) or 'none'}); Generator's decode loop needs GPT-2's blocks")


_BLOCK_PARTS = ("_self_attention_layer_norm", "_self_attention_layer", "_feedforward_layer_norm",
                "_feedforward_intermediate_dense", "_feedforward_output_dense")
_ATTENTION_PARTS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_inverse_sqrt_key_dim")
_LARGE_NEGATIVE = -1e9  # a masked logit: exp() of it is 0 in float32 and bfloat16 alike


def decoder_block(layer, x, keys, values, index):
    """One keras-hub GPT-2 `TransformerDecoder` block (pre-norm, no dropout) on a (batch, heads, pos, dim) cache.

    The norms, the q/k/v/output projections and the MLP are the layer's own
    sublayers; the attention is Keras's `dot_product_attention` arithmetic
    (logits in float32 scaled after the dot, masked, softmax, then the
    values) written for this cache layout, with the causal mask of a cached
    decode: position `index + s` sees cache positions `<= index + s`.

    Args:
        layer: keras_hub TransformerDecoder.
        x: tensor (batch, length, hidden). The block's input.
        keys, values: tensors (batch, heads, positions, head_dim). This layer's cache.
        index: int tensor. The position of `x`'s first row in the cache; or a
            (batch,) vector of each row's position when `x` has length 1.

    Returns:
        (output (batch, length, hidden), keys, values) with the new positions written.
    """
    from keras import ops

    attention = layer._self_attention_layer
    residual = x
    h = layer._self_attention_layer_norm(x)
    query = attention._query_dense(h)  # (batch, length, heads, head_dim)
    keys = _write_cache(keys, attention._key_dense(h), index)
    values = _write_cache(values, attention._value_dense(h), index)
    length, positions = query.shape[1], keys.shape[2]
    logits = ops.einsum("bhsd,bhtd->bhst", ops.transpose(query, (0, 2, 1, 3)), keys)
    logits = ops.cast(logits, "float32") * ops.cast(attention._inverse_sqrt_key_dim, "float32")
    if len(index.shape) == 1:  # one query per row, at its own position
        visible = (ops.arange(positions)[None, :] <= ops.reshape(index, (-1, 1)))[:, None, None, :]
    else:
        visible = (ops.arange(positions)[None, :] <= (index + ops.arange(length))[:, None])[None, None]
    logits = ops.where(visible, logits, _LARGE_NEGATIVE)
    probabilities = ops.cast(ops.softmax(logits, axis=-1), values.dtype)
    attended = ops.einsum("bhst,bhtd->bshd", probabilities, values)  # (batch, length, heads, head_dim)
    x = attention._output_dense(attended) + residual
    residual = x
    h = layer._feedforward_layer_norm(x)
    h = layer._feedforward_output_dense(layer._feedforward_intermediate_dense(h))
    return h + residual, keys, values


def _write_cache(cache, new, index):
    """`cache` (batch, heads, positions, head_dim) with `new` (batch, length, heads, head_dim) written at `index`.

    A scalar `index` writes every row's block at the same position; a (batch,)
    vector writes each row's single new position where that row is (a scatter
    of batch x heads vectors, so the rest of the cache is not touched).
    """
    from keras import ops

    new = ops.transpose(new, (0, 2, 1, 3))  # (batch, heads, length, head_dim)
    if len(index.shape) == 0:
        return ops.slice_update(cache, (0, 0, index, 0), new)
    batch, heads, _, head_dim = cache.shape
    rows = ops.repeat(ops.arange(batch, dtype="int32"), heads)
    head = ops.tile(ops.arange(heads, dtype="int32"), [batch])
    where = ops.stack([rows, head, ops.repeat(ops.cast(index, "int32"), heads)], axis=1)
    return ops.scatter_update(cache, where, ops.reshape(new, (batch * heads, head_dim)))
