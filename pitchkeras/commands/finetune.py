"""`pitchkeras finetune`: fine-tune GPT-2 on prepared examples (flags named like gpt-2-simple's).

Every default comes from `pitchkeras.train.TrainConfig` (importing it does not load TensorFlow).
"""

from __future__ import annotations

import argparse

from pitchkeras.cli import add_command
from pitchkeras.train.config import OPTIMIZERS, PRECISIONS, STRATEGIES, TrainConfig

# (flag, TrainConfig field, type, help): the flags that map one-to-one onto a setting.
FLAGS = (
    ("--run-name", "run_name", str, "run folder under --checkpoint-dir"),
    ("--checkpoint-dir", "checkpoint_dir", str, "where runs live"),
    ("--preset", "preset", str, "keras-hub preset (gpt2_base_en, gpt2_medium_en, gpt2_large_en, gpt2_extra_large_en), "
                                "a local preset directory, or `tiny` (offline)"),
    ("--steps", "steps", int, "total optimizer steps (a resumed run trains up to this)"),
    ("--sequence-length", "sequence_length", int, "tokens per row"),
    ("--learning-rate", "learning_rate", float, "peak learning rate (linear warmup, cosine decay)"),
    ("--warmup-steps", "warmup_steps", int, "warmup steps (-1: 10%% of --steps, at most 200)"),
    ("--weight-decay", "weight_decay", float, "AdamW decoupled weight decay (not on biases and norms)"),
    ("--clipnorm", "clipnorm", float, "global gradient-norm clip (0 = off)"),
    ("--grad-accum", "grad_accum", int, "micro-batches accumulated per optimizer step"),
    ("--print-every", "print_every", int, "steps between log lines (0 = off)"),
    ("--save-every", "save_every", int, "steps between checkpoints (0 = only at the end)"),
    ("--sample-every", "sample_every", int, "steps between sample files in samples/ (0 = off)"),
    ("--max-checkpoints", "max_checkpoints", int, "checkpoints kept"),
    ("--restore-from", "restore_from", str, "latest, fresh, or a checkpoint/run directory"),
    ("--seed", "seed", int, "initialisation and data-order seed"),
    ("--val-every", "val_every", int, "steps between validation passes on val.csv (0 = end only)"),
    ("--val-batches", "val_batches", int, "batches per validation pass (0 = all)"),
    ("--lora-rank", "lora_rank", int, "keras-hub LoRA rank (0 = full fine-tuning)"),
    ("--cache-dir", "cache_dir", str, "tokenized-data cache (default CHECKPOINT_DIR/.token-cache; `none` = off)"),
    ("--memory", "memory", str, "device memory for --batch-size auto, e.g. 16GB (default: the local "
                                "accelerator's; none on a CPU, where the batch stays as given)"),
    ("--memory-margin", "memory_margin", float, "fraction of --memory --batch-size auto leaves free"),
)


def _batch_size(text: str):
    """An int, or `auto` / `auto:N`: (True, N or None)."""
    if text == "auto" or text.startswith("auto:"):
        rows = text[len("auto:"):] if ":" in text else ""
        if rows and not rows.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: auto:N takes a whole number of rows")
        return True, int(rows) if rows else None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, auto or auto:N") from None


def add_parser(subparsers):
    p = add_command(subparsers, "finetune", "Fine-tune a keras-hub GPT-2 on a prepared dataset (resumable).", __name__)
    p.add_argument("--dataset", required=True, help="`pitchkeras prepare` output directory, or one CSV")
    for flag, name, kind, help in FLAGS:
        p.add_argument(flag, dest=name, type=kind, default=TrainConfig.default(name), help=help)
    p.add_argument("--batch-size", type=_batch_size, default=TrainConfig.default("batch_size"),
                   help="global rows per micro-step (split across replicas); `auto`: the largest micro-batch whose "
                        "planned step fits --memory, accumulated up to batch size x --grad-accum rows per step "
                        "(`auto:N`: that batch size is N)")
    p.add_argument("--optimizer", default=TrainConfig.default("optimizer"), choices=OPTIMIZERS,
                   help="adamw; adafactor (factored second moments); lion (one moment, wants a lower learning rate)")
    p.add_argument("--remat", action="store_true", default=TrainConfig.default("remat"),
                   help="rematerialize the transformer blocks: less memory, one more forward pass per step")
    p.add_argument("--mixed-precision", default=TrainConfig.default("mixed_precision"), choices=PRECISIONS,
                   help="auto: bf16 on GPUs >= 8.0 and TPUs, fp16 + loss scaling on older GPUs, fp32 on CPU")
    p.add_argument("--strategy", default=TrainConfig.default("strategy"), choices=STRATEGIES,
                   help="TensorFlow: tf.distribute strategy (auto: multiworker with TF_CONFIG, mirrored with >1 GPU, "
                        "else one); KERAS_BACKEND=jax: auto = keras.distribution.DataParallel over local devices")
    p.add_argument("--no-packing", action="store_true", help="one padded example per row instead of packed blocks")
    p.add_argument("--jit-compile", default=TrainConfig.default("jit_compile"), choices=("auto", "true", "false"),
                   help="XLA-compile the step")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def run(args) -> int:
    from pitchkeras.train import finetune  # here, not at the top: it imports Keras (start-up time)

    auto = isinstance(args.batch_size, tuple)
    config = TrainConfig(
        dataset=args.dataset,
        batch_size=(args.batch_size[1] or TrainConfig.default("batch_size")) if auto else args.batch_size,
        auto_batch=auto,
        optimizer=args.optimizer,
        remat=args.remat,
        mixed_precision=args.mixed_precision,
        strategy=args.strategy,
        packing=not args.no_packing,
        jit_compile=args.jit_compile,
        progress=not args.quiet,
        **{name: getattr(args, name) for _, name, _, _ in FLAGS},
    )
    result = finetune(config)
    if result.interrupted:
        print(f"interrupted at step {result.step}: checkpoint saved in {result.run_dir}; "
              "rerun with --restore-from latest to continue")
        return 130
    print(f"finetune {result.model_version}: step {result.step}, "
          f"last loss {result.losses[-1][1] if result.losses else float('nan'):.4f}"
          + (f", val loss {result.val_loss:.4f}" if result.val_loss is not None else "")
          + f", {result.tokens_per_sec:,.0f} tokens/s, {result.seconds:.0f} s; model: {result.model_dir}")
    return 0
