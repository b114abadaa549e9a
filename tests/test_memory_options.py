"""The memory options of `finetune`: `--optimizer adafactor|lion`, `--remat` and `--batch-size auto`.

Each trains the tiny preset (loss falls), resumes exactly after SIGTERM, and is
stored in the run; on JAX, remat with dropout gives the same losses as no remat.
"""

import dataclasses
import json
import os
import shutil
import signal

import numpy as np
import pytest

from tests.jax_child import run_on_jax
from tests.test_train import TINY_SHAPE, checkpoint_arrays, small_config, write_dataset


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    data = write_dataset(root / "data")
    # The same training rows without val.csv, for runs that only check training (no validation pass to compile).
    (root / "train-only").mkdir()
    for name in ("train.csv", "stats.json"):
        shutil.copy(data / name, root / "train-only" / name)
    return {"data": data, "train_only": root / "train-only", "cache": root / "token-cache", "root": root}


def _interrupt_at(step):
    def log(line):
        if line.startswith(f"step {step}/"):
            os.kill(os.getpid(), signal.SIGTERM)
    return log


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(optimizer="adafactor", learning_rate=0.2),
                                     dict(optimizer="lion", learning_rate=1e-3, remat=True)],
                         ids=["adafactor", "lion-remat"])
def test_optimizer_and_remat_train_and_resume_exactly(shared, options):
    from pitchkeras.train import finetune
    from pitchkeras.train.checkpoints import read_state

    name = options["optimizer"]
    settings = dict(steps=8, save_every=4, print_every=1, val_every=0, sample_every=0, **options)
    ref = finetune(small_config(shared, shared["root"] / f"ref-{name}", **settings))
    losses = [loss for _, loss in ref.losses]
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses

    config = small_config(shared, shared["root"] / f"resume-{name}", **settings)
    first = finetune(config, log=_interrupt_at(4))
    assert first.interrupted and first.step == 4
    state = read_state(first.run_dir / "checkpoints" / "ckpt-00000004")
    assert state["optimizer"] == name and state["remat"] == options.get("remat", False)
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert saved["optimizer"] == name and saved["remat"] == options.get("remat", False)
    second = finetune(config)
    assert [s for s, _ in second.losses] == list(range(5, 9))
    assert [loss for _, loss in second.losses] == pytest.approx(losses[4:], rel=1e-4, abs=1e-5)
    resumed = checkpoint_arrays(second.run_dir / "checkpoints" / "ckpt-00000008")
    uninterrupted = checkpoint_arrays(ref.run_dir / "checkpoints" / "ckpt-00000008")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_resume_with_another_optimizer_is_refused(shared):
    from pitchkeras.errors import UsageError
    from pitchkeras.train import finetune

    config = small_config(shared, shared["root"] / "switch", steps=2, save_every=2, val_every=0)
    finetune(config)
    with pytest.raises(UsageError, match="--optimizer adamw.*--optimizer adamw or --restore-from fresh"):
        finetune(small_config(shared, shared["root"] / "switch", steps=4, save_every=2, val_every=0,
                              optimizer="lion"))


def test_remat_on_tensorflow_refuses_dropout():
    import keras_hub

    from pitchkeras.errors import UsageError
    from pitchkeras.train.remat import remat_transformer_blocks

    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16, dropout=0.1)
    with pytest.raises(UsageError, match="dropout.*KERAS_BACKEND=jax"):
        remat_transformer_blocks(backbone)


