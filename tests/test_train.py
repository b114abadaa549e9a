"""Fine-tuning through `CausalLM.fit` on the `tiny` preset: loss falls, run files, exact resume,
SIGTERM/SIGKILL, export, mixed precision, per-condition validation, tf.distribute, JAX.

Runs are tiny (1 layer, hidden 32, sequence 32, batch 4) and share one
dataset and one token cache; the expensive uninterrupted run is a module
fixture that several tests read.
"""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pitchkeras.conditioning import REVIEWS
from pitchkeras.errors import InvalidArgument, UsageError
from tests.jax_child import run_on_jax

GENRES = ["Rock", "Electronic", "Jazz"]
WORDS = {
    "Rock": "loud guitars drums riff band stage amplifier chorus",
    "Electronic": "synth beat drum machine bass loop club pulse",
    "Jazz": "saxophone trio swing improvisation horn piano brushes",
}
TINY_SHAPE = dict(vocabulary_size=400, num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64)


def make_corpus(n=90):
    examples = []
    for i in range(n):
        genre = GENRES[i % 3]
        words = WORDS[genre].split()
        body = " ".join(words[(i + k) % len(words)] for k in range(12))
        examples.append(REVIEWS.example({"score": (i % 7) + 2.5, "genre": genre}, f"The {body}.\nIt is {genre.lower()}."))
    return examples


def write_dataset(directory: Path, n=90) -> Path:
    """A `pitchkeras prepare`-shaped directory: train.csv, val.csv, stats.json."""
    directory.mkdir(parents=True, exist_ok=True)
    examples = make_corpus(n)
    for name, rows in (("train.csv", examples[: n - 10]), ("val.csv", examples[n - 10:])):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([r] for r in rows)
    stats = {"prompt_format": REVIEWS.to_json(),
             "condition_values": {"genre": sorted(GENRES), "score": sorted({(i % 7) + 2.5 for i in range(n)})}}
    (directory / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"data": write_dataset(root / "data"), "cache": root / "token-cache", "root": root}


