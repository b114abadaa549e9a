"""`pitchkeras store`: look after a review store (`migrate` a seed-written collection, `counts`)."""

from __future__ import annotations

import argparse

from pitchkeras.cli import add_command
from pitchkeras.commands.options import add_progress_flag, parameter_default
from pitchkeras.errors import UsageError
from pitchkeras.store import DEFAULT_STORE_URI, ReviewStore, open_store


def _add_store_flag(p) -> None:
    p.add_argument("--store", default=DEFAULT_STORE_URI, help="sqlite:///path.db or firestore://PROJECT/COLLECTION")


def add_parser(subparsers):
    p = add_command(subparsers, "store", "Look after a review store: migrate a seed-written collection, counts.",
                    __name__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    migrate = actions.add_parser(
        "migrate", formatter_class=fmt,
        help="add the fields this project's schema has to documents another tool (the seed's script) wrote; "
             "never touches text or selection_count; idempotent and resumable (rerun it)")
    _add_store_flag(migrate)
    migrate.add_argument("--model-version", default=parameter_default(ReviewStore.migrate, "model_version"),
                         help="model_version given to documents that have none")
    add_progress_flag(migrate)

    counts = actions.add_parser("counts", formatter_class=fmt, help="reviews per (score, genre) pair")
    _add_store_flag(counts)
    return p


def run(args) -> int:
    if args.action == "migrate" and not args.model_version.strip():
        raise UsageError("--model-version must not be empty")
    with open_store(args.store) as store:
        if args.action == "migrate":
            result = store.migrate(model_version=args.model_version, progress=not args.no_progress)
            print(f"migrate {store.uri}: {result.summary()}")
        else:
            rows = store.counts()
            print(f"{'score':>5}  {'genre':<20} {'reviews':>7}")
            for row in rows:
                score = "-" if row.score is None else f"{row.score:.1f}"
                print(f"{score:>5}  {row.genre or '-':<20} {row.count:>7}")
            print(f"{sum(r.count for r in rows)} review(s) in {len(rows)} pair(s)")
    return 0
