"""`pitchkeras serve --workers N`: N server processes sharing the gRPC and HTTP ports (SO_REUSEPORT).

As gRPC's `examples/python/multiprocessing` does: the parent reserves the
ports with SO_REUSEPORT sockets it never listens on, then forks the workers
before any gRPC server, channel or event loop exists (gRPC's core is not
fork-safe once started), and each worker builds its own server on the same
ports with SO_REUSEPORT set, so the kernel spreads connections over them.
Each worker has its own store connection, its own model (only with
`--model`), and answers health, `/readyz` and `/metrics` for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from typing import Callable, Iterator, Optional

from pitchkeras.errors import PitchkerasError, UsageError

# `pitchkeras.server.app` (and with it grpc's core) is imported inside the functions: the parent must fork
# the workers before any gRPC object exists (see above), and `pitchkeras serve` imports this module at start-up.

log = logging.getLogger("pitchkeras.server.workers")


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Bind (not listen) an SO_REUSEPORT socket on `host:port` for as long as the workers run; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as err:
            raise UsageError(f"cannot reserve {host}:{port} for the workers: {err.strerror or err}") from None
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _worker(index: int, ready: "multiprocessing.connection.Connection", serve_kwargs: dict, worker_init: Optional[Callable[[], None]]) -> None:
    """One worker process: its own server on the shared ports; tells the parent when it listens."""
    from pitchkeras.server.app import serve

    told = []

    def announce(line: str) -> None:
        if not told:  # the first line means both ports listen (serve announces after start)
            told.append(True)
            ready.send("")

    try:
        if worker_init is not None:
            worker_init()
        asyncio.run(serve(announce=announce, reuse_port=True, **serve_kwargs))
    except PitchkerasError as err:
        if not told:
            ready.send(str(err))
        raise SystemExit(2) from None


def run_workers(workers: int, *, host: str, port: int, http_port: Optional[int], announce=print,
                worker_init: Optional[Callable[[], None]] = None, **serve_kwargs) -> None:
    """Run `workers` server processes on shared ports until SIGTERM/SIGINT, then stop them gracefully.

    Args:
        workers: int. Processes to fork, >= 1.
        host: str. Interface to bind.
        port: int. gRPC port; 0 picks one (announced).
        http_port: int or None. HTTP port (0 picks one); None: gRPC only.
        announce: callable. Receives `serving on HOST:PORT` (and `http on URL`) once every worker listens.
        worker_init: callable or None. Runs first in each worker (e.g. import TensorFlow quietly).
        **serve_kwargs: passed to `serve` in each worker (store, model_dir, config, ...).
    """
    from pitchkeras.server.app import _url

    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    context = multiprocessing.get_context("fork")
    with contextlib.ExitStack() as stack:
        grpc_port = stack.enter_context(reserve_port(host, port))
        shared_http = stack.enter_context(reserve_port(host, http_port)) if http_port is not None else None
        processes, readers = [], {}
        for index in range(workers):
            kwargs = dict(serve_kwargs, host=host, port=grpc_port, http_port=shared_http)
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(index, writer, kwargs, worker_init),
                                      name=f"pitchkeras-worker-{index}")
            process.start()
            writer.close()  # the worker holds the only writer: its exit reads as EOF here
            processes.append(process)
            readers[reader] = index

        def forward(signum, frame):
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while readers:
                for reader in multiprocessing.connection.wait(list(readers)):
                    index = readers.pop(reader)
                    try:
                        error = reader.recv()
                    except EOFError:
                        processes[index].join()
                        error = f"exited with code {processes[index].exitcode} before it listened; see its log"
                    if error:
                        forward(None, None)
                        raise UsageError(f"worker {index}: {error}")
            announce(f"serving on {host}:{grpc_port}")
            if shared_http is not None:
                announce(f"http on {_url(host, shared_http, https=serve_kwargs.get('tls_cert') is not None)}")
            log.info("%d workers serving (pids %s)", workers, ", ".join(str(p.pid) for p in processes))
        finally:
            for process in processes:
                process.join()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
