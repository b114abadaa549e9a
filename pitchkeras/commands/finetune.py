"""`pitchkeras finetune`: fine-tune GPT-2 on prepared examples (flags named like gpt-2-simple's)."""

from __future__ import annotations

from pitchkeras.cli import add_command

PRECISIONS = ("auto", "mixed_float16", "mixed_bfloat16", "float32")  # same as pitchkeras.train (no TF import here)
STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")


def add_parser(subparsers):
    p = add_command(subparsers, "finetune", "Fine-tune a keras-hub GPT-2 on a prepared dataset (resumable).", __name__)
    p.add_argument("--dataset", required=True, help="`pitchkeras prepare` output directory, or one CSV")
    p.add_argument("--run-name", default="run1", help="run folder under --checkpoint-dir")
    p.add_argument("--checkpoint-dir", default="checkpoint", help="where runs live")
    p.add_argument("--preset", default="gpt2_medium_en",
                   help="keras-hub preset (gpt2_base_en, gpt2_medium_en, gpt2_large_en, gpt2_extra_large_en), "
                        "a local preset directory, or `tiny` (offline)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run trains up to this)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch per micro-step (split across replicas)")
    p.add_argument("--sequence-length", type=int, default=256, help="tokens per row")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=-1, help="warmup steps (-1: 10%% of --steps, at most 200)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--print-every", type=int, default=50, help="steps between log lines (0 = off)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="steps between sample files in samples/ (0 = off)")
    p.add_argument("--max-checkpoints", type=int, default=3, help="checkpoints kept")
    p.add_argument("--restore-from", default="latest", help="latest, fresh, or a checkpoint/run directory")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    p.add_argument("--val-every", type=int, default=100, help="steps between validation passes on val.csv (0 = end only)")
    p.add_argument("--val-batches", type=int, default=20, help="batches per validation pass (0 = all)")
    p.add_argument("--lora-rank", type=int, default=0, help="keras-hub LoRA rank (0 = full fine-tuning)")
    p.add_argument("--mixed-precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on GPUs >= 8.0 and TPUs, fp16 on older GPUs, fp32 on CPU")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="tf.distribute strategy (auto: multiworker with TF_CONFIG, mirrored with >1 GPU, else one)")
    p.add_argument("--no-packing", action="store_true", help="one padded example per row instead of packed blocks")
    p.add_argument("--cache-dir", default="", help="tokenized-data cache (default CHECKPOINT_DIR/.token-cache; `none` = off)")
    p.add_argument("--jit-compile", default="auto", choices=("auto", "true", "false"), help="XLA-compile the step")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def run(args) -> int:
    from pitchkeras.train import TrainConfig, finetune

    config = TrainConfig(
        dataset=args.dataset,
        run_name=args.run_name,
        checkpoint_dir=args.checkpoint_dir,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        grad_accum=args.grad_accum,
        print_every=args.print_every,
        save_every=args.save_every,
        sample_every=args.sample_every,
        max_checkpoints=args.max_checkpoints,
        restore_from=args.restore_from,
        seed=args.seed,
        val_every=args.val_every,
        val_batches=args.val_batches,
        lora_rank=args.lora_rank,
        mixed_precision=args.mixed_precision,
        strategy=args.strategy,
        packing=not args.no_packing,
        cache_dir=args.cache_dir,
        jit_compile=args.jit_compile,
        progress=not args.quiet,
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
