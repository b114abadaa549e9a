"""Token selection in `keras.ops`: temperature, top-k, top-p and the repetition processors.

Everything here is shape-polymorphic and backend-neutral, traced inside the
decode loop. Nucleus and top-k selection find their probability threshold by
bisection on the float bit pattern (exact, 31 vectorised passes) instead of
sorting the vocabulary at every step, then sample by inverse CDF with one
uniform number per row.
"""

from __future__ import annotations

_BIT_SEARCH_STEPS = 31  # bisection steps over float32 bit patterns of [0, 1] (< 2**30 + 1 values): exact


def scaled_probabilities(logits, temperature):
    """Softmax of `logits / temperature` in float32 (temperature per row).

    Args:
        logits: tensor (batch, vocab), any float dtype.
        temperature: float32 tensor (batch,).
    """
    from keras import ops

    temperature = ops.convert_to_tensor(temperature, dtype="float32")
    return ops.softmax(ops.cast(logits, "float32") / temperature[:, None], axis=-1)


def _smallest_bits(predicate, upper_bits):
    """Smallest non-negative float32 bit pattern b <= upper_bits with predicate(b) true, per row.

    `predicate` must be monotone (false then true) in b, and true at
    `upper_bits`. Positive floats order like their bit patterns, so 31
    bisection steps over int32 find the exact threshold, no sort needed.
    """
    from keras import ops

    lo = ops.full_like(upper_bits, -1)  # predicate false (conceptually)
    hi = upper_bits  # predicate true

    def body(i, bounds):
        lo, hi = bounds
        # Rounding up keeps mid in (lo, hi]: never -1 (a NaN bit pattern), and
        # a converged pair (hi = lo + 1) stays put.
        mid = lo + (hi - lo + 1) // 2
        ok = predicate(mid)
        return ops.where(ok, lo, mid), ops.where(ok, mid, hi)

    _, hi = ops.fori_loop(0, _BIT_SEARCH_STEPS, body, (lo, hi))
    return hi


def select_tokens(probabilities, uniform, top_k, top_p):
    """Draw one token per row from `probabilities` under top-k and top-p, exactly.

    Keeps token i when fewer than `top_k` tokens are strictly more likely
    (`top_k` 0 = all), and when the mass of tokens strictly more likely than
    it is below `top_p` (so the token that crosses `top_p` is kept, as in
    keras-hub's `TopPSampler`; `top_p` 1 = all). Then draws by inverse CDF
    over the kept tokens with one uniform number per row. With fixed inputs
    the result is exact: a token outside the kept set is never returned.
    Written in `keras.ops`, so it runs on every Keras backend.

    Args:
        probabilities: float32 tensor (batch, vocab).
        uniform: float32 tensor (batch,) in [0, 1).
        top_k: int32 tensor (batch,).
        top_p: float32 tensor (batch,).

    Returns:
        int32 tensor (batch,): the chosen token ids.
    """
    from keras import ops

    probabilities = ops.cast(probabilities, "float32")
    uniform = ops.convert_to_tensor(uniform, dtype="float32")
    top_k = ops.convert_to_tensor(top_k, dtype="int32")
    top_p = ops.convert_to_tensor(top_p, dtype="float32")
    bits = ops.view(probabilities, "int32")
    max_bits = ops.max(bits, axis=-1)

    def threshold(bits_value):
        return ops.view(bits_value, "float32")[:, None]

    # Nucleus: smallest t with mass(p > t) < top_p; keep p >= t.
    def nucleus_ok(b):
        above = ops.sum(ops.where(probabilities > threshold(b), probabilities, 0.0), axis=-1)
        return above < top_p

    # Top-k: smallest t with count(p > t) < k; keep p >= t.
    def top_k_ok(b):
        count = ops.sum(ops.cast(probabilities > threshold(b), "int32"), axis=-1)
        return count < top_k

    use_p = (top_p < 1.0)[:, None]
    use_k = top_k > 0
    keep_p = probabilities >= threshold(_smallest_bits(nucleus_ok, max_bits))
    keep = ops.logical_or(ops.logical_not(use_p), keep_p)
    # Skip the top-k search when no row asks for it (the common case).
    keep_k = ops.cond(
        ops.any(use_k),
        lambda: probabilities >= threshold(_smallest_bits(top_k_ok, max_bits)),
        lambda: ops.ones_like(keep),
    )
    keep = ops.logical_and(keep, ops.logical_or(ops.logical_not(use_k[:, None]), keep_k))
    weights = ops.where(keep, probabilities, 0.0)
    cumulative = ops.cumsum(weights, axis=-1)
    target = uniform[:, None] * cumulative[:, -1:]
    # The first position whose cumulative mass passes the target; zero-weight
    # (dropped) tokens never pass it because the cumulative sum is flat there.
    chosen = ops.sum(ops.cast(cumulative <= target, "int32"), axis=-1)
    return ops.minimum(chosen, ops.shape(probabilities)[-1] - 1)


