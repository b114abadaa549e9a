"""The decode engine: determinism alone, mixed and joining mid-flight; greedy equals keras-hub; slots freed at
once; no head-of-line blocking; stop sequences and whole characters in the deltas; the same on JAX."""

import textwrap
import threading

import pytest

from pitchkeras.conditioning import REVIEWS

tf = pytest.importorskip("tensorflow")

from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig  # noqa: E402
from pitchkeras.sampling.engine import CANCELLED, Cancelled, DecodeEngine, _Row, _safe_end  # noqa: E402
from tests.jax_child import run_on_jax  # noqa: E402
from tests.test_sampling import PROOF_PREFIXES, ROCK, keras_hub_greedy  # noqa: E402

# Different prompt buckets, lengths and every sampler setting: what shares one step.
MIXED = [
    (GenerationRequest(ROCK, "", seed=1), SamplerConfig(), 20),
    (GenerationRequest(ROCK, "The band plays loud and", seed=2), SamplerConfig(temperature=1.3, top_k=5), 7),
    (GenerationRequest({"score": 3.0, "genre": "Jazz"}, "word " * 12, seed=3),
     SamplerConfig(top_p=0.5, repetition_penalty=1.4), 12),
    (GenerationRequest(ROCK, "A quiet", seed=4), SamplerConfig(no_repeat_ngram_size=2, temperature=0.9), 16),
]


@pytest.fixture(scope="module")
def model_dir(sampling_model_dir):
    """The session's sampling-shape model directory (tests/conftest.py)."""
    return sampling_model_dir


@pytest.fixture(scope="module")
def generator(model_dir):
    from pitchkeras.model import load_model

    # No stop at <|endoftext|>: an untrained model may draw it early; every row then runs its length.
    return Generator(load_model(model_dir), batch_size=4, max_new_tokens=20, stop_at_end_token=False)


def test_the_step_updates_the_decode_state_in_place_on_tensorflow(generator):
    """The HLO proof: XLA aliases every cache, the token buffer and the positions of the resident state to the
    step's outputs (updated in place), and copies no cache-sized array."""
    import re

    engine = DecodeEngine(generator, slots=2, tokens_per_step=4)
    state = engine._state.fresh()
    state.resize(2, 64, engine._program)
    hlo = engine._program.step_ir(state, tokens=4)
    caches = 2 * len(generator._backbone.transformer_layers)  # a key and a value cache per layer
    aliased = {int(p) for p in re.findall(r"\{\d+\}: \((\d+), \{\}, may-alias\)", hlo)}
    assert aliased == set(range(caches + 2)), aliased  # parameters: the caches, the token buffer, the positions
    cache = "f32[" + ",".join(str(d) for d in state.caches[0][0].shape) + "]"
    assert not [line for line in hlo.splitlines() if " copy(" in line and line.split("=")[1].strip().startswith(cache)]
    state.release()


