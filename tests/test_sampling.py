"""Sampler and Generator tests: exact token selection on fixed inputs, a tiny model for the loop."""

import numpy as np
import pytest

from pitchkeras.conditioning import REVIEWS, validate_conditions
from pitchkeras.errors import InvalidArgument
from pitchkeras.postprocess import PostprocessOptions
from pitchkeras.sampling import (
    GenerationRequest,
    Generator,
    SamplerConfig,
    prompt_bucket,
    row_keys,
)

tf = pytest.importorskip("tensorflow")

TEXTS = [
    REVIEWS.example({"score": score, "genre": genre}, body)
    for score in (3.0, 8.0)
    for genre in ("Rock", "Jazz")
    for body in ("The band plays loud. Mr. Smith sings well.", "A quiet record. It is good music for everyone.")
] * 20


UNIFORM_GRID = np.linspace(0.0, 1.0, 1000, endpoint=False, dtype=np.float32)


def select(probabilities, uniform, top_k=0, top_p=1.0):
    """`select_tokens` for one row of probabilities and many uniform numbers."""
    from pitchkeras.sampling import select_tokens

    probabilities = np.asarray(probabilities, dtype=np.float32)
    batch = len(uniform)
    return select_tokens(
        tf.constant(np.tile(probabilities, (batch, 1))),
        tf.constant(np.asarray(uniform, dtype=np.float32)),
        tf.constant([top_k] * batch, tf.int32),
        tf.constant([top_p] * batch, tf.float32),
    ).numpy()


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs, named):
    with pytest.raises(InvalidArgument, match=named):
        SamplerConfig(**kwargs).validate()


def test_config_defaults_are_valid():
    config = SamplerConfig().validate()
    assert (config.temperature, config.top_k, config.top_p) == (0.7, 0, 0.95)
    assert (config.repetition_penalty, config.no_repeat_ngram_size) == (1.0, 0)  # off: today's behaviour
    assert SamplerConfig(top_p=1.0, top_k=5).validate().top_k == 5


# -- token selection on fixed probabilities ------------------------------------------------


def test_nucleus_never_admits_a_token_outside_it():
    probabilities = [0.05, 0.5, 0.15, 0.3]  # nucleus at 0.9: tokens 1, 3, 2 (mass before 2 is 0.8 < 0.9)
    chosen = select(probabilities, UNIFORM_GRID, top_p=0.9)
    assert set(chosen) == {1, 2, 3}
    # Inverse CDF over the renormalised nucleus: shares follow 0.5/0.95, 0.3/0.95, 0.15/0.95.
    shares = np.bincount(chosen, minlength=4) / len(chosen)
    np.testing.assert_allclose(shares[[1, 3, 2]], np.array([0.5, 0.3, 0.15]) / 0.95, atol=2e-3)


def test_nucleus_keeps_the_token_that_crosses_top_p():
    chosen = select([0.6, 0.3, 0.1], UNIFORM_GRID, top_p=0.7)  # 0.6 < 0.7, so 0.3 is kept too
    assert set(chosen) == {0, 1}
    chosen = select([0.6, 0.3, 0.1], UNIFORM_GRID, top_p=0.6)  # mass before 0.3 is 0.6, not < 0.6
    assert set(chosen) == {0}


def test_tiny_top_p_equals_greedy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        probabilities = rng.dirichlet(np.ones(500)).astype(np.float32)
        chosen = select(probabilities, UNIFORM_GRID[::50], top_p=1e-6)
        assert set(chosen) == {int(np.argmax(probabilities))}


def test_one_hot_is_greedy_for_any_setting():
    probabilities = np.zeros(50, np.float32)
    probabilities[17] = 1.0
    for top_k, top_p in [(0, 1.0), (0, 0.95), (3, 1.0), (1, 0.5)]:
        assert set(select(probabilities, UNIFORM_GRID[::10], top_k, top_p)) == {17}


def test_top_k_keeps_exactly_the_k_most_likely():
    probabilities = [0.1, 0.25, 0.05, 0.2, 0.4]
    assert set(select(probabilities, UNIFORM_GRID, top_k=1)) == {4}
    assert set(select(probabilities, UNIFORM_GRID, top_k=3)) == {4, 1, 3}
    assert set(select(probabilities, UNIFORM_GRID, top_k=0)) == {0, 1, 2, 3, 4}
    # Both: top-k 3 then nucleus 0.6 -> 0.4, 0.25 (mass before 0.2 is 0.65).
    assert set(select(probabilities, UNIFORM_GRID, top_k=3, top_p=0.6)) == {4, 1}


