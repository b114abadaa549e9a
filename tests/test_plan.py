"""`pitchkeras plan`: the compiler's memory plan of one training step agrees with what parameter counts imply.

The plans compile Keras's JAX train step for abstract shapes in a child
process (tiny models: seconds each); the GPT-2 shape table is checked
against keras-hub's own parameter counts without compiling anything.
"""

import json

import pytest

from pitchkeras.cli import main
from tests.jax_child import run_on_jax

TINY = dict(vocabulary_size=300, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
            max_sequence_length=256, dropout=0.0)


def gpt2_params(vocabulary_size, num_layers, hidden_dim, intermediate_dim, max_sequence_length, **_):
    """GPT-2's parameter count, written out: embeddings, per block (2 norms, q/k/v/out, 2 MLP layers), final norm."""
    d, f = hidden_dim, intermediate_dim
    block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    return vocabulary_size * d + max_sequence_length * d + num_layers * block + 2 * d


def test_gpt2_shapes_match_keras_hub_parameter_counts():
    from keras_hub.src.models.gpt2.gpt2_presets import backbone_presets

    from pitchkeras.train.plan import model_shape

    for name in ("gpt2_base_en", "gpt2_medium_en", "gpt2_large_en", "gpt2_extra_large_en"):
        assert gpt2_params(**model_shape(name)) == backbone_presets[name]["metadata"]["params"], name


PLAN_SCRIPT = r"""
import json, sys
from pitchkeras.model import TinyConfig
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.plan import PlanRequest, _compile_plan
tiny = json.loads(sys.argv[1])
out = {}
for key, options in json.loads(sys.argv[2]).items():
    request = PlanRequest(TrainConfig(preset="tiny", tiny=TinyConfig(**tiny), **options), batch_sizes=[2])
    out[key] = _compile_plan(request, 2).__dict__
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def plans():
    """Several plans of the tiny model, compiled in the session's JAX worker (tests/jax_child.py)."""
    cases = {
        "adamw": dict(sequence_length=32),
        "lion": dict(sequence_length=32, optimizer="lion"),
        "adafactor": dict(sequence_length=32, optimizer="adafactor"),
        "accum": dict(sequence_length=32, grad_accum=4),
        "lora": dict(sequence_length=32, lora_rank=4),
        "mixed": dict(sequence_length=32, mixed_precision="mixed_bfloat16"),
        "long": dict(sequence_length=256),
        "long_remat": dict(sequence_length=256, remat=True),
    }
    return run_on_jax(PLAN_SCRIPT, json.dumps(TINY), json.dumps(cases))


@pytest.mark.slow
def test_plan_weight_and_optimizer_bytes_follow_parameter_counts(plans):
    """Weights are 4 bytes a parameter (float32 variables, mixed precision too); AdamW keeps 2 moments, Lion 1,
    accumulation one more buffer, LoRA moments only for the adapters; plus a few scalars (step, loss scale)."""
    params = gpt2_params(**TINY)
    scalars = 64  # iterations, learning-rate and loss-scale counters: a few 4-8 byte scalars
    for key, plan in plans.items():
        assert plan["params"] >= params and plan["weights"] == 4 * plan["params"], key
    assert plans["adamw"]["params"] == params and plans["adamw"]["trainable_params"] == params
    assert 0 <= plans["adamw"]["optimizer_state"] - 2 * 4 * params < scalars
    assert 0 <= plans["lion"]["optimizer_state"] - 1 * 4 * params < scalars
    assert 0 <= plans["accum"]["optimizer_state"] - 3 * 4 * params < scalars
    assert plans["mixed"]["weights"] == plans["adamw"]["weights"] and plans["mixed"]["policy"] == "mixed_bfloat16"
    # keras-hub's LoRA adapts each block's query and value EinsumDense (kernel d x heads x head_dim):
    # A is the kernel's shape with its last axis made the rank, B is rank x head_dim; the biases stay trainable.
    d, heads, rank = TINY["hidden_dim"], TINY["num_heads"], 4
    adapter_params = d * heads * rank + rank * (d // heads)
    trainable = TINY["num_layers"] * 2 * (adapter_params + d)
    lora = plans["lora"]
    assert lora["trainable_params"] == trainable
    assert lora["params"] == params + TINY["num_layers"] * 2 * adapter_params
    assert 0 <= lora["optimizer_state"] - 2 * 4 * trainable < scalars and lora["gradients"] == 4 * trainable
    # Every figure is part of the total the compiler planned.
    for key, plan in plans.items():
        assert plan["total"] >= plan["weights"] + plan["optimizer_state"], key


@pytest.mark.slow
def test_remat_plans_fewer_activations_and_adafactor_less_state(plans):
    assert plans["long_remat"]["temporaries"] < 0.7 * plans["long"]["temporaries"]
    assert plans["long_remat"]["weights"] == plans["long"]["weights"]
    assert plans["adafactor"]["optimizer_state"] < plans["adamw"]["optimizer_state"]


@pytest.mark.slow
def test_plan_command_prints_each_figure_against_the_budget(capsys):
    assert main(["plan", "--preset", "tiny", "--sequence-length", "16", "--batch-size", "1,2",
                 "--memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny: batch ") == 2 and "batch 2 x 16 tokens" in out
    for label in ("weights", "optimizer state", "gradients", "activations/temps"):
        assert out.count(label) == 2, label
    assert out.count("of 1.00 GB: fits") == 2


def test_plan_command_errors_are_one_line(capsys, tmp_path):
    assert main(["plan", "--preset", "tiny", "--memory", "16XB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "16XB" in err and "\n" not in err
    assert main(["plan", "--preset", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot plan" in err and "\n" not in err
    assert main(["plan", "--preset", "tiny", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_parse_memory_units():
    from pitchkeras.errors import InvalidArgument
    from pitchkeras.train.config import TrainConfig, parse_memory

    assert parse_memory("16GB") == 16 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("800mb") == 800 * 10**6 and parse_memory("123") == 123
    with pytest.raises(InvalidArgument, match="-1GB"):
        parse_memory("-1GB")
    # TrainConfig.validate promises InvalidArgument for every bad value, the memory budget included.
    with pytest.raises(InvalidArgument, match="16XB"):
        TrainConfig(dataset="data", memory="16XB").validate()
