"""The gradient gates of `compile_for_training` on JAX's CPU backend: the same numbers, one conditional a block.

`pitchkeras.train.remat.gate_block_gradients` routes each transformer block's
input gradient through a `lax.cond`, so XLA's CPU fusion cannot copy the
residual stream's gradient chain into every block's weight-gradient fusion.
It must change the program, never the numbers.
"""

import pytest

from tests.jax_child import run_on_jax

JAX_SCRIPT = r"""
import json
import numpy as np
import keras, keras_hub, jax
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.optimizer import compile_for_training
from pitchkeras.train.remat import GATED, _gradient_gate

def model(gates):
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=97, num_layers=4, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=32, dropout=0.1)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    compile_for_training(lm, TrainConfig(dataset="-", steps=10, learning_rate=1e-2, warmup_steps=0, batch_size=4,
                                         sequence_length=16), jit_compile=True, gradient_gates=gates)
    return lm

ids = np.random.default_rng(0).integers(0, 97, size=(8, 17)).astype(np.int32)
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
out = {}
for gates in (True, False):
    lm = model(gates)
    history = keras.Model.fit(lm, x, ids[:, 1:], batch_size=4, epochs=3, shuffle=False, verbose=0)
    lm.make_train_function()
    state = ([v.value for v in lm.trainable_variables], [v.value for v in lm.non_trainable_variables],
             [v.value for v in lm.optimizer.variables], [v.value for v in lm.metrics_variables])
    program = jax.jit(lm.train_step).lower(state, (x, ids[:, 1:], None)).as_text()
    out[str(gates)] = {"losses": history.history["loss"],
                       "weights": [float(np.abs(np.asarray(v.value)).sum()) for v in lm.trainable_variables],
                       "gated": [bool(getattr(b, GATED, False)) for b in lm.backbone.transformer_layers],
                       "conditionals": program.count("stablehlo.case")}
gate_grad = jax.grad(lambda v, w: (_gradient_gate(v) * w).sum())
w = np.arange(6, dtype=np.float32).reshape(2, 3)
out["gradient"] = np.asarray(gate_grad(np.ones((2, 3), np.float32), w)).tolist()
poisoned = w.copy(); poisoned[0, 0] = np.nan
out["poisoned"] = np.isnan(np.asarray(gate_grad(np.ones((2, 3), np.float32), poisoned))).all().item()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_gates_change_the_program_not_the_numbers():
    out = run_on_jax(JAX_SCRIPT)
    gated, plain = out["True"], out["False"]
    assert gated["gated"] == [True] * 4 and plain["gated"] == [False] * 4
    assert gated["conditionals"] == plain["conditionals"] + 4  # one per block, in the backward pass
    assert gated["losses"] == pytest.approx(plain["losses"], rel=1e-6)  # dropout included: the same masks
    assert gated["weights"] == pytest.approx(plain["weights"], rel=1e-5, abs=1e-6)  # key biases: ~1e-8 of noise
    assert plain["losses"][-1] < plain["losses"][0]
    # The gate is the identity's gradient, and a NaN at its first element poisons all of it (as the step is).
    assert out["gradient"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert out["poisoned"] is True


def test_gates_only_on_jax_on_a_cpu():
    import keras
    import keras_hub

    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import compile_for_training
    from pitchkeras.train.remat import GATED

    expected = keras.config.backend() == "jax"
    if expected:
        import jax

        expected = jax.default_backend() == "cpu"
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    calls = [block.call for block in backbone.transformer_layers]
    compile_for_training(lm, TrainConfig(dataset="-", batch_size=2, sequence_length=8), jit_compile=False)
    assert ([block.call for block in backbone.transformer_layers] != calls) is expected
    assert [getattr(block, GATED, False) for block in backbone.transformer_layers] == [expected] * 2
