"""GPT-2 training throughput and MFU on KERAS_BACKEND=jax, with only keras, keras-hub, jax and numpy.

For the GPU machine this project is sometimes lent (JAX, no TensorFlow): the keras-hub GPT2CausalLM of the
GPT-2 124M and 355M architectures (random weights, no download), `compile` with keras.optimizers.AdamW
and the per-token loss, `fit` on random token batches (numpy, no tf.data), mixed_bfloat16 by default,
sequence 1024, and the largest batch that fits (doubling from 1 until the device runs out of memory, or
`--batch-size`). Printed per model: tokens/s, step time and MFU.

MFU = achieved model FLOP/s / the chip's dense bf16 peak, with the training FLOPs per token

    6 * N + 12 * L * d * T

(Kaplan et al. / PaLM appendix B: forward + backward of every weight matmul, plus attention scores and
values), N = parameters excluding the position embedding (the token embedding counts: it is also the
tied LM head), L layers, d model width, T sequence length. Peaks (dense bf16, no sparsity) come from the
device kind (H100/H200 989 TFLOP/s, A100 312, L4 121, TPU v4 275, v5e 197, v5p 459, v6e 918) or
`--peak-tflops`; on a CPU MFU is not reported.

Usage:

    KERAS_BACKEND=jax python benchmarks/gpu_train.py                # 124M and 355M, seq 1024, bf16, auto batch
    KERAS_BACKEND=jax python benchmarks/gpu_train.py --model tiny --sequence-length 32 --batch-size 2 --steps 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MODELS = {
    "gpt2_124m": dict(vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
                      max_sequence_length=1024),
    "gpt2_355m": dict(vocabulary_size=50257, num_layers=24, num_heads=16, hidden_dim=1024, intermediate_dim=4096,
                      max_sequence_length=1024),
    "tiny": dict(vocabulary_size=512, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
                 max_sequence_length=128),  # for the CPU test
}
# Dense bf16 peak FLOP/s by a substring of jax's device_kind (lower case), first match wins.
PEAKS = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12),
         ("v6", 918e12), ("v5p", 459e12), ("v5", 197e12), ("v4", 275e12))


def flops_per_token(params: int, shape: dict, sequence_length: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (N without the position embedding)."""
    n = params - shape["max_sequence_length"] * shape["hidden_dim"]
    return 6.0 * n + 12.0 * shape["num_layers"] * shape["hidden_dim"] * sequence_length


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float:
    """The chip's dense bf16 peak in FLOP/s (0 when unknown, e.g. a CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    return next((peak for name, peak in PEAKS if name in kind), 0.0)


def is_out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def train(shape: dict, batch_size: int, args) -> dict:
    """Compile and fit one model; returns the timed figures (raises on OOM)."""
    import keras
    import keras_hub
    import numpy as np

    keras.backend.clear_session()
    keras.config.set_dtype_policy(args.precision)
    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.GPT2Backbone(dropout=0.0, **shape)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        weighted_metrics=[], jit_compile=True)
    steps = args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, shape["vocabulary_size"], size=(steps * batch_size, args.sequence_length + 1), dtype=np.int32)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y, weights = ids[:, 1:], np.ones(ids[:, 1:].shape, np.float32)

    marks = {}

    class Clock(keras.callbacks.Callback):  # one step per epoch, like `pitchkeras finetune`: logs sync each step
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == args.warmup:
                marks["start"] = time.perf_counter()
            marks["end"], marks["loss"] = time.perf_counter(), float(logs["loss"])

    # Keras's own fit: keras-hub's override turns arrays into a tf.data/grain pipeline for its
    # preprocessor, and there is no preprocessor (nor TensorFlow) here.
    keras.Model.fit(causal_lm, x, y, sample_weight=weights, batch_size=batch_size, epochs=steps, steps_per_epoch=1,
                    shuffle=False, verbose=0, callbacks=[Clock()])
    seconds = marks["end"] - marks["start"]
    tokens = args.steps * batch_size * args.sequence_length
    return {"params": int(causal_lm.count_params()), "seconds": seconds, "tokens_per_sec": tokens / seconds,
            "step_seconds": seconds / args.steps, "loss": marks["loss"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="architecture(s) to run (default: gpt2_124m and gpt2_355m)")
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the largest power of two that fits")
    parser.add_argument("--max-batch-size", type=int, default=256, help="where the search stops")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (XLA compiles on the first)")
    parser.add_argument("--precision", default="mixed_bfloat16", choices=("mixed_bfloat16", "float32"))
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the chip's dense bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import keras
    import keras_hub

    if keras.config.backend() != "jax":
        print(f"gpu_train: needs KERAS_BACKEND=jax, got {keras.config.backend()}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, args.peak_tflops)
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "peak unknown (MFU not reported)"
    print(f"gpu_train: {len(jax.devices())} x {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"keras {keras.__version__}, keras-hub {keras_hub.__version__}, {args.precision}, sequence "
          f"{args.sequence_length}, {args.warmup} warm-up + {args.steps} timed steps; {peak_text}")
    print("FLOPs/token = 6*N + 12*L*d*T (N: parameters without the position embedding)")
    for name in args.model or ["gpt2_124m", "gpt2_355m"]:
        shape = dict(MODELS[name], max_sequence_length=max(MODELS[name]["max_sequence_length"], args.sequence_length))
        sizes = [args.batch_size] if args.batch_size else [2 ** i for i in range(args.max_batch_size.bit_length())
                                                           if 2 ** i <= args.max_batch_size]
        best = None
        for batch_size in sizes:
            try:
                figures = train(shape, batch_size, args)
            except Exception as err:  # noqa: BLE001 - only an out-of-memory ends the search quietly
                if not is_out_of_memory(err) or best is None:
                    raise
                break
            best = (batch_size, figures)
        batch_size, figures = best
        per_token = flops_per_token(figures["params"], shape, args.sequence_length)
        achieved = per_token * figures["tokens_per_sec"]
        mfu = f"{100 * achieved / peak:.4f}%" if peak else "n/a"
        print(f"{name}: {figures['params']:,} params, batch {batch_size} x {args.sequence_length}: "
              f"{figures['tokens_per_sec']:.1f} tokens/s, {figures['step_seconds'] * 1000:.1f} ms/step, "
              f"{achieved / 1e12:.6f} TFLOP/s, MFU {mfu}, loss {figures['loss']:.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported (in main); never on a plain import
    sys.exit(main())