def small_config(shared, checkpoint_dir, **overrides):
    from pitchkeras.model import TinyConfig
    from pitchkeras.train import TrainConfig

    values = dict(
        dataset=str(shared["data"]), checkpoint_dir=str(checkpoint_dir), preset="tiny",
        steps=20, batch_size=4, sequence_length=32, learning_rate=3e-3, print_every=10, save_every=5,
        max_checkpoints=2, val_every=10, val_batches=2, progress=False, cache_dir=str(shared["cache"]),
        jit_compile="false", tiny=TinyConfig(**TINY_SHAPE),
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(run_dir: Path):
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def checkpoint_arrays(path: Path) -> dict:
    """{variable path: array} of a checkpoint directory."""
    from pitchkeras.train.checkpoints import read_arrays

    return read_arrays(path)


@pytest.fixture(scope="module")
def reference(shared):
    """One uninterrupted 20-step run: checkpoints every 5 steps, 2 kept, validation every 10.

    XLA is off here (compiling costs more than 20 tiny steps gain); `single_device` runs with it on.
    """
    from pitchkeras.train import finetune

    lines = []
    result = finetune(small_config(shared, shared["root"] / "ck-ref", sample_every=20), log=lines.append)
    return result, lines


# -- settings, schedule, checkpoints (no training) ----------------------------------


def test_config_rejects_unknown_and_bad_values():
    from pitchkeras.train import TrainConfig

    with pytest.raises(InvalidArgument, match="unknown training setting.*stepz"):
        TrainConfig.from_dict({"dataset": "d", "stepz": 3})
    with pytest.raises(InvalidArgument, match="batch_size must be at least 1"):
        TrainConfig.from_dict({"dataset": "d", "batch_size": 0})
    with pytest.raises(InvalidArgument, match="mixed_precision must be one of"):
        TrainConfig.from_dict({"dataset": "d", "mixed_precision": "fp8"})
    with pytest.raises(InvalidArgument, match="lora_rank must be 0 or more"):
        TrainConfig.from_dict({"dataset": "d", "lora_rank": -1})


def test_learning_rate_schedule_warms_up_then_decays():
    """Keras's CosineDecay with warmup, counted in micro-batches: the same curve with any --grad-accum."""
    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import learning_rate_schedule

    for accum in (1, 4):
        schedule = learning_rate_schedule(TrainConfig(dataset="d", steps=100, warmup_steps=10, learning_rate=1.0,
                                                      grad_accum=accum))
        values = [float(schedule(step * accum)) for step in (0, 5, 10, 55, 100)]
        assert values[0] == pytest.approx(0.0, abs=1e-7) and values[1] == pytest.approx(0.5)
        assert values[2] == pytest.approx(1.0) and 0.1 < values[3] < 1.0 and values[4] == pytest.approx(0.1)


def test_optimizer_is_keras_adamw_with_accumulation_and_clipping():
    import keras

    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import make_optimizer

    optimizer = make_optimizer(TrainConfig(dataset="d", grad_accum=3, clipnorm=0.5))
    assert type(optimizer) is keras.optimizers.AdamW
    assert optimizer.gradient_accumulation_steps == 3 and optimizer.global_clipnorm == 0.5
    assert make_optimizer(TrainConfig(dataset="d")).gradient_accumulation_steps is None


def test_a_process_joins_one_multiworker_cluster_and_reuses_its_strategy(monkeypatch):
    """A second fine-tuning with the same TF_CONFIG reuses the strategy (TensorFlow starts one cluster server per
    process); another TF_CONFIG in the same process is refused with what to do."""
    from pitchkeras.train import distribution

    joined = object()
    monkeypatch.setattr(distribution, "_MULTIWORKER", {'{"cluster": "a"}': joined})
    monkeypatch.setenv("TF_CONFIG", '{"cluster": "a"}')
    assert distribution._multiworker_strategy(None) is joined
    monkeypatch.setenv("TF_CONFIG", '{"cluster": "b"}')
    with pytest.raises(UsageError, match="already joined another multi-worker cluster.*in a new process"):
        distribution._multiworker_strategy(None)


def test_mixed_precision_auto_follows_the_device_facts():
    from pitchkeras.train import DeviceFacts, choose_policy

    assert choose_policy("auto", DeviceFacts()) == "float32"  # CPU only
    assert choose_policy("auto", DeviceFacts(gpu_capabilities=((8, 0),))) == "mixed_bfloat16"  # A100
    assert choose_policy("auto", DeviceFacts(gpu_capabilities=((9, 0), (9, 0)))) == "mixed_bfloat16"  # H100s
    assert choose_policy("auto", DeviceFacts(gpu_capabilities=((7, 5),))) == "mixed_float16"  # T4
    assert choose_policy("auto", DeviceFacts(gpu_capabilities=((8, 6), (7, 0)))) == "mixed_float16"  # the weakest decides
    assert choose_policy("auto", DeviceFacts(tpus=8)) == "mixed_bfloat16"
    assert choose_policy("mixed_float16", DeviceFacts(tpus=8)) == "mixed_float16"  # asked for: kept


def test_cli_flag_defaults_come_from_train_config():
    from pitchkeras.cli import build_parser
    from pitchkeras.train import TrainConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    args = sub.parse_args(["--dataset", "d"])
    defaults = TrainConfig(dataset="d")
    checked = [name for name in vars(args) if hasattr(defaults, name)]
    assert len(checked) >= 25
    for name in checked:
        assert getattr(args, name) == getattr(defaults, name), name


def test_checkpoints_are_atomic_pruned_and_restored_by_path(tmp_path, monkeypatch):
    """A crash while writing leaves `latest` on the previous complete checkpoint; restore goes by path."""
    import keras

    from pitchkeras.train import checkpoints

    def make():
        return [keras.Variable(np.arange(6, dtype="float32").reshape(2, 3), name="w"), keras.Variable(1.0, name="b")]

    variables = make()
    ckdir = tmp_path / "run" / checkpoints.CHECKPOINTS
    for step in (1, 2, 3):
        variables[1].assign(float(step))
        checkpoints.save_checkpoint(ckdir, variables, {"step": step}, keep=2)
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt-00000002", "ckpt-00000003", "latest"]
    assert (ckdir / "latest").read_text().strip() == "ckpt-00000003"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(ckdir, variables, {"step": 4}, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt-00000002", "ckpt-00000003", "latest"]

    found = checkpoints.find_checkpoint(tmp_path / "run", "latest")
    assert found.name == "ckpt-00000003"
    assert checkpoints.find_checkpoint(tmp_path / "run", str(tmp_path / "run")) == found  # a run dir as PATH
    assert checkpoints.find_checkpoint(tmp_path / "run", "fresh") is None
    fresh = make()
    fresh[0].assign(np.zeros((2, 3), "float32"))
    # Restored by path: the order the model lists its variables in does not matter.
    assert checkpoints.restore_checkpoint(found, fresh[::-1])["step"] == 3
    assert float(fresh[1].numpy()) == 3.0 and fresh[0].numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(UsageError, match="missing or incomplete"):
        checkpoints.find_checkpoint(tmp_path / "run", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=r"holds 1 variable\(s\) this model does not have, e.g. b"):
        checkpoints.restore_checkpoint(found, make()[:1])
    other = [keras.Variable(np.zeros((3, 3), "float32"), name="w"), keras.Variable(0.0, name="b")]
    with pytest.raises(UsageError, match=r"w has shape \[2, 3\], this model's is \[3, 3\]; .*another preset"):
        checkpoints.restore_checkpoint(found, other)
    assert other[0].numpy().sum() == 0  # nothing assigned from a refused checkpoint


# -- one real run ----------------------------------------------------------------------


def test_loss_plot_redraws_every_n_steps_and_at_the_end_only_when_it_is_behind(tmp_path, monkeypatch):
    """`loss.png` is redrawn every `every` steps and when training ends, unless the last step's redraw shows it all."""
    from pitchkeras.train import callbacks

    drawn = []
    monkeypatch.setattr(callbacks, "plot_loss", lambda csv_path, out: drawn.append(csv_path))
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n1,2.0\n", encoding="utf-8")

    def run(steps, every, chief=True, start=0):
        drawn.clear()
        plot = callbacks.LossPlot(metrics, tmp_path / "loss.png", every, chief)
        for epoch in range(start, steps):
            plot.on_epoch_end(epoch)
        plot.on_train_end()
        return len(drawn)

    assert run(8, 4) == 2  # steps 4 and 8; the end shows nothing newer
    assert run(6, 4) == 2  # step 4, then the end (steps 5-6 were not drawn)
    assert run(8, 0) == 1  # only at the end
    assert run(3, 4, start=3) == 1  # a resumed run with no step left still draws its run's file once
    assert run(8, 4, chief=False) == 0  # other workers never write


def test_loss_falls_and_run_files(reference):
    result, lines = reference
    assert "precision policy: float32 (auto)" in lines[0] and "XLA: off" in lines[0]
    losses = [loss for _, loss in result.losses]
    assert [s for s, _ in result.losses] == list(range(1, 21))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # clearly learnt something
    run_dir = result.run_dir

    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        assert f.readline().strip() == ("step,loss,learning_rate,tokens_per_sec,val_loss,val_perplexity,"
                                        "loss_scale,skipped_steps")
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-5)
    assert all(float(r["tokens_per_sec"]) > 0 and float(r["learning_rate"]) > 0 for r in rows)
    validated = [int(r["step"]) for r in rows if r["val_loss"]]
    assert validated == [10, 20]
    val = float(rows[19]["val_loss"])
    assert float(rows[19]["val_perplexity"]) == pytest.approx(math.exp(val), rel=1e-4)
    assert result.val_loss == pytest.approx(val, rel=1e-5) and val < float(rows[9]["val_loss"])

    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run_dir / "samples" / "step-00000020.txt").read_text(encoding="utf-8")
    assert samples.count("=== {") == 3 and '"genre": "Electronic"' in samples
    assert all(not r["loss_scale"] and not r["skipped_steps"] for r in rows)  # float32: no loss scaling
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))  # Keras's TensorBoard callback
    ckdir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt-00000015", "ckpt-00000020", "latest"]
    assert (ckdir / "latest").read_text().strip() == "ckpt-00000020"
    state = json.loads((ckdir / "ckpt-00000020" / "state.json").read_text())
    assert state["step"] == 20 and state["data_position"] == 20 and state["model_version"] == result.model_version


