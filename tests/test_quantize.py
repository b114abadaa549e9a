"""int8 weights: Keras's quantize on the backbone, and the Generator's cached loop running on the quantized layers."""

import numpy as np
import pytest

from pitchkeras.errors import InvalidArgument
from pitchkeras.quantize import is_quantized, quantize_model
from tests.test_sampling import PROOF_PREFIXES, ROCK, keras_hub_greedy

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def int8_model(sampling_model):
    from pitchkeras.model import load_model

    return quantize_model(load_model(sampling_model.path), "int8")


def test_quantize_turns_kernels_and_the_embedding_into_int8(int8_model):
    backbone = int8_model.causal_lm.backbone
    assert is_quantized(int8_model)
    assert backbone.token_embedding.embeddings.dtype == "int8"
    kernels = [w for w in backbone.transformer_layers[0].weights if w.path.endswith("/kernel")]
    assert kernels and {w.dtype for w in kernels} == {"int8"}
    assert backbone.compute_dtype == "float32"  # activations stay float; the loop still compiles with XLA


def test_quantize_collects_garbage_once_and_gives_keras_own_int8_weights(sampling_model, monkeypatch):
    """Keras's per-layer `gc.collect()` calls (one per dropped kernel) run once, at the end; the int8 weights are
    exactly those of Keras's own `quantize`, and `gc.collect` is itself again afterwards."""
    import gc
    import warnings

    from pitchkeras.model import load_model

    calls = []
    real_collect = gc.collect

    def counting_collect(*args):
        calls.append(args)
        return real_collect(*args)

    monkeypatch.setattr(gc, "collect", counting_collect)
    ours = quantize_model(load_model(sampling_model.path), "int8")
    assert calls == [()] and gc.collect is counting_collect
    keras_own = load_model(sampling_model.path).causal_lm.backbone
    with warnings.catch_warnings():  # Keras's own per-layer notes, as quantize_model hides them
        warnings.simplefilter("ignore", UserWarning)
        keras_own.quantize("int8")
    assert len(calls) > 2  # Keras alone collects once per quantized layer
    weights = {w.path: w for w in ours.causal_lm.backbone.weights}
    assert sorted(weights) == sorted(w.path for w in keras_own.weights)
    for w in keras_own.weights:
        np.testing.assert_array_equal(np.asarray(weights[w.path]), np.asarray(w), err_msg=w.path)


def test_bad_modes_and_double_quantization_are_invalid_argument(int8_model, sampling_model):
    with pytest.raises(InvalidArgument, match="quantize must be one of int8"):
        quantize_model(sampling_model, "int4")
    with pytest.raises(InvalidArgument, match="already quantized"):
        quantize_model(int8_model, "int8")
    assert quantize_model(sampling_model, None) is sampling_model and not is_quantized(sampling_model)


@pytest.mark.slow
def test_the_cached_loop_runs_on_the_quantized_layers(int8_model, sampling_model):
    from pitchkeras.conditioning import REVIEWS
    from pitchkeras.sampling import Generator, SamplerConfig

    # keras-hub's own generate on the quantized model is the reference: the same int8 layers, its own loop.
    generator = Generator(int8_model, batch_size=4, max_new_tokens=12, stop_at_end_token=False)
    prompts = [generator._tokenize(REVIEWS.prompt(ROCK, prefix)) for prefix in PROOF_PREFIXES[:3]]
    expected = [keras_hub_greedy(int8_model.causal_lm, p, 12) for p in prompts]
    assert generator.complete_ids(prompts, [0, 1, 2], SamplerConfig(top_k=1), 12) == expected
    # The int8 logits are close to, not equal to, the float ones.
    float_logits, int8_logits = (
        np.asarray(m.causal_lm.backbone.token_embedding(m.causal_lm.backbone(
            {"token_ids": np.asarray([prompts[0]]), "padding_mask": np.ones((1, len(prompts[0])), bool)})[:, -1],
            reverse=True))
        for m in (sampling_model, int8_model))
    assert not np.array_equal(float_logits, int8_logits)
    np.testing.assert_allclose(int8_logits, float_logits, atol=0.1 * np.abs(float_logits).max())
