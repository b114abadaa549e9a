"""The sampler and the decode loop are keras.ops code: the same model directory generates the
same tokens on the JAX backend as on TensorFlow.

The JAX side runs in the session's JAX worker (tests/jax_child.py: a Keras backend is chosen once per process). It loads the
model directory the TensorFlow side saved, so this also checks that a model fine-tuned with
TensorFlow serves on JAX (the GPU machine's backend).
"""

import textwrap

import numpy as np
import pytest

from pitchkeras.conditioning import REVIEWS

pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")

from tests.jax_child import run_on_jax  # noqa: E402
from tests.test_sampling import ROCK, processor_cases, run_processors  # noqa: E402 - the same cases
PREFIXES = ("", "The band", "A quiet record with many words in its prefix")

# Fixed probabilities: (probabilities, top_k, top_p, the tokens that may come out).
SELECTION_CASES = [
    ([0.5, 0.3, 0.15, 0.05], 0, 0.7, [0, 1]),
    ([0.5, 0.3, 0.15, 0.05], 0, 0.79, [0, 1]),
    ([0.5, 0.3, 0.15, 0.05], 0, 0.81, [0, 1, 2]),
    ([0.05, 0.15, 0.3, 0.5], 2, 1.0, [2, 3]),
    ([0.1, 0.2, 0.3, 0.4], 0, 1e-6, [3]),
]

GRID = np.linspace(0.0, 1.0, 500, endpoint=False, dtype=np.float32)


def select_on_grid(probabilities, top_k, top_p):
    """`select_tokens` on one row of probabilities for every uniform number of GRID (a backend tensor)."""
    from pitchkeras.sampling import select_tokens

    batch = len(GRID)
    return select_tokens(np.tile(np.asarray(probabilities, np.float32), (batch, 1)), GRID,
                         np.full(batch, top_k, np.int32), np.full(batch, top_p, np.float32))


def generate_twice(model) -> dict:
    """The PREFIXES' texts, generated, then again in reverse order, then with both repetition
    processors on, and the trace counts after each."""
    from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig

    generator = Generator(model, batch_size=4, max_new_tokens=24, prompt_buckets=(16, 32))
    requests = [GenerationRequest(ROCK, prefix, seed=seed) for seed, prefix in enumerate(PREFIXES)]
    raw = [sample.raw for sample in generator.generate(requests)]
    traces_after_first = generator.trace_count
    again = [sample.raw for sample in generator.generate(list(reversed(requests)))][::-1]
    processed = [sample.raw for sample in generator.generate(
        requests, config=SamplerConfig(repetition_penalty=1.3, no_repeat_ngram_size=2))]
    return {"raw": raw, "again": again, "processed": processed,
            "traces": [traces_after_first, generator.trace_count]}


# Runs with KERAS_BACKEND=jax, from the repository root; the helpers above run on both backends.
JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    import numpy as np
    assert keras.config.backend() == "jax", keras.config.backend()
    import jax
    import keras_hub
    from pitchkeras.model import load_model
    from tests.test_backends import SELECTION_CASES, generate_twice, select_on_grid
    from tests.test_sampling import processor_cases, run_processors

    selections = []
    for probabilities, top_k, top_p, _ in SELECTION_CASES:
        chosen = select_on_grid(probabilities, top_k, top_p)
        assert isinstance(chosen, jax.Array), type(chosen)
        selections.append(np.asarray(chosen).tolist())
    model = load_model(sys.argv[1])
    # keras-hub's own generate: a tiny top_p is greedy.
    lm = model.causal_lm
    lm.compile(sampler=keras_hub.samplers.GreedySampler())
    greedy = lm.generate("8.0\\nRock\\n", max_length=24, stop_token_ids=None)
    lm.compile(sampler=keras_hub.samplers.TopPSampler(p=1e-6, seed=3))
    nucleus = lm.generate("8.0\\nRock\\n", max_length=24, stop_token_ids=None)
    processors = [[out.tolist() for out in run_processors(case)] for case in processor_cases()]
    print("RESULT " + json.dumps({"selections": selections, "greedy": [greedy, nucleus], "processors": processors,
                                  **generate_twice(model)}))
    """
)


@pytest.mark.slow
def test_jax_backend_matches_tensorflow(sampling_model_dir):
    from pitchkeras.model import load_model

    jax_side = run_on_jax(JAX_SCRIPT, str(sampling_model_dir))

    # Token selection: exact on both backends, and the same draws.
    for (probabilities, top_k, top_p, allowed), on_jax in zip(SELECTION_CASES, jax_side["selections"]):
        on_tf = select_on_grid(probabilities, top_k, top_p)
        assert set(on_jax) == set(allowed)  # the nucleus, and all of it
        assert on_jax == on_tf.numpy().tolist()

    # The repetition processors: exact on fixed logits on JAX too (the same cases as test_sampling's).
    for case, (penalized, banned) in zip(processor_cases(), jax_side["processors"]):
        np.testing.assert_array_equal(penalized, run_processors(case)[0])
        np.testing.assert_array_equal(banned, run_processors(case)[1])

    # The decode loop: the same model directory, seeds and prompts give the same text.
    tf_side = generate_twice(load_model(sampling_model_dir))
    on_tf = tf_side["raw"]
    assert len(set(on_tf)) == len(PREFIXES)
    assert all(len(raw) > len(REVIEWS.prompt(ROCK, prefix)) for raw, prefix in zip(on_tf, PREFIXES))
    assert jax_side["raw"] == on_tf
    assert jax_side["again"] == on_tf  # deterministic, batch order does not matter
    assert jax_side["processed"] == tf_side["processed"] != on_tf  # the processors change the text, alike
    greedy, nucleus = jax_side["greedy"]
    assert nucleus == greedy and len(greedy) > len("8.0\nRock\n")
    # Three prompt lengths in one bucket: the engine's programs traced once, reused in any order and settings.
    assert jax_side["traces"][0] == jax_side["traces"][1] > 0
