"""`pitchkeras populate`: fill a store with reviews for every (score, genre) pair."""

from __future__ import annotations

from pitchkeras.cli import add_command
from pitchkeras.commands.options import add_compile_cache_flags, add_quantize_flag, add_sampler_flags, sampler_config
from pitchkeras.errors import UsageError
from pitchkeras.store import DEFAULT_STORE_URI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--scores must be comma-separated numbers, got {text!r}") from None


def _score_range(text: str) -> list[float]:
    from pitchkeras.populate import score_grid

    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--score-range must be START:STOP:STEP, got {text!r}") from None
    return score_grid(start, stop, step)


def add_parser(subparsers):
    p = add_command(subparsers, "populate", "Generate reviews for every (score, genre) pair and store them.", __name__)
    p.add_argument("--model", help="model directory; when omitted, CHECKPOINT_DIR/RUN_NAME/model")
    p.add_argument("--run-name", default="run1", help="run whose model/ to use when --model is not given")
    p.add_argument("--checkpoint-dir", default="checkpoint", help="where runs live")
    p.add_argument("--store", default=DEFAULT_STORE_URI, help="sqlite:///path.db or firestore://PROJECT/COLLECTION")
    p.add_argument("--per-pair", type=int, default=5, help="reviews wanted per (score, genre) pair")
    p.add_argument("--scores", help="comma-separated scores, e.g. 2,8.5; when given, overrides --score-range")
    p.add_argument("--score-range", default="0:10:0.5", help="score grid START:STOP:STEP")
    p.add_argument("--genres", default="Rock,Electronic,Rap,Pop/R&B,Experimental,Folk/Country,Metal,Jazz",
                   help="comma-separated genres (matched case-insensitively to the model's)")
    p.add_argument("--dataset", help="prepared dataset dir or train.csv: reject samples copied from it")
    p.add_argument("--max-copied-fraction", type=float, default=0.5,
                   help="with --dataset: reject a sample when this share of its 8-grams is in the training data")
    add_sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=8, help="samples decoded together (decode engine slots)")
    p.add_argument("--max-attempts", type=int, default=4, help="candidates generated per wanted review at most; a pair still short after them is reported missing")
    p.add_argument("--shard-index", type=int, default=0, help="this worker's shard")
    p.add_argument("--num-shards", type=int, default=1, help="workers splitting the grid")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_cache_flags(p)
    add_quantize_flag(p)
    return p


def run(args) -> int:
    import os

    from pitchkeras.populate import PopulateConfig, format_table, populate

    model = args.model or os.path.join(args.checkpoint_dir, args.run_name, "model")
    if not os.path.isdir(model):
        raise UsageError(f"model directory {model} does not exist; run `pitchkeras finetune` first or pass --model")
    scores = _floats(args.scores) if args.scores else _score_range(args.score_range)
    genres = [g.strip() for g in args.genres.split(",") if g.strip()]
    config = PopulateConfig(
        model=model,
        store=args.store,
        per_pair=args.per_pair,
        scores=scores,
        genres=genres,
        dataset=args.dataset,
        max_copied_fraction=args.max_copied_fraction,
        sampler=sampler_config(args),
        length=args.length,
        batch_size=args.batch_size,
        seed=args.seed,
        max_attempts=args.max_attempts,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        quantize=args.quantize,
    )
    result = populate(config, progress=not args.quiet)
    print(format_table(result))
    missing = sum(p.missing for p in result.pairs)
    # Generation is deterministic per (seed, attempt): a plain rerun redoes the rejected attempts
    # with the same outcome, so new candidates need more attempts or another seed.
    print(f"model {result.model_version}: stored {result.stored} new review(s) in {result.store}"
          + (f"; {missing} still missing after {args.max_attempts} attempt(s) per review: rerun with a larger "
             "--max-attempts or another --seed for new candidates" if missing else ""))
    return 0
