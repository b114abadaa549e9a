"""Sample texts during and after training, prompted with the run's own prompt format (`samples/*.txt`)."""

from __future__ import annotations

import json
from pathlib import Path

from pitchkeras.io import atomic_write_text
from pitchkeras.model import PitchModel
from pitchkeras.sampling import GenerationRequest, Generator


def sample_prompts(prompt_format, condition_values: dict, count: int = 3) -> list[dict]:
    """A few condition dicts spread over the values seen in training (`[{}]` for a plain corpus)."""
    if not prompt_format.conditions:
        return [{}]
    pairs = []
    for i in range(count):
        values = {}
        for name in prompt_format.conditions:
            seen = condition_values.get(name) or [5.0 if name in prompt_format.numeric else "Rock"]
            values[name] = (seen[(i * (len(seen) - 1)) // max(count - 1, 1)] if name in prompt_format.numeric
                            else seen[i % len(seen)])
        pairs.append(values)
    return pairs


def write_samples(causal_lm, info, out, *, max_new_tokens: int = 80, seed: int = 0, count: int = 3) -> Path:
    """Generate `count` samples with the run's own prompt format (`ModelInfo`) into the text file `out`."""
    conditions = sample_prompts(info.prompt_format, info.condition_values, count)
    generator = Generator(PitchModel(causal_lm=causal_lm, info=info), batch_size=len(conditions),
                          max_new_tokens=max_new_tokens)
    samples = generator.generate([GenerationRequest(conditions=c or None, seed=seed + i)
                                  for i, c in enumerate(conditions)])
    blocks = [f"=== {json.dumps(c)}\n{s.raw}\n" for c, s in zip(conditions, samples)]
    return atomic_write_text(out, "\n".join(blocks))