def _loop_fused_dots(hlo: str) -> list:
    """The result shape of each product an HLO module emits as a plain loop (a loop fusion holding a dot)."""
    import re

    bodies = dict(re.findall(r"^(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
    return [dot.group(1) for name in re.findall(r"kind=kLoop, calls=(%[\w.\-]+)", hlo)
            for dot in re.finditer(r"= (\w+\[[\d,]*\])\{[^}]*\} dot\(", bodies.get(name, ""))]


def test_a_one_row_step_runs_its_products_as_library_calls(generator):
    """A lone request runs on 1 row on TensorFlow: the q/k/v products take 2-D kernel views, so XLA's CPU
    backend does not fuse them with the kernels' reshape into plain loops (BUILD_NOTES.md, "Ninth pass")."""
    from pitchkeras.sampling.decode import flat_projections

    assert generator._batch_shape(1) == 1
    engine = DecodeEngine(generator, slots=2)
    state = engine._state.fresh()
    state.resize(1, 64, engine._program)
    # Only the logits' product may stay a loop (over the embedding's transpose: fast, rows read in order).
    vocabulary = generator._backbone.vocabulary_size
    assert _loop_fused_dots(engine._program.step_ir(state)) in ([], [f"f32[{vocabulary}]"])
    views = flat_projections(generator._backbone)
    kernel = generator._backbone.transformer_layers[0]._self_attention_layer._query_dense.kernel
    assert len(views) == len(generator._backbone.transformer_layers) and views[0][0].shape == (
        kernel.shape[0], kernel.shape[1] * kernel.shape[2])
    state.release()


def test_lora_layers_run_their_own_calls_with_the_same_tokens(generator, model_dir):
    """A LoRA-enabled model (a fine-tuning's sample callback) has no 2-D kernel views: its q/k/v layers run their
    own calls. Its adapters start at zero, so its tokens are the plain model's."""
    from pitchkeras.model import load_model
    from pitchkeras.sampling.decode import flat_projections

    model = load_model(model_dir)
    model.causal_lm.backbone.enable_lora(2)
    assert flat_projections(model.causal_lm.backbone) is None
    assert flat_projections(generator._backbone) is not None
    request, config, length = MIXED[0]
    lora = Generator(model, batch_size=4, max_new_tokens=20, stop_at_end_token=False)
    assert lora.generate([request], config=config, max_new_tokens=length)[0].completion_ids == \
        generator.generate([request], config=config, max_new_tokens=length)[0].completion_ids


def run_mixed(engine, join_after_steps=None) -> list[str]:
    """MIXED through `engine` (all at once, or the last two joining after some steps): the raw texts."""
    first = MIXED if join_after_steps is None else MIXED[:2]
    streams = [engine.submit(r, c, n) for r, c, n in first]
    if join_after_steps is not None:
        for _ in range(join_after_steps):
            engine.step()
        streams += [engine.submit(r, c, n) for r, c, n in MIXED[2:]]
    engine.run_until_idle()
    return [s.result().raw for s in streams]


@pytest.mark.slow
def test_texts_are_the_same_alone_mixed_and_joining_mid_flight(generator):
    engine = DecodeEngine(generator, slots=4)
    alone = []
    for request, config, length in MIXED:
        stream = engine.submit(request, config, length)
        engine.run_until_idle()
        alone.append(stream.result().raw)
        assert len(stream.result().raw) > len(stream.result().prompt)
    assert len(set(alone)) == len(MIXED)
    steps = engine.counters.steps
    assert run_mixed(engine) == alone
    # Mixed settings and lengths shared the steps: as many steps as the longest request, not the sum.
    assert engine.counters.steps - steps == max(n for _, _, n in MIXED)
    assert run_mixed(engine, join_after_steps=3) == alone
    # Several tokens per compiled call: the same texts.
    assert run_mixed(DecodeEngine(generator, slots=4, tokens_per_step=5), join_after_steps=1) == alone
    # The closed batch draws the same tokens (same counter-based random numbers per position).
    request, config, length = MIXED[1]
    assert generator.generate([request], config=config, max_new_tokens=length)[0].raw == alone[1]


def test_rows_that_finish_are_refilled_at_once(generator):
    engine = DecodeEngine(generator, slots=2)
    streams = [engine.submit(GenerationRequest(ROCK, "", seed=s), None, n) for s, n in enumerate([3, 12, 3, 3])]
    engine.run_until_idle()
    assert [s.result() and s.tokens for s in streams] == [3, 12, 3, 3]
    # Two slots for 21 tokens: the short ones take turns beside the long one (12 steps), not 3 + 12 + 3.
    assert engine.counters.steps == 12 and engine.counters.row_steps == 21
    assert engine.counters.prefills == 4 and engine.counters.active == 0


def test_a_lone_request_runs_on_the_smallest_row_bucket_with_the_same_text(generator):
    engine = DecodeEngine(generator, slots=8)
    smallest = engine.row_buckets[0]
    assert engine.row_buckets[-1] == 8 and smallest in (1, 2)
    request, config, length = MIXED[3]
    alone = engine.submit(request, config, length)
    engine.run_until_idle()
    assert engine.counters.computed_rows == smallest * engine.counters.steps == smallest * length
    others = [(GenerationRequest(ROCK, "", seed=10 + i), None, length) for i in range(5)]
    # Beside 5 others, in slot 5: every step runs all 8 rows.
    streams = [engine.submit(*other) for other in others] + [engine.submit(request, config, length)]
    steps, computed = engine.counters.steps, engine.counters.computed_rows
    engine.run_until_idle()
    assert engine.counters.computed_rows - computed == 8 * (engine.counters.steps - steps)
    # In slot 0 beside 5 shorter ones: 8 rows, then the smallest bucket once they leave.
    first = engine.submit(request, config, length)
    shorter = [engine.submit(r, c, 3) for r, c, _ in others]
    engine.step()
    assert engine.counters.rows == 8
    engine.run_until_idle()
    assert engine.counters.rows == smallest and all(s.result() for s in shorter)
    assert streams[-1].result().raw == first.result().raw == alone.result().raw


def test_greedy_equals_keras_hub_generate_alone_and_mixed(generator):
    greedy = SamplerConfig(top_k=1)
    prompts = [generator._tokenize(REVIEWS.prompt(ROCK, prefix)) for prefix in PROOF_PREFIXES]
    expected = [generator.detokenize(keras_hub_greedy(generator.model.causal_lm, p, 10)) for p in prompts]
    assert len(set(expected)) > 1
    engine = DecodeEngine(generator, slots=4)
    requests = [GenerationRequest(ROCK, prefix, seed=i) for i, prefix in enumerate(PROOF_PREFIXES)]
    alone = [engine.generate([r], greedy, 10)[0] for r in requests[:2]]
    assert [s.raw[len(s.prompt):] for s in alone] == expected[:2]
    # Five requests for four slots, beside sampled rows of other lengths: the fifth joins when one leaves.
    streams = [engine.submit(r, greedy, 10) for r in requests] + [engine.submit(r, c, n) for r, c, n in MIXED[1:3]]
    engine.run_until_idle()
    assert [s.result().raw[len(s.result().prompt):] for s in streams[:5]] == expected


def test_cancel_frees_the_slot_at_the_next_step(generator):
    engine = DecodeEngine(generator, slots=1)
    long = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 40)
    engine.step()
    engine.step()
    waiting = engine.submit(GenerationRequest(ROCK, "", seed=2), None, 3)
    engine.step()
    assert (engine.counters.active, engine.counters.waiting, engine.counters.prefills) == (1, 1, 1)
    long.cancel()
    engine.step()  # one step: the cancelled row leaves, the waiting one is prefilled and decodes its first token
    assert engine.counters.cancelled == 1 and engine.counters.prefills == 2 and engine.counters.active == 1
    assert long.finish_reason == CANCELLED
    with pytest.raises(Cancelled):
        long.result()
    engine.run_until_idle()
    assert waiting.result().raw and engine.counters.active == 0


def test_a_deadline_ends_a_request_and_frees_its_slot(generator):
    engine = DecodeEngine(generator, slots=1)
    late = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 40, timeout=0.0)
    engine.run_until_idle()
    assert late.finish_reason == "deadline" and engine.counters.cancelled == 1 and engine.counters.active == 0


