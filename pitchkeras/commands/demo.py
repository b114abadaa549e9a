"""`pitchkeras demo`: the main job end to end on the bundled sample dump, offline, on the CPU."""

from __future__ import annotations

from pitchkeras.cli import add_command
from pitchkeras.errors import UsageError


def add_parser(subparsers):
    p = add_command(
        subparsers, "demo",
        "Prepare the bundled sample dump, fine-tune, populate an SQLite store, serve it over gRPC and call it.",
        __name__,
    )
    p.add_argument("--workdir", default="pitchkeras-demo", help="where every artifact goes")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--preset", default="tiny", help="`tiny` (offline) or a keras-hub GPT-2 preset name / local dir")
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--sequence-length", type=int, default=128, help="training sequence length (tokens)")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--scores", default="2,5,8", help="comma-separated scores to populate")
    p.add_argument("--genres", default="Rock,Electronic,Rap,Pop/R&B,Experimental,Folk/Country,Metal,Jazz",
                   help="comma-separated genres to populate")
    p.add_argument("--per-pair", type=int, default=2, help="reviews stored per (score, genre) pair")
    p.add_argument("--length", type=int, default=120, help="max new tokens per generated review")
    p.add_argument("--seed", type=int, default=0, help="seed for every stage")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one)")
    p.add_argument("--http-port", type=int, default=0,
                   help="HTTP/JSON and web page port (0 picks a free one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    return p


def run(args) -> int:
    from pitchkeras.demo import DemoConfig, run_demo

    try:
        scores = [float(x) for x in args.scores.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--scores must be comma-separated numbers, got {args.scores!r}") from None
    genres = [g.strip() for g in args.genres.split(",") if g.strip()]
    config = DemoConfig(
        workdir=args.workdir, fresh=args.fresh, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        sequence_length=args.sequence_length, learning_rate=args.learning_rate, scores=scores, genres=genres or None,
        per_pair=args.per_pair, length=args.length, seed=args.seed, port=args.port, http_port=args.http_port,
        progress=not args.no_progress,
    )
    run_demo(config)
    return 0
