"""Sampling: sampler config, a keras-hub sampler, and fast batched generation.

One module per role, all public names re-exported here:

- `config`: `SamplerConfig`, `GenerationRequest`, `Sample`.
- `counter_rng`: counter-based random numbers per (seed, position).
- `selection`: token selection and the repetition processors.
- `decode`: the cached GPT-2 forward pass and token draw.
- `engine`: `DecodeEngine`, the one decode path (continuous batching).
- `generator`: prompt buckets and `Generator`.

`Generator` turns `GenerationRequest`s (conditions, a free-text prefix, a seed)
into post-processed, quality-checked `Sample`s:

1. Prompts come from the model's `PromptFormat` alone; the GPT-2 start token
   (`<|endoftext|>`) is prepended exactly as `GPT2CausalLMPreprocessor` does.
2. Prompts are right-padded into a few length buckets and batches into a few
   batch sizes, so one compiled function per (batch, bucket, length) shape is
   traced once and reused, whatever the prompt lengths.
3. Every request runs on the `DecodeEngine` (`pitchkeras.sampling.engine`):
   rows of a fixed set of slots, each with its own key/value cache positions,
   join and leave at step boundaries; a row ends at `<|endoftext|>`, a stop
   sequence or its length.
4. Sampling parameters are tensors, so a new temperature, top-k or top-p
   never recompiles. Randomness is counter-based per row (seed, position), so
   a request's output does not depend on the other requests in its batch.
5. Everything traced is `keras.ops`: the same loop runs on the TensorFlow
   backend (a `tf.function`, XLA for float32) and on JAX (`jax.jit`), and a
   model directory gives the same tokens on both.

Nucleus and top-k selection find their probability threshold by bisection on
the float bit pattern (exact, 31 vectorised passes) instead of sorting the
50k-token vocabulary at every step, then sample by inverse CDF with one
uniform number per row.

Example:

>>> from pitchkeras.model import load_model
>>> generator = Generator(load_model("checkpoint/run1/model"), batch_size=8)
>>> samples = generator.generate([GenerationRequest({"score": 8.0, "genre": "Rock"}, seed=1)])
>>> samples[0].text
"""

from pitchkeras.sampling.config import (
    MAX_TOP_LOGPROBS,
    MEMORIZED,
    PROMPT_BUCKETS,
    GenerationRequest,
    Sample,
    SamplerConfig,
    TokenLogprob,
)
from pitchkeras.sampling.counter_rng import counter_uniform, row_keys
from pitchkeras.sampling.generator import Generator, prompt_bucket
from pitchkeras.sampling.selection import (
    ban_repeated_ngrams,
    context_tokens,
    penalize_repetition,
    scaled_probabilities,
    select_tokens,
    token_mask,
)

__all__ = [
    "MAX_TOP_LOGPROBS",
    "MEMORIZED",
    "PROMPT_BUCKETS",
    "GenerationRequest",
    "Generator",
    "Sample",
    "SamplerConfig",
    "TokenLogprob",
    "ban_repeated_ngrams",
    "context_tokens",
    "counter_uniform",
    "penalize_repetition",
    "prompt_bucket",
    "row_keys",
    "scaled_probabilities",
    "select_tokens",
    "token_mask",
]

