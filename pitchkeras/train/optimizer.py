"""The optimizer, its learning-rate schedule and the loss of a fine-tuning run, and the `compile` that joins them."""

from __future__ import annotations

from pitchkeras.train.accumulation import update_only_when_due
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.remat import gate_block_gradients


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
            (`pitchkeras.train.remat.gate_block_gradients`; what it saves: BUILD_NOTES.md).
    """
    if gradient_gates and hasattr(causal_lm, "backbone") and hasattr(causal_lm.backbone, "transformer_layers"):
        gate_block_gradients(causal_lm.backbone)
    causal_lm.compile(optimizer=make_optimizer(config), loss=token_loss(), weighted_metrics=[],
                      jit_compile=jit_compile)


def build_optimizer(model) -> None:
    """Create the optimizer's variables (slots, loss scale) now, so a checkpoint can be restored into them."""
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def inner_optimizer(optimizer):
    """The optimizer that updates the weights: the one inside Keras's loss-scale wrapper, if any."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer's schedule gives at its current micro-step."""
    import keras

    return float(keras.ops.convert_to_numpy(inner_optimizer(optimizer).learning_rate))
