"""`pitchkeras demo`: the main job end to end on the bundled sample dump, offline, on the CPU."""

from __future__ import annotations

from pitchkeras.cli import add_command
from pitchkeras.commands.options import (
    add_genres_flag, add_progress_flag, field_default, format_scores, parse_list, parse_scores)
from pitchkeras.demo import DemoConfig, run_demo


def add_parser(subparsers):
    def default(name):
        return field_default(DemoConfig, name)

    p = add_command(
        subparsers, "demo",
        "Prepare the bundled sample dump, fine-tune, populate an SQLite store, serve it over gRPC and call it.",
        __name__,
    )
    p.add_argument("--workdir", default=default("workdir"), help="where every artifact goes")
    p.add_argument("--fresh", action="store_true", default=default("fresh"),
                   help="start over instead of reusing finished stages")
    p.add_argument("--preset", default=default("preset"),
                   help="`tiny` (offline) or a keras-hub GPT-2 preset name / local dir")
    p.add_argument("--steps", type=int, default=default("steps"), help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=default("batch_size"), help="training batch size")
    p.add_argument("--sequence-length", type=int, default=default("sequence_length"),
                   help="training sequence length (tokens)")
    p.add_argument("--learning-rate", type=float, default=default("learning_rate"), help="peak learning rate")
    p.add_argument("--scores", default=format_scores(default("scores")), help="comma-separated scores to populate")
    add_genres_flag(p, "comma-separated genres to populate")
    p.add_argument("--per-pair", type=int, default=default("per_pair"), help="reviews stored per (score, genre) pair")
    p.add_argument("--length", type=int, default=default("length"), help="max new tokens per generated review")
    p.add_argument("--seed", type=int, default=default("seed"), help="seed for every stage")
    p.add_argument("--port", type=int, default=default("port"), help="gRPC port (0 picks a free one)")
    p.add_argument("--http-port", type=int, default=default("http_port"),
                   help="HTTP/JSON and web page port (0 picks a free one)")
    add_progress_flag(p, help="no progress bars (logs, CI)")
    return p


def run(args) -> int:
    scores = parse_scores(args.scores)
    genres = parse_list(args.genres) or None  # none given: the seed's eight
    config = DemoConfig(
        workdir=args.workdir, fresh=args.fresh, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        sequence_length=args.sequence_length, learning_rate=args.learning_rate, scores=scores, genres=genres,
        per_pair=args.per_pair, length=args.length, seed=args.seed, port=args.port, http_port=args.http_port,
        progress=not args.no_progress,
    )
    run_demo(config)
    return 0
