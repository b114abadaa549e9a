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

import importlib

# Public names, re-exported lazily (as `pitchkeras` does): the store and the gRPC client read
# `pitchkeras.sampling.config` alone and do not pay for the engine's modules and numpy (start-up time).
_EXPORTS = {
    "MAX_TOP_LOGPROBS": "config",
    "MEMORIZED": "config",
    "PROMPT_BUCKETS": "config",
    "GenerationRequest": "config",
    "Sample": "config",
    "SamplerConfig": "config",
    "TokenLogprob": "config",
    "counter_uniform": "counter_rng",
    "row_keys": "counter_rng",
    "Generator": "generator",
    "prompt_bucket": "generator",
    "ban_repeated_ngrams": "selection",
    "context_tokens": "selection",
    "penalize_repetition": "selection",
    "scaled_probabilities": "selection",
    "select_tokens": "selection",
    "token_mask": "selection",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pitchkeras.sampling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pitchkeras.sampling.{module}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)

