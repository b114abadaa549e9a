"""No compile on the step path once the engine runs on its thread (a server reports SERVING only then): a request
that needs a shape not yet compiled waits while its programs compile on the compile thread, the running streams
keep stepping and the requests that fit join past it; a failed compile ends only the request that needed it.

Every assertion is on counters (tokens decoded, compiles on and off the engine thread), never on time.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("tensorflow")

from pitchkeras.errors import ResourceExhausted, Unavailable  # noqa: E402
from pitchkeras.sampling import GenerationRequest  # noqa: E402
from pitchkeras.sampling.engine import DecodeEngine  # noqa: E402
from tests.serve_fixtures import wait_for  # noqa: E402

ROCK = {"score": 8.0, "genre": "Rock"}
LONG_PREFIX = "word " * 20  # a prompt past the smallest prompt bucket: a prefill shape warm-up did not compile
STEPS_DURING_COMPILE = 5  # tokens the running stream must decode while the new shape's compile is held


def serving_engine(generator) -> DecodeEngine:
    """An engine as a server runs it: warmed for the example prompt, then on its thread."""
    engine = DecodeEngine(generator, slots=2)
    engine.warmup([len(generator._tokenize(generator.example_prompt()))], 40)
    engine.start()
    return engine


def test_a_stream_keeps_stepping_while_a_new_shape_compiles(tiny_generator):
    engine = serving_engine(tiny_generator)
    try:
        running = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 40)
        assert wait_for(lambda: running.tokens >= 2)
        compile_shape, entered, seen, fits = engine._compile_shape, threading.Event(), {}, []

        def held(*job):
            # The compile waits until the running stream has decoded more tokens and a request that fits has
            # joined past the waiting one and finished: both need the engine thread, so both happen only if
            # this compile is not on it.
            seen.setdefault("tokens_at_start", running.tokens)
            entered.set()
            assert wait_for(lambda: fits and fits[0].done and
                            running.tokens >= seen["tokens_at_start"] + STEPS_DURING_COMPILE)
            seen.setdefault("tokens_during", running.tokens - seen["tokens_at_start"])
            compile_shape(*job)

        engine._compile_shape = held
        # A new prompt bucket (a new prefill) and log-probabilities (a new step variant).
        new_shape = engine.submit(GenerationRequest(ROCK, LONG_PREFIX, seed=2, top_logprobs=2), None, 6)
        assert wait_for(entered.is_set)
        fits.append(engine.submit(GenerationRequest(ROCK, "", seed=3), None, 4))
        sample = new_shape.result(timeout=300)
        assert len(sample.logprobs) == len(sample.completion_ids) > 0
        assert fits[0].result(timeout=0).raw and running.result(timeout=300).completion_ids
        assert seen["tokens_during"] >= STEPS_DURING_COMPILE
        assert running.tokens == 40
        assert engine.counters.inline_compiles == 0 and engine.counters.compiles >= 1
        warm_bucket = engine._bucket(running)
        assert any(shape[0] == "step" and shape[3] for shape in engine._ready)
        assert any(shape[0] == "prefill" and shape[2] > warm_bucket for shape in engine._ready)
        # The same shapes again: nothing compiles, on either thread.
        compiles, traces = engine.counters.compiles, engine._program.traces
        again = engine.submit(GenerationRequest(ROCK, LONG_PREFIX, seed=2, top_logprobs=2), None, 6)
        assert again.result(timeout=300).completion_ids == sample.completion_ids
        assert (engine.counters.compiles, engine._program.traces, engine.counters.inline_compiles) == \
            (compiles, traces, 0)
    finally:
        engine.close()


@pytest.mark.parametrize("raised, expected", [
    (MemoryError("injected: out of memory"), ResourceExhausted),
    (RuntimeError("injected: the compiler broke"), Unavailable),
])
def test_a_failed_compile_ends_only_the_request_that_needed_it(tiny_generator, raised, expected):
    engine = serving_engine(tiny_generator)
    try:
        running = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 30)
        assert wait_for(lambda: running.tokens >= 1)
        compile_shape = engine._compile_shape

        def failing(rows, length, prefill, logprobs):
            if logprobs:
                raise raised
            compile_shape(rows, length, prefill, logprobs)

        engine._compile_shape = failing
        doomed = engine.submit(GenerationRequest(ROCK, "", seed=2, top_logprobs=1), None, 6)
        with pytest.raises(expected, match="decode programs for .* rows x .* cache positions"):
            doomed.result(timeout=300)
        assert doomed.finish_reason == "error" and engine.counters.failed == 1
        assert "injected" not in str(doomed.error)  # the backend's message stays in the log
        assert running.result(timeout=300).completion_ids and running.tokens == 30
        # Still serving: a request on compiled shapes, and one whose shape now compiles fine.
        engine._compile_shape = compile_shape
        after = [engine.submit(GenerationRequest(ROCK, prefix, seed=4, top_logprobs=logprobs), None, 4)
                 for prefix, logprobs in (("", None), (LONG_PREFIX, 1))]
        assert all(stream.result(timeout=300).completion_ids for stream in after)
        assert engine.counters.inline_compiles == 0
    finally:
        engine.close()


def test_a_request_waiting_for_its_compile_can_be_cancelled(tiny_generator):
    engine = serving_engine(tiny_generator)
    release = threading.Event()
    try:
        compile_shape = engine._compile_shape

        def held(*job):
            assert release.wait(300)
            compile_shape(*job)

        engine._compile_shape = held
        waiting = engine.submit(GenerationRequest(ROCK, LONG_PREFIX, seed=2), None, 4)
        assert wait_for(lambda: engine._compiling)
        waiting.cancel()
        assert wait_for(lambda: waiting.done)
        assert waiting.finish_reason == "cancelled" and engine.counters.waiting == 0
        release.set()
        fits = engine.submit(GenerationRequest(ROCK, "", seed=3), None, 4)
        assert fits.result(timeout=300).raw and engine.counters.inline_compiles == 0
    finally:
        release.set()
        engine.close()


def test_a_serving_server_compiles_nothing_on_its_engine_thread(tmp_path, tiny_generator):
    grpc = pytest.importorskip("grpc")
    from pitchkeras.server import BackgroundServer, ServerConfig
    from pitchkeras.v1 import review_service_pb2 as pb
    from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

    config = ServerConfig(max_batch_size=2, default_max_length=8, max_length_cap=80, num_samples_cap=2,
                          prompt_chars_cap=200, warmup=True)
    with BackgroundServer(f"sqlite:///{tmp_path}/compile.db", generator=tiny_generator, config=config) as served:
        assert served.wait_until_ready(300) == "ready"  # SERVING: warm-up done, the engine thread running
        engine = served.server.model.batcher.engine
        with grpc.insecure_channel(f"localhost:{served.port}") as channel:
            stub = pb_grpc.ReviewServiceStub(channel)
            # Shapes warm-up left out: a longer prompt (prefill), a longer length (cache), two rows at once.
            calls = [stub.Generate.future(pb.GenerateRequest(score=8.0, genre="Rock", seed=seed, **fields),
                                          timeout=300)
                     for seed, fields in enumerate(({}, {"prompt": LONG_PREFIX}, {"max_length": 80},
                                                    {"num_samples": 2, "max_length": 30}))]
            assert all(review.raw for call in calls for review in call.result().reviews)
        assert engine.counters.compiles >= 1 and engine.counters.inline_compiles == 0


JAX_SCRIPT = '''
import json, sys
from pitchkeras.model import load_model
from pitchkeras.postprocess import PostprocessOptions
from pitchkeras.sampling import GenerationRequest, Generator
from pitchkeras.sampling.engine import DecodeEngine

relaxed = PostprocessOptions(strip_to_last_start=False, check_conditions=False, reject_second_document=False,
                             require_sentence=False, trim_to_sentence=False)
generator = Generator(load_model(sys.argv[1]), batch_size=2, max_new_tokens=8, postprocess_options=relaxed)
rock = {"score": 8.0, "genre": "Rock"}
new_shape = GenerationRequest(rock, "word " * 20, seed=2, top_logprobs=2)
alone = DecodeEngine(generator, slots=2).generate([new_shape], None, 6)[0]  # stepped here: compiles inline
engine = DecodeEngine(generator, slots=2)
engine.warmup([len(generator._tokenize(generator.example_prompt()))], 30)
engine.start()
running = engine.submit(GenerationRequest(rock, "", seed=1), None, 30)
served = engine.submit(new_shape, None, 6).result(timeout=600)
running.result(timeout=600)
engine.close()
print("RESULT " + json.dumps({"same": served.completion_ids == alone.completion_ids, "ended": running.finish_reason,
                              "compiles": engine.counters.compiles, "inline": engine.counters.inline_compiles}))
'''


@pytest.mark.slow
def test_on_jax_a_new_shape_compiles_off_the_engine_thread(tiny_model_dir):
    from tests.jax_child import run_on_jax

    result = run_on_jax(JAX_SCRIPT, str(tiny_model_dir))
    assert result == {"same": True, "ended": "length", "compiles": result["compiles"], "inline": 0}
    assert result["compiles"] >= 1
