"""Every setting of a fine-tuning run, the precision choice, and the Keras optimizer they describe.

`TrainConfig` is the one place each default lives: `pitchkeras finetune`'s
flags read their defaults from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from pitchkeras.errors import InvalidArgument
from pitchkeras.model import TinyConfig

PRECISIONS = ("auto", "mixed_float16", "mixed_bfloat16", "float32")
STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
OPTIMIZERS = ("adamw", "adafactor", "lion")


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
        warmup_steps: int. Linear warmup steps; -1 means 10% of `steps` (at most 200).
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
    sequence_length: int = 256  # reviews median ~700 tokens; 256 keeps 355M on one 16 GB GPU
    learning_rate: float = 1e-4  # fine-tuning a pretrained model; a fresh `tiny` wants ~2e-3
    warmup_steps: int = -1  # -1: 10% of steps, at most 200
    min_learning_rate_ratio: float = 0.1  # cosine decays to 10% of the peak
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
            from pitchkeras.train.plan import parse_memory

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


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What `choose_policy` looks at: accelerators attached to this process.

    Args:
        tpus: int. TPU cores.
        gpu_capabilities: tuple of (major, minor). CUDA compute capability of each GPU.
    """

    tpus: int = 0
    gpu_capabilities: tuple = ()

    @classmethod
    def detect(cls) -> "DeviceFacts":
        """The facts of this machine, from the active Keras backend."""
        import keras

        if keras.config.backend() == "jax":
            import jax

            devices = jax.devices()
            gpus = [d for d in devices if d.platform == "gpu"]
            capabilities = tuple(tuple(int(x) for x in str(getattr(d, "compute_capability", "0.0")).split(".")[:2])
                                 for d in gpus)
            return cls(tpus=sum(d.platform == "tpu" for d in devices), gpu_capabilities=capabilities)
        import tensorflow as tf

        tpus = len(tf.config.list_logical_devices("TPU")) or (1 if os.environ.get("TPU_NAME") else 0)
        capabilities = tuple(
            tuple(tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)))
            for g in tf.config.list_physical_devices("GPU"))
        return cls(tpus=tpus, gpu_capabilities=capabilities)


def choose_policy(requested: str, devices: Optional[DeviceFacts] = None) -> str:
    """The Keras dtype policy for `requested` on this machine (or on `devices`).

    `auto`: `mixed_bfloat16` on TPUs and on GPUs of compute capability 8.0 or
    more (Ampere, Hopper), `mixed_float16` (with Keras's loss scaling) on
    older GPUs, `float32` on CPU (bfloat16 training measured slower than
    float32 on this 2-core CPU).

    Args:
        requested: str. One of `PRECISIONS`.
        devices: DeviceFacts or None. Injected facts (tests); None detects them.
    """
    if requested != "auto":
        return requested
    devices = devices or DeviceFacts.detect()
    if devices.tpus:
        return "mixed_bfloat16"
    if not devices.gpu_capabilities:
        return "float32"
    return "mixed_bfloat16" if min(devices.gpu_capabilities) >= (8, 0) else "mixed_float16"


def learning_rate_schedule(config: TrainConfig):
    """Linear warmup to the peak, then cosine decay to `min_learning_rate_ratio` of it at `steps`.

    A `keras.optimizers.schedules.CosineDecay` counted in micro-batches (the
    optimizer's own counter, which checkpoints restore, runs once per
    micro-batch under gradient accumulation), so a step means the same with
    any `grad_accum` (an update uses the rate of its last micro-batch: under
    accumulation at most one step later on the curve).
    """
    import keras

    accum = config.grad_accum
    warmup = config.warmup
    decay = max(config.steps - warmup, 1) * accum
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay, alpha=config.min_learning_rate_ratio)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay, alpha=config.min_learning_rate_ratio, warmup_target=config.learning_rate,
        warmup_steps=warmup * accum)


def make_optimizer(config: TrainConfig):
    """The Keras optimizer `config.optimizer` names, with the schedule, weight decay, clipping and accumulation.

    `adamw` is `keras.optimizers.AdamW`; `adafactor` is
    `keras.optimizers.Adafactor` with the run's schedule (its own
    `relative_step` 1/sqrt(step) cap off); `lion` is `keras.optimizers.Lion`.
    Each decays weights decoupled and clips the global gradient norm the same
    way. Keras adds loss scaling itself when the model's policy is
    `mixed_float16` (`compile(auto_scale_loss=True)` wraps this in a
    `LossScaleOptimizer`).
    """
    import keras

    from pitchkeras.train.accumulation import update_only_when_due

    common = dict(learning_rate=learning_rate_schedule(config), weight_decay=config.weight_decay,
                  global_clipnorm=config.clipnorm or None, name=config.optimizer,
                  gradient_accumulation_steps=config.grad_accum if config.grad_accum > 1 else None)
    if config.optimizer == "adafactor":
        optimizer = keras.optimizers.Adafactor(relative_step=False, **common)
    elif config.optimizer == "lion":
        optimizer = keras.optimizers.Lion(beta_1=0.9, beta_2=0.99, **common)
    else:
        optimizer = keras.optimizers.AdamW(beta_1=0.9, beta_2=0.999, epsilon=1e-6, **common)
    # Decay only matrices: biases and layer-norm scales/offsets keep their values (as in GPT-2's recipe).
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    update_only_when_due(optimizer)  # JAX + --grad-accum: one update per step, not one per micro-batch
    return optimizer


def token_loss():
    """Mean cross-entropy per target token: padding (sample weight 0) neither counts nor dilutes."""
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


def compile_for_training(causal_lm, config: TrainConfig, *, jit_compile: bool | str = "auto",
                         gradient_gates: bool = True) -> None:
    """`causal_lm.compile` with pitchkeras' optimizer and the per-token loss (no extra metrics).

    Args:
        causal_lm: keras_hub.models.CausalLM.
        config: TrainConfig.
        jit_compile: bool or `auto`. Passed to Keras.
        gradient_gates: bool. On JAX on a CPU, gate each block's input gradient
            (`pitchkeras.train.remat.gate_block_gradients`: 15-18% off a GPT-2 step there).
    """
    if gradient_gates and hasattr(causal_lm, "backbone") and hasattr(causal_lm.backbone, "transformer_layers"):
        from pitchkeras.train.remat import gate_block_gradients

        gate_block_gradients(causal_lm.backbone)
    causal_lm.compile(optimizer=make_optimizer(config), loss=token_loss(), weighted_metrics=[],
                      jit_compile=jit_compile)
