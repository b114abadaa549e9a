"""`pitchkeras client`: call a running ReviewService (get-review, get ID, generate)."""

from __future__ import annotations

import argparse

from pitchkeras.cli import add_command
from pitchkeras.commands.options import add_sampler_flags, sampler_fields


def add_parser(subparsers):
    p = add_command(subparsers, "client", "Call a pitchkeras gRPC server.", __name__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=None,
                        help="server host:port (default: $PITCHKERAS_TARGET or 127.0.0.1:50051)")
    common.add_argument("--timeout", type=float,
                        help="deadline in seconds (default: ReviewClient's, longer for generate)%(default).0s")
    common.add_argument("--ca-cert", help="PEM root certificate: connect with TLS")
    common.add_argument("--json", action="store_true", help="print JSON (one object per line) for machines")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    get_review = actions.add_parser("get-review", parents=[common], formatter_class=fmt,
                                    help="the least-shown review matching the filters (counts it as shown)")
    get_review.add_argument("--score", type=float, help="only this score, in [0, 10]")
    get_review.add_argument("--genre", help="only this genre (case-insensitive)")

    get = actions.add_parser("get", parents=[common], formatter_class=fmt, help="one review by id (the permalink)")
    get.add_argument("id", help="review id: 1 to 128 characters from A-Z a-z 0-9 _ - (a permalink)")

    generate = actions.add_parser("generate", parents=[common], formatter_class=fmt,
                                  help="write new reviews with the server's model")
    generate.add_argument("--score", type=float, help="score condition")
    generate.add_argument("--genre", help="genre condition")
    generate.add_argument("--prefix", help="free text for the model to continue (default: none)%(default).0s")
    add_sampler_flags(generate, server_defaults=True)
    generate.add_argument("--nsamples", type=int, help="how many reviews")
    generate.add_argument("--store", action="store_true", help="save accepted reviews and print their ids")
    generate.add_argument("--api-key", help="API key (default: $PITCHKERAS_API_KEY)")
    return p


def format_review(review) -> str:
    """A review for people: a header line, then the text."""
    parts = [f"id {review.id}" if review.id else "(not stored)"]
    if review.score is not None:
        parts.append(f"score {review.score:.1f}")
    if review.genre is not None:
        parts.append(f"genre {review.genre}")
    parts.append(f"shown {review.selection_count}x")
    if review.model_version:
        parts.append(f"model {review.model_version}")
    return " | ".join(parts) + "\n" + review.text


def run(args) -> int:
    import json
    import os

    from pitchkeras.client import DEFAULT_TARGET, ReviewClient  # here, not at the top: grpc is slow to import

    credentials = None
    if args.ca_cert:
        import grpc

        with open(args.ca_cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())
    target = args.target or DEFAULT_TARGET
    api_key = getattr(args, "api_key", None) or os.environ.get("PITCHKERAS_API_KEY")
    # An unset --timeout keeps ReviewClient's own deadlines (one for reads, a longer one for Generate).
    deadlines = {} if args.timeout is None else {"timeout": args.timeout, "generate_timeout": args.timeout}
    with ReviewClient(target, credentials=credentials, api_key=api_key, **deadlines) as client:
        if args.action == "get-review":
            reviews = [client.get_review(score=args.score, genre=args.genre)]
        elif args.action == "get":
            reviews = [client.get_by_id(args.id)]
        else:
            generated = client.generate(
                score=args.score, genre=args.genre, prompt=args.prefix, max_length=args.length,
                seed=args.seed, num_samples=args.nsamples, store=args.store, **sampler_fields(args),
            )
            for item in generated:
                if args.json:
                    print(json.dumps(item.to_dict(), ensure_ascii=False))
                elif item.accepted:
                    print(format_review(item.review) + "\n")
                else:
                    print(f"(rejected: {item.rejection_reason}, seed {item.review.seed})\n")
            return 0
    for review in reviews:
        print(json.dumps(review.to_dict(), ensure_ascii=False) if args.json else format_review(review))
    return 0
