"""`pitchkeras populate`: fill a store with reviews for every (score, genre) pair."""

from __future__ import annotations

from pitchkeras.cli import add_command
from pitchkeras.commands.options import (
    add_compile_cache_flags, add_genres_flag, add_model_flags, add_progress_flag, add_quantize_flag, add_sampler_flags,
    field_default, model_directory, parameter_default, parse_list, parse_scores, sampler_config)
from pitchkeras.errors import UsageError
from pitchkeras.populate import PopulateConfig, format_table, populate, score_grid


def _score_range(text: str) -> list[float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--score-range must be START:STOP:STEP, got {text!r}") from None
    return score_grid(start, stop, step)


def _default_score_range() -> str:
    """`score_grid`'s own defaults as START:STOP:STEP."""
    return ":".join(f"{parameter_default(score_grid, name):g}" for name in ("start", "stop", "step"))


def add_parser(subparsers):
    def default(name):
        return field_default(PopulateConfig, name)

    p = add_command(subparsers, "populate", "Generate reviews for every (score, genre) pair and store them.", __name__)
    add_model_flags(p)
    p.add_argument("--store", default=default("store"), help="sqlite:///path.db or firestore://PROJECT/COLLECTION")
    p.add_argument("--per-pair", type=int, default=default("per_pair"), help="reviews wanted per (score, genre) pair")
    p.add_argument("--scores", default=default("scores"),
                   help="comma-separated scores, e.g. 2,8.5; when given, overrides --score-range")
    p.add_argument("--score-range", default=_default_score_range(), help="score grid START:STOP:STEP")
    add_genres_flag(p, "comma-separated genres (matched case-insensitively to the model's)")
    p.add_argument("--dataset", default=default("dataset"),
                   help="prepared dataset dir or train.csv: reject samples copied from it")
    p.add_argument("--max-copied-fraction", type=float, default=default("max_copied_fraction"),
                   help="with --dataset: reject a sample when this share of its 8-grams is in the training data")
    add_sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=default("batch_size"),
                   help="samples decoded together (decode engine slots)")
    p.add_argument("--max-attempts", type=int, default=default("max_attempts"),
                   help="candidates generated per wanted review at most; a pair still short after them is reported "
                        "missing")
    p.add_argument("--shard-index", type=int, default=default("shard_index"), help="this worker's shard")
    p.add_argument("--num-shards", type=int, default=default("num_shards"), help="workers splitting the grid")
    add_progress_flag(p, quiet_alias=True)
    add_compile_cache_flags(p)
    add_quantize_flag(p)
    return p


def run(args) -> int:
    model = model_directory(args)
    scores = parse_scores(args.scores) if args.scores else _score_range(args.score_range)
    genres = parse_list(args.genres)
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
    result = populate(config, progress=not args.no_progress)
    print(format_table(result))
    missing = sum(p.missing for p in result.pairs)
    # Generation is deterministic per (seed, attempt): a plain rerun redoes the rejected attempts
    # with the same outcome, so new candidates need more attempts or another seed.
    print(f"model {result.model_version}: stored {result.stored} new review(s) in {result.store}"
          + (f"; {missing} still missing after {args.max_attempts} attempt(s) per review: rerun with a larger "
             "--max-attempts or another --seed for new candidates" if missing else ""))
    return 0