def test_a_short_request_sent_during_a_long_one_finishes_first(generator):
    engine = DecodeEngine(generator, slots=4)
    engine.start()
    try:
        order = []
        first_delta = threading.Event()

        def listener(name):
            def hear(delta):
                if delta is None:
                    order.append(name)
                else:
                    first_delta.set()
            return hear

        long = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 55, listener=listener("long"))
        assert first_delta.wait(120)
        short = engine.submit(GenerationRequest(ROCK, "", seed=2), None, 3, listener=listener("short"))
        short.result(120)
        long.result(120)
        assert order == ["short", "long"]
    finally:
        engine.close()


def test_stop_sequences_end_the_text_and_are_never_streamed(generator):
    engine = DecodeEngine(generator, slots=2)
    request = GenerationRequest(ROCK, "The band", seed=5)
    plain = engine.generate([request], None, 20)[0]
    continuation = plain.raw[len(plain.prompt):]
    stop = continuation[8:11]
    assert len(stop) == 3 and continuation.find(stop) == 8
    stream = engine.submit(request, SamplerConfig(stop_sequences=("zzzzzz", stop)), 20)
    deltas = []
    while engine.step():
        pass
    deltas = list(stream.deltas(timeout=0))
    assert stream.finish_reason == "stop_sequence"
    assert "".join(deltas) == continuation[:8] == stream.result().raw[len(plain.prompt):]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_deltas_are_whole_characters_and_a_stop_prefix_is_held_back(generator):
    engine = DecodeEngine(generator, slots=1)
    ids = generator._tokenize("é ü ok")[1:]  # the tiny byte-level vocabulary splits é and ü into bytes
    assert len(ids) > len("é ü ok") - 2
    stream = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 5)
    row = _Row(stream, position=0, limit=64)
    pieces = []
    for token in ids:
        row.completion.append(token)
        before = row.text
        engine._extend_text(row)
        pieces.append(row.text[len(before):])
    assert "".join(pieces) == "é ü ok" and "\ufffd" not in "".join(pieces)
    assert _safe_end("great rec", ("record",)) == len("great ")
    assert _safe_end("great r", ("rx", "record")) == len("great ")
    assert _safe_end("great", ("record",)) == len("great")


