"""The HTTP port's connection layer: timeouts on slow clients, security headers, quiet framework errors.

aiohttp keeps an idle connection for an hour by default and has no header
timeout, so clients that stop mid-headers hold sockets for that long; and it
logs every malformed request with a traceback at ERROR. `EdgeRunner` serves
the application through `EdgeHandler`, aiohttp's own connection handler plus:

- a header timeout: once the first byte of a request head arrives, the rest of
  the head must follow within `header_timeout_s`, or the connection is closed;
- aiohttp's keep-alive timeout set from `keepalive_timeout_s` (idle connections,
  before the first request and between requests);
- framework errors (a malformed request line or header) answered as an AIP-193
  JSON error with the security headers, and logged once per peer per
  `PARSE_ERROR_LOG_INTERVAL_S` at WARNING, without a traceback.

The body timeout is the handlers' (`http_api`): only they know when a body is read.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Optional

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

log = logging.getLogger("pitchkeras.server.http")

#: Sent on every answer of the HTTP port. The page loads its script and style from /static only
#: (no inline code), so a policy without 'unsafe-inline' fits it; nothing may frame it.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "Referrer-Policy": "no-referrer",
    "Server": "pitchkeras",  # replaces aiohttp's `Python/3.x aiohttp/3.y` banner
}
#: A peer's malformed requests are logged at most once per this many seconds.
PARSE_ERROR_LOG_INTERVAL_S = 60.0
# Peers remembered by the parse-error log limiter; the oldest are forgotten first.
_MAX_LOGGED_PEERS = 10_000
# After refusing a request before its body, read (and drop) the rest of the body for at most this long, so the
# client sees the answer before the connection closes; aiohttp's 10 s lets a staller hold the socket longer.
_LINGER_S = 1.0


class PeerLogLimiter:
    """Whether a peer's next framework error should be logged: once per `interval_s` per peer.

    Args:
        interval_s: float. Seconds between two log lines about one peer.
        clock: callable. Monotonic seconds.
    """

    def __init__(self, interval_s: float = PARSE_ERROR_LOG_INTERVAL_S, clock=time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()

    def allow(self, peer: str) -> bool:
        now = self._clock()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval_s:
            return False
        self._last.pop(peer, None)
        self._last[peer] = now
        while len(self._last) > _MAX_LOGGED_PEERS:
            self._last.popitem(last=False)
        return True


class EdgeHandler(RequestHandler):
    """aiohttp's connection handler with a header timeout and quiet, JSON framework errors.

    Args:
        manager: web.Server. The server that made it.
        header_timeout_s: float. Seconds from the first byte of a request head to its end.
        parse_errors: PeerLogLimiter. Decides which framework errors are logged.
        error_body: callable. `(status, message) -> web.Response`: the AIP-193 error answer.
        **kwargs: passed to aiohttp's `RequestHandler` (`keepalive_timeout`, ...).
    """

    def __init__(self, manager, *, header_timeout_s: float, parse_errors: PeerLogLimiter, error_body, **kwargs):
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: Optional[object] = None
        self._parse_errors = parse_errors
        self._error_body = error_body

    def _waiting_for_a_head(self) -> bool:
        # aiohttp's own idle test (see its keep-alive check): the handler waits for the next message. Before
        # the connection's first head its handler task may not have started yet (Python < 3.12 starts it
        # lazily), so no head parsed so far also counts.
        return (self._waiter is not None and not self._waiter.done()) or self._request_count == 0

    def data_received(self, data: bytes) -> None:
        heads = self._request_count  # aiohttp counts every request head it has parsed
        super().data_received(data)
        if self._request_count != heads or not self._waiting_for_a_head():  # a head completed, or a request runs
            self._cancel_header_timer()
        elif self._header_timer is None and self.transport is not None:
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting_for_a_head():
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            log.info("closed a connection from %s: no complete request head within %g s",
                     peer[0] if peer else "?", self._header_timeout_s)
            self.force_close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def log_exception(self, *args, **kwargs) -> None:
        """aiohttp's own error log: what a client caused (a body that breaks off or does not parse while
        aiohttp drains it) is a rate-limited WARNING without a traceback; anything else stays an ERROR."""
        exc = kwargs.get("exc_info")
        if not isinstance(exc, (HttpProcessingError, RequestPayloadError, ConnectionError)):
            super().log_exception(*args, **kwargs)
            return
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        host = peer[0] if peer else "?"
        if self._parse_errors.allow(host):
            log.warning("malformed HTTP request: %s from %s (logged once per %g s per peer)",
                        _reason(exc, None, 400), host, self._parse_errors.interval_s)

    def handle_error(self, request, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        """A framework error: JSON, security headers, the connection closed; logged without a traceback."""
        if status >= 500:  # not the client's doing: ours or aiohttp's bug
            log.error("HTTP request from %s failed in the framework", request.remote, exc_info=exc)
            text = "internal error; see the server log"
        else:
            text = f"malformed HTTP request: {_reason(exc, message, status)}"
            if self._parse_errors.allow(request.remote or "?"):
                log.warning("%s from %s (logged once per %g s per peer)", text, request.remote,
                            self._parse_errors.interval_s)
        if request.writer.output_size > 0:  # an answer had begun: the connection is broken
            raise ConnectionError("an answer had begun; cannot send an error instead")
        response = self._error_body(status, text)
        response.headers.update(SECURITY_HEADERS)
        response.force_close()
        return response


def _reason(exc: Optional[BaseException], message: Optional[str], status: int) -> str:
    """aiohttp's short reason (`Invalid header: ...`) on one line, without the request's bytes."""
    text = getattr(exc, "message", None) or message or str(status)
    return " ".join(str(text).split("\n", 1)[0].split())[:200]


class _EdgeServer(web.Server):
    """aiohttp's low-level server, making `EdgeHandler`s."""

    def __init__(self, *args, edge_kwargs: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._edge_kwargs = edge_kwargs

    def __call__(self) -> EdgeHandler:
        return EdgeHandler(self, loop=self._loop, **self._edge_kwargs)


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` serving through `EdgeHandler`.

    Args:
        app: web.Application. The application.
        header_timeout_s: float. See `EdgeHandler`.
        keepalive_timeout_s: float. How long an idle connection is kept.
        error_body: callable. `(status, message) -> web.Response`.
        **kwargs: passed to `web.AppRunner` (`shutdown_timeout`, ...).
    """

    def __init__(self, app: web.Application, *, header_timeout_s: float, keepalive_timeout_s: float, error_body,
                 **kwargs):
        super().__init__(app, access_log=None, handle_signals=False, **kwargs)
        self._edge_kwargs = dict(header_timeout_s=header_timeout_s, keepalive_timeout=keepalive_timeout_s,
                                 parse_errors=PeerLogLimiter(), error_body=error_body, access_log=None,
                                 lingering_time=_LINGER_S, auto_decompress=False)  # http_api decodes bodies

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts and freezes the app
        return _EdgeServer(made.request_handler, request_factory=made.request_factory,
                           handler_cancellation=made.handler_cancellation, edge_kwargs=self._edge_kwargs)