def test_no_top_p_samples_the_full_distribution():
    probabilities = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    shares = np.bincount(select(probabilities, UNIFORM_GRID), minlength=4) / len(UNIFORM_GRID)
    np.testing.assert_allclose(shares, probabilities, atol=2e-3)


def test_rows_use_their_own_settings():
    from pitchkeras.sampling import select_tokens

    probabilities = tf.constant([[0.1, 0.2, 0.3, 0.4]] * 2)
    chosen = select_tokens(probabilities, tf.constant([0.0, 0.0]), tf.constant([1, 0]), tf.constant([1.0, 1.0]))
    assert chosen.numpy().tolist() == [3, 0]  # row 0 top-k 1 -> argmax; row 1 unrestricted -> first token at u=0


def test_temperature_scales_logits():
    from pitchkeras.sampling import scaled_probabilities

    logits = np.array([[1.0, 2.0, 4.0]], np.float32)
    for temperature in (0.5, 1.0, 2.0):
        got = scaled_probabilities(tf.constant(logits), tf.constant([temperature])).numpy()
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Log-probability gaps scale with 1/temperature; a low temperature is near-greedy.
    cold = scaled_probabilities(tf.constant(logits), tf.constant([0.01])).numpy()
    assert cold[0, 2] > 0.999


# -- logits processors on fixed logits ----------------------------------------------------------


