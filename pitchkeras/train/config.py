"""Every setting of a fine-tuning run (`TrainConfig`) and the parsing of its values (`parse_memory`).

`TrainConfig` is the one place each default lives: `pitchkeras finetune`'s
flags read their defaults from it.
"""

from __future__ import annotations

import dataclasses
import os
import re

from pitchkeras.errors import InvalidArgument
from pitchkeras.model import TinyConfig

PRECISIONS = ("auto", "mixed_float16", "mixed_bfloat16", "float32")
STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
OPTIMIZERS = ("adamw", "adafactor", "lion")
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; unknown keys are rejected by `from_dict`.

    One Keras epoch of `fit` is one optimizer step here (`steps_per_epoch` is
    `grad_accum` micro-batches), so a resumed run is `fit(initial_epoch=step)`.

    Args:
        dataset: str. A `pitchkeras prepare` output directory (train.csv, val.csv, stats.json) or one CSV.
        run_name: str. The run's folder under `checkpoint_dir`.
        checkpoint_dir: str. Where runs live.
        preset: str. A keras-hub GPT-2 preset name, a local preset directory, or `tiny`.
        steps: int. Total optimizer steps the run trains to (a resumed run finishes the same schedule).
        batch_size: int. Global batch (rows) per micro-step, split across replicas.
        auto_batch: bool. Choose the micro-batch from the memory plan: the largest divisor of
            `batch_size * grad_accum` that fits `memory`, accumulated up to that effective batch.
        memory: str. The device memory budget of `auto_batch` (`16GB`; "" = the local accelerator's,
            none on a CPU, where the batch stays as given).
        memory_margin: float. Fraction of `memory` kept free by `auto_batch` (allocator slack, fragmentation).
        sequence_length: int. Tokens per row.
        learning_rate: float. Peak learning rate.
        warmup_steps: int. Linear warmup steps; -1 means a tenth of `steps` (at most 200).
        min_learning_rate_ratio: float. Cosine decay ends at this fraction of the peak.
        weight_decay: float. AdamW decoupled weight decay (not applied to biases and norms).
        clipnorm: float. Global gradient-norm clip (0 = off).
        optimizer: str. `adamw` (two moments per weight), `adafactor` (factored second moments) or `lion`
            (one moment; wants a 3-10x lower learning rate than AdamW).
        remat: bool. Rematerialize the transformer blocks (recompute activations in the backward pass).
        grad_accum: int. Micro-batches accumulated per optimizer step.
        print_every: int. Steps between log lines (0 = off).
        save_every: int. Steps between checkpoints (0 = only at the end).
        sample_every: int. Steps between sample files in samples/ (0 = off).
        max_checkpoints: int. Checkpoints kept; older ones are deleted.
        restore_from: str. `latest` (continue if a checkpoint exists), `fresh`, or a checkpoint path.
        seed: int. Seeds initialisation and data order.
        val_every: int. Steps between validation passes on val.csv (0 = only at the end).
        val_batches: int. Validation batches per pass (0 = the whole file).
        lora_rank: int. keras-hub LoRA rank on the backbone (0 = full fine-tuning).
        mixed_precision: str. `auto`, `mixed_float16`, `mixed_bfloat16` or `float32`.
        strategy: str. TensorFlow: `auto`, `one`, `mirrored`, `multiworker` (TF_CONFIG) or `tpu`;
            JAX: `auto`/`mirrored` (keras.distribution.DataParallel over the local devices) or `one`.
        packing: bool. Pack examples into full blocks (else one padded example per row).
        cache_dir: str. Tokenized-data cache ("" = CHECKPOINT_DIR/.token-cache, "none" = off).
        jit_compile: str. `auto` (XLA on one device), `true` or `false` for the compiled step.
        progress: bool. Show a tqdm bar and print lines (False for library callers wanting quiet).
        tiny: TinyConfig. Shape of the `tiny` preset.
    """

    dataset: str = ""  # required
    run_name: str = "run1"  # gpt-2-simple's default
    checkpoint_dir: str = "checkpoint"  # gpt-2-simple's default
    preset: str = "gpt2_medium_en"  # the seed tutorial's model; `tiny` for offline/CPU
    steps: int = 1000
    batch_size: int = 8
    auto_batch: bool = False
    memory: str = ""
    memory_margin: float = 0.1  # XLA's plan excludes allocator slack; a tenth of the device is left for it
    sequence_length: int = 256  # shorter than most reviews, so gpt2_medium_en fits one GPU (BUILD_NOTES.md)
    learning_rate: float = 1e-4  # fine-tuning a pretrained model; a fresh `tiny` wants ~2e-3
    warmup_steps: int = -1  # -1: a tenth of the steps, at most 200
    min_learning_rate_ratio: float = 0.1  # cosine decays to a tenth of the peak
    weight_decay: float = 0.01
    clipnorm: float = 1.0  # GPT-2/nanoGPT recipe: clip the global gradient norm at 1
    optimizer: str = "adamw"
    remat: bool = False
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

    @classmethod
    def default(cls, name: str):
        """The default of setting `name` (what the CLI shows and uses)."""
        field = cls.__dataclass_fields__[name]
        return field.default_factory() if field.default is dataclasses.MISSING else field.default

    def validate(self) -> "TrainConfig":
        """Check every value; raises InvalidArgument naming the first bad one."""
        if not self.dataset:
            raise InvalidArgument("dataset is required: a `pitchkeras prepare` output directory or a CSV")
        for name in ("steps", "batch_size", "sequence_length", "grad_accum", "max_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("print_every", "save_every", "sample_every", "val_every", "val_batches", "lora_rank"):
            if int(getattr(self, name)) < 0:
                raise InvalidArgument(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InvalidArgument(f"learning_rate must be positive, got {self.learning_rate}")
        if self.clipnorm < 0:
            raise InvalidArgument(f"clipnorm must be 0 (off) or positive, got {self.clipnorm}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgument(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.memory_margin < 1:
            raise InvalidArgument(f"memory_margin must be in [0, 1), got {self.memory_margin}")
        if self.memory:
            parse_memory(self.memory)
        if self.mixed_precision not in PRECISIONS:
            raise InvalidArgument(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if str(self.jit_compile).lower() not in ("auto", "true", "false"):
            raise InvalidArgument(f"jit_compile must be auto, true or false, got {self.jit_compile!r}")
        if not self.run_name or os.sep in self.run_name:
            raise InvalidArgument(f"run_name must be a plain folder name, got {self.run_name!r}")
        return self

    @property
    def warmup(self) -> int:
        """Warmup steps, `-1` resolved."""
        return self.warmup_steps if self.warmup_steps >= 0 else min(200, self.steps // 10)


def parse_memory(text: str) -> int:
    """Bytes of a memory size like `16GB`, `15.5GiB` or `800MB` (GB = 10^9 bytes, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise InvalidArgument(f"memory {text!r} is not a size like 16GB, 15.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
