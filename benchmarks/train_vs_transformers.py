"""Training throughput: pitchkeras' fit (TensorFlow and JAX) vs a plain Hugging Face transformers/PyTorch loop.

Both sides train the GPT-2 124M architecture (12 layers, 12 heads, hidden 768,
MLP 3072, vocabulary 50257, 1024 positions) from random weights (no
download), on the same random token batches, with AdamW, in the same
precision (float32), one optimizer step per batch:

- ours: `keras_hub.models.GPT2CausalLM` compiled by
  `pitchkeras.train.optimizer.compile_for_training` (keras.optimizers.AdamW with
  the warmup/cosine schedule and global clipping, the per-token loss) and
  trained with `fit`, one step per epoch, exactly as `pitchkeras finetune`
  runs it, once with KERAS_BACKEND=tensorflow and once with KERAS_BACKEND=jax;
- theirs: `transformers.GPT2LMHeadModel` with `torch.optim.AdamW`, the
  textbook loop (`loss = model(ids, labels=ids).loss; loss.backward();
  opt.step(); opt.zero_grad()`).

Each side runs in its own child process (so thread pools never compete;
PyTorch's OpenMP threads wait passively, its best setting on a shared CPU),
warms up, then times `--steps` steps. The header names the CPU's SIMD level;
the last line printed is `ratio=<ours on TensorFlow / theirs>` (tokens/sec
over tokens/sec), the line before it the JAX ratio.

Usage:

    python benchmarks/train_vs_transformers.py --batch-size 4 --sequence-length 128 --steps 10

Needs `torch` and `transformers` (not pitchkeras dependencies):
`pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# GPT-2 124M ("gpt2" / keras-hub gpt2_base_en), written out so neither side downloads anything.
GPT2_124M = dict(vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
                 max_sequence_length=1024)


def batches(args, count):
    """The same random token ids for both sides (seeded)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    return [rng.integers(0, GPT2_124M["vocabulary_size"], size=(args.batch_size, args.sequence_length + 1),
                         dtype=np.int64) for _ in range(count)]


def simd_level() -> str:
    """The widest x86 vector extension this CPU has (from /proc/cpuinfo)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    for name in ("avx512f", "avx2", "avx", "sse4_2"):
        if name in flags:
            return name.upper().replace("AVX512F", "AVX-512")
    return "none of AVX/SSE4.2"


def run_ours(args) -> dict:
    import keras
    import keras_hub
    import numpy as np

    from pitchkeras.train.config import TrainConfig
    from pitchkeras.train.devices import choose_policy
    from pitchkeras.train.optimizer import compile_for_training

    policy = choose_policy(args.precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.GPT2Backbone(dropout=args.dropout, **GPT2_124M)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    config = TrainConfig(dataset="-", steps=1000, learning_rate=1e-4, batch_size=args.batch_size,
                         sequence_length=args.sequence_length)
    compile_for_training(causal_lm, config, jit_compile=args.jit)
    ids = np.concatenate(batches(args, args.warmup + args.steps)).astype(np.int32)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y, weights = ids[:, 1:], np.ones(ids[:, 1:].shape, np.float32)
    marks, losses = {}, []

    class Clock(keras.callbacks.Callback):  # the epoch-end log sync of every step is part of what finetune does
        def on_epoch_end(self, epoch, logs=None):
            losses.append(float(logs["loss"]))
            if epoch + 1 == args.warmup:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

    # Keras's own fit on arrays (keras-hub's would route them through its preprocessor's data pipeline).
    keras.Model.fit(causal_lm, x, y, sample_weight=weights, batch_size=args.batch_size, epochs=args.warmup + args.steps,
                    steps_per_epoch=1, shuffle=False, verbose=0, callbacks=[Clock()])
    return {"side": f"ours ({keras.config.backend()})", "seconds": marks["end"] - marks["start"],
            "losses": [losses[0], losses[-1]], "policy": policy, "params": int(causal_lm.count_params()),
            "intra_threads": os.cpu_count()}


def run_theirs(args) -> dict:
    import torch
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"float32": torch.float32, "mixed_bfloat16": torch.bfloat16}[args.precision if args.precision != "auto" else "float32"]
    config = transformers.GPT2Config(
        vocab_size=GPT2_124M["vocabulary_size"], n_positions=GPT2_124M["max_sequence_length"],
        n_embd=GPT2_124M["hidden_dim"], n_layer=GPT2_124M["num_layers"], n_head=GPT2_124M["num_heads"],
        n_inner=GPT2_124M["intermediate_dim"], resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
    )
    model = transformers.GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    # `labels` shift inside the model, so the input is sequence_length tokens like ours.
    data = [torch.from_numpy(ids[:, :-1]).contiguous() for ids in batches(args, args.warmup + args.steps)]

    def step(ids):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    losses = [float(step(ids)) for ids in data[: args.warmup]]
    start = time.perf_counter()
    for ids in data[args.warmup:]:
        loss = step(ids)
    losses.append(float(loss))
    seconds = time.perf_counter() - start
    return {"side": "theirs", "seconds": seconds, "losses": losses, "policy": str(dtype),
            "params": sum(p.numel() for p in model.parameters()), "intra_threads": torch.get_num_threads(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (XLA compiles on the first)")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--dropout", type=float, default=0.1, help="GPT-2's own dropout, on both sides")
    parser.add_argument("--no-jit", dest="jit", action="store_false", help="ours without XLA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)

    if args.side:
        result = (run_ours if args.side == "ours" else run_theirs)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    tokens = args.batch_size * args.sequence_length * args.steps
    print(f"GPT-2 124M, random weights, batch {args.batch_size} x {args.sequence_length} tokens, {args.precision}, "
          f"dropout {args.dropout}, {args.warmup} warm-up + {args.steps} timed steps, {os.cpu_count()} CPU(s), "
          f"SIMD {simd_level()}")
    rates = {}
    for side, backend in (("ours", "tensorflow"), ("ours", "jax"), ("theirs", None)):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        if backend:
            env["KERAS_BACKEND"] = backend
        # PyTorch's OpenMP threads spin-wait by default; on a shared, loaded CPU that made its step
        # 3x slower here (15 s vs 5 s). Passive waiting is its best setting; TensorFlow ignores it.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side],
                               env=env, capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(f"{side} ({backend}) failed:\n{child.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len("RESULT "):])
        rates[result["side"]] = tokens / result["seconds"]
        print(f"{result['side']:17s}: {rates[result['side']]:8.1f} tokens/s ({result['seconds'] / args.steps:.3f} s/step, "
              f"{result['params'] / 1e6:.1f}M params, {result['policy']}, {result['intra_threads']} intra-op threads, "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"
              + (f", {result['versions']}" if "versions" in result else "") + ")")
    print(f"ratio_jax={rates['ours (jax)'] / rates['theirs']:.3f}")
    print(f"ratio={rates['ours (tensorflow)'] / rates['theirs']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
