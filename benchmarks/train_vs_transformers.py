"""Training throughput: pitchkeras' Trainer vs a plain Hugging Face transformers/PyTorch loop, same CPU.

Both sides train the GPT-2 124M architecture (12 layers, 12 heads, hidden 768,
MLP 3072, vocabulary 50257, 1024 positions) from random weights (no
download), on the same random token batches, with AdamW, in the same
precision (float32), one optimizer step per batch:

- ours: `keras_hub.models.GPT2CausalLM` driven by `pitchkeras.train.Trainer`
  (the step `pitchkeras finetune` runs: forward, token cross-entropy,
  backward and AdamW compiled as one XLA program) with
  `pitchkeras.train.make_optimizer`;
- theirs: `transformers.GPT2LMHeadModel` with `torch.optim.AdamW`, the
  textbook loop (`loss = model(ids, labels=ids).loss; loss.backward();
  opt.step(); opt.zero_grad()`).

Each side runs in its own child process (so TensorFlow's and PyTorch's
thread pools never compete; PyTorch's OpenMP threads wait passively, its
best setting on a shared CPU), warms up, then times `--steps` steps. The last
line printed is `ratio=<ours/theirs>` (tokens/sec over tokens/sec).

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


def run_ours(args) -> dict:
    import keras
    import keras_hub
    import tensorflow as tf

    from pitchkeras.train import Trainer, TrainConfig, choose_policy, make_optimizer

    policy = choose_policy(args.precision)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.GPT2Backbone(dropout=args.dropout, **GPT2_124M)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    config = TrainConfig(dataset="-", steps=1000, learning_rate=1e-4, batch_size=args.batch_size,
                         sequence_length=args.sequence_length)
    optimizer = make_optimizer(config, policy)
    optimizer.build(causal_lm.trainable_variables)
    trainer = Trainer(causal_lm, optimizer, tf.distribute.get_strategy(), jit_compile=args.jit)

    def to_batch(ids):
        ids = tf.constant(ids, tf.int32)
        x = {"token_ids": ids[:, :-1], "padding_mask": tf.ones_like(ids[:, :-1], tf.bool)}
        return x, ids[:, 1:], tf.ones_like(ids[:, 1:], tf.bool)

    data = [to_batch(ids) for ids in batches(args, args.warmup + args.steps)]
    losses = []
    for batch in data[: args.warmup]:
        losses.append(float(trainer.train_step([batch])))
    start = time.perf_counter()
    for batch in data[args.warmup:]:
        loss = trainer.train_step([batch])
    losses.append(float(loss))  # float() waits for the last step
    seconds = time.perf_counter() - start
    return {"side": "ours", "seconds": seconds, "losses": losses, "policy": policy,
            "params": int(causal_lm.count_params()), "intra_threads": tf.config.threading.get_intra_op_parallelism_threads()}


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
          f"dropout {args.dropout}, {args.warmup} warm-up + {args.steps} timed steps, {os.cpu_count()} CPU(s)")
    rates = {}
    for side in ("ours", "theirs"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        # PyTorch's OpenMP threads spin-wait by default; on a shared, loaded CPU that made its step
        # 3x slower here (15 s vs 5 s). Passive waiting is its best setting; TensorFlow ignores it.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side],
                               env=env, capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(f"{side} failed:\n{child.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len("RESULT "):])
        rates[side] = tokens / result["seconds"]
        print(f"{side:6s}: {rates[side]:8.1f} tokens/s ({result['seconds'] / args.steps:.3f} s/step, "
              f"{result['params'] / 1e6:.1f}M params, {result['policy']}, {result['intra_threads']} intra-op threads, "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"
              + (f", {result['versions']}" if "versions" in result else "") + ")")
    print(f"ratio={rates['ours'] / rates['theirs']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
