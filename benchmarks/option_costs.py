"""What each memory option of `pitchkeras finetune` costs in speed: seconds per step against the default.

Builds a GPT-2 of a small shape (default: 6 layers, 6 heads, hidden 384,
vocabulary 50257, batch 4 x 256, dropout 0.1) on the JAX backend, applies
the options the way `finetune` does (`remat_transformer_blocks`,
`enable_lora`, the dtype policy, `--optimizer`, then `compile_for_training`)
and times `fit` one step per epoch (the median step after the warm-up) for:
the default (float32, AdamW), `--remat`, `--optimizer adafactor`,
`--optimizer lion`, `--lora-rank 8`, `--mixed-precision mixed_bfloat16`, and
the lean settings of the README's table (mixed_bfloat16 + remat + Adafactor).
The rounds are interleaved (every setting once per round, `--rounds` rounds)
so a change in the machine's load falls on all of them alike. The header names
the CPU's SIMD level; the last line is `remat_cost=<remat / default>`.

    python benchmarks/option_costs.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_transformers import simd_level  # noqa: E402

SETTINGS = {
    "default": {},
    "remat": {"remat": True},
    "adafactor": {"optimizer": "adafactor"},
    "lion": {"optimizer": "lion"},
    "lora8": {"lora_rank": 8},
    "bfloat16": {"mixed_precision": "mixed_bfloat16"},
    "lean": {"mixed_precision": "mixed_bfloat16", "remat": True, "optimizer": "adafactor"},
}


def build(options: dict, args):
    """A compiled GPT2CausalLM with `options` applied as `finetune` applies them, and a `step()` running fit once."""
    import keras
    import keras_hub
    import numpy as np

    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.optimizer import compile_for_training
    from pitchkeras.train.remat import remat_transformer_blocks

    config = TrainConfig(dataset="-", steps=1000, batch_size=args.batch_size, sequence_length=args.sequence_length,
                         **{k: v for k, v in options.items() if k != "mixed_precision"},
                         mixed_precision=options.get("mixed_precision", "float32"))
    keras.config.set_dtype_policy(config.mixed_precision)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50257, num_layers=args.layers, num_heads=args.heads, hidden_dim=args.hidden,
        intermediate_dim=4 * args.hidden, max_sequence_length=max(1024, args.sequence_length), dropout=0.1)
    if config.lora_rank:
        backbone.enable_lora(config.lora_rank)
    if config.remat:
        remat_transformer_blocks(backbone)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    compile_for_training(causal_lm, config, jit_compile=True)
    keras.config.set_dtype_policy("float32")
    ids = np.random.default_rng(0).integers(0, 50257, size=(args.batch_size, args.sequence_length + 1)).astype(np.int32)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    marks = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])
            marks.append(time.perf_counter())

    epoch = [0]

    def steps(count: int) -> list:
        marks.clear()
        start = time.perf_counter()
        keras.Model.fit(causal_lm, x, ids[:, 1:], batch_size=args.batch_size, epochs=epoch[0] + count,
                        initial_epoch=epoch[0], steps_per_epoch=1, shuffle=False, verbose=0, callbacks=[Clock()])
        epoch[0] += count
        return [b - a for a, b in zip([start, *marks], marks)]

    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated settings (default: all)")
    args = parser.parse_args(argv)
    import keras

    names = args.only.split(",") if args.only else list(SETTINGS)
    print(f"GPT-2 {args.layers} layers, {args.heads} heads, hidden {args.hidden}, vocabulary 50257, batch "
          f"{args.batch_size} x {args.sequence_length}, dropout 0.1, backend {keras.config.backend()}, fit one step "
          f"per epoch, {args.rounds} interleaved rounds x {args.steps} steps, {os.cpu_count()} CPU(s), "
          f"SIMD {simd_level()}", flush=True)
    runs = {name: build(SETTINGS[name], args) for name in names}
    for run in runs.values():
        run(2)  # compile and warm up
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name] += run(args.steps)
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:10s}: {median * 1000:8.1f} ms/step ({1 / median:6.3f} steps/s), x{median / base:.3f} of "
              f"{names[0]}")
    if "remat" in times and "default" in times:
        print(f"remat_cost={statistics.median(times['remat']) / statistics.median(times['default']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
