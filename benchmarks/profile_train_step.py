"""Where one training step's time goes: `fit` against the bare compiled step it runs, and the step's phases.

For GPT-2 124M (random weights, batch 4 x 128, float32, dropout 0.1: the
shape of `train_vs_transformers.py`), on the backend KERAS_BACKEND names,
the median seconds of:

- `fit`: `keras.Model.fit` one step per epoch, as `pitchkeras finetune` runs it;
- `train_step`: Keras's own compiled train step (what `fit` calls) in a bare
  Python loop, inputs already on the device;
- `forward`: the loss alone, compiled;
- `forward+backward`: the loss and its gradients, compiled, no update;
- `update`: the optimizer applying a gradient, compiled.

`fit - train_step` is what `fit` adds per step (host work, callbacks,
input); `train_step - forward+backward` is the update plus what the
whole-step program loses or gains by fusing. The header names the CPU's
SIMD level; the last line is `fit_overhead=<fit / train_step>`.

    KERAS_BACKEND=jax python benchmarks/profile_train_step.py
    KERAS_BACKEND=tensorflow python benchmarks/profile_train_step.py

`--gates-ab ROUNDS` (JAX) times instead Keras's train step with and without
`compile_for_training`'s gradient gates, interleaved; its last line is
`gates_speedup=<plain / gated>`. `--accum-ab ROUNDS` (JAX) times a micro-batch
of `--grad-accum 2` with pitchkeras' accumulation and with Keras's own, and
one without accumulation; its last line is `accum_speedup=<Keras's / ours>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_transformers import GPT2_124M, simd_level  # noqa: E402


def timed(function, repeats: int, warmup: int) -> float:
    """Median seconds of `function()` (which blocks until its result is ready) after `warmup` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(args, gradient_gates: bool = True, grad_accum: int = 1, keras_accumulation: bool = False):
    """The compiled GPT2CausalLM of `train_vs_transformers.py` and one batch (x, y, sample_weight).

    `keras_accumulation`: with `grad_accum` > 1 on JAX, Keras's own accumulation instead of pitchkeras'.
    """
    import keras
    import keras_hub
    import numpy as np

    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import compile_for_training

    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.GPT2Backbone(dropout=args.dropout, **GPT2_124M)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    config = TrainConfig(dataset="-", steps=1000, learning_rate=1e-4, batch_size=args.batch_size,
                         sequence_length=args.sequence_length, grad_accum=grad_accum)
    compile_for_training(causal_lm, config, jit_compile=True, gradient_gates=gradient_gates)
    if keras_accumulation and "_backend_apply_gradients" in vars(causal_lm.optimizer):
        del causal_lm.optimizer._backend_apply_gradients  # Keras's JaxOptimizer method again
    causal_lm.optimizer.build(causal_lm.trainable_variables)
    ids = np.random.default_rng(args.seed).integers(0, GPT2_124M["vocabulary_size"],
                                                    size=(args.batch_size, args.sequence_length + 1)).astype(np.int32)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    return causal_lm, x, ids[:, 1:], np.ones(ids[:, 1:].shape, np.float32)


def fit_seconds(causal_lm, x, y, sw, args) -> float:
    """Median seconds per step of `fit` with one step per epoch (epoch-end logs synced every step)."""
    import keras

    marks = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])
            marks.append(time.perf_counter())

    keras.Model.fit(causal_lm, x, y, sample_weight=sw, batch_size=args.batch_size,
                    epochs=args.warmup + args.repeats + 1, steps_per_epoch=1, shuffle=False, verbose=0,
                    callbacks=[Clock()])
    return statistics.median(b - a for a, b in zip(marks[args.warmup:], marks[args.warmup + 1:]))


def jax_train_step(causal_lm, data):
    """Keras's JAX train step, compiled with its state donated, as a function running one step."""
    import jax

    causal_lm.make_train_function()
    state = [jax.tree.map(lambda a: a.copy(), (  # donated: copies, so the model's own arrays stay valid
        [v.value for v in causal_lm.trainable_variables], [v.value for v in causal_lm.non_trainable_variables],
        [v.value for v in causal_lm.optimizer.variables], [v.value for v in causal_lm.metrics_variables]))]
    step = jax.jit(causal_lm.train_step, donate_argnums=0)

    def run():
        logs, state[0] = step(state[0], data)
        jax.block_until_ready(logs)

    return run


