"""Exactness across shapes: a request's tokens are the same whatever its slot, row bucket and cache length, on a
model with 512 positions (the tiny preset), with neighbours that force the largest cache length; its
log-probabilities agree to the last bits (not bitwise on TensorFlow's XLA CPU backend)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig  # noqa: E402
from pitchkeras.sampling.engine import DecodeEngine  # noqa: E402
from tests.test_sampling import ROCK, TEXTS  # noqa: E402

TARGETS = [
    (GenerationRequest(ROCK, "", seed=1, top_logprobs=0), SamplerConfig()),
    (GenerationRequest(ROCK, "The band plays", seed=2, top_logprobs=0), SamplerConfig(temperature=1.2, top_k=20)),
    (GenerationRequest({"score": 3.0, "genre": "Jazz"}, "A quiet", seed=3, top_logprobs=0),
     SamplerConfig(top_p=0.8, repetition_penalty=1.3)),
    (GenerationRequest(ROCK, "word " * 10, seed=4, top_logprobs=0), SamplerConfig(top_k=1)),
]
LENGTH = 40


pytestmark = pytest.mark.slow  # every test here runs on the module's own 512-position model, compiling its shapes


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from pitchkeras.conditioning import REVIEWS
    from pitchkeras.model import ModelInfo, build_tiny_causal_lm, load_model, save_model_dir

    lm = build_tiny_causal_lm(TEXTS, sequence_length=64)  # the tiny preset: 512 positions
    assert lm.backbone.max_sequence_length >= 512
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, "exact-v1", "tiny", 64)
    model = load_model(save_model_dir(lm, info, tmp_path_factory.mktemp("model") / "model"))
    return Generator(model, batch_size=4, max_new_tokens=LENGTH, stop_at_end_token=False)


def run_shapes(generator) -> dict:
    """TARGETS alone (slot 0, the smallest row bucket and cache), then in slots 2 and 3 (row bucket 4) beside two
    neighbours that need the whole 512-position cache, then on the bulk path: their tokens and how far apart
    their log-probabilities are."""
    engine = DecodeEngine(generator, slots=4)
    # TensorFlow runs a lone request on 1 row, JAX on 2 (Generator._batch_shape).
    assert engine.cache_buckets[-1] >= 512 and engine.row_buckets in ((1, 2, 4), (2, 4))
    alone, rows_alone = [], set()
    for request, config in TARGETS:
        alone.append(engine.generate([request], config, LENGTH)[0])
        rows_alone.add(engine.counters.rows)
    long = max(1, generator._max_length - len(generator.prepare(GenerationRequest(ROCK)).ids) - 1)
    neighbours = [engine.submit(GenerationRequest(ROCK, "", seed=90 + i), None, long) for i in range(2)]
    engine.step()
    crowded = [engine.submit(request, config, LENGTH) for request, config in TARGETS]
    rows_seen, lengths_seen = set(), set()
    while not all(s.done for s in crowded):
        engine.step()
        rows_seen.add(engine.counters.rows)
        lengths_seen.add(engine._state.length)
    for stream in neighbours:
        stream.cancel()
    engine.run_until_idle()
    bulk = generator.generate([TARGETS[0][0]], config=TARGETS[0][1], max_new_tokens=LENGTH)[0]
    crowded = [s.result() for s in crowded]
    differences = [float(np.max(np.abs(np.array([t.logprob for t in a.logprobs])
                                       - np.array([t.logprob for t in b.logprobs]))))
                   for a, b in zip(alone, crowded)]
    return {"alone": [list(s.completion_ids) for s in alone], "crowded": [list(s.completion_ids) for s in crowded],
            "bulk": list(bulk.completion_ids), "differences": differences, "rows_alone": sorted(rows_alone),
            "rows": sorted(rows_seen), "lengths": sorted(lengths_seen), "largest": engine.cache_buckets[-1],
            "smallest": engine.row_buckets[0]}


def check(result: dict) -> None:
    assert result["rows_alone"] == [result["smallest"]] and result["rows"] == [4]
    assert result["lengths"] == [result["largest"]]
    assert result["crowded"] == result["alone"], result["differences"]
    assert result["bulk"] == result["alone"][0]
    # Not bitwise on XLA's CPU backend: a longer cache and more rows change the order of the attention and
    # matmul reductions, so the log-probabilities move in the last bits (measured in the notes); the tokens
    # did not move, and the logits stay this close.
    assert max(result["differences"]) < 1e-5, result["differences"]


def test_tokens_do_not_depend_on_slot_row_bucket_or_cache_length(generator):
    result = run_shapes(generator)
    print("tensorflow logprob differences across shapes:", result["differences"])
    assert result["smallest"] == 1  # alone: one row (the 2-D q/k/v views); crowded: four
    check(result)


JAX_SCRIPT = """
import json, sys
from pitchkeras.model import load_model
from pitchkeras.sampling import Generator
from tests.test_engine_exactness import LENGTH, run_shapes

generator = Generator(load_model(sys.argv[1]), batch_size=4, max_new_tokens=LENGTH, stop_at_end_token=False)
print("RESULT " + json.dumps(run_shapes(generator)))
"""


def test_on_jax_too(generator):
    from tests.jax_child import run_on_jax

    result = run_on_jax(JAX_SCRIPT, str(generator.model.path))
    print("jax logprob differences across shapes:", result["differences"])
    assert result["smallest"] == 2  # JAX runs a lone float32 request as 2 rows
    check(result)


def test_a_shape_compiled_off_the_engine_thread_is_ready_and_leaves_the_running_rows_alone(generator):
    import threading

    from pitchkeras.sampling.config import prompt_bucket

    request, config = TARGETS[1]
    expected = DecodeEngine(generator, slots=4).generate([request], config, LENGTH)[0].completion_ids
    engine = DecodeEngine(generator, slots=4)
    running = engine.submit(request, config, LENGTH)
    engine.step()  # running in slot 0: row bucket 2, a short cache
    program, state = engine._program, engine._state
    before = (state.rows, state.length, [np.asarray(a).copy() for a in state.arrays])
    bucket = prompt_bucket(len(generator.prepare(TARGETS[3][0]).ids), generator.prompt_buckets)
    shape = (4, engine.cache_buckets[-1], bucket)
    thread = threading.Thread(target=program.compile, args=(state,) + shape, kwargs={"logprobs": (False, True)})
    thread.start()
    thread.join()
    assert (state.rows, state.length) == before[:2] and state.length < shape[1]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(state.arrays, before[2]))
    traces = program.traces
    scratch = state.fresh()
    scratch.resize(shape[0], shape[1], program)
    program.prefill(scratch, np.zeros((1,), np.int32), np.zeros((1, bucket), np.int32))
    program.step(scratch, True)
    assert program.traces == traces  # every program of that shape was ready
    engine.run_until_idle()
    assert running.result().completion_ids == expected
