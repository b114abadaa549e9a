"""Sampling: sampler config, a keras-hub sampler, and fast batched generation.

`Generator` turns `GenerationRequest`s (conditions, a free-text prefix, a seed)
into post-processed, quality-checked `Sample`s:

1. Prompts come from the model's `PromptFormat` alone; the GPT-2 start token
   (`<|endoftext|>`) is prepended exactly as `GPT2CausalLMPreprocessor` does.
2. Prompts are right-padded into a few length buckets and batches into a few
   batch sizes, so one compiled function per (batch, bucket, length) shape is
   traced once and reused, whatever the prompt lengths.
3. The decode loop is a `keras.ops.while_loop` over the keras-hub GPT-2 layers with
   one key/value cache per layer (updated in place, no per-step copy of the
   whole stacked cache) sized prompt bucket + new tokens only, and it stops
   when every row has produced `<|endoftext|>`.
4. Sampling parameters are tensors, so a new temperature, top-k or top-p
   never recompiles. Randomness is counter-based per row (seed, position), so
   a request's output does not depend on the other requests in its batch.
5. Everything traced is `keras.ops`: the same loop runs on the TensorFlow
   backend (a `tf.function`, XLA for float32) and on JAX (`jax.jit`), and a
   model directory gives the same tokens on both.

Nucleus and top-k selection find their probability threshold by bisection on
the float bit pattern (exact, 31 vectorised passes) instead of sorting the
50k-token vocabulary at every step, then sample by inverse CDF with one
uniform number per row. `NucleusSampler` exposes the same selection through
keras-hub's `Sampler` API for `causal_lm.compile(sampler=...)`.

Example:

>>> from pitchkeras.model import load_model
>>> generator = Generator(load_model("checkpoint/run1/model"), batch_size=8)
>>> samples = generator.generate([GenerationRequest({"score": 8.0, "genre": "Rock"}, seed=1)])
>>> samples[0].text
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pitchkeras.errors import FailedPrecondition, InvalidArgument
from pitchkeras.postprocess import PostprocessOptions, postprocess

MEMORIZED = "memorized"
PROMPT_BUCKETS = (16, 32, 64, 128, 256)  # prompt lengths (tokens, with the start token) padded up to these

_BIT_SEARCH_STEPS = 31  # bisection steps over float32 bit patterns of [0, 1] (< 2**30 + 1 values): exact


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the next token is drawn.

    Args:
        temperature: float. Logits are divided by it before the softmax; > 0.
            Lower is more conservative.
        top_k: int. Keep only the `top_k` most likely tokens; 0 turns it off.
        top_p: float. Keep the smallest set of most likely tokens whose mass
            reaches `top_p` (nucleus sampling); in (0, 1], 1 turns it off.
        repetition_penalty: float. CTRL's penalty (Keskar et al. 2019), as
            transformers applies it: the logit of every token already in the
            prompt or the completion is divided by it when positive and
            multiplied by it when negative; > 0, 1 turns it off.
        no_repeat_ngram_size: int. A token that would complete an n-gram of
            this many tokens already in the prompt or the completion is never
            drawn (transformers' `no_repeat_ngram_size`); 0 turns it off.
    """

    temperature: float = 0.7  # gpt-2-simple's default
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # nucleus mass; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the text; 1.0 = off (CTRL used 1.2)
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size; 0 = off

    def validate(self) -> "SamplerConfig":
        """Return self, or raise InvalidArgument naming the bad value."""
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise InvalidArgument(f"temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) \
                or penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be a number > 0 (1.0 = off), got {penalty!r}")
        size = self.no_repeat_ngram_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InvalidArgument(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {size!r}")
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GenerationRequest:
    """One sample to generate.

    Args:
        conditions: dict or None. Condition values, e.g. `{"score": 8.0,
            "genre": "Rock"}`; None for a corpus without conditions.
        prefix: str. Free text placed after the header (an artist name, a
            first sentence); the model continues it.
        seed: int. Fixes the sample: the same request and config give the
            same text.
    """

    conditions: Optional[dict] = None
    prefix: str = ""
    seed: int = 0


@dataclasses.dataclass
class Sample:
    """A generated sample, post-processed and checked.

    Args:
        text: str. The clean body (header stripped); `""` when rejected.
        raw: str. The prompt plus the completion as generated.
        conditions: dict. Parsed back from the generated header (the
            requested ones when the format has none).
        prompt: str. The exact prompt text (without the start token).
        seed: int. The request's seed.
        config: SamplerConfig. The sampler settings used.
        model_version: str. The training run that produced the model.
        rejected: str or None. Why it was rejected (`condition_mismatch`,
            `no_sentence`, `memorized`, `second_document`, `repetition`,
            `empty`, `bad_header`); None if accepted.
        quality: dict. Quality measures, e.g. `longest_copied_run` and
            `copied_ngram_fraction` when a memorization index is used.
    """

    text: str
    raw: str
    conditions: dict
    prompt: str
    seed: int
    config: SamplerConfig
    model_version: str
    rejected: Optional[str] = None
    quality: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict (the JSONL record `pitchkeras generate --out` writes)."""
        return {
            "text": self.text,
            "conditions": self.conditions,
            "prompt": self.prompt,
            "seed": self.seed,
            "sampler": self.config.to_json(),
            "model_version": self.model_version,
            "rejected": self.rejected,
            "quality": self.quality,
            "raw": self.raw,
        }


# -- token selection (keras.ops: any backend, shape-polymorphic, traced inside the decode loop) --


def row_keys(seeds: Sequence[int]) -> np.ndarray:
    """Per-row random keys: (batch, 2) uint32 from 64-bit seeds (splitmix64)."""
    keys = np.empty((len(seeds), 2), dtype=np.uint32)
    for i, seed in enumerate(seeds):
        z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
        keys[i] = (z >> 32, z & 0xFFFFFFFF)
    return keys


def _uint32(value: int):
    from keras import ops

    return ops.convert_to_tensor(np.uint32(value), dtype="uint32")


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a cheap, well-mixed bijection on uint32."""
    from keras import ops

    def shift_xor(x, n):
        return ops.bitwise_xor(x, ops.right_shift(x, _uint32(n)))

    x = ops.multiply(shift_xor(x, 16), _uint32(0x85EBCA6B))
    x = ops.multiply(shift_xor(x, 13), _uint32(0xC2B2AE35))
    return shift_xor(x, 16)


def counter_uniform(keys, position):
    """One uniform number in [0, 1) per row from (row key, position): stateless, per row.

    Args:
        keys: uint32 tensor of shape (batch, 2), from `row_keys`.
        position: int tensor. The sequence position being sampled.
    """
    from keras import ops

    keys = ops.convert_to_tensor(keys, dtype="uint32")
    counter = ops.multiply(ops.cast(position, "uint32"), _uint32(0x9E3779B9))
    x = _fmix32(ops.bitwise_xor(keys[:, 0], counter))
    x = _fmix32(ops.bitwise_xor(x, keys[:, 1]))
    # The top 24 bits fill a float32 mantissa exactly: u in [0, 1 - 2**-24].
    return ops.cast(ops.right_shift(x, _uint32(8)), "float32") * (1.0 / (1 << 24))


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
    """Which tokens occur in each row's context, positions `[0, length)`: bool (batch, vocabulary_size)."""
    from keras import ops

    total = ops.shape(token_ids)[1]
    return token_mask(token_ids, ops.arange(total, dtype="int32")[None, :] < length, vocabulary_size)


def penalize_repetition(logits, token_ids, length, penalty):
    """CTRL's repetition penalty on the tokens of each row's context, exactly as transformers applies it.

    transformers' `RepetitionPenaltyLogitsProcessor`: a token already in the
    context has its logit divided by `penalty` when positive and multiplied
    by it when negative (so it always becomes less likely for penalty > 1).

    Args:
        logits: float tensor (batch, vocab).
        token_ids: int tensor (batch, total).
        length: int tensor. Positions `[0, length)` of `token_ids` are the context.
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
        length: int tensor. Positions `[0, length)` of `token_ids` are the context.
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
    length = ops.cast(length, "int32")

    def same_before(k, match):
        # match[b, p]: token p - k equals the context's k-th last token, for every k so far < n.
        earlier = ops.roll(token_ids, k, axis=1)  # earlier[:, p] = token_ids[:, p - k]
        last = ops.take(token_ids, ops.maximum(length - k, 0), axis=1)
        same = earlier == last[:, None]
        return ops.logical_and(match, ops.logical_or((k >= size)[:, None], same))

    match = ops.fori_loop(1, ops.max(size), same_before, ops.ones((batch, total), "bool"))
    positions = ops.arange(total, dtype="int32")[None, :]
    # p - (n - 1) >= 0 keeps the rolled comparisons from wrapping round; p < length: p is a context token.
    completes = ops.logical_and(positions >= (size - 1)[:, None], positions < length)
    completes = ops.logical_and(ops.logical_and(match, completes), (size > 0)[:, None])
    banned = token_mask(token_ids, completes, vocabulary)
    banned = ops.logical_and(banned, ops.logical_not(ops.all(banned, axis=-1, keepdims=True)))
    return ops.where(banned, float("-inf"), logits)


def _nucleus_sampler_class():
    """Build `NucleusSampler` on first use, so importing this module stays cheap."""
    import keras
    import keras_hub
    from keras import ops

    class NucleusSampler(keras_hub.samplers.Sampler):
        """A keras-hub `Sampler` with top-k and top-p, for `causal_lm.compile(sampler=...)`.

        The same exact selection as `Generator` (`select_tokens`), drawing its
        uniform numbers from a keras `SeedGenerator` like keras-hub's samplers.

        Args:
            temperature: float. Softmax temperature; > 0.
            top_k: int. Top-k cut-off; 0 = off.
            top_p: float. Nucleus mass in (0, 1]; 1 = off.
            seed: int or None. Seed for the sampler's random stream.
        """

        def __init__(self, temperature=0.7, top_k=0, top_p=0.95, seed=None):
            config = SamplerConfig(temperature, top_k, top_p).validate()
            super().__init__(temperature=config.temperature)
            self.top_k = config.top_k
            self.top_p = config.top_p
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def get_next_token(self, probabilities):
            batch = ops.shape(probabilities)[0]
            uniform = keras.random.uniform((batch,), seed=self.seed_generator)
            return select_tokens(
                probabilities,
                ops.cast(uniform, "float32"),
                ops.full((batch,), self.top_k, dtype="int32"),
                ops.full((batch,), self.top_p, dtype="float32"),
            )

        def get_config(self):
            return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    return NucleusSampler


def __getattr__(name: str):
    # `NucleusSampler` subclasses keras-hub's Sampler: defined on first access.
    if name == "NucleusSampler":
        cls = _nucleus_sampler_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- conditions -----------------------------------------------------------------------


def validate_conditions(info, conditions: Optional[Mapping[str, Any]]) -> dict:
    """Check requested conditions against what the model was trained on.

    Args:
        info: ModelInfo. The model's `pitchkeras.json`.
        conditions: dict or None. The requested values.

    Returns:
        The conditions with text values spelt as in training ("rock" -> "Rock").

    Raises:
        InvalidArgument: a condition is missing, unknown to this model's
            format, a text value the model never saw (the message lists the
            known ones), or a number outside the trained range.
    """
    fmt = info.prompt_format
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(fmt.conditions))
    if unknown:
        raise InvalidArgument(
            f"unknown condition(s) {', '.join(unknown)}; this model takes {', '.join(fmt.conditions) or 'none'}"
        )
    missing = [name for name in fmt.conditions if conditions.get(name) is None]
    if missing:
        raise InvalidArgument(f"missing condition(s) {', '.join(missing)}; this model needs {', '.join(fmt.conditions)}")
    for name in fmt.conditions:
        known = info.condition_values.get(name)
        value = conditions[name]
        if name in fmt.numeric:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise InvalidArgument(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
            if known:
                low, high = min(map(float, known)), max(map(float, known))
                if not low <= number <= high:
                    raise InvalidArgument(f"{name} {number:g} is outside this model's range {low:g}..{high:g}")
            conditions[name] = number
        elif known:
            by_key = {str(k).casefold(): str(k) for k in known}
            spelt = by_key.get(" ".join(str(value).split()).casefold())
            if spelt is None:
                raise InvalidArgument(f"unknown {name} {value!r} for this model; known: {', '.join(map(str, known))}")
            conditions[name] = spelt
    return conditions


# -- the generator --------------------------------------------------------------------


def prompt_bucket(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The padded length for a prompt of `length` tokens: the smallest bucket that fits.

    Beyond the largest bucket, lengths round up to a multiple of it, so there
    are still only a few shapes.
    """
    for bucket in buckets:
        if length <= bucket:
            return bucket
    largest = buckets[-1]
    return -(-length // largest) * largest


class Generator:
    """Batched, compiled, deterministic generation for a `PitchModel`.

    Args:
        model: PitchModel. A loaded model (`pitchkeras.model.load_model`).
        batch_size: int. Rows generated together; fewer requests use the
            next power of two, so a lone request does not pay for 8 rows.
        max_new_tokens: int. Default cap on generated tokens per sample
            (gpt-2-simple's `length`).
        memorization: quality.MemorizationIndex or None. When given, each
            sample's copied n-gram share is measured and samples over
            `max_copied_fraction` are rejected as `memorized`.
        max_copied_fraction: float. Share of a sample's n-grams found in the
            training data above which it is rejected.
        prompt_buckets: tuple of int. Prompt lengths (in tokens) padded up to.
        jit_compile: bool or None. Compile the decode loop with XLA (True) or
            run it as a TensorFlow graph (False; token selection is still
            XLA-compiled), for every batch shape. None picks per shape what
            measured fastest on CPU: XLA for float32 batches of 2 and more
            and for int8 weights; a graph at batch 1 (XLA's CPU backend runs
            GPT-2's 768x768 projections as matrix-vector products about 5x
            slower than TensorFlow's kernels: 42 against 72 ms per token on
            124M) and for bfloat16/float16, whose matmuls TensorFlow's oneDNN
            kernels run several times faster than XLA's.
        postprocess_options: PostprocessOptions or None. Post-processing steps.
        stop_at_end_token: bool. Stop a row at `<|endoftext|>` (True); False
            always runs the full `max_new_tokens` (benchmarks, to compare
            equal work with other libraries).
    """

    def __init__(
        self,
        model,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 200,
        memorization=None,
        max_copied_fraction: float = 0.5,
        prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
        jit_compile: Optional[bool] = None,
        postprocess_options: Optional[PostprocessOptions] = None,
        stop_at_end_token: bool = True,
    ):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {max_new_tokens}")
        if not 0 < max_copied_fraction <= 1:
            raise InvalidArgument(f"max_copied_fraction must be in (0, 1], got {max_copied_fraction}")
        self.model = model
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.memorization = memorization
        self.max_copied_fraction = float(max_copied_fraction)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.jit_compile = None if jit_compile is None else bool(jit_compile)
        # The prompt already holds the document start, so a start marker in
        # the completion means a second document, never junk to strip.
        self.postprocess_options = postprocess_options or PostprocessOptions(strip_to_last_start=False)
        self.stop_at_end_token = bool(stop_at_end_token)
        self.trace_count = 0  # how many times the decode loop was traced (= compiled shapes)
        self._lock = threading.Lock()

        backbone = model.causal_lm.backbone
        if not hasattr(backbone, "transformer_layers") or not hasattr(backbone, "position_embedding"):
            raise FailedPrecondition(f"{type(backbone).__name__} is not a GPT-2 backbone; Generator needs one")
        self._backbone = backbone
        preprocessor = model.causal_lm.preprocessor
        self._tokenizer = preprocessor.tokenizer
        self._start_id = self._tokenizer.start_token_id if getattr(preprocessor, "add_start_token", True) else None
        self._end_id = int(self._tokenizer.end_token_id)
        self._pad_id = int(self._tokenizer.pad_token_id)
        self._max_length = int(backbone.max_sequence_length)
        self._function = None  # the compiled decode loop, built by _compiled()
        self._sample = self._sample_step  # token selection as the loop calls it; _compiled() picks the backend's

    def uses_xla(self, batch: int) -> bool:
        """Whether the decode loop for `batch` rows is XLA-compiled (TensorFlow; see `jit_compile`)."""
        if self.jit_compile is not None:
            return self.jit_compile
        from pitchkeras.quantize import is_quantized

        if self._backbone.compute_dtype in ("bfloat16", "float16"):
            return False
        return batch > 1 or is_quantized(self.model)  # int8 dots are slower still in graph mode

    # -- public API ---------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        config: Optional[SamplerConfig] = None,
        max_new_tokens: Optional[int] = None,
        progress: bool = False,
        truncate: Optional[str] = None,
        include_prefix: bool = True,
    ) -> list[Sample]:
        """Generate one sample per request, in request order.

        Args:
            requests: sequence of GenerationRequest.
            config: SamplerConfig or None. Sampler settings (default: SamplerConfig()).
            max_new_tokens: int or None. Cap on new tokens (default: the generator's).
            progress: bool. Show a tqdm bar.
            truncate: str or None. gpt-2-simple's stop string: the completion
                is cut where it first appears.
            include_prefix: bool. Keep the request's prefix at the start of
                the text (gpt-2-simple's `include_prefix`).

        Returns:
            A list of `Sample`, one per request.
        """
        config = (config or SamplerConfig()).validate()
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {new_tokens}")
        if truncate == "":
            raise InvalidArgument("truncate must be a non-empty stop string or None")
        fmt = self.model.prompt_format
        prepared = []
        for request in requests:
            conditions = validate_conditions(self.model.info, request.conditions) if fmt.conditions else {}
            prompt = fmt.prompt(conditions, request.prefix or "")
            ids = self._tokenize(prompt)
            if len(ids) >= self._max_length:
                raise InvalidArgument(
                    f"prompt is {len(ids)} tokens; this model takes at most {self._max_length - 1}"
                )
            prepared.append((request, conditions, prompt, ids))

        with self._lock:
            completions = self._complete([p[3] for p in prepared], [int(p[0].seed) for p in prepared],
                                         config, new_tokens, progress)
        return [
            self._finish(request, conditions, prompt, completion, config, truncate, include_prefix)
            for (request, conditions, prompt, _), completion in zip(prepared, completions)
        ]

    def warmup(self, *, prompt_lengths: Optional[Sequence[int]] = None, batch_sizes: Optional[Sequence[int]] = None,
               max_new_tokens: Optional[int] = None) -> None:
        """Compile the shapes a server uses, so first requests are fast.

        Args:
            prompt_lengths: sequence of int or None. Prompt lengths in tokens
                (default: the length of a prompt for the model's first known
                conditions).
            batch_sizes: sequence of int or None. Batch sizes to compile
                (default: 1 and `batch_size`).
            max_new_tokens: int or None. Default: the generator's.
        """
        if prompt_lengths is None:
            prompt_lengths = [len(self._tokenize(self.model.prompt_format.prompt(self._example_conditions())))]
        batch_sizes = batch_sizes or sorted({1, self.batch_size})
        new_tokens = max_new_tokens or self.max_new_tokens
        config = SamplerConfig()
        with self._lock:
            for length in sorted({prompt_bucket(n, self.prompt_buckets) for n in prompt_lengths}):
                for batch in sorted({self._batch_shape(b) for b in batch_sizes}):
                    ids = [[self._start_id or 0] * min(length, self._max_length - 1)] * batch
                    self._complete(ids, list(range(batch)), config, new_tokens, progress=False)

    # -- internals ----------------------------------------------------------------
    def _example_conditions(self) -> dict:
        info = self.model.info
        example = {}
        for name in info.prompt_format.conditions:
            values = info.condition_values.get(name) or ([5.0] if name in info.prompt_format.numeric else ["x"])
            example[name] = values[0]
        return example

    def _tokenize(self, text: str) -> list[int]:
        """Token ids as `GPT2CausalLMPreprocessor.generate_preprocess` packs them (start token first)."""
        ids = np.asarray(self._tokenizer.tokenize(text)).reshape(-1).tolist() if text else []
        return ([int(self._start_id)] if self._start_id is not None else []) + [int(i) for i in ids]

    def _batch_shape(self, n: int) -> int:
        """Rows to run for `n` requests: the next power of two, at most batch_size."""
        shape = 1
        while shape < n:
            shape *= 2
        return min(shape, self.batch_size)

    def _complete(self, prompts: list[list[int]], seeds: list[int], config: SamplerConfig, new_tokens: int,
                  progress: bool) -> list[list[int]]:
        """New token ids per prompt (cut at the end token and at `new_tokens`)."""
        # Similar lengths together: fewer wasted prompt positions per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="sample", desc="generate")
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                shape = self._batch_shape(len(rows))
                rows_padded = rows + [rows[0]] * (shape - len(rows))  # copies of row 0 finish with it
                lengths = [len(prompts[i]) for i in rows_padded]
                bucket = min(prompt_bucket(max(lengths), self.prompt_buckets), self._max_length - 1)
                total = min(bucket + new_tokens, self._max_length)
                token_ids = np.full((shape, bucket), self._pad_id, dtype=np.int32)
                mask = np.zeros((shape, bucket), dtype=bool)
                for r, i in enumerate(rows_padded):
                    token_ids[r, : len(prompts[i])] = prompts[i]
                    mask[r, : len(prompts[i])] = True
                output = self._compiled()(
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
                    if self.stop_at_end_token and self._end_id in new:
                        new = new[: new.index(self._end_id)]
                    results[i] = new
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return results

    def _finish(self, request, conditions, prompt, completion, config, truncate, include_prefix) -> Sample:
        continuation = self._detokenize(completion)
        if truncate:
            cut = continuation.find(truncate)
            if cut >= 0:
                continuation = continuation[:cut]
        raw = prompt + continuation
        fmt = self.model.prompt_format
        processed = postprocess(raw, fmt, conditions or None, self.postprocess_options)
        text, rejected = processed.text, processed.rejected
        prefix = (request.prefix or "").strip()
        if not include_prefix and prefix and text.startswith(prefix):
            text = text[len(prefix):].lstrip()
        quality: dict = {}
        if self.memorization is not None and rejected is None:
            quality = self.memorization.check(text)
            if quality["copied_ngram_fraction"] > self.max_copied_fraction:
                rejected = MEMORIZED
        return Sample(
            text="" if rejected else text,
            raw=raw,
            conditions=processed.conditions or dict(conditions),
            prompt=prompt,
            seed=int(request.seed),
            config=config,
            model_version=self.model.info.model_version,
            rejected=rejected,
            quality=quality,
        )

    def _detokenize(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.detokenize(np.asarray(ids, dtype=np.int32))
        if not isinstance(text, str):
            text = np.asarray(text).item()
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        return text

    def _compiled(self):
        """The decode loop compiled for the Keras backend; each input shape is traced (and compiled) once.

        Returns a function of numpy inputs returning a numpy (batch, total) int32 array.
        TensorFlow: a `tf.function` (XLA or graph per batch shape, see `jit_compile`). JAX:
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
            ops.zeros([batch, 2, total, heads, head_dim], dtype=backbone.compute_dtype)
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

    def _sample_step(self, logits, token_ids, keys, index, temperature, top_k, top_p, repetition_penalty,
                     no_repeat_ngram_size):
        """The token at `index` per row: logits processors, then temperature, top-k, top-p (transformers' order)."""
        from keras import ops

        logits = ops.cast(logits, "float32")
        # Each processor runs only when some row asks for it: off, it costs one `any` per step.
        logits = ops.cond(ops.any(repetition_penalty != 1.0),
                          lambda: penalize_repetition(logits, token_ids, index, repetition_penalty), lambda: logits)
        logits = ops.cond(ops.any(no_repeat_ngram_size > 0),
                          lambda: ban_repeated_ngrams(logits, token_ids, index, no_repeat_ngram_size), lambda: logits)
        probabilities = scaled_probabilities(logits, temperature)
        return select_tokens(probabilities, counter_uniform(keys, index), top_k, top_p)

    def _forward(self, token_ids, caches, index):
        """GPT-2 hidden states for `token_ids` at `index`, one cache per layer.

        Mirrors `GPT2CausalLM.call_with_cache`, but keeps the layers' caches
        separate, so the loop updates each in place instead of slicing and
        re-stacking one (batch, layers, 2, length, heads, dim) tensor per step.
        """
        backbone = self._backbone
        x = backbone.token_embedding(token_ids)
        positions = backbone.position_embedding(x, start_index=index)
        x = backbone.embeddings_add((x, positions))
        new_caches = []
        for layer, cache in zip(backbone.transformer_layers, caches):
            x, cache = layer(x, self_attention_cache=cache, self_attention_cache_update_index=index)
            new_caches.append(cache)
        return backbone.layer_norm(x), new_caches