def test_bad_requests_fail_before_they_queue(generator):
    from pitchkeras.errors import InvalidArgument

    engine = DecodeEngine(generator, slots=1)
    with pytest.raises(InvalidArgument, match="genre"):
        engine.submit(GenerationRequest({"score": 8.0, "genre": "Polka"}), None, 5)
    with pytest.raises(InvalidArgument, match="stop_sequences"):
        engine.submit(GenerationRequest(ROCK), SamplerConfig(stop_sequences=("",)), 5)
    with pytest.raises(InvalidArgument, match="length"):
        engine.submit(GenerationRequest(ROCK), None, 0)
    assert engine.counters.waiting == 0


# Runs in the session's JAX worker (tests/jax_child.py) from the repository root: the same engine checks, their texts printed.
JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    assert keras.config.backend() == "jax", keras.config.backend()
    from pitchkeras.model import load_model
    from pitchkeras.sampling import Generator, SamplerConfig
    from pitchkeras.sampling.engine import DecodeEngine
    from tests.test_engine import MIXED, run_mixed

    generator = Generator(load_model(sys.argv[1]), batch_size=4, max_new_tokens=20, stop_at_end_token=False)
    engine = DecodeEngine(generator, slots=4)
    alone = [engine.generate([r], c, n)[0].raw for r, c, n in MIXED]
    greedy = [s.raw for s in engine.generate([r for r, _, _ in MIXED], SamplerConfig(top_k=1), 10)]
    chunked = run_mixed(DecodeEngine(generator, slots=4, tokens_per_step=5), 1)
    print("RESULT " + json.dumps({"alone": alone, "mixed": run_mixed(engine), "joined": run_mixed(engine, 3),
                                  "chunked": chunked, "greedy": greedy}))
    """
)


@pytest.mark.slow
def test_engine_on_jax_gives_the_tensorflow_texts(model_dir, generator):
    on_jax = run_on_jax(JAX_SCRIPT, str(model_dir))
    engine = DecodeEngine(generator, slots=4)
    on_tf = [engine.generate([r], c, n)[0].raw for r, c, n in MIXED]
    assert on_jax["alone"] == on_jax["mixed"] == on_jax["joined"] == on_jax["chunked"] == on_tf
    prompts = [generator._tokenize(REVIEWS.prompt(r.conditions, r.prefix)) for r, _, _ in MIXED]
    expected = [generator.detokenize(keras_hub_greedy(generator.model.causal_lm, p, 10)) for p in prompts]
    assert [raw[len(REVIEWS.prompt(r.conditions, r.prefix)):] for raw, (r, _, _) in zip(on_jax["greedy"], MIXED)] \
        == expected