JAX_SCRIPT = r"""
import json, sys
from pitchkeras.model import TinyConfig
from pitchkeras.train import TrainConfig, finetune
data, root, cache, shape = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = {}
adafactor = {"optimizer": "adafactor", "learning_rate": 0.2}
for key, options in (("adafactor", adafactor), ("adafactor_remat", dict(adafactor, remat=True)),
                     ("lion", {"optimizer": "lion", "learning_rate": 1e-3})):
    values = dict(dataset=data, checkpoint_dir=f"{root}/{key}", preset="tiny", steps=6, batch_size=4,
                  sequence_length=32, learning_rate=3e-3, save_every=6, val_every=0, progress=False,
                  cache_dir=cache, tiny=TinyConfig(**shape, dropout=0.1))
    values.update(options)
    out[key] = [loss for _, loss in finetune(TrainConfig(**values)).losses]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_jax_remat_with_dropout_matches_and_optimizers_train(shared, tmp_path):
    """Adafactor with and without remat (dropout on), and Lion, on JAX (AdamW on JAX: tests/test_train.py)."""
    losses = run_on_jax(JAX_SCRIPT, str(shared["train_only"]), str(tmp_path), str(shared["cache"]),
                        json.dumps(TINY_SHAPE))
    # The same dropout masks in the recomputation: remat changes memory, not the numbers.
    assert losses["adafactor_remat"] == pytest.approx(losses["adafactor"], rel=1e-5)
    for key, run in losses.items():
        assert np.mean(run[-2:]) < run[0] - 0.1, (key, run)


def test_auto_batch_without_budget_on_a_cpu_keeps_the_batch(shared):
    from pitchkeras.train.auto_batch import resolve_batch

    lines = []
    config = small_config(shared, shared["root"] / "auto-cpu", auto_batch=True, batch_size=8, grad_accum=2)
    assert resolve_batch(config, {}, 1, lines.append) is config
    assert "no accelerator and no --memory" in lines[0]


PLAN_SCRIPT = r"""
import dataclasses, json, sys
from pitchkeras.train.plan import PlanRequest, _plan_here
result = _plan_here(PlanRequest.from_json(json.loads(sys.argv[1])))
print("RESULT " + json.dumps({"plans": [dataclasses.asdict(p) for p in result.plans],
                              "device_memory": result.device_memory}))
"""


@pytest.fixture
def plans_on_the_jax_worker(monkeypatch):
    """`plan_memory` does its child's work (`_plan_here`) in the session's JAX worker instead of a fresh JAX
    process; the child itself is exercised by tests/test_plan.py's `pitchkeras plan` test."""
    from pitchkeras.train import plan

    def plan_memory(request, *, timeout=1800):
        found = run_on_jax(PLAN_SCRIPT, json.dumps(request.to_json()), timeout=timeout)
        return plan.PlanResult([plan.MemoryPlan(**p) for p in found["plans"]], found["device_memory"])

    monkeypatch.setattr(plan, "plan_memory", plan_memory)


@pytest.mark.slow
def test_auto_batch_under_a_small_budget_accumulates(shared, plans_on_the_jax_worker):
    """A budget between the plans of micro-batches 4 and 8 gives 4 x 2 accumulated, printed and recorded."""
    from pitchkeras.train import finetune
    from pitchkeras.train.checkpoints import read_state
    from pitchkeras.train.plan import PlanRequest, plan_memory

    config = small_config(shared, shared["root"] / "auto", auto_batch=True, batch_size=8, steps=2, save_every=2,
                          val_every=0)
    plans = plan_memory(PlanRequest(dataclasses.replace(config, grad_accum=2), batch_sizes=[4, 8]))
    four, eight = sorted(plans.plans, key=lambda p: p.batch_size)
    assert four.total < eight.total
    budget = (four.total + eight.total) / 2 / (1 - config.memory_margin)
    lines = []
    result = finetune(dataclasses.replace(config, memory=f"{int(budget)}B"), log=lines.append)
    assert any(line.startswith("auto batch: micro-batch 4 x 2 accumulated = 8 per step") for line in lines), lines
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["batch_size"] == 4 and saved["grad_accum"] == 2 and saved["auto_batch"] is True
    state = read_state(result.run_dir / "checkpoints" / "ckpt-00000002")
    assert state["batch_size"] == 4 and state["grad_accum"] == 2
