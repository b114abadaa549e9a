"""Fine-tuning: a keras-hub GPT-2 on prepared examples, resumable, on tf.distribute.

`finetune(TrainConfig(...))` is the library behind `pitchkeras finetune`:

- the model is a keras-hub preset by name, a local preset directory, or `tiny`
  (a small GPT2Backbone plus a BPE tokenizer learnt from the training texts);
- batches come from `pitchkeras.data.pipeline.make_dataset`;
- the step is our own loop: forward/backward compiled with XLA, gradient
  accumulation, AdamW with linear warmup then cosine decay, mixed precision
  (loss scaling for float16), all under a `tf.distribute` strategy;
- checkpoints hold every model and optimizer variable, the step and the data
  position; each is written to a temp directory and renamed, and the
  `latest` pointer is replaced atomically, so a crash never leaves half a
  checkpoint; SIGTERM/SIGINT save one before exiting;
- the run directory `CHECKPOINT_DIR/RUN_NAME/` gets `metrics.csv`, `samples/`,
  TensorBoard `logs/`, `loss.png` and finally `model/` (a keras-hub preset
  directory plus `pitchkeras.json`).

Example:

>>> from pitchkeras.train import TrainConfig, finetune
>>> result = finetune(TrainConfig(dataset="data", preset="tiny", steps=40, batch_size=8,
...                               sequence_length=128, learning_rate=2e-3))
>>> result.model_dir
PosixPath('checkpoint/run1/model')
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pitchkeras.conditioning import PLAIN, REVIEWS, PromptFormat
from pitchkeras.errors import InvalidArgument, UsageError
from pitchkeras.model import GPT2_PRESETS, TINY, ModelInfo, TinyConfig, atomic_write_text

PRECISIONS = ("auto", "mixed_float16", "mixed_bfloat16", "float32")
STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
METRICS_COLUMNS = ("step", "loss", "learning_rate", "tokens_per_sec", "val_loss", "val_perplexity")
CHECKPOINTS = "checkpoints"  # inside the run dir: ckpt-00000040/ ... and the `latest` pointer
BASE = "base"  # inside the run dir: the starting `tiny` preset (its tokenizer is learnt, so it is kept)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; unknown keys are rejected by `from_dict`.

    Args:
        dataset: str. A `pitchkeras prepare` output directory (train.csv, val.csv, stats.json) or one CSV.
        run_name: str. The run's folder under `checkpoint_dir`.
        checkpoint_dir: str. Where runs live.
        preset: str. A keras-hub GPT-2 preset name, a local preset directory, or `tiny`.
        steps: int. Total optimizer steps the run trains to (a resumed run finishes the same schedule).
        batch_size: int. Global batch (rows) per micro-step, split across replicas.
        sequence_length: int. Tokens per row.
        learning_rate: float. Peak learning rate.
        warmup_steps: int. Linear warmup steps; -1 means 10% of `steps` (at most 200).
        min_learning_rate_ratio: float. Cosine decay ends at this fraction of the peak.
        weight_decay: float. AdamW decoupled weight decay (not applied to biases and norms).
        grad_accum: int. Micro-batches accumulated per optimizer step.
        print_every: int. Steps between log lines (0 = off).
        save_every: int. Steps between checkpoints (0 = only at the end).
        sample_every: int. Steps between sample files in samples/ (0 = off).
        max_checkpoints: int. Checkpoints kept; older ones are deleted.
        restore_from: str. `latest` (continue if a checkpoint exists), `fresh`, or a checkpoint path.
        seed: int. Seeds initialisation and data order.
        val_every: int. Steps between validation passes on val.csv (0 = off; also run at the end).
        val_batches: int. Validation batches per pass (0 = the whole file).
        lora_rank: int. keras-hub LoRA rank on the backbone (0 = full fine-tuning).
        mixed_precision: str. `auto`, `mixed_float16`, `mixed_bfloat16` or `float32`.
        strategy: str. `auto`, `one`, `mirrored`, `multiworker` (TF_CONFIG) or `tpu`.
        packing: bool. Pack examples into full blocks (else one padded example per row).
        cache_dir: str. Tokenized-data cache ("" = CHECKPOINT_DIR/.token-cache, "none" = off).
        jit_compile: str. `auto` (XLA on), `true` or `false` for the training step.
        progress: bool. Show a tqdm bar and print lines (False for library callers wanting quiet).
        tiny: TinyConfig. Shape of the `tiny` preset.
    """

    dataset: str = ""  # required
    run_name: str = "run1"  # gpt-2-simple's default
    checkpoint_dir: str = "checkpoint"  # gpt-2-simple's default
    preset: str = "gpt2_medium_en"  # the seed tutorial's model; `tiny` for offline/CPU
    steps: int = 1000
    batch_size: int = 8
    sequence_length: int = 256  # reviews median ~700 tokens; 256 keeps 355M on one 16 GB GPU
    learning_rate: float = 1e-4  # fine-tuning a pretrained model; a fresh `tiny` wants ~2e-3
    warmup_steps: int = -1  # -1: 10% of steps, at most 200
    min_learning_rate_ratio: float = 0.1  # cosine decays to 10% of the peak
    weight_decay: float = 0.01
    grad_accum: int = 1  # effective batch = batch_size * grad_accum
    print_every: int = 50
    save_every: int = 500
    sample_every: int = 0  # generation is slow on CPU; turn on for real runs
    max_checkpoints: int = 3
    restore_from: str = "latest"
    seed: int = 0
    val_every: int = 100
    val_batches: int = 20
    lora_rank: int = 0
    mixed_precision: str = "auto"
    strategy: str = "auto"
    packing: bool = True
    cache_dir: str = ""
    jit_compile: str = "auto"
    progress: bool = True
    tiny: TinyConfig = dataclasses.field(default_factory=TinyConfig)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from a dict, rejecting keys that are not settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidArgument(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values).validate()

    def validate(self) -> "TrainConfig":
        """Check every value; raises InvalidArgument naming the first bad one."""
        if not self.dataset:
            raise InvalidArgument("dataset is required: a `pitchkeras prepare` output directory or a CSV")
        positive = ("steps", "batch_size", "sequence_length", "grad_accum", "max_checkpoints")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("print_every", "save_every", "sample_every", "val_every", "val_batches", "lora_rank"):
            if int(getattr(self, name)) < 0:
                raise InvalidArgument(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InvalidArgument(f"learning_rate must be positive, got {self.learning_rate}")
        if self.mixed_precision not in PRECISIONS:
            raise InvalidArgument(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if str(self.jit_compile).lower() not in ("auto", "true", "false"):
            raise InvalidArgument(f"jit_compile must be auto, true or false, got {self.jit_compile!r}")
        if not self.run_name or os.sep in self.run_name:
            raise InvalidArgument(f"run_name must be a plain folder name, got {self.run_name!r}")
        return self


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Args:
        run_dir: Path. `CHECKPOINT_DIR/RUN_NAME`.
        model_dir: Path or None. The exported model (None when interrupted).
        model_version: str. The run id stored in pitchkeras.json.
        start_step: int. The step the run started (or resumed) at.
        step: int. The last step completed.
        losses: list of (step, loss). Training loss of each step this call ran.
        val_loss: float or None. The last validation loss.
        tokens_per_sec: float. Mean training throughput of this call.
        seconds: float. Wall time of this call.
        interrupted: bool. Stopped by SIGTERM/SIGINT after saving a checkpoint.
        policy: str. The mixed-precision policy used.
        replicas: int. Replicas in sync.
    """

    run_dir: Path
    model_dir: Optional[Path]
    model_version: str
    start_step: int
    step: int
    losses: list = dataclasses.field(default_factory=list)
    val_loss: Optional[float] = None
    tokens_per_sec: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    policy: str = "float32"
    replicas: int = 1


# -- precision and strategy -----------------------------------------------------


def choose_policy(requested: str) -> str:
    """The mixed-precision policy for `requested` on this machine.

    `auto`: bfloat16 on TPUs and on GPUs of compute capability 8.0 or more,
    float16 (with loss scaling) on older GPUs, float32 on CPU (on this
    2-core CPU with XLA, bfloat16 training measured slower than float32).
    """
    if requested != "auto":
        return requested
    import tensorflow as tf

    if os.environ.get("TPU_NAME") or tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "float32"
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def make_strategy(name: str):
    """A `tf.distribute` strategy: `one`, `mirrored`, `multiworker` (TF_CONFIG) or `tpu`; `auto` picks.

    `auto` is `multiworker` when TF_CONFIG names a cluster, `tpu` when a TPU is
    attached, `mirrored` with several GPUs, else `one` (the default strategy).
    `mirrored` without GPUs mirrors over the logical CPU devices (tests).
    """
    import tensorflow as tf

    if name == "auto":
        if json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster"):
            name = "multiworker"
        elif os.environ.get("TPU_NAME"):
            name = "tpu"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise UsageError("--strategy multiworker needs TF_CONFIG describing the cluster (see BUILD_NOTES.md)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as err:
            raise UsageError(f"--strategy tpu: no TPU found ({err})") from None
        return tf.distribute.TPUStrategy(resolver)
    raise InvalidArgument(f"unknown strategy {name!r}")


def is_chief(strategy) -> bool:
    """Whether this process writes files (always, except non-chief multi-worker tasks)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# -- learning-rate schedule -----------------------------------------------------


def _schedule_class():
    import keras

    @keras.saving.register_keras_serializable(package="pitchkeras")
    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total` steps.

        A function of the optimizer's own step counter, which checkpoints
        restore, so a resumed run continues the schedule where it was.
        """

        def __init__(self, peak, warmup, total, min_ratio=0.1):
            self.peak, self.warmup, self.total, self.min_ratio = float(peak), int(warmup), int(total), float(min_ratio)

        def __call__(self, step):
            from keras import ops

            step = ops.cast(step, "float32")
            warm = self.peak * (step + 1.0) / max(self.warmup, 1)
            progress = ops.clip((step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0)
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
            return ops.where(step < self.warmup, warm, decayed)

        def get_config(self):
            return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "min_ratio": self.min_ratio}

    return WarmupCosine


def learning_rate_schedule(config: TrainConfig):
    warmup = config.warmup_steps if config.warmup_steps >= 0 else min(200, config.steps // 10)
    return _schedule_class()(config.learning_rate, warmup, config.steps, config.min_learning_rate_ratio)


# -- dataset --------------------------------------------------------------------


@dataclasses.dataclass
class DatasetFiles:
    """The files of a training dataset: a prepare output directory or a single CSV."""

    train: Path
    val: Optional[Path]
    prompt_format: Optional[PromptFormat]
    condition_values: Optional[dict]


def resolve_dataset(dataset: str) -> DatasetFiles:
    """Find train.csv / val.csv / stats.json for `dataset` (a directory or a CSV)."""
    path = Path(dataset)
    if path.is_dir():
        train = path / "train.csv"
        if not train.is_file():
            raise UsageError(f"{path} has no train.csv; pass a `pitchkeras prepare` output directory or a CSV")
        val = path / "val.csv"
        stats_path = path / "stats.json"
        prompt_format = condition_values = None
        if stats_path.is_file():
            try:
                stats = json.loads(stats_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UsageError(f"{stats_path}: not valid JSON ({err})") from None
            if "prompt_format" in stats:
                prompt_format = PromptFormat.from_json(stats["prompt_format"])
            if "condition_values" in stats:
                condition_values = stats["condition_values"]
        has_val = val.is_file() and val.stat().st_size > 0
        return DatasetFiles(train, val if has_val else None, prompt_format, condition_values)
    if path.is_file():
        return DatasetFiles(path, None, None, None)
    raise UsageError(f"dataset {dataset} does not exist (a `pitchkeras prepare` output directory or a CSV)")


def infer_conditions(examples: list[str]) -> tuple[PromptFormat, dict]:
    """Guess the prompt format from the examples when stats.json is absent.

    Reviews (`score` then `genre` header lines) if every example parses that
    way, else a plain corpus; returns the format and the values seen.
    """
    values: dict[str, set] = {"score": set(), "genre": set()}
    for example in examples:
        try:
            parsed, _ = REVIEWS.split(example)
        except ValueError:
            return PLAIN, {}
        for name, value in parsed.items():
            values[name].add(value)
    return REVIEWS, {name: sorted(v) for name, v in values.items()}


# -- model ----------------------------------------------------------------------


def load_causal_lm(preset: str, *, texts: list[str], config: TrainConfig, policy: str):
    """The starting model: `tiny`, a local preset directory, or a keras-hub preset name.

    Raises:
        UsageError: a preset name that cannot be downloaded (offline).
    """
    import keras_hub

    from pitchkeras.model import build_tiny_causal_lm

    if preset == TINY:
        return build_tiny_causal_lm(texts, config=config.tiny, sequence_length=config.sequence_length, seed=config.seed)
    if Path(preset).is_dir():
        try:
            return keras_hub.models.CausalLM.from_preset(preset, dtype=policy)
        except Exception as err:  # keras-hub raises many kinds for a bad directory
            raise UsageError(f"{preset} is not a keras-hub preset directory ({type(err).__name__}: {err})") from None
    if os.sep in preset or preset.startswith("."):
        raise UsageError(f"preset directory {preset} does not exist")
    try:
        return keras_hub.models.CausalLM.from_preset(preset, dtype=policy)
    except Exception as err:  # offline: requests/kagglehub/OSError; unknown name: ValueError
        known = ", ".join(GPT2_PRESETS)
        if isinstance(err, ValueError) and "preset" in str(err).lower() and preset not in GPT2_PRESETS:
            raise UsageError(f"unknown preset {preset!r}: use {known}, tiny or a local preset directory") from None
        raise UsageError(f"cannot download {preset}: no network; use --preset tiny or a local preset directory") from None


# -- checkpoints ----------------------------------------------------------------


def _variables(model, optimizer) -> list:
    return list(model.variables) + list(optimizer.variables)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(checkpoints_dir: Path, variables: list, state: dict, keep: int) -> Path:
    """Write every variable plus `state` as `ckpt-<step>/`, atomically, and point `latest` at it."""
    import numpy as np

    step = int(state["step"])
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=checkpoints_dir, prefix=f".ckpt-{step:08d}."))
    try:
        arrays = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
        with open(tmp / "variables.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        state = dict(state, variables=[[v.path, list(v.shape)] for v in variables])
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
        if final.exists():  # the same step saved again (e.g. interrupted right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(checkpoints_dir / "latest", final.name + "\n")
    for old in sorted(checkpoints_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path, restore_from: str) -> Optional[Path]:
    """The checkpoint directory `restore_from` names, or None to start fresh."""
    if restore_from == "fresh":
        return None
    if restore_from == "latest":
        pointer = run_dir / CHECKPOINTS / "latest"
        if not pointer.is_file():
            return None
        path = run_dir / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(restore_from)
        if (path / CHECKPOINTS / "latest").is_file():  # a run directory
            path = path / CHECKPOINTS / (path / CHECKPOINTS / "latest").read_text(encoding="utf-8").strip()
    if not (path / "state.json").is_file() or not (path / "variables.npz").is_file():
        raise UsageError(f"checkpoint {path} is missing or incomplete (needs state.json and variables.npz)")
    return path


def restore_checkpoint(path: Path, variables: list) -> dict:
    """Assign the saved values to `variables` (same model and optimizer) and return the saved state."""
    import numpy as np

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    saved = state.get("variables", [])
    if len(saved) != len(variables):
        raise UsageError(
            f"checkpoint {path} holds {len(saved)} variables but this model/optimizer has {len(variables)}; "
            "was it made with another preset, --lora-rank or --mixed-precision?"
        )
    with np.load(path / "variables.npz") as arrays:
        for i, (variable, (name, shape)) in enumerate(zip(variables, saved)):
            value = arrays[f"v{i:05d}"]
            if list(value.shape) != list(variable.shape):
                raise UsageError(f"checkpoint {path}: {name} has shape {list(value.shape)}, model wants {list(variable.shape)}")
            variable.assign(value)
    return state


# -- run files ------------------------------------------------------------------


class MetricsLog:
    """`metrics.csv`, appended row by row; on resume rows past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        buffer = [",".join(METRICS_COLUMNS)] + [",".join(r.get(c, "") or "" for c in METRICS_COLUMNS) for r in rows]
        atomic_write_text(path, "\n".join(buffer) + "\n")
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)

    def append(self, **row):
        self.writer.writerow(["" if row.get(c) is None else _fmt(row[c]) for c in METRICS_COLUMNS])
        self.file.flush()

    def close(self):
        self.file.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_loss(metrics_csv: Path, out: Path) -> None:
    """Draw loss (and validation loss) against step into `out`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, vsteps, vlosses = [], [], [], []
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
            if row.get("val_loss"):
                vsteps.append(int(row["step"]))
                vlosses.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def sample_prompts(prompt_format: PromptFormat, condition_values: dict, count: int = 3) -> list[tuple[dict, str]]:
    """A few (conditions, prompt) pairs spread over the values seen in training."""
    if not prompt_format.conditions:
        return [({}, "")]
    pairs = []
    for i in range(count):
        values = {}
        for name in prompt_format.conditions:
            seen = condition_values.get(name) or [5.0 if name in prompt_format.numeric else "Rock"]
            values[name] = seen[(i * (len(seen) - 1)) // max(count - 1, 1)] if name in prompt_format.numeric else seen[i % len(seen)]
        pairs.append((values, prompt_format.prompt(values)))
    return pairs


def write_samples(causal_lm, info: ModelInfo, out: Path, *, max_new_tokens: int = 80, seed: int = 0) -> Path:
    """Generate a few samples with the run's own prompt format into `out` (a text file)."""
    from pitchkeras.model import PitchModel

    pairs = sample_prompts(info.prompt_format, info.condition_values)
    texts: list[str]
    try:
        from pitchkeras.sampling import GenerationRequest, Generator
    except ImportError:
        Generator = None
    if Generator is not None:
        generator = Generator(PitchModel(causal_lm=causal_lm, info=info), batch_size=len(pairs), max_new_tokens=max_new_tokens)
        samples = generator.generate([GenerationRequest(conditions=c or None, seed=seed + i) for i, (c, _) in enumerate(pairs)])
        texts = [s.raw for s in samples]
    else:
        import keras_hub

        causal_lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.95, temperature=0.7, seed=seed))
        texts = list(causal_lm.generate([p for _, p in pairs], max_length=info.sequence_length or 128))
    blocks = [f"=== {json.dumps(c)}\n{t}\n" for (c, _), t in zip(pairs, texts)]
    return atomic_write_text(out, "\n".join(blocks))


def _scalar_summary(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar without the `tensorboard` package (what its `scalar` op writes)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata)


def new_run_id(run_name: str) -> str:
    """`RUN_NAME-<UTC timestamp>-<4 hex>`: the model_version of everything this run generates."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{run_name}-{stamp}-{secrets.token_hex(2)}"


class _StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each step, so it saves before exiting."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the training step ------------------------------------------------------------


class Trainer:
    """The compiled training and evaluation steps for one model, optimizer and strategy.

    Loss is the mean cross-entropy per target token over the global batch
    (all replicas, all accumulated micro-batches): each replica computes the
    sum of its token losses and their count under XLA, the counts are
    all-reduced, and the gradients divided by the global count are summed
    across replicas by the optimizer.

    Args:
        causal_lm: keras_hub.models.CausalLM. Built under `strategy.scope()`.
        optimizer: keras.optimizers.Optimizer. Built on the trainable variables.
        strategy: tf.distribute.Strategy.
        grad_accum: int. Micro-batches per optimizer step.
        jit_compile: bool. Compile the per-replica forward/backward with XLA.
    """

    def __init__(self, causal_lm, optimizer, strategy, *, grad_accum: int = 1, jit_compile: bool = True):
        import tensorflow as tf

        self.model, self.optimizer, self.strategy = causal_lm, optimizer, strategy
        self.grad_accum = grad_accum
        variables = causal_lm.trainable_variables
        single = strategy.num_replicas_in_sync == 1 and not isinstance(strategy, tf.distribute.TPUStrategy)

        def token_loss(batch, training):
            x, y, weight = batch
            logits = causal_lm(x, training=training)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(logits, tf.float32))
            weight = tf.cast(weight, tf.float32)
            return tf.reduce_sum(losses * weight), tf.reduce_sum(weight)

        def accumulate(batches):
            grads = [tf.zeros_like(v) for v in variables]
            loss_sum = count = tf.constant(0.0)
            for batch in batches:  # unrolled: grad_accum is a small Python int
                with tf.GradientTape() as tape:
                    micro_loss, micro_count = token_loss(batch, True)
                    scaled = optimizer.scale_loss(micro_loss)
                micro_grads = tape.gradient(scaled, variables)
                grads = [g + tf.cast(m, g.dtype) for g, m in zip(grads, micro_grads)]
                loss_sum, count = loss_sum + micro_loss, count + micro_count
            return grads, loss_sum, count

        def apply(grads, count_global):
            denominator = tf.maximum(count_global, 1.0)
            optimizer.apply_gradients(zip([g / tf.cast(denominator, g.dtype) for g in grads], variables))

        if single:
            # One device: compile the whole step (forward, backward, AdamW) as one XLA program.
            def step(*batches):
                grads, loss_sum, count = accumulate(batches)
                apply(grads, count)
                return loss_sum / tf.maximum(count, 1.0)

            self._train = tf.function(step, jit_compile=jit_compile, reduce_retracing=True)
            self._eval = tf.function(lambda batch: token_loss(batch, False), jit_compile=jit_compile)
            return

        accumulate_fn = tf.function(accumulate, jit_compile=jit_compile)
        # Not XLA: a jit-compiled forward called per replica reads replica 0's variables from the
        # other devices (TF "variable on a different device" known issue); evaluation is rare and cheap.
        eval_fn = tf.function(lambda batch: token_loss(batch, False))

        def replica_step(*batches):
            grads, loss_sum, count = accumulate_fn(batches)
            count_global = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, count)
            apply(grads, count_global)
            return loss_sum, count

        @tf.function
        def step(*batches):
            loss_sum, count = strategy.run(replica_step, args=batches)
            loss_sum = strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None)
            count = strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)
            return loss_sum / tf.maximum(count, 1.0)

        @tf.function
        def evaluate(batch):
            loss_sum, count = strategy.run(eval_fn, args=(batch,))
            return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
                    strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))

        self._train, self._eval = step, evaluate

    def train_step(self, batches) -> Any:
        """One optimizer step over `grad_accum` (distributed) batches; returns the mean token loss."""
        return self._train(*batches)

    def evaluate(self, dataset, max_batches: int = 0) -> Optional[float]:
        """Mean token loss over `dataset` (at most `max_batches`, 0 = all)."""
        loss_sum = count = 0.0
        for i, batch in enumerate(dataset):
            if max_batches and i >= max_batches:
                break
            s, c = self._eval(batch)
            loss_sum, count = loss_sum + float(s), count + float(c)
        return loss_sum / count if count else None


def make_optimizer(config: TrainConfig, policy: str):
    import keras

    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(config),
        weight_decay=config.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-6,
    )
    # Decay only matrices: biases and layer-norm scales/offsets keep their values (as in GPT-2's recipe).
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = inner._learning_rate
    return float(schedule(inner.iterations)) if callable(schedule) else float(inner.learning_rate)


# -- the run ----------------------------------------------------------------------


def finetune(config: TrainConfig, *, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Fine-tune `config.preset` on `config.dataset`; resumable; exports `model/` at the end.

    Args:
        config: TrainConfig. Every setting of the run.
        log: callable or None. Where progress lines go (default: print, if `config.progress`).

    Returns:
        TrainResult.

    Raises:
        UsageError / InvalidArgument: bad settings, dataset or preset.
    """
    config.validate()
    started = time.perf_counter()
    say = log or (print if config.progress else (lambda _msg: None))
    import keras

    if keras.config.backend() != "tensorflow":
        raise UsageError(
            f"fine-tuning runs on the TensorFlow Keras backend (tf.distribute), not {keras.config.backend()!r}: "
            "unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow (generation and serving also run on jax)")
    files = resolve_dataset(config.dataset)

    import tensorflow as tf

    strategy = make_strategy(config.strategy)  # first: multi-worker needs it before other TF work
    chief = is_chief(strategy)
    if not chief:
        say = lambda _msg: None  # noqa: E731 - one voice per cluster

    from pitchkeras.data.pipeline import make_dataset, read_examples
    from pitchkeras.model import save_model_dir

    policy = choose_policy(config.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(config.seed)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the {replicas} replicas")
    jit = str(config.jit_compile).lower() != "false"
    say(f"precision policy: {policy} ({'requested' if config.mixed_precision != 'auto' else 'auto'}); "
        f"strategy: {type(strategy).__name__} with {replicas} replica(s); XLA: {'on' if jit else 'off'}")

    run_dir = Path(config.checkpoint_dir) / config.run_name
    checkpoints_dir = run_dir / CHECKPOINTS
    checkpoint = find_checkpoint(run_dir, config.restore_from)
    if config.restore_from == "fresh" and chief and checkpoints_dir.exists():
        shutil.rmtree(checkpoints_dir)
    state: dict[str, Any] = {}
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        if state.get("base_preset") not in (None, config.preset):
            raise UsageError(
                f"checkpoint {checkpoint} was trained from preset {state['base_preset']!r}, not {config.preset!r}; "
                "pass the same --preset or --restore-from fresh"
            )

    texts = read_examples(files.train)
    if files.prompt_format is not None:
        prompt_format = files.prompt_format
        condition_values = files.condition_values
        if condition_values is None:
            _, condition_values = infer_conditions(texts)
    else:
        prompt_format, condition_values = infer_conditions(texts)

    with strategy.scope():
        base_dir = run_dir / BASE
        if config.preset == TINY and checkpoint is not None and base_dir.is_dir():
            # The tokenizer was learnt at the first start: reuse it, do not relearn it.
            import keras_hub

            causal_lm = keras_hub.models.CausalLM.from_preset(str(base_dir), dtype=policy)
        else:
            causal_lm = load_causal_lm(config.preset, texts=texts, config=config, policy=policy)
            if config.preset == TINY and chief:
                save_model_dir(causal_lm, ModelInfo(prompt_format=prompt_format, base_preset=TINY), base_dir)
        if config.lora_rank:
            causal_lm.backbone.enable_lora(config.lora_rank)
        causal_lm.preprocessor.sequence_length = config.sequence_length
        optimizer = make_optimizer(config, policy)
        optimizer.build(causal_lm.trainable_variables)
        trainer = Trainer(causal_lm, optimizer, strategy, grad_accum=config.grad_accum, jit_compile=jit)

    variables = _variables(causal_lm, optimizer)
    start_step = 0
    run_id = new_run_id(config.run_name)
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, variables)
        start_step = int(state["step"])
        run_id = state.get("model_version", run_id)
        say(f"restored {checkpoint} at step {start_step}")
    elif config.restore_from == "latest":
        say(f"no checkpoint in {checkpoints_dir}: starting fresh from {config.preset}")

    info = ModelInfo(
        prompt_format=prompt_format,
        condition_values=condition_values or {},
        model_version=run_id,
        base_preset=config.preset,
        sequence_length=config.sequence_length,
    )
    tokenizer = causal_lm.preprocessor.tokenizer
    cache_dir = None if config.cache_dir == "none" else (config.cache_dir or str(Path(config.checkpoint_dir) / ".token-cache"))
    if not chief:
        cache_dir = None  # one writer per cluster: other workers tokenize in memory (it is fast)
    data_position = int(state.get("data_position", 0))
    train_ds = make_dataset(
        files.train, tokenizer, sequence_length=config.sequence_length, batch_size=config.batch_size,
        packing=config.packing, seed=config.seed, cache_dir=cache_dir, skip_batches=data_position,
    )
    train_iter = iter(strategy.experimental_distribute_dataset(train_ds))
    val_ds = None
    if files.val is not None:  # validated every --val-every steps and at the end
        val_ds = strategy.experimental_distribute_dataset(make_dataset(
            files.val, tokenizer, sequence_length=config.sequence_length, batch_size=config.batch_size,
            packing=config.packing, shuffle=False, repeat=False, cache_dir=cache_dir,
        ))

    metrics = None
    writer = None
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        metrics = MetricsLog(run_dir / "metrics.csv", start_step if checkpoint is not None else None)
        writer = tf.summary.create_file_writer(str(run_dir / "logs"))
        atomic_write_text(run_dir / "config.json", json.dumps(
            dict(dataclasses.asdict(config), model_version=run_id), indent=2, default=str))

    tokens_per_step = config.batch_size * config.sequence_length * config.grad_accum
    result = TrainResult(run_dir=run_dir, model_dir=None, model_version=run_id, start_step=start_step,
                         step=start_step, policy=policy, replicas=replicas)

    def save(step: int, loss: Optional[float]):
        if not chief:
            return
        path = save_checkpoint(checkpoints_dir, variables, {
            "step": step,
            "data_position": step * config.grad_accum,  # batches consumed
            "loss": loss,
            "model_version": run_id,
            "base_preset": config.preset,
            "lora_rank": config.lora_rank,
            "policy": policy,
        }, config.max_checkpoints)
        plot_loss(run_dir / "metrics.csv", run_dir / "loss.png")
        say(f"saved {path}")

    def validate_now(step: int) -> Optional[float]:
        if val_ds is None:
            return None
        val_loss = trainer.evaluate(val_ds, config.val_batches)
        if val_loss is not None:
            result.val_loss = val_loss
            say(f"step {step}: val_loss {val_loss:.4f} val_perplexity {math.exp(min(val_loss, 50)):.2f}")
        return val_loss

    bar = None
    if config.progress and chief:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True)
        say = bar.write  # log lines above the bar, not through it
    step = start_step
    train_seconds = 0.0
    trained_tokens = 0
    try:
        with _StopFlag() as stop:
            while step < config.steps:
                t0 = time.perf_counter()
                batches = [next(train_iter) for _ in range(config.grad_accum)]
                loss = float(trainer.train_step(batches))
                elapsed = time.perf_counter() - t0
                step += 1
                if step > start_step + 1:  # the first step includes compilation
                    train_seconds += elapsed
                    trained_tokens += tokens_per_step
                tps = tokens_per_step / elapsed if elapsed > 0 else 0.0
                lr = _current_lr(optimizer)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}; lower --learning-rate")
                result.losses.append((step, loss))
                val_loss = validate_now(step) if (config.val_every and step % config.val_every == 0) or step == config.steps else None
                if chief:
                    metrics.append(step=step, loss=loss, learning_rate=lr, tokens_per_sec=tps, val_loss=val_loss,
                                   val_perplexity=None if val_loss is None else math.exp(min(val_loss, 50)))
                    with writer.as_default(step=step):
                        for tag, value in (("loss", loss), ("learning_rate", lr), ("tokens_per_sec", tps),
                                           ("val_loss", val_loss)):
                            if value is not None:
                                _scalar_summary(tag, value, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    bar.update(1)
                if config.print_every and step % config.print_every == 0:
                    line = f"step {step}/{config.steps}: loss {loss:.4f} lr {lr:.3g} {tps:,.0f} tokens/s"
                    say(line)
                if config.sample_every and step % config.sample_every == 0 and chief:
                    write_samples(causal_lm, info, run_dir / "samples" / f"step-{step:08d}.txt", seed=config.seed)
                result.step = step
                if stop.signal is not None:
                    save(step, loss)
                    result.interrupted = True
                    say(f"stopped by signal {stop.signal} at step {step}; resume with --restore-from latest")
                    break
                if step < config.steps and config.save_every and step % config.save_every == 0:
                    save(step, loss)
            else:
                if step > start_step:
                    save(step, result.losses[-1][1])
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()

    if not result.interrupted and chief:
        if start_step >= config.steps:
            say(f"already at step {start_step} of {config.steps}: nothing to train")
        result.model_dir = save_model_dir(causal_lm, info, run_dir / "model")
        if config.sample_every:
            write_samples(causal_lm, info, run_dir / "samples" / "final.txt", seed=config.seed)
        say(f"model {run_id} exported to {result.model_dir}")
    result.tokens_per_sec = trained_tokens / train_seconds if train_seconds else 0.0
    result.seconds = time.perf_counter() - started
    return result