def interleaved(args, variants: dict, rounds: int) -> dict:
    """Median seconds per micro-batch of each variant (name -> `build` keywords), interleaved (JAX).

    A variant with `grad_accum` N is timed N calls at a time (one optimizer update), divided by N.
    """
    import jax

    runs, calls = {}, {}
    for name, options in variants.items():
        causal_lm, x, y, sw = build(args, **options)
        runs[name] = jax_train_step(causal_lm, jax.device_put((x, y, sw)))
        calls[name] = options.get("grad_accum", 1)  # one optimizer step: the micro-batches of one update
    times = {name: [] for name in runs}
    for name, run in runs.items():
        for _ in range(args.warmup * calls[name]):
            run()
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(lambda: [run() for _ in range(calls[name])], 1, 0) / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def jax_phases(causal_lm, x, y, sw, args) -> dict:
    import jax

    train_step = jax_train_step(causal_lm, jax.device_put((x, y, sw)))
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    optimizer_vars = [v.value for v in causal_lm.optimizer.variables]
    metrics_vars = [v.value for v in causal_lm.metrics_variables]

    def loss_of(tv, ntv):
        loss, _ = causal_lm.compute_loss_and_updates(tv, ntv, metrics_vars, x, y, sw, training=True,
                                                     optimizer_variables=optimizer_vars)
        return loss

    forward = jax.jit(loss_of)
    backward = jax.jit(jax.value_and_grad(loss_of))
    grads = backward(trainable, non_trainable)[1]
    update = jax.jit(lambda ov, tv, g: causal_lm.optimizer.stateless_apply(ov, g, tv), donate_argnums=(0, 1))
    update_state = [jax.tree.map(lambda a: a.copy(), (optimizer_vars, trainable))]  # donated

    def apply():
        tv, ov = update(*update_state[0], grads)
        update_state[0] = (ov, tv)
        jax.block_until_ready(tv)

    measure = lambda f: timed(f, args.repeats, args.warmup)  # noqa: E731
    return {"train_step": measure(train_step),
            "forward": measure(lambda: jax.block_until_ready(forward(trainable, non_trainable))),
            "forward+backward": measure(lambda: jax.block_until_ready(backward(trainable, non_trainable))),
            "update": measure(apply)}


def tf_phases(causal_lm, x, y, sw, args) -> dict:
    import tensorflow as tf

    data = (tf.constant(x["token_ids"]), tf.constant(y), tf.constant(sw))
    inputs = {"token_ids": data[0], "padding_mask": tf.ones_like(data[0])}
    step = tf.function(causal_lm.train_step, jit_compile=True, reduce_retracing=True)

    def loss_of():
        logits = causal_lm(inputs, training=True)
        return causal_lm.compute_loss(x=inputs, y=data[1], y_pred=logits, sample_weight=data[2], training=True)

    forward = tf.function(loss_of, jit_compile=True)
    weights = causal_lm.trainable_variables

    @tf.function(jit_compile=True)
    def backward():
        with tf.GradientTape() as tape:
            loss = loss_of()
        return loss, tape.gradient(loss, weights)

    grads = backward()[1]
    update = tf.function(lambda: causal_lm.optimizer.apply(grads, weights), jit_compile=True)
    measure = lambda f: timed(f, args.repeats, args.warmup)  # noqa: E731
    return {"train_step": measure(lambda: float(step((inputs, data[1], data[2]))["loss"])),
            "forward": measure(lambda: float(forward())),
            "forward+backward": measure(lambda: float(backward()[0])),
            "update": measure(lambda: (update(), float(tf.reduce_sum(weights[0])))[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each phase (the median is printed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gates-ab", type=int, default=0, metavar="ROUNDS",
                        help="JAX: instead, train_step with and without the gradient gates, interleaved ROUNDS times")
    parser.add_argument("--accum-ab", type=int, default=0, metavar="ROUNDS",
                        help="JAX: instead, a micro-batch of --grad-accum 2 with pitchkeras' and Keras's "
                             "accumulation, and without accumulation, interleaved ROUNDS times")
    args = parser.parse_args(argv)

    import keras

    backend = keras.config.backend()
    print(f"GPT-2 124M, random weights, batch {args.batch_size} x {args.sequence_length}, float32, dropout "
          f"{args.dropout}, backend {backend}, median of {args.repeats} after {args.warmup} warm-up, "
          f"{os.cpu_count()} CPU(s), SIMD {simd_level()}", flush=True)
    if args.gates_ab or args.accum_ab:
        rounds = args.gates_ab or args.accum_ab
        variants = ({"gated": {}, "plain": {"gradient_gates": False}} if args.gates_ab else
                    {"no accumulation": {}, "accumulating (ours)": {"grad_accum": 2},
                     "accumulating (keras)": {"grad_accum": 2, "keras_accumulation": True}})
        medians = interleaved(args, variants, rounds)
        for name, seconds in medians.items():
            print(f"train_step {name:20s}: {seconds * 1000:8.1f} ms (median of {rounds} interleaved)")
        if args.gates_ab:
            print(f"gates_speedup={medians['plain'] / medians['gated']:.3f}")
        else:
            print(f"accum_speedup={medians['accumulating (keras)'] / medians['accumulating (ours)']:.3f}")
        return 0
    causal_lm, x, y, sw = build(args)
    fit = fit_seconds(causal_lm, x, y, sw, args)
    phases = (jax_phases if backend == "jax" else tf_phases)(causal_lm, x, y, sw, args)
    tokens = args.batch_size * args.sequence_length
    for name, seconds in [("fit", fit), *phases.items()]:
        print(f"{name:17s}: {seconds * 1000:8.1f} ms ({tokens / seconds:7.1f} tokens/s)")
    print(f"fit_overhead={fit / phases['train_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
