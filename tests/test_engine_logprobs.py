"""Log-probabilities from the engine: the model's own distribution (a direct forward pass agrees within 1e-4)
for greedy and sampled rows, top alternatives, stream token deltas that add up to the Sample's, and the tokens
kept at a stop sequence."""

import math

import numpy as np
import pytest


tf = pytest.importorskip("tensorflow")

from pitchkeras.errors import InvalidArgument  # noqa: E402
from pitchkeras.sampling import GenerationRequest, SamplerConfig, TokenLogprob  # noqa: E402
from pitchkeras.sampling.engine import DecodeEngine  # noqa: E402
from tests.test_engine import generator, model_dir  # noqa: E402,F401
from tests.test_sampling import ROCK  # noqa: E402


def direct_logprobs(generator, prompt_ids, completion_ids):
    """log_softmax of the backbone's logits over prompt + completion, one full forward pass, no cache:
    row i is the distribution of the token after position len(prompt) - 1 + i."""
    backbone = generator._backbone
    ids = np.asarray([list(prompt_ids) + list(completion_ids)], np.int32)
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
    logits = backbone.token_embedding(hidden, reverse=True)
    scores = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1).numpy()[0]
    return scores[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]


@pytest.mark.parametrize("config", [SamplerConfig(top_k=1),
                                    SamplerConfig(temperature=1.3, top_p=0.9, repetition_penalty=1.3)],
                         ids=["greedy", "sampled"])
def test_chosen_logprobs_equal_a_direct_forward_pass(generator, config):
    engine = DecodeEngine(generator, slots=4)
    requests = [GenerationRequest(ROCK, "The band", seed=3, top_logprobs=3),
                GenerationRequest(ROCK, "", seed=4, top_logprobs=0),
                GenerationRequest(ROCK, "A quiet", seed=5)]  # no logprobs, beside rows that ask
    samples = engine.generate(requests, config, 12)
    for request, sample in zip(requests, samples):
        assert sample.finish_reason == "length" and len(sample.completion_ids) == 12
        assert generator.detokenize(list(sample.completion_ids)) == sample.raw[len(sample.prompt):]
        if request.top_logprobs is None:
            assert sample.logprobs is None
            continue
        assert [t.token_id for t in sample.logprobs] == list(sample.completion_ids)
        expected = direct_logprobs(generator, generator._tokenize(sample.prompt), sample.completion_ids)
        got = np.array([t.logprob for t in sample.logprobs])
        np.testing.assert_allclose(got, expected[np.arange(12), list(sample.completion_ids)], atol=1e-4)
        for token, row in zip(sample.logprobs, expected):
            assert len(token.top) == request.top_logprobs
            best = np.argsort(-row, kind="stable")[: request.top_logprobs]
            assert [i for i, _ in token.top] == best.tolist()
            np.testing.assert_allclose([lp for _, lp in token.top], row[best], atol=1e-4)
            if config.top_k == 1 and token.top:  # greedy draws the most likely token
                assert token.top[0][0] == token.token_id
        if config.top_k != 1:  # sampling drew tokens other than the most likely
            assert any(t.logprob < expected[i].max() - 1e-6 for i, t in enumerate(sample.logprobs))


def test_token_deltas_add_up_to_the_sample_and_stop_keeps_the_completing_token(generator):
    engine = DecodeEngine(generator, slots=2)
    request = GenerationRequest(ROCK, "The band", seed=5, top_logprobs=2)
    plain = engine.generate([request], None, 20)[0]
    continuation = plain.raw[len(plain.prompt):]
    stop = continuation[8:11]
    assert continuation.find(stop) == 8
    for asked in (2, None):
        stream = engine.submit(GenerationRequest(ROCK, "The band", seed=5, top_logprobs=asked),
                               SamplerConfig(stop_sequences=(stop,)), 20)
        engine.run_until_idle()
        pairs = list(stream.token_deltas(timeout=0))
        sample = stream.result()
        assert sample.finish_reason == "stop_sequence"
        assert "".join(text for text, _ in pairs) == continuation[:8]
        tokens = [t for _, group in pairs for t in group]
        assert tuple(t.token_id for t in tokens) == sample.completion_ids
        kept = sample.completion_ids
        # The kept tokens end with the one that completed the text kept: it covers character 7, not 8 on.
        assert kept == plain.completion_ids[: len(kept)]
        assert len(generator.detokenize(list(kept))) >= 8 > len(generator.detokenize(list(kept[:-1])))
        if asked is None:
            assert sample.logprobs is None and all(math.isnan(t.logprob) and t.top == () for t in tokens)
        else:
            assert tuple(tokens) == sample.logprobs == plain.logprobs[: len(kept)]
            assert all(isinstance(t, TokenLogprob) and len(t.top) == 2 for t in tokens)


def test_top_logprobs_out_of_range_is_refused_before_it_queues(generator):
    engine = DecodeEngine(generator, slots=1)
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(InvalidArgument, match="top_logprobs"):
            engine.submit(GenerationRequest(ROCK, top_logprobs=bad), None, 5)
    assert engine.counters.waiting == 0
