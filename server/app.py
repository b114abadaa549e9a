"""Assemble and run the server: gRPC servicer, health, reflection, interceptor, model warm-up, shutdown,
and (with `http_port`) the HTTP/JSON API, web page and metrics on the same event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import socket
import threading
from typing import Optional, Union

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pitchkeras.errors import UsageError
from pitchkeras.server.auth import ApiKeys
from pitchkeras.server.batcher import make_batcher
from pitchkeras.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from pitchkeras.server.handlers import add_review_service
from pitchkeras.server.interceptor import LoggingInterceptor
from pitchkeras.server.metrics import ServerMetrics
from pitchkeras.server.servicer import ModelSlot, ReviewServicer
from pitchkeras.store.base import ReviewStore
from pitchkeras.v1 import review_service_pb2 as pb

log = logging.getLogger("pitchkeras.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReviewService"].full_name  # "pitchkeras.v1.ReviewService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ReviewServer:
    """A running (or startable) ReviewService server; made by `create_server`.

    `start()` begins serving; with a model, health stays NOT_SERVING until the
    model has loaded and compiled its shapes. `stop()` flips health to
    NOT_SERVING first, refuses new calls, and lets in-flight calls finish
    within the grace period. `http_port` is the HTTP/JSON port (None when off);
    it speaks HTTPS with the same certificate when the gRPC port serves TLS.
    """

    def __init__(self, server: grpc.aio.Server, port: int, *, store: ReviewStore, owns_store: bool,
                 servicer: ReviewServicer, health_servicer: health.aio.HealthServicer, config: ServerConfig,
                 model_dir: Optional[str], generator, store_executor: concurrent.futures.ThreadPoolExecutor,
                 metrics: ServerMetrics, http_socket: Optional[socket.socket] = None,
                 http_tls: Optional[tuple[bytes, bytes]] = None):
        self.server = server
        self.port = port
        self.metrics = metrics
        self.http_port: Optional[int] = http_socket.getsockname()[1] if http_socket is not None else None
        self._http_socket = http_socket
        self._http_tls = http_tls  # (cert, key): HTTPS when gRPC serves TLS too
        self._http_runner = None
        self.http_app = None  # the aiohttp application once started with an HTTP port
        self.store = store
        self.servicer = servicer
        self.health = health_servicer
        self.config = config
        self.model = servicer.model
        self._owns_store = owns_store
        self._model_dir = model_dir
        self._generator = generator
        self._store_executor = store_executor
        self._model_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pitchkeras-model")
        self._warm_task: Optional[asyncio.Task] = None
        self._ready = asyncio.Event()
        self._stopped = False

    @property
    def https(self) -> bool:
        """Whether the HTTP port speaks TLS."""
        return self._http_tls is not None

    @property
    def stopping(self) -> bool:
        """True once `stop()` has begun (readiness then fails)."""
        return self._stopped

    async def start(self) -> None:
        await self.server.start()
        if self._http_socket is not None:
            from aiohttp import web

            from pitchkeras.server.http_api import HttpApi

            from pitchkeras.server.http_api import framework_error
            from pitchkeras.server.http_edge import EdgeRunner
            from pitchkeras.server.openai_api import OpenAiApi

            http_api = HttpApi(self)
            OpenAiApi(http_api)  # /v1/completions and /v1/models on the same application
            self.http_app = http_api.app
            self._http_runner = EdgeRunner(self.http_app, header_timeout_s=self.config.header_timeout_s,
                                           keepalive_timeout_s=self.config.keepalive_timeout_s,
                                           error_body=framework_error, shutdown_timeout=self.config.grace_s)
            await self._http_runner.setup()
            ssl_context = _ssl_context(*self._http_tls) if self._http_tls is not None else None
            await web.SockSite(self._http_runner, self._http_socket, shutdown_timeout=self.config.grace_s,
                               ssl_context=ssl_context).start()
        if self.model.state == "off":
            await self._set_health(SERVING)
            self._ready.set()
        else:
            await self._set_health(NOT_SERVING)
            self._warm_task = asyncio.get_running_loop().create_task(self._load_model(), name="model-warmup")

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _set_model_state(self, state: str) -> None:
        self.model.state = state
        self.metrics.model_state.state(state)

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            generator = await loop.run_in_executor(self._model_executor, self._build_generator)
            batcher = make_batcher(generator, self._model_executor, self.config, metrics=self.metrics)
            if self.config.warmup:
                await loop.run_in_executor(self._model_executor, batcher.warmup, self.config.default_max_length)
        except Exception as err:  # the server keeps serving stored reviews; Generate reports why
            log.exception("loading the model failed")
            self.model.error = f"{type(err).__name__}; see the server log"  # its text may name paths
            self._set_model_state("failed")
            await self._set_health(NOT_SERVING)
            self._ready.set()
            return
        batcher.start()
        self.model.generator, self.model.batcher = generator, batcher
        self._set_model_state("ready")
        if not self._stopped:
            await self._set_health(SERVING)
        self._ready.set()
        log.info("model %s ready", generator.model.info.model_version)

    def _build_generator(self):
        """Load the model (unless given); runs in the model thread, never on the loop."""
        generator = self._generator
        if generator is None:
            from pitchkeras.model import load_model
            from pitchkeras.quantize import quantize_model
            from pitchkeras.sampling import Generator

            log.info("loading model %s", self._model_dir)
            model = quantize_model(load_model(self._model_dir), self.config.quantize)
            generator = Generator(model, batch_size=self.config.max_batch_size,
                                  max_new_tokens=self.config.default_max_length)
        return generator

    async def wait_until_ready(self, timeout: Optional[float] = None) -> str:
        """Wait until the model is ready (or failed, or absent); returns the model state."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self.model.state

    async def stop(self, grace: Optional[float] = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, finish in-flight ones within `grace` s."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # Both protocols stop listening at once and give in-flight calls the same grace.
        stops = [self.server.stop(grace)]
        if self._http_runner is not None:
            stops.append(self._http_runner.cleanup())
        await asyncio.gather(*stops)
        if self._http_socket is not None:
            self._http_socket.close()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        if self.model.batcher is not None:
            await self.model.batcher.close()
        self._store_executor.shutdown(wait=False, cancel_futures=True)
        self._model_executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_store:
            self.store.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(
    store: Union[str, ReviewStore],
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    model_dir: Optional[str] = None,
    generator=None,
    config: Optional[ServerConfig] = None,
    api_keys: Optional[ApiKeys] = None,
    tls_cert: Optional[bytes] = None,
    tls_key: Optional[bytes] = None,
    http_port: Optional[int] = None,
    reuse_port: bool = False,
) -> tuple[ReviewServer, int]:
    """Build a ReviewService server bound to `host:port` (not started yet).

    Args:
        store: str or ReviewStore. A store URI (opened here, closed on stop) or an open store.
        host: str. Interface to bind (`0.0.0.0` or `::` for all).
        port: int. Port; 0 picks a free one (returned).
        model_dir: str or None. A pitchkeras model directory: enables Generate.
        generator: sampling.Generator or None. An already-built generator (tests); enables Generate.
        config: ServerConfig or None. Limits, batching and shutdown settings.
        api_keys: ApiKeys or None. When set, Generate requires a key.
        tls_cert: bytes or None. PEM certificate chain; with `tls_key`, serve TLS.
        tls_key: bytes or None. PEM private key.
        http_port: int or None. Also serve HTTP/JSON, the web page and /metrics on this port
            (0 picks a free one; `server.http_port` tells which); None: gRPC only.
        reuse_port: bool. Let several processes bind the same ports (SO_REUSEPORT, `--workers`).

    Returns:
        `(server, port)`: call `await server.start()`, later `await server.stop()`.

    Example:

    >>> server, port = await create_server("sqlite:///reviews.db", port=0)
    >>> await server.start()
    """
    config = (config or ServerConfig()).validate()
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    owns_store = isinstance(store, str)
    if owns_store:
        from pitchkeras.store import open_store

        store = open_store(store)
    try:
        store_executor = concurrent.futures.ThreadPoolExecutor(config.store_workers, thread_name_prefix="pitchkeras-store")
        model = ModelSlot(state="off" if model_dir is None and generator is None else "loading")
        metrics = ServerMetrics()
        metrics.model_state.state(model.state)
        metrics.watch_store(store)
        servicer = ReviewServicer(store, config=config, store_executor=store_executor, model=model, api_keys=api_keys,
                                  metrics=metrics)
        server, health_servicer = _grpc_server(servicer, LoggingInterceptor(metrics, api_keys),
                                               _grpc_options(config, reuse_port))
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            if tls_cert is not None:
                bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as err:
            raise UsageError(f"cannot listen on {address}: {err} (port in use or bad host?)") from None
        if not bound:
            raise UsageError(f"cannot listen on {address} (port in use or bad host?)")
        http_socket = _http_socket(host, http_port, reuse_port) if http_port is not None else None
    except BaseException:
        if owns_store:
            store.close()
        raise
    return (
        ReviewServer(server, bound, store=store, owns_store=owns_store, servicer=servicer,
                     health_servicer=health_servicer, config=config, model_dir=model_dir, generator=generator,
                     store_executor=store_executor, metrics=metrics, http_socket=http_socket,
                     http_tls=(tls_cert, tls_key) if tls_cert is not None else None),
        bound,
    )


def _grpc_server(servicer: ReviewServicer, interceptor: LoggingInterceptor,
                 options: list) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server with the ReviewService, health and reflection (not bound, not started)."""
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    add_review_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer


def _grpc_options(config: ServerConfig, reuse_port: bool) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server: message limits, keepalive pings, idle and ping-abuse limits."""
    return [
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        ("grpc.max_send_message_length", config.max_send_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Ping each client after this much silence; drop it if the ack takes longer than the timeout.
        ("grpc.keepalive_time_ms", int(config.grpc_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.grpc_keepalive_timeout_s * 1000)),
        # A connection without calls for this long is closed (GOAWAY); clients reconnect when they need to.
        ("grpc.max_connection_idle_ms", int(config.grpc_max_idle_s * 1000)),
        # Clients' own keepalive pings: allowed every 10 s at most, also between calls.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # A connection must finish its TLS and HTTP/2 handshake as fast as an HTTP client sends its head.
        ("grpc.server_handshake_timeout_ms", int(config.header_timeout_s * 1000)),
    ]


def _http_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """Bind the HTTP port now, as gRPC's is bound, so a busy port fails `create_server`, not `start`."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--http-port must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, reuse_port=reuse_port, backlog=1024)
    except OSError as err:
        raise UsageError(f"cannot listen for HTTP on {host}:{port}: {err.strerror or err} "
                         "(port in use or bad host?)") from None


def _ssl_context(cert: bytes, key: bytes):
    """A server SSLContext from PEM bytes (the ssl module loads chains from files only)."""
    import ssl
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="pitchkeras-tls-") as folder:  # 0700, removed at once
        cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
        for path, data in ((cert_path, cert), (key_path, key)):
            with open(path, "wb") as f:
                f.write(data)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as err:
            raise UsageError(f"cannot use the TLS certificate and key for HTTPS: {err}") from None
    return context


async def serve(store: Union[str, ReviewStore], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                announce=print, **kwargs) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    Args:
        store: str or ReviewStore. As for `create_server`.
        host: str. Interface to bind.
        port: int. Port; 0 picks one.
        announce: callable. Receives `serving on HOST:PORT` once listening, then
            `http on http://HOST:PORT/` when HTTP is on.
        **kwargs: passed to `create_server`.
    """
    server, bound = await create_server(store, host=host, port=port, **kwargs)
    await server.start()
    announce(f"serving on {host}:{bound}")
    if server.http_port is not None:
        announce(f"http on {_url(host, server.http_port, https=server.https)}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: health NOT_SERVING, finishing in-flight calls (grace %.0f s)", server.config.grace_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()


def _url(host: str, port: int, https: bool = False) -> str:
    """The page's URL; a wildcard host is reached on localhost."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{'https' if https else 'http'}://{shown}:{port}/"


class BackgroundServer:
    """A server on its own event loop in a daemon thread, beside the caller's code.

    Not only a test helper: `pitchkeras demo` serves from one while its own client calls it, which is why it
    lives here, public, rather than under tests/. Tests, benchmarks and notebooks use it the same way.

    Args:
        store: str or ReviewStore. As for `create_server`.
        **kwargs: passed to `create_server` (port defaults to 0).

    Example:

    >>> with BackgroundServer("sqlite:///reviews.db") as background:
    ...     client = ReviewClient(f"127.0.0.1:{background.port}")
    """

    def __init__(self, store: Union[str, ReviewStore], **kwargs):
        kwargs.setdefault("port", 0)
        self._store, self._kwargs = store, kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pitchkeras-server", daemon=True)
        self.server: Optional[ReviewServer] = None
        self.port = 0
        self.http_port: Optional[int] = None

    def run(self, coroutine, timeout: Optional[float] = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> "BackgroundServer":
        self._thread.start()

        async def _start():
            server, port = await create_server(self._store, **self._kwargs)
            await server.start()
            return server, port

        self.server, self.port = self.run(_start())
        self.http_port = self.server.http_port
        return self

    def wait_until_ready(self, timeout: Optional[float] = None) -> str:
        return self.run(self.server.wait_until_ready(timeout))

    def stop(self, grace: Optional[float] = None) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