def reference_repetition_penalty(logits, token_ids, length, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor, transcribed to numpy (float32)."""
    out = np.array(logits, np.float32)
    for row, p in enumerate(np.asarray(penalty, np.float32)):
        context = np.asarray(token_ids[row][:length])
        score = out[row, context]
        out[row, context] = np.where(score < 0, score * p, score / p)
    return out


def reference_no_repeat_ngram(logits, token_ids, length, ngram_size):
    """transformers' NoRepeatNGramLogitsProcessor (`_get_ngrams` / `_get_generated_ngrams`), in numpy."""
    out = np.array(logits, np.float32)
    for row, n in enumerate(ngram_size):
        tokens = [int(t) for t in token_ids[row][:length]]
        if n == 0 or length + 1 < n:
            continue
        seen: dict = {}
        for i in range(len(tokens) - n + 1):
            seen.setdefault(tuple(tokens[i:i + n - 1]), []).append(tokens[i + n - 1])
        out[row, seen.get(tuple(tokens[length - n + 1:length]), [])] = -np.inf
    return out


def processor_cases(count=40, seed=0):
    """Random (logits, token_ids, length, penalty, ngram_size) cases over a 7-token vocabulary, 3 rows each."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        logits = rng.normal(0, 2, (3, 7)).astype(np.float32)
        token_ids = rng.integers(0, 4, (3, 12)).astype(np.int32)  # few distinct tokens: many repeats
        length = int(rng.integers(0, 13))
        penalty = rng.choice([1.0, 0.5, 1.2, 2.0], 3).astype(np.float32)
        ngram = rng.integers(0, 5, 3).astype(np.int32)
        cases.append((logits, token_ids, length, penalty, ngram))
    return cases


def run_processors(case):
    """Both processors on one case, as numpy (any backend)."""
    from keras import ops

    from pitchkeras.sampling import ban_repeated_ngrams, penalize_repetition

    logits, token_ids, length, penalty, ngram = case
    length = ops.convert_to_tensor(length, "int32")
    return (ops.convert_to_numpy(penalize_repetition(logits, token_ids, length, penalty)),
            ops.convert_to_numpy(ban_repeated_ngrams(logits, token_ids, length, ngram)))


def test_repetition_penalty_exact_on_fixed_logits():
    logits = np.array([[2.0, -1.0, 0.5, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]], np.float32)
    token_ids = np.array([[0, 1, 1, 4, 2], [3, 3, 3, 3, 3]], np.int32)
    # Row 0's context (length 3) is tokens 0, 1, 1: 2.0 / 2 and -1.0 * 2, once each; row 1 has penalty 1 (off).
    got, _ = run_processors((logits, token_ids, 3, np.array([2.0, 1.0], np.float32), np.zeros(2, np.int32)))
    np.testing.assert_array_equal(got, [[1.0, -2.0, 0.5, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]])


def test_no_repeat_ngram_exact_on_fixed_logits():
    logits = np.zeros((3, 5), np.float32)
    token_ids = np.array([[1, 2, 3, 1, 2, 0], [1, 2, 1, 2, 1, 0], [4, 4, 0, 0, 0, 0]], np.int32)
    _, got = run_processors((logits, token_ids, 5, np.ones(3, np.float32), np.array([3, 2, 1], np.int32)))
    inf = -np.inf
    # Row 0: context ends "1 2" and "1 2 3" was seen -> 3. Row 1: ends "1", "1 2" seen -> 2.
    # Row 2 (n = 1): every context token (0 and 4; the context is 4 4 0 0 0).
    np.testing.assert_array_equal(got, [[0, 0, 0, inf, 0], [0, 0, inf, 0, 0], [inf, 0, 0, 0, inf]])


def test_processors_match_transformers_algorithm_on_random_cases():
    from pitchkeras.sampling import ban_repeated_ngrams, penalize_repetition

    # Also XLA-compiled, as in the decode loop (XLA may rewrite x / p as x * (1 / p), which rounds differently).
    compiled = [tf.function(f, jit_compile=True) for f in (penalize_repetition, ban_repeated_ngrams)]
    for case in processor_cases():
        logits, token_ids, length, penalty, ngram = case
        penalized, banned = run_processors(case)
        np.testing.assert_array_equal(compiled[0](logits, token_ids, tf.constant(length), penalty).numpy(), penalized)
        np.testing.assert_array_equal(compiled[1](logits, token_ids, tf.constant(length), ngram).numpy(), banned)
        np.testing.assert_array_equal(penalized, reference_repetition_penalty(logits, token_ids, length, penalty))
        expected = reference_no_repeat_ngram(logits, token_ids, length, ngram)
        every_token = np.all(np.isinf(expected), axis=-1)
        expected[every_token] = logits[every_token]  # documented: a row left with no token is not banned
        np.testing.assert_array_equal(banned, expected)


@pytest.mark.slow
def test_processors_match_transformers_itself():
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    for logits, token_ids, length, penalty, ngram in processor_cases(count=10, seed=1):
        if length == 0:
            continue
        for row in range(3):
            one = (logits[row:row + 1], token_ids[row:row + 1], length, penalty[row:row + 1], ngram[row:row + 1])
            penalized, banned = run_processors(one)
            ids = torch.tensor(token_ids[row:row + 1, :length], dtype=torch.long)
            scores = torch.tensor(logits[row:row + 1])
            theirs = generation.RepetitionPenaltyLogitsProcessor(float(penalty[row]))(ids, scores.clone())
            np.testing.assert_array_equal(penalized, theirs.numpy())
            if ngram[row] > 0:
                theirs = generation.NoRepeatNGramLogitsProcessor(int(ngram[row]))(ids, scores.clone()).numpy()
                if not np.all(np.isinf(theirs)):
                    np.testing.assert_array_equal(banned, theirs)


def test_counter_uniform_is_per_row_and_deterministic():
    from pitchkeras.sampling import counter_uniform

    keys = tf.constant(row_keys([1, 2, 1]))
    first = counter_uniform(keys, tf.constant(5)).numpy()
    assert first[0] == first[2] and first[0] != first[1]
    assert np.all((first >= 0) & (first < 1))
    assert not np.array_equal(first, counter_uniform(keys, tf.constant(6)).numpy())
    many = counter_uniform(tf.constant(row_keys(range(4000))), tf.constant(0)).numpy()
    assert abs(many.mean() - 0.5) < 0.02  # roughly uniform


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 16, 17, 64, 65, 256, 257, 600)] == [16, 16, 32, 64, 128, 256, 512, 768]


# -- keras-hub Sampler API -------------------------------------------------------------------------


# -- the Generator on a tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(sampling_model):
    return Generator(sampling_model, batch_size=4, max_new_tokens=12)


ROCK = {"score": 8.0, "genre": "Rock"}


def test_prompt_tokens_match_the_keras_hub_preprocessor(generator, sampling_model):
    prompt = REVIEWS.prompt(ROCK, "The Band")
    packed = sampling_model.causal_lm.preprocessor.generate_preprocess([prompt], sequence_length=32)
    expected = np.asarray(packed["token_ids"])[0][np.asarray(packed["padding_mask"])[0]].tolist()
    assert generator._tokenize(prompt) == expected
    assert expected.count(sampling_model.tokenizer.start_token_id) == 1  # one start token, not two


def test_same_seed_same_output_and_batch_neighbours_do_not_matter(generator):
    requests = [GenerationRequest(ROCK, seed=s) for s in (1, 2, 3)] + [GenerationRequest(ROCK, "Long prefix words", 4)]
    first = generator.generate(requests)
    again = generator.generate(list(reversed(requests)))[::-1]
    assert [s.raw for s in first] == [s.raw for s in again]
    assert len({s.raw for s in first}) > 1  # different seeds, different samples
    for sample, request in zip(first, requests):
        assert sample.raw.startswith(sample.prompt)
        assert sample.prompt == REVIEWS.prompt(ROCK, request.prefix)
        assert sample.seed == request.seed and sample.model_version == "test-v1"
        assert sample.conditions == ROCK
        assert (sample.rejected is None) == bool(sample.text)


def test_new_prompt_lengths_in_a_bucket_do_not_recompile(sampling_model):
    from pitchkeras.model import load_model

    # A model of its own: compiled programs are shared by every Generator on a backbone, so the session model
    # may already hold the shapes counted here.
    generator = Generator(load_model(sampling_model.path), batch_size=2, max_new_tokens=6, prompt_buckets=(16, 32))
    generator.warmup(prompt_lengths=[5], batch_sizes=[2])
    warm = generator.trace_count  # the engine's step and prefill programs
    assert warm >= 2
    prefixes = ("", "The", "The band plays loud")
    lengths = [len(generator._tokenize(REVIEWS.prompt(ROCK, prefix))) for prefix in prefixes]
    assert len(set(lengths)) == 3 and max(lengths) <= 16  # three prompt lengths, one bucket
    for prefix in prefixes:
        generator.generate([GenerationRequest(ROCK, prefix, seed=1), GenerationRequest(ROCK, seed=2)])
    assert generator.trace_count == warm
    generator.generate([GenerationRequest(ROCK, "word " * 20, seed=1)] * 2)  # a longer prompt: a new prefill shape
    assert generator.trace_count == warm + 2  # and a longer cache: a new step shape
    # A new sampler config is a tensor input: no retrace.
    generator.generate([GenerationRequest(ROCK, seed=1)] * 2, config=SamplerConfig(temperature=1.3, top_k=5, top_p=0.5))
    assert generator.trace_count == warm + 2


def test_generators_on_one_model_share_its_compiled_programs(sampling_model):
    from pitchkeras.model import load_model
    from pitchkeras.quantize import quantize_model

    model = load_model(sampling_model.path)  # no other test's programs on it
    requests = [GenerationRequest(ROCK, "The band", seed=1), GenerationRequest(ROCK, seed=2)]
    first = Generator(model, batch_size=2, max_new_tokens=6)
    tokens = [s.completion_ids for s in first.generate(requests)]
    traced = first.trace_count
    assert traced >= 2  # a prefill and a step
    # Another batch size and post-processing on the same model: the same shapes and tokens, nothing compiled again.
    second = Generator(model, batch_size=4, max_new_tokens=6, postprocess_options=PostprocessOptions(
        strip_to_last_start=False, require_sentence=False, trim_to_sentence=False))
    assert [s.completion_ids for s in second.generate(requests)] == tokens
    assert second.engine()._program is first.engine()._program and second.trace_count == traced
    # Without the stop at the end token: the end token is an argument of the step, so the same programs run and
    # nothing is traced again; with the same seeds the texts run on past where the first ones stopped.
    fourth = Generator(model, batch_size=2, max_new_tokens=6, stop_at_end_token=False)
    longer = [s.completion_ids for s in fourth.generate(requests)]
    assert fourth.engine()._program is first.engine()._program and fourth.trace_count == traced
    assert [ids[:len(short)] for ids, short in zip(longer, tokens)] == tokens
    # Another number of tokens per call: a step of its own, the prefills shared; the same tokens.
    from pitchkeras.sampling.engine import BULK_CACHE_BUCKETS, DecodeEngine

    engine = DecodeEngine(first, slots=2, tokens_per_step=3, cache_buckets=BULK_CACHE_BUCKETS, prefill_together=True)
    assert [s.completion_ids for s in engine.generate(requests, None, 6)] == tokens
    assert engine._program is first.engine()._program and engine._program.traces == traced + 1
    # Quantized in place, the layers are new: programs of its own, never the ones traced on the float weights.
    third = Generator(quantize_model(model, "int8"), batch_size=2, max_new_tokens=6)
    assert third.engine()._program is not first.engine()._program and third.trace_count == 0


def test_generation_stops_at_end_of_text(sampling_model):
    from pitchkeras.model import load_model

    # A second copy of the tiny model, rigged so <|endoftext|> always wins.
    model = load_model(sampling_model.path)
    backbone = model.causal_lm.backbone
    end = sampling_model.tokenizer.end_token_id
    embeddings = backbone.token_embedding.embeddings.numpy()
    embeddings[end] = 0
    embeddings[end, 0] = 100.0
    backbone.token_embedding.embeddings.assign(embeddings)
    backbone.layer_norm.gamma.assign(np.zeros_like(backbone.layer_norm.gamma.numpy()))
    beta = np.zeros_like(backbone.layer_norm.beta.numpy())
    beta[0] = 1.0
    backbone.layer_norm.beta.assign(beta)
    rigged = Generator(model, batch_size=2, max_new_tokens=8)
    sample = rigged.generate([GenerationRequest(ROCK, "It", seed=0)])[0]
    assert sample.raw == sample.prompt  # stopped at once, end token not in the text
    assert sample.rejected == "no_sentence"
    # Benchmarks turn the stop off: every row runs the full length, end tokens and all.
    full = Generator(model, batch_size=2, max_new_tokens=8, stop_at_end_token=False)
    prompt = full._tokenize(REVIEWS.prompt(ROCK, "It"))
    assert full.complete_ids([prompt, prompt], [0, 1], SamplerConfig(), 8) == [[end] * 8] * 2


def test_truncate_and_include_prefix(sampling_model):
    options = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False,
                                 normalize_whitespace=False)
    generator = Generator(sampling_model, batch_size=1, max_new_tokens=12, postprocess_options=options)
    request = GenerationRequest(ROCK, "Prefix", seed=5)
    full = generator.generate([request])[0]
    continuation = full.raw[len(full.prompt):]
    assert len(continuation) > 4
    stop = continuation[2:4]
    cut = generator.generate([request], truncate=stop)[0]
    assert cut.raw == full.prompt + continuation[: continuation.find(stop)]
    assert full.text.startswith("Prefix")
    without = generator.generate([request], include_prefix=False)[0]
    assert not without.text.startswith("Prefix") and full.text.endswith(without.text)


def test_generator_validates_requests(generator):
    with pytest.raises(InvalidArgument, match="Jazz.*Rock|known"):
        generator.generate([GenerationRequest({"score": 8.0, "genre": "Polka"})])
    with pytest.raises(InvalidArgument, match="missing"):
        generator.generate([GenerationRequest({"score": 8.0})])
    with pytest.raises(InvalidArgument, match="top_p"):
        generator.generate([GenerationRequest(ROCK)], config=SamplerConfig(top_p=0.0))
    with pytest.raises(InvalidArgument, match="at most"):
        generator.generate([GenerationRequest(ROCK, "word " * 400)])


def test_validate_conditions_spells_known_values(sampling_model):
    assert validate_conditions(sampling_model.info, {"score": "7", "genre": " rock "}) == {"score": 7.0, "genre": "Rock"}
    with pytest.raises(InvalidArgument, match="range"):
        validate_conditions(sampling_model.info, {"score": 11, "genre": "Rock"})


# -- the processors inside the compiled loop, exact on a model with fixed logits -------------------


def fixed_logits(vocabulary_size, logits: dict) -> np.ndarray:
    """`logits` (token id -> value); every other token a distinct value near -30, so greedy has no ties."""
    out = -30.0 - 1e-3 * np.arange(vocabulary_size, dtype=np.float32)
    for token, value in logits.items():
        out[token] = value
    return out.astype(np.float32)


def fixed_logits_model(sampling_model, logits: dict):
    """A copy of the tiny model whose next-token logits are `fixed_logits(...)`, whatever the input.

    The final layer norm outputs e0 (gamma 0, beta e0), so the tied-embedding
    logits are exactly column 0 of the token embedding.
    """
    from pitchkeras.model import load_model

    model = load_model(sampling_model.path)
    backbone = model.causal_lm.backbone
    embeddings = backbone.token_embedding.embeddings.numpy()
    embeddings[:, 0] = fixed_logits(len(embeddings), logits)
    backbone.token_embedding.embeddings.assign(embeddings)
    backbone.layer_norm.gamma.assign(np.zeros_like(backbone.layer_norm.gamma.numpy()))
    beta = np.zeros_like(backbone.layer_norm.beta.numpy())
    beta[0] = 1.0
    backbone.layer_norm.beta.assign(beta)
    return model


def simulate_greedy(fixed, vocabulary_size, prompt, steps, penalty, ngram_size):
    """What greedy decoding with transformers' two processors gives on constant logits."""
    context = list(prompt)
    for _ in range(steps):
        logits = fixed_logits(vocabulary_size, fixed)[None, :]
        ids = np.asarray([context], np.int32)
        logits = reference_repetition_penalty(logits, ids, len(context), [penalty])
        logits = reference_no_repeat_ngram(logits, ids, len(context), [ngram_size])
        context.append(int(np.argmax(logits)))
    return context[len(prompt):]


def test_processors_inside_the_loop_match_greedy_simulation(sampling_model):
    # Token ids 10..13 likely (positive and negative logits), the end token never.
    fixed = {10: 3.0, 11: 2.5, 12: 2.0, 13: -1.0}
    model = fixed_logits_model(sampling_model, fixed)
    generator = Generator(model, batch_size=2, max_new_tokens=10, stop_at_end_token=False)
    prompts = [generator._tokenize(REVIEWS.prompt(ROCK, prefix)) for prefix in ("", "The band plays")]
    vocabulary = model.causal_lm.backbone.vocabulary_size
    for penalty, ngram_size in [(1.0, 0), (2.0, 0), (1.0, 2), (1.0, 3), (1.3, 2)]:
        config = SamplerConfig(top_k=1, repetition_penalty=penalty, no_repeat_ngram_size=ngram_size)
        got = generator.complete_ids(prompts, [0, 1], config, 10)
        expected = [simulate_greedy(fixed, vocabulary, prompt, 10, penalty, ngram_size) for prompt in prompts]
        assert got == expected, (penalty, ngram_size)
        if (penalty, ngram_size) == (1.0, 0):
            assert got[0] == [10] * 10  # off: today's greedy loop
        else:
            assert len(set(got[0])) > 1
    assert generator.trace_count == 2  # one step and one prefill: the settings are tensors, no recompile


# -- proofs: the cached loop is keras-hub's GPT-2, and a request's text ignores its batch ------------

PROOF_PREFIXES = ("", "The", "The band plays loud and", "The band plays loud. Mr. Smith sings well. A quiet record.",
                  "word " * 25)  # prompt buckets 16, 16, 16, 32 and 128


def keras_hub_greedy(causal_lm, prompt_ids, new_tokens):
    """`GPT2CausalLM.generate` with keras-hub's GreedySampler on token ids: the new tokens."""
    causal_lm.compile(sampler="greedy")
    preprocessor, causal_lm.preprocessor = causal_lm.preprocessor, None  # token ids in, token ids out
    try:
        length = len(prompt_ids) + new_tokens
        token_ids = np.zeros((1, length), np.int32)
        token_ids[0, : len(prompt_ids)] = prompt_ids
        mask = np.arange(length)[None, :] < len(prompt_ids)
        out = causal_lm.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    finally:
        causal_lm.preprocessor = preprocessor
    return np.asarray(out["token_ids"])[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_greedy_tokens_equal_keras_hub_generate_alone_and_in_mixed_batches(sampling_model):
    generator = Generator(sampling_model, batch_size=8, max_new_tokens=12, stop_at_end_token=False)
    prompts = [generator._tokenize(REVIEWS.prompt(ROCK, prefix)) for prefix in PROOF_PREFIXES]
    buckets = [prompt_bucket(len(p)) for p in prompts]
    assert buckets == [16, 16, 16, 32, 128], [len(p) for p in prompts]
    greedy = SamplerConfig(top_k=1)
    expected = [keras_hub_greedy(sampling_model.causal_lm, p, 12) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    alone = [generator.complete_ids([p], [0], greedy, 12)[0] for p in prompts]
    assert alone == expected
    graph = Generator(sampling_model, batch_size=8, max_new_tokens=12, stop_at_end_token=False, jit_compile=False)
    assert [graph.complete_ids([p], [0], greedy, 12)[0] for p in prompts[:2]] == expected[:2]
    mixed = generator.complete_ids(prompts, list(range(len(prompts))), greedy, 12)  # one batch, bucket 128
    assert mixed == expected
    pairs = generator.complete_ids([prompts[1], prompts[3]], [0, 1], greedy, 12)  # bucket 32
    assert pairs == [expected[1], expected[3]]


@pytest.mark.slow
def test_sampled_text_is_the_same_alone_and_batched_with_a_longer_bucket(sampling_model):
    generator = Generator(sampling_model, batch_size=4, max_new_tokens=16)
    short = GenerationRequest(ROCK, "The band", seed=9)
    longer = GenerationRequest(ROCK, "word " * 25, seed=10)  # bucket 128: the batch runs at that length
    alone = generator.generate([short])[0]
    batched = generator.generate([longer, short, GenerationRequest(ROCK, "", seed=11)])
    assert batched[1].raw == alone.raw and len(alone.raw) > len(alone.prompt)
    assert batched[0].raw == generator.generate([longer])[0].raw


def test_xla_or_graph_is_chosen_per_batch_shape_and_device(sampling_model):
    from pitchkeras.model import load_model
    from pitchkeras.quantize import quantize_model

    auto = Generator(sampling_model, batch_size=8)
    assert not auto.on_accelerator()  # the test machine is a CPU
    assert [auto.uses_xla(b) for b in (1, 2, 8)] == [True, True, True]
    # TensorFlow runs a lone request on 1 row: its steps give the q/k/v products 2-D kernel views (on JAX: 2 rows).
    assert [auto._batch_shape(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 8]
    assert Generator(sampling_model, batch_size=1)._batch_shape(1) == 1
    graph = Generator(sampling_model, jit_compile=False)
    assert not graph.uses_xla(8) and graph._batch_shape(1) == 1  # a graph runs a lone request alone
    assert Generator(sampling_model, jit_compile=True).uses_xla(1)
    int8 = Generator(quantize_model(load_model(sampling_model.path), "int8"))
    assert int8.uses_xla(1) and int8._batch_shape(1) == 1  # int8 dots: XLA everywhere, a lone request alone
    # bfloat16 on a CPU: a graph (oneDNN's kernels); on an accelerator: XLA, with no padding row.
    half = Generator(sampling_model)
    half._backbone = type("Backbone", (), {"compute_dtype": "bfloat16"})()
    assert not half.uses_xla(8) and half._batch_shape(1) == 1
    half._on_accelerator = True
    assert half.uses_xla(1) and half.uses_xla(8) and half._batch_shape(1) == 1


def test_decode_loop_names_what_a_non_gpt2_block_lacks():
    from types import SimpleNamespace

    from pitchkeras.errors import FailedPrecondition
    from pitchkeras.sampling.decode import check_gpt2_layers

    attention = SimpleNamespace(_query_dense=object(), _key_dense=object(), _value_dense=object(),
                                _inverse_sqrt_key_dim=0.125)  # no _output_dense
    layer = SimpleNamespace(name="block_0", normalize_first=True, _self_attention_layer=attention,
                            _self_attention_layer_norm=object(), _feedforward_layer_norm=object(),
                            _feedforward_intermediate_dense=object(), _feedforward_output_dense=object())
    with pytest.raises(FailedPrecondition, match=r"block_0 .*missing: _output_dense"):
        check_gpt2_layers(SimpleNamespace(transformer_layers=[layer], position_embedding=object()))
    attention._output_dense = object()
    layer.normalize_first = False  # a post-norm block computes something else
    with pytest.raises(FailedPrecondition, match=r"block_0 is not a pre-norm .*missing: none"):
        check_gpt2_layers(SimpleNamespace(transformer_layers=[layer], position_embedding=object()))
