"""The cached GPT-2 forward pass and token draw the decode engine compiles, in `keras.ops` for TensorFlow and JAX.

`forward` runs the keras-hub GPT-2 layers with a key cache and a value cache
per layer, each (batch, heads, positions, head_dim); `sample_next` draws the
next token per row. Each decoder block calls the layer's own norms and
projections (so int8-quantized layers run as Keras quantized them) but does
its attention here, on that cache layout: keras-hub's cached attention keeps
one stacked (batch, 2, positions, heads, head_dim) cache per layer, which it
slices, re-stacks and transposes at every step, a large share of a step's time
(profiled: BUILD_NOTES.md, "The decode loop at the matmul floor").
Sampling parameters are tensors, so a new temperature, top-k or top-p never
recompiles.
"""

from __future__ import annotations

from pitchkeras.errors import FailedPrecondition
from pitchkeras.sampling.counter_rng import counter_uniform
from pitchkeras.sampling.selection import ban_repeated_ngrams, penalize_repetition, scaled_probabilities, select_tokens


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


def forward(backbone, token_ids, caches, index, projections=None):
    """GPT-2 hidden states for `token_ids` at positions `index, index + 1, ...`, and the updated caches.

    The same computation as `GPT2CausalLM.call_with_cache` (embeddings,
    then each `TransformerDecoder` block, then the final norm), with the
    caches as one (keys, values) pair per layer, each (batch, heads,
    positions, head_dim).

    Args:
        backbone: keras_hub GPT2Backbone.
        token_ids: int tensor (batch, length).
        caches: list of (keys, values) per layer.
        index: int tensor. A scalar: every row's first position (a prefill);
            or a (batch,) vector: each row's own position, with `length` 1
            (`DecodeEngine`, whose rows are at different positions).
        projections: None, or per layer the (query, key, value) kernels as
            (hidden, heads * head_dim) tensors (`flat_projections`): the
            q/k/v products then run on them instead of the layers' calls.
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
    projections = projections or [None] * len(caches)
    for layer, (keys, values), flat in zip(backbone.transformer_layers, caches, projections):
        x, keys, values = decoder_block(layer, x, keys, values, index, flat)
        new_caches.append((keys, values))
    return backbone.layer_norm(x), new_caches


def check_gpt2_layers(backbone) -> None:
    """Raise FailedPrecondition unless `backbone` is a GPT-2 backbone whose every block is a pre-norm,
    self-attention-only keras-hub decoder (what `forward` runs)."""
    if not hasattr(backbone, "transformer_layers") or not hasattr(backbone, "position_embedding"):
        raise FailedPrecondition(f"{type(backbone).__name__} is not a GPT-2 backbone; Generator needs one")
    for layer in backbone.transformer_layers:
        attention = getattr(layer, "_self_attention_layer", None)
        missing = [name for name in _BLOCK_PARTS if getattr(layer, name, None) is None] + [
            name for name in _ATTENTION_PARTS if getattr(attention, name, None) is None]
        if missing or not getattr(layer, "normalize_first", False) or getattr(layer, "_cross_attention_layer", None):
            raise FailedPrecondition(
                f"{layer.name} is not a pre-norm keras-hub TransformerDecoder without cross-attention "
                f"(missing: {', '.join(missing) or 'none'}); the decode engine needs GPT-2's blocks")


_BLOCK_PARTS = ("_self_attention_layer_norm", "_self_attention_layer", "_feedforward_layer_norm",
                "_feedforward_intermediate_dense", "_feedforward_output_dense")
_ATTENTION_PARTS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_inverse_sqrt_key_dim")
_LARGE_NEGATIVE = -1e9  # a masked logit: exp() of it is 0 in float32 and bfloat16 alike


def flat_projections(backbone):
    """Each block's query, key and value kernels as (hidden, heads * head_dim) tensors, or None where that does
    not apply (a backend other than TensorFlow; a quantized or LoRA layer, or one computing in another dtype than
    its kernel's: those run the layer's own call).

    On XLA's CPU backend a one-row product whose (hidden, heads, head_dim)
    kernel is reshaped inside the program is fused with that reshape into an
    elemental loop on one thread, while a product on a kernel that is already
    2-D is a library call, several times faster (measured: BUILD_NOTES.md,
    "Ninth pass"). TensorFlow's reshape of a variable's value outside the
    program shares its buffer, so these are views, read from the weights at
    every call (never stale), not copies.
    """
    import keras

    if keras.config.backend() != "tensorflow":
        return None
    import tensorflow as tf

    out = []
    for layer in backbone.transformer_layers:
        attention = layer._self_attention_layer
        denses = (attention._query_dense, attention._key_dense, attention._value_dense)
        if any(getattr(d, "quantization_mode", None) or getattr(d, "lora_enabled", False)
               or len(d.kernel.shape) != 3 or d.compute_dtype != d.kernel.dtype for d in denses):
            return None
        out.append(tuple(tf.reshape(d.kernel.value, (d.kernel.shape[0], -1)) for d in denses))
    return out


def _project(dense, flat, h):
    """`dense(h)` for a (hidden, heads, head_dim) `EinsumDense` through its kernel's 2-D view `flat`."""
    from keras import ops

    out = ops.matmul(ops.reshape(h, (-1, flat.shape[0])), flat)
    if dense.bias is not None:
        out = out + ops.reshape(dense.bias, (-1,))
    return ops.reshape(out, tuple(h.shape[:-1]) + tuple(dense.kernel.shape[1:]))


def decoder_block(layer, x, keys, values, index, projections=None):
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
        projections: None, or this layer's (query, key, value) kernels as 2-D
            tensors (`flat_projections`), used instead of its q/k/v calls.

    Returns:
        (output (batch, length, hidden), keys, values) with the new positions written.
    """
    from keras import ops

    attention = layer._self_attention_layer
    residual = x
    h = layer._self_attention_layer_norm(x)
    denses = (attention._query_dense, attention._key_dense, attention._value_dense)
    if projections is None:
        query, key, value = (dense(h) for dense in denses)  # each (batch, length, heads, head_dim)
    else:
        query, key, value = (_project(dense, flat, h) for dense, flat in zip(denses, projections))
    keys = _write_cache(keys, key, index)
    values = _write_cache(values, value, index)
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
