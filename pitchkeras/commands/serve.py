"""`pitchkeras serve`: the gRPC ReviewService over a store, with Generate when a model is given,
and with `--http-port` the HTTP/JSON API, the web page and /metrics on the same event loop."""

from __future__ import annotations

import argparse

from pitchkeras.cli import add_command, import_tensorflow_quietly
from pitchkeras.commands.options import add_compile_cache_flags, add_quantize_flag, field_default
from pitchkeras.errors import UsageError
from pitchkeras.server.config import (
    DEFAULT_HOST, DEFAULT_LOG_LEVEL, DEFAULT_PORT, LOG_LEVELS, ServerConfig)
from pitchkeras.server.workers import run_workers
from pitchkeras.store import DEFAULT_STORE_URI


def add_parser(subparsers):
    def default(name):
        return field_default(ServerConfig, name)

    p = add_command(subparsers, "serve", "Serve reviews over gRPC (pitchkeras.v1.ReviewService).", __name__)
    p.add_argument("--store", default=DEFAULT_STORE_URI, help="sqlite:///path.db or firestore://PROJECT/COLLECTION")
    p.add_argument("--model", help="model directory: enables Generate (health is NOT_SERVING until it is warm)")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (0.0.0.0 or :: for all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one and prints it")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve HTTP/JSON, the web page and /metrics on this port (0 picks one); off when not given")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the ports (SO_REUSEPORT); each loads its own --model")
    p.add_argument("--max-batch-size", type=int, default=default("max_batch_size"),
                   help="Generate samples decoded together")
    p.add_argument("--max-waiting", type=int, default=default("max_waiting"),
                   help="Generate samples that may wait for a decode slot; past it calls get RESOURCE_EXHAUSTED "
                        "(HTTP 429 with Retry-After)")
    p.add_argument("--length", dest="default_max_length", metavar="N", type=int,
                   default=default("default_max_length"),
                   help="default max new tokens per generated review")
    p.add_argument("--max-length-cap", type=int, default=default("max_length_cap"),
                   help="largest max_length a request may ask for")
    p.add_argument("--num-samples-cap", type=int, default=default("num_samples_cap"),
                   help="most reviews one Generate call may ask for")
    p.add_argument("--grace", dest="grace_s", type=float, default=default("grace_s"),
                   help="seconds in-flight calls get to finish on shutdown")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=default("warmup"),
                   help="compile the model before reporting SERVING (--no-warmup skips it)")
    p.add_argument("--api-key-file", help="file with one API key per line: Generate then requires `x-api-key`")
    p.add_argument("--rate-limit", dest="rate_per_s", type=float, default=default("rate_per_s"),
                   help="with keys: sustained Generate calls/s per key")
    p.add_argument("--burst", type=int, default=default("burst"),
                   help="with keys: Generate calls a key may make at once")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, choices=LOG_LEVELS,
                   help="one access-log line per call at INFO")
    _add_timeout_flags(p)
    add_compile_cache_flags(p)
    add_quantize_flag(p)
    return p


def _add_timeout_flags(p) -> None:
    """Slow or silent clients: how long each edge waits before dropping them."""
    def default(name):
        return field_default(ServerConfig, name)

    p.add_argument("--header-timeout", type=float, default=default("header_timeout_s"),
                   help="HTTP: seconds from a request head's first byte to its end")
    p.add_argument("--body-timeout", type=float, default=default("body_timeout_s"),
                   help="HTTP: seconds to receive a whole request body")
    p.add_argument("--keepalive-timeout", type=float, default=default("keepalive_timeout_s"),
                   help="HTTP: seconds an idle connection is kept open")
    p.add_argument("--grpc-keepalive", type=float, default=default("grpc_keepalive_s"),
                   help="gRPC: ping a client after this many seconds without traffic")
    p.add_argument("--grpc-keepalive-timeout", type=float, default=default("grpc_keepalive_timeout_s"),
                   help="gRPC: drop a client whose ping is not acknowledged within this many seconds")
    p.add_argument("--grpc-max-idle", type=float, default=default("grpc_max_idle_s"),
                   help="gRPC: close a connection without calls for this many seconds")


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise UsageError(f"cannot read {flag} {path}: {err.strerror or err}") from None


def run(args) -> int:
    import asyncio
    import logging
    import os

    from pitchkeras.server import ApiKeys, ServerConfig, serve  # here, not at the top: grpc (start-up time)

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise UsageError(f"--http-port must be in [0, 65535], got {args.http_port}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.model and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model} is not a directory; point it at a pitchkeras model directory")
    config = ServerConfig(
        max_batch_size=args.max_batch_size,
        default_max_length=args.default_max_length,
        max_length_cap=args.max_length_cap,
        num_samples_cap=args.num_samples_cap,
        grace_s=args.grace_s,
        warmup=args.warmup,
        rate_per_s=args.rate_per_s,
        burst=args.burst,
        quantize=args.quantize,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
        grpc_keepalive_s=args.grpc_keepalive,
        grpc_keepalive_timeout_s=args.grpc_keepalive_timeout,
        grpc_max_idle_s=args.grpc_max_idle,
        max_waiting=args.max_waiting,
    ).validate()
    api_keys = (ApiKeys.from_file(args.api_key_file, rate=config.rate_per_s, burst=config.burst)
                if args.api_key_file else None)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    tls_cert = _read(args.tls_cert, "--tls-cert") if args.tls_cert else None
    tls_key = _read(args.tls_key, "--tls-key") if args.tls_key else None

    kwargs = dict(store=args.store, host=args.host, port=args.port, http_port=args.http_port, model_dir=args.model,
                  config=config, api_keys=api_keys, tls_cert=tls_cert, tls_key=tls_key,
                  announce=lambda line: print(line, flush=True))  # scripts wait for these lines (port 0)
    if args.workers == 1:
        asyncio.run(serve(**kwargs))
    else:
        # TensorFlow loads in each worker, after the fork (see `_uses_tensorflow` in cli.py).
        run_workers(args.workers, worker_init=import_tensorflow_quietly if args.model else None, **kwargs)
    return 0
