"""Gradient accumulation on JAX: one optimizer update per step, with Keras's own arithmetic.

`pitchkeras.train.accumulation.update_only_when_due` replaces Keras 3.15's JAX
accumulation (which runs the update at every micro-batch and discards it) with
a branch that updates only at the last micro-batch. Trained side by side with
Keras's own, the losses, weights and optimizer state must be equal.
"""

import pytest

from tests.jax_child import run_on_jax

JAX_SCRIPT = r"""
import json
import numpy as np
import keras, keras_hub
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.optimizer import compile_for_training

ids = np.random.default_rng(0).integers(0, 97, size=(24, 17)).astype(np.int32)
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
out = {}
for optimizer in ("adamw", "adafactor"):
    for ours in (True, False):
        keras.utils.set_random_seed(5)
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=97, num_layers=1, num_heads=2, hidden_dim=16,
                                                 intermediate_dim=32, max_sequence_length=32, dropout=0.1)
        lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        config = TrainConfig(dataset="-", steps=4, grad_accum=3, learning_rate=1e-2, warmup_steps=1, batch_size=4,
                             sequence_length=16, optimizer=optimizer)
        compile_for_training(lm, config, jit_compile=True)
        patched = "_backend_apply_gradients" in vars(lm.optimizer)
        if not ours:
            del lm.optimizer._backend_apply_gradients  # Keras's own JaxOptimizer method again
        history = keras.Model.fit(lm, x, ids[:, 1:], batch_size=4, epochs=4, steps_per_epoch=3, shuffle=False,
                                  verbose=0)
        out[f"{optimizer}-{ours}"] = {
            "patched": patched, "losses": history.history["loss"],
            "weights": [float(np.abs(np.asarray(v.value)).sum()) for v in lm.trainable_variables],
            "optimizer": [float(np.abs(np.asarray(v.value, dtype=np.float64)).sum()) for v in lm.optimizer.variables],
            "iterations": int(np.asarray(lm.optimizer.iterations))}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_one_update_per_step_same_numbers_as_keras():
    out = run_on_jax(JAX_SCRIPT)
    for optimizer in ("adamw", "adafactor"):
        ours, keras_own = out[f"{optimizer}-True"], out[f"{optimizer}-False"]
        assert ours["patched"] and keras_own["patched"]
        assert ours["iterations"] == keras_own["iterations"] == 4  # updates; Keras counts 12 micro-batches inside
        assert ours["losses"] == pytest.approx(keras_own["losses"], rel=1e-5), optimizer
        assert ours["weights"] == pytest.approx(keras_own["weights"], rel=1e-5, abs=1e-6), optimizer
        assert ours["optimizer"] == pytest.approx(keras_own["optimizer"], rel=1e-5, abs=1e-6), optimizer
        assert ours["losses"][-1] < ours["losses"][0], optimizer


def test_tensorflow_keeps_keras_accumulation():
    import keras

    from pitchkeras.train.accumulation import update_only_when_due

    optimizer = keras.optimizers.AdamW(gradient_accumulation_steps=2)
    assert update_only_when_due(optimizer) is (keras.config.backend() == "jax")
    assert ("_backend_apply_gradients" in vars(optimizer)) is (keras.config.backend() == "jax")
    assert update_only_when_due(keras.optimizers.AdamW()) is False  # no accumulation: nothing to change