def token_mask(token_ids, selected, vocabulary_size: int):
    """Which tokens occur at the selected positions of each row: a bool tensor (batch, vocabulary_size).

    Args:
        token_ids: int tensor (batch, total). Each row's tokens.
        selected: bool tensor broadcastable to (batch, total). The positions that count.
        vocabulary_size: int. The logits' last dimension.
    """
    from keras import ops

    token_ids = ops.cast(token_ids, "int32")
    batch, total = ops.shape(token_ids)
    rows = ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None], (batch, total))
    selected = ops.broadcast_to(ops.cast(selected, "int32"), (batch, total))
    indices = ops.reshape(ops.stack([rows, token_ids], axis=-1), (batch * total, 2))
    # scatter adds duplicates up (tf.scatter_nd, jax .at[].add): a count per token. No (batch, total,
    # vocabulary) one-hot, which would be 50257 times the sequence.
    counts = ops.scatter(indices, ops.reshape(selected, (batch * total,)), (batch, vocabulary_size))
    return counts > 0


def context_tokens(token_ids, length, vocabulary_size: int):
    """Which tokens occur in each row's context, positions `[0, length)`: bool (batch, vocabulary_size).

    `length` is a scalar (every row) or a (batch,) vector (each row its own).
    """
    from keras import ops

    total = ops.shape(token_ids)[1]
    length = ops.reshape(ops.cast(length, "int32"), (-1, 1))  # one length for all rows, or one per row
    return token_mask(token_ids, ops.arange(total, dtype="int32")[None, :] < length, vocabulary_size)


def penalize_repetition(logits, token_ids, length, penalty):
    """CTRL's repetition penalty on the tokens of each row's context, exactly as transformers applies it.

    transformers' `RepetitionPenaltyLogitsProcessor`: a token already in the
    context has its logit divided by `penalty` when positive and multiplied
    by it when negative (so it always becomes less likely for penalty > 1).

    Args:
        logits: float tensor (batch, vocab).
        token_ids: int tensor (batch, total).
        length: int tensor, a scalar or (batch,). Positions `[0, length)` of each row are its context.
        penalty: float32 tensor (batch,). 1 leaves a row unchanged.

    Returns:
        float32 logits (batch, vocab).
    """
    from keras import ops

    logits = ops.cast(logits, "float32")
    penalty = ops.convert_to_tensor(penalty, dtype="float32")[:, None]
    seen = context_tokens(token_ids, length, ops.shape(logits)[-1])
    # The penalty per token, 1 for unseen ones: not a plain broadcast, so XLA cannot turn the
    # division into a multiplication by 1/penalty, which rounds differently from transformers'.
    factor = ops.where(seen, penalty, 1.0)
    return ops.where(logits < 0, logits * factor, logits / factor)


def ban_repeated_ngrams(logits, token_ids, length, ngram_size):
    """Set to -inf the logit of every token that would repeat an n-gram of the context.

    transformers' `NoRepeatNGramLogitsProcessor`: with n = `ngram_size`, the
    next token t is banned when the last n - 1 context tokens followed by t
    already occur as n consecutive context tokens. No sort or hash table:
    for each earlier position p, the n - 1 tokens before it are compared with
    the last n - 1 tokens of the context, one shifted comparison per k < n.
    A row whose every token would be banned (a tiny vocabulary) is left
    unchanged rather than given no token at all.

    Args:
        logits: float tensor (batch, vocab).
        token_ids: int tensor (batch, total).
        length: int tensor, a scalar or (batch,). Positions `[0, length)` of each row are its context.
        ngram_size: int32 tensor (batch,). 0 leaves a row unchanged.

    Returns:
        float32 logits (batch, vocab).
    """
    from keras import ops

    logits = ops.cast(logits, "float32")
    token_ids = ops.cast(token_ids, "int32")
    size = ops.convert_to_tensor(ngram_size, dtype="int32")
    batch, total = ops.shape(token_ids)
    vocabulary = ops.shape(logits)[-1]
    length = ops.broadcast_to(ops.cast(length, "int32"), (batch,))

    def same_before(k, match):
        # match[b, p]: token p - k equals the context's k-th last token, for every k so far < n.
        earlier = ops.roll(token_ids, k, axis=1)  # earlier[:, p] = token_ids[:, p - k]
        last = ops.take_along_axis(token_ids, ops.maximum(length - k, 0)[:, None], axis=1)
        same = earlier == last
        return ops.logical_and(match, ops.logical_or((k >= size)[:, None], same))

    match = ops.fori_loop(1, ops.max(size), same_before, ops.ones((batch, total), "bool"))
    positions = ops.arange(total, dtype="int32")[None, :]
    # p - (n - 1) >= 0 keeps the rolled comparisons from wrapping round; p < length: p is a context token.
    completes = ops.logical_and(positions >= (size - 1)[:, None], positions < length[:, None])
    completes = ops.logical_and(ops.logical_and(match, completes), (size > 0)[:, None])
    banned = token_mask(token_ids, completes, vocabulary)
    banned = ops.logical_and(banned, ops.logical_not(ops.all(banned, axis=-1, keepdims=True)))
    return ops.where(banned, float("-inf"), logits)