def test_validation_per_condition(reference):
    """val_by_condition.csv/.png: a loss per genre and per score bucket at each validation pass."""
    result, _ = reference
    with open(result.run_dir / "val_by_condition.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "condition", "value", "examples", "val_loss", "val_perplexity"]
    assert sorted({int(r["step"]) for r in rows}) == [10, 20]
    last = {(r["condition"], r["value"]): r for r in rows if r["step"] == "20"}
    # The val rows are examples 80-89: scores (i % 7) + 2.5 and the three genres.
    expected_scores = {((i % 7) + 2.5) for i in range(80, 90)}
    buckets = {"0-3.5" if s < 4 else "4-6.5" if s < 7 else "7-8.5" if s < 9 else "9-10" for s in expected_scores}
    assert {v for c, v in last if c == "score"} == buckets
    assert {v for c, v in last if c == "genre"} == set(GENRES)
    assert sum(int(r["examples"]) for (c, _), r in last.items() if c == "genre") == 10
    for row in last.values():
        loss = float(row["val_loss"])
        assert math.isfinite(loss) and float(row["val_perplexity"]) == pytest.approx(math.exp(loss), rel=1e-4)
        assert loss < float(next(r["val_loss"] for r in rows if r["step"] == "10" and
                                 (r["condition"], r["value"]) == (row["condition"], row["value"])))
    assert result.val_by_condition.keys() == last.keys()
    assert (result.run_dir / "val_by_condition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_loss_falls_like_float32(shared, tmp_path, reference, policy):
    """The same 20-step run in bf16/fp16: per-step loss within 0.05 nats of float32's, no NaN;
    fp16 runs under Keras's LossScaleOptimizer and metrics.csv shows the loss scale and skipped steps."""
    from pitchkeras.train import finetune

    ref, _ = reference
    result = finetune(small_config(shared, tmp_path / "ck", mixed_precision=policy, save_every=0, val_every=0))
    assert result.policy == policy and result.step == 20
    losses = [loss for _, loss in result.losses]
    ref_losses = [loss for _, loss in ref.losses]
    assert all(math.isfinite(loss) for loss in losses)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.05  # stated tolerance: 0.05 nats per step
    assert losses[0] - losses[-1] > 0.8 * (ref_losses[0] - ref_losses[-1])  # falls like float32's
    rows = read_metrics(result.run_dir)
    if policy == "mixed_float16":
        assert all(float(r["loss_scale"]) >= 1 for r in rows)
        skipped = [int(r["skipped_steps"]) for r in rows]
        assert skipped == sorted(skipped) and 0 <= skipped[-1] < 20  # cumulative, and most steps applied
    else:  # bfloat16 has float32's range: no loss scaling
        assert all(not r["loss_scale"] for r in rows)
    import keras

    assert keras.config.dtype_policy().name == "float32"  # the run's policy did not leak out of it


def test_exported_model_loads_with_keras_hub_and_generates(reference):
    import keras_hub

    from pitchkeras.model import load_model

    result, _ = reference
    info = json.loads((result.model_dir / "pitchkeras.json").read_text(encoding="utf-8"))
    assert info["model_version"] == result.model_version and result.model_version.startswith("run1-")
    assert info["prompt_format"] == REVIEWS.to_json() and info["condition_values"]["genre"] == sorted(GENRES)
    assert info["base_preset"] == "tiny" and info["sequence_length"] == 32
    causal_lm = keras_hub.models.CausalLM.from_preset(str(result.model_dir))
    # stop_token_ids=None: a model this small may end the document at once; we want tokens to look at.
    text = causal_lm.generate(REVIEWS.prompt({"score": 5.0, "genre": "Rock"}), max_length=24, stop_token_ids=None)
    assert text.startswith("5.0\nRock\n") and len(text) > len("5.0\nRock\n")
    assert load_model(result.model_dir).info.model_version == result.model_version


def test_sigterm_saves_then_resume_matches_uninterrupted_run(shared, reference):
    """SIGTERM at step 10 saves; `latest` continues at step 11 with the same losses, LR and final weights."""
    from pitchkeras.train import finetune

    ref, _ = reference

    def interrupt_at_10(line):
        if line.startswith("step 10/"):
            os.kill(os.getpid(), signal.SIGTERM)

    config = small_config(shared, shared["root"] / "ck-resume")  # samples do not touch training state
    first = finetune(config, log=interrupt_at_10)
    assert first.interrupted and first.step == 10 and first.model_dir is None
    ckdir = first.run_dir / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "ckpt-00000010"
    metrics_before = (first.run_dir / "metrics.csv").read_text(encoding="utf-8")

    second = finetune(config)
    assert second.start_step == 10 and second.step == 20 and second.model_version == first.model_version
    assert [s for s, _ in second.losses] == list(range(11, 21))
    assert [loss for _, loss in second.losses] == pytest.approx([loss for _, loss in ref.losses[10:]], rel=1e-4, abs=1e-5)
    # metrics.csv is appended: the first 10 rows untouched, the step numbers continue.
    metrics_after = (second.run_dir / "metrics.csv").read_text(encoding="utf-8")
    assert metrics_after.startswith(metrics_before)
    rows, ref_rows = read_metrics(second.run_dir), read_metrics(ref.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([float(r["learning_rate"]) for r in ref_rows])
    resumed, uninterrupted = checkpoint_arrays(ckdir / "ckpt-00000020"), checkpoint_arrays(ref.run_dir / "checkpoints" / "ckpt-00000020")
    assert len(resumed) == len(uninterrupted) and any("iteration" in name for name in resumed)
    for (name, a), b in zip(resumed.items(), uninterrupted.values()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)



@pytest.mark.slow
def test_grad_accum_matches_a_larger_batch(shared):
    """fit with batch 4 x 2 accumulated micro-batches == batch 8: same losses and weights (packed rows).

    A constant rate (the schedule reads Keras's micro-batch counter, so under accumulation each update
    uses the rate of its last micro-batch, a fraction of a step later than batch 8's).
    """
    import keras

    from pitchkeras.data.pipeline import make_dataset, read_examples
    from pitchkeras.model import TinyConfig, build_tiny_causal_lm, tokenized_inputs
    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import compile_for_training

    texts = read_examples(shared["data"] / "train.csv")
    runs = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = build_tiny_causal_lm(texts, config=TinyConfig(**TINY_SHAPE), sequence_length=32, seed=0)
        config = TrainConfig(dataset="d", steps=3, learning_rate=3e-3, grad_accum=accum, warmup_steps=0,
                             min_learning_rate_ratio=1.0)
        compile_for_training(model, config, jit_compile=False)
        batches = make_dataset(shared["data"] / "train.csv", model.preprocessor.tokenizer, sequence_length=32,
                               batch_size=batch_size, seed=0)
        with tokenized_inputs(model):
            history = model.fit(batches, epochs=3, steps_per_epoch=accum, verbose=0, shuffle=False)
        runs.append((history.history["loss"], [np.array(v) for v in model.trainable_variables]))
        keras.backend.clear_session()
    (big, big_weights), (accumulated, acc_weights) = runs
    assert accumulated == pytest.approx(big, rel=1e-5)
    assert big[2] < big[0]
    for a, b in zip(acc_weights, big_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_local_preset_directory_with_lora_trains_only_adapters(shared, tmp_path):
    """A keras-hub preset directory loads as --preset PATH; with --lora-rank the base kernels stay frozen."""
    from pitchkeras.data.pipeline import read_examples
    from pitchkeras.model import TinyConfig, build_tiny_causal_lm, load_model
    from pitchkeras.train import finetune

    preset_dir = tmp_path / "preset"
    texts = read_examples(shared["data"] / "train.csv")
    build_tiny_causal_lm(texts, config=TinyConfig(**TINY_SHAPE), sequence_length=32).save_to_preset(str(preset_dir))
    result = finetune(small_config(shared, tmp_path / "ck", preset=str(preset_dir), steps=4, lora_rank=2,
                                   save_every=2, val_every=0))
    assert result.step == 4 and all(math.isfinite(loss) for _, loss in result.losses)
    at2 = checkpoint_arrays(result.run_dir / "checkpoints" / "ckpt-00000002")
    at4 = checkpoint_arrays(result.run_dir / "checkpoints" / "ckpt-00000004")
    lora_b = [n for n in at4 if n.endswith("lora_kernel_b") and "optimizer" not in n and "adamw" not in n]
    frozen = [n for n in at4 if "query" in n and n.endswith("/kernel") and "adamw" not in n]
    assert lora_b and frozen, sorted(at4)[:20]
    assert any(np.abs(at4[n] - at2[n]).max() > 0 for n in lora_b)  # adapters train
    for n in frozen:
        np.testing.assert_array_equal(at4[n], at2[n])  # the base weights do not
    model = load_model(result.model_dir)
    assert model.info.base_preset == str(preset_dir)
    assert model.causal_lm.generate("5.0\nRock\n", max_length=16, stop_token_ids=None).startswith("5.0\nRock\n")


@pytest.mark.slow
def test_cli_prepare_gpt2_simple_txt_then_finetune(shared, tmp_path, capsys):
    """`pitchkeras prepare corpus.txt` (gpt-2-simple delimiters) then `pitchkeras finetune` on its output."""
    from pitchkeras.cli import main

    docs = [f"DJ number {i} plays {' '.join(WORDS[GENRES[i % 3]].split()[:6])} all night long." for i in range(40)]
    corpus = tmp_path / "bios.txt"
    corpus.write_text("".join(f"<|startoftext|>{d}<|endoftext|>\n" for d in docs), encoding="utf-8")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    code = main(["finetune", "--dataset", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ck"),
                 "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--sequence-length", "32",
                 "--learning-rate", "3e-3", "--val-every", "0", "--jit-compile", "false", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "step 3," in out
    info = json.loads((tmp_path / "ck" / "run1" / "model" / "pitchkeras.json").read_text(encoding="utf-8"))
    assert info["prompt_format"] == {"conditions": [], "numeric": []}  # a plain corpus: no conditions
    assert not (tmp_path / "ck" / "run1" / "val_by_condition.csv").exists()


def test_preset_errors_are_one_clear_line(shared, tmp_path, capsys):
    from pitchkeras.cli import main
    from pitchkeras.train import finetune

    with pytest.raises(UsageError, match="has no train.csv"):
        finetune(small_config(shared, tmp_path / "ck", dataset=str(tmp_path)))
    code = main(["finetune", "--dataset", str(shared["data"]), "--checkpoint-dir", str(tmp_path / "ck"),
                 "--preset", "gpt2_medium_en", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == ("pitchkeras finetune: error: cannot download gpt2_medium_en: no network; "
                                            "use --preset tiny or a local preset directory")
    assert "Traceback" not in err
    assert main(["finetune", "--dataset", str(shared["data"]), "--checkpoint-dir", str(tmp_path / "ck"),
                 "--preset", str(tmp_path / "no-such-dir"), "--quiet"]) == 2
    assert "preset directory" in capsys.readouterr().err


# -- processes: SIGKILL, tf.distribute -------------------------------------------------


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    return env


@pytest.mark.slow
def test_cli_sigkill_mid_run_then_resume_latest(shared, tmp_path, cli):
    """The CLI's run is killed in its own process; the resume is the same command, run in this one (a second
    fresh interpreter would only add its import time)."""
    ck = tmp_path / "ck"
    args = ["finetune", "--dataset", str(shared["data"]),
            "--checkpoint-dir", str(ck), "--cache-dir", str(shared["cache"]), "--preset", "tiny",
            "--steps", "60", "--batch-size", "4", "--sequence-length", "32", "--learning-rate", "3e-3",
            "--save-every", "10", "--print-every", "20", "--val-every", "0", "--jit-compile", "false",
            "--max-checkpoints", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "pitchkeras.cli", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest = ck / "run1" / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while not latest.exists():
            if proc.poll() is not None:
                pytest.fail(f"finetune exited early:\n{proc.stderr.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("no checkpoint in time")
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        proc.wait()
    saved = int(latest.read_text().strip().split("-")[1])
    assert 10 <= saved < 60
    assert int(read_metrics(ck / "run1")[-1]["step"]) >= saved  # rows past the checkpoint are dropped on resume

    code, out, err = cli(*args, "--restore-from", "latest", "--quiet")
    assert code == 0, out + err[-3000:]
    assert "step 60," in out
    rows = read_metrics(ck / "run1")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    assert sorted(p.name for p in (ck / "run1" / "checkpoints").glob("ckpt-*")) == ["ckpt-00000050", "ckpt-00000060"]
    assert (ck / "run1" / "model" / "pitchkeras.json").exists()


DIST_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import tensorflow as tf
    mode, data, cache = sys.argv[1:4]
    runs = json.loads(sys.argv[4])  # [[checkpoint dir, steps, SIGTERM after this step or 0], ...], in this process
    if mode == "mirrored":  # two logical CPU devices -> two replicas in one process
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras_hub
    from pitchkeras.model import TinyConfig
    from pitchkeras.train import TrainConfig, finetune
    shapes = []
    real_step = keras_hub.models.GPT2CausalLM.train_step
    def spy(self, data):  # traced once per replica: the per-replica shape of the labels
        shapes.append(list(data[1].shape))
        return real_step(self, data)
    keras_hub.models.GPT2CausalLM.train_step = spy
    from pitchkeras.train import callbacks
    real_end = callbacks.MetricsCSV.on_epoch_end
    def on_epoch_end(self, epoch, logs=None):  # SIGTERM this process alone once step `kill_at` is done
        real_end(self, epoch, logs)
        if epoch + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
    callbacks.MetricsCSV.on_epoch_end = on_epoch_end
    for ck, steps, kill_at in runs:
        shapes.clear()
        result = finetune(TrainConfig(
            dataset=data, checkpoint_dir=ck, cache_dir=cache, preset="tiny", steps=steps, batch_size=4,
            sequence_length=32, learning_rate=3e-3, print_every=0, save_every=2, val_every=0,
            clipnorm=0, progress=False, strategy=mode, seed=0, tiny=TinyConfig(**json.loads(sys.argv[5]))))
        print("RESULT " + json.dumps({"losses": [l for _, l in result.losses], "replicas": result.replicas,
                                      "shapes": list(shapes), "step": result.step, "interrupted": result.interrupted,
                                      "model": str(result.model_dir) if result.model_dir else None}), flush=True)
""")


def _spawn(shared, tmp_path, mode, runs, tf_config=None):
    """One process running `runs` ([checkpoint dir, steps, SIGTERM after step or 0], ...) one after another."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT, encoding="utf-8")
    env = _env()
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, str(script), mode, str(shared["data"]), str(shared["cache"]),
                             json.dumps([[str(ck), steps, kill_at] for ck, steps, kill_at in runs]),
                             json.dumps(TINY_SHAPE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(proc, timeout=300):
    """Each run's RESULT, in order."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err[-4000:]
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


@pytest.fixture(scope="module")
def single_device(shared):
    """The 4-step run the distributed runs must reproduce (same global batch, XLA on).

    No clipping: under tf.distribute Keras clips each replica's share of the gradient before the
    all-reduce, which is not the single-device clip (see BUILD_NOTES.md).
    """
    from pitchkeras.train import finetune

    lines = []
    result = finetune(small_config(shared, shared["root"] / "ck-single", steps=4, save_every=2, val_every=0,
                                   print_every=0, strategy="one", jit_compile="auto", clipnorm=0), log=lines.append)
    assert "XLA: on" in lines[0]
    return result


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_single_device(shared, tmp_path, single_device):
    [mirrored] = _results(_spawn(shared, tmp_path, "mirrored", [(tmp_path / "ck", 4, 0)]))
    assert mirrored["replicas"] == 2
    assert mirrored["shapes"][:2] == [[2, 32], [2, 32]]  # the global batch of 4 split in two
    assert mirrored["losses"] == pytest.approx([loss for _, loss in single_device.losses], rel=1e-3, abs=1e-3)
    ours = checkpoint_arrays(tmp_path / "ck" / "run1" / "checkpoints" / "ckpt-00000004")
    ref = checkpoint_arrays(single_device.run_dir / "checkpoints" / "ckpt-00000004")
    weights = [(a, b) for (name, a), b in zip(ours.items(), ref.values()) if "adamw" not in name]
    assert len(ours) == len(ref) and weights
    for a, b in weights:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def multiworker(shared, tmp_path_factory):
    """One two-process MultiWorkerMirroredStrategy cluster running two fine-tunings in turn, as a notebook would:

    - `full`: 4 steps to the end (checkpoints at 2 and 4, the model);
    - `sigterm`: 8 steps, and SIGTERM on worker 1 alone (not the chief) after step 3.

    Returns {"root": the directory, "full": [chief, worker 1], "sigterm": [chief, worker 1]} (each run's RESULT).
    """
    root = tmp_path_factory.mktemp("multiworker")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = [
        _spawn(shared, root, "multiworker",
               [(root / f"full-{i}", 4, 0), (root / f"sigterm-{i}", 8, 3 if i == 1 else 0)],
               {"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(2)
    ]
    chief, other = _results(workers[0]), _results(workers[1])
    assert len(chief) == len(other) == 2
    return {"root": root, "full": [chief[0], other[0]], "sigterm": [chief[1], other[1]]}


@pytest.mark.slow
def test_multiworker_two_local_processes_match_single_device_and_write_once(multiworker, single_device):
    chief, other = multiworker["full"]
    root = multiworker["root"]
    assert chief["replicas"] == 2 and other["replicas"] == 2
    assert chief["shapes"][0][1:] == [32]  # (the batch size is not static under MultiWorkerMirroredStrategy)
    assert chief["losses"] == pytest.approx([loss for _, loss in single_device.losses], rel=1e-3, abs=1e-3)
    assert chief["losses"] == pytest.approx(other["losses"], rel=1e-6)
    # Files are written once, by the chief (worker 0); worker 1 writes nothing at all.
    assert chief["model"] and other["model"] is None
    assert sorted(p.name for p in (root / "full-0" / "run1" / "checkpoints").glob("ckpt-*")) == [
        "ckpt-00000002", "ckpt-00000004"]
    assert not (root / "full-1").exists()


@pytest.mark.slow
def test_multiworker_sigterm_on_one_worker_stops_every_worker_at_the_same_step(multiworker):
    """SIGTERM on worker 1 (not the chief) after step 3: both workers stop at step 3, the chief saves it.

    This run is the cluster's second fine-tuning in the same processes: the strategy is reused, not rebuilt."""
    chief, other = multiworker["sigterm"]
    for worker in (chief, other):
        assert worker["interrupted"] and worker["step"] == 3 and worker["model"] is None
        assert len(worker["losses"]) == 3
    assert chief["losses"] == pytest.approx(other["losses"], rel=1e-6)
    run = multiworker["root"] / "sigterm-0" / "run1"
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-00000003"
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2, 3]
    assert not (multiworker["root"] / "sigterm-1").exists()


# -- the JAX backend ---------------------------------------------------------------------------------

JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    assert keras.config.backend() == "jax", keras.config.backend()
    import jax
    from pitchkeras.model import TinyConfig, load_model
    from pitchkeras.train import TrainConfig, finetune
    data, ck, cache, shape, tf_model, start = sys.argv[1:7]
    result = finetune(TrainConfig(
        dataset=data, checkpoint_dir=ck, cache_dir=cache, preset=start, steps=20, batch_size=4,
        sequence_length=32, learning_rate=3e-3, print_every=0, save_every=10, val_every=10, val_batches=2,
        progress=False, seed=0, tiny=TinyConfig(**json.loads(shape))))
    on_jax = load_model(tf_model).causal_lm  # trained on TensorFlow, generating on JAX
    text = on_jax.generate("5.0\\nRock\\n", max_length=24, stop_token_ids=None)
    print("RESULT " + json.dumps({"losses": [l for _, l in result.losses], "replicas": result.replicas,
                                  "backend": result.backend, "devices": len(jax.devices()),
                                  "val_loss": result.val_loss, "model": str(result.model_dir), "text": text}))
""")


@pytest.mark.slow
def test_jax_backend_trains_with_data_parallel_like_tensorflow(shared, tmp_path, reference):
    """KERAS_BACKEND=jax, two CPU devices: the same run as TensorFlow's within 2% per step; the models cross over.

    The JAX run starts from the TensorFlow run's starting point (its saved `base/` preset: the same
    initial weights and tokenizer; each backend draws its own random init otherwise).
    """
    import keras_hub

    ref, _ = reference
    jax_side = run_on_jax(JAX_SCRIPT, str(shared["data"]), str(tmp_path / "ck"), str(shared["cache"]),
                          json.dumps(TINY_SHAPE), str(ref.model_dir), str(ref.run_dir / "base"), devices=2)
    assert jax_side["backend"] == "jax" and jax_side["devices"] == 2 and jax_side["replicas"] == 2
    # Same data, same initial weights, float32 both: the losses agree within the stated 2% at every step.
    assert jax_side["losses"] == pytest.approx([loss for _, loss in ref.losses], rel=2e-2)
    assert jax_side["val_loss"] == pytest.approx(ref.val_loss, rel=2e-2)
    assert jax_side["text"].startswith("5.0\nRock\n") and len(jax_side["text"]) > len("5.0\nRock\n")
    # ...and the model trained on JAX loads and generates on TensorFlow.
    causal_lm = keras_hub.models.CausalLM.from_preset(jax_side["model"])
    text = causal_lm.generate("5.0\nRock\n", max_length=24, stop_token_ids=None)
    assert text.startswith("5.0\nRock\n") and len(text) > len("5.0\nRock\n")
    assert json.loads((Path(jax_side["model"]) / "pitchkeras.json").read_text())["base_preset"] == str(ref.run_dir / "base")

