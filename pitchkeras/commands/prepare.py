"""`pitchkeras prepare`: a review dump -> conditioned examples, a train/val split and statistics."""

from __future__ import annotations

import sys

from pitchkeras.cli import add_command
from pitchkeras.commands.options import add_progress_flag, field_default
from pitchkeras.data.options import MULTI_GENRE, PrepareOptions, parse_condition_columns


def _stated(text: str) -> str:
    """Help whose own words state the default (better than argparse's `(default: None)`).

    `%(default).0s` prints nothing, but its presence stops the
    ArgumentDefaultsHelpFormatter from appending `(default: None)`.
    """
    return text + "%(default).0s"


def add_parser(subparsers):
    def default(name):
        return field_default(PrepareOptions, name)

    p = add_command(subparsers, "prepare",
                    "Turn a review dump (Kaggle or seed SQLite, CSV, JSONL, Parquet, a gpt-2-simple .txt corpus) "
                    "into conditioned training examples, a train/val split and statistics.", __name__)
    p.add_argument("source", metavar="SOURCE",
                   help="the dump file, or a directory of .txt files; its format is detected")
    p.add_argument("--out", required=True, metavar="DIR",
                   help=_stated("output directory for examples.csv, train.csv, val.csv, stats.json, stats.png "
                                 "(required; created if missing)"))
    p.add_argument("--query", default=default("query"), help=_stated(
        "SQLite only: a SELECT to read instead of the detected schema (default: none, the schema decides)"))
    p.add_argument("--text-column", default=default("text_column"), help=_stated(
        "column holding the text (default: detected: content for the Kaggle dump, review for the seed's, "
        "else the first of text, review, content, body, bio, biography, description)"))
    p.add_argument("--condition-columns", default=default("condition_columns"), help=_stated(
        "conditions in prompt order, comma-separated; NAME=COLUMN reads NAME from COLUMN; \"\" for a plain "
        "corpus (default: score,genre for tables, none for a .txt corpus)"))
    p.add_argument("--no-conditions", action="store_true",
                   help="plain corpus (e.g. DJ biographies): same as --condition-columns \"\"")
    p.add_argument("--multi-genre", choices=MULTI_GENRE, default=default("multi_genre"),
                   help="a review with several genres: keep its first, or one example per genre")
    p.add_argument("--min-chars", type=int, default=default("min_chars"),
                   help="drop texts shorter than this (after cleaning)")
    p.add_argument("--max-chars", type=int, default=default("max_chars"), help="drop texts longer than this")
    p.add_argument("--drop-multiline", action="store_true", default=default("drop_multiline"),
                   help="drop texts containing a newline (the seed tutorial's filter); kept by default")
    p.add_argument("--language", metavar="CODE", default=default("language"),
                   help=_stated("keep only texts langid identifies as this ISO 639-1 code, e.g. en "
                                 "(default: no filter)"))
    p.add_argument("--delimiters", action="store_true", default=default("delimiters"),
                   help="wrap each examples.csv row in <|startoftext|>/<|endoftext|> for gpt-2-simple")
    p.add_argument("--val-fraction", type=float, default=default("val_fraction"), help="share of examples in val.csv")
    p.add_argument("--seed", type=int, default=default("seed"), help="seeds the hash that splits train/val")
    add_progress_flag(p)
    return p


def run(args) -> int:
    from pitchkeras.data.prepare import prepare  # here, not at the top: it imports pandas (start-up time)

    options = PrepareOptions(
        query=args.query,
        text_column=args.text_column,
        condition_columns=() if args.no_conditions else (
            None if args.condition_columns is None else parse_condition_columns(args.condition_columns)),
        multi_genre=args.multi_genre,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        drop_multiline=args.drop_multiline,
        language=args.language,
        delimiters=args.delimiters,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = prepare(args.source, args.out, options=options)
    for warning in result.warnings:
        print(f"pitchkeras prepare: warning: {warning}", file=sys.stderr)
    dropped = ", ".join(f"{reason} {n}" for reason, n in result.stats["dropped"].items()) or "none"
    print(f"read {result.read} rows from {args.source} ({result.kind}); "
          f"kept {result.kept} examples (train {result.train}, val {result.val}); dropped: {dropped}")
    print(f"wrote {result.examples_path}, {result.train_path}, {result.val_path}, {result.stats_path}, "
          f"{result.plot_path} in {result.seconds:.1f} s")
    return 0
