"""HTTP/JSON beside gRPC, on the same event loop: the seed's routes, `/v1/...`, health, metrics, the web page.

Every RPC route calls the gRPC servicer's own method with an `HttpContext`
standing in for `grpc.aio.ServicerContext`, so validation, the pick and the
error translation exist once; the servicer's `context.abort(code, message)`
becomes an HTTP status through `HTTP_STATUS` and an AIP-193 JSON error.

Routes:

- `GET /review/?score=&genre=`, `GET /review/<id>`: the seed's routes and JSON keys
  (`id, text, score, genre, length, added, selection_count`, plus ours).
- `/v1/...`: read from the `google.api.http` options of each RPC in the .proto;
  bodies and answers in the proto3 JSON mapping (`google.protobuf.json_format`).
- `GET /healthz` (the process answers), `GET /readyz` (model warm, store reachable),
  `GET /metrics` (Prometheus text format).
- `GET /` (the web page), `GET /r/<id>` (one review, rendered here, HTML-escaped),
  `GET /static/<file>` (its CSS and JavaScript).

Every GET route answers HEAD too. Request bodies must be `application/json`
(415 otherwise), at most `MAX_JSON_DEPTH` deep, optionally gzip/deflate
encoded, and arrive within `body_timeout_s`; keyed RPCs check the key before
the body is read. A client that leaves mid-request is counted as 499. Every
answer carries `http_edge.SECURITY_HEADERS`; connection-level limits (header
and keep-alive timeouts, malformed requests) are in `http_edge`.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import re
import socket
import string
import time
import zlib
from importlib import resources
from typing import Any, Callable

import grpc
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import json_format

from pitchkeras.errors import PitchkerasError, clip, echo
from pitchkeras.server.auth import KEYED_METHODS, AuthError
from pitchkeras.server.http_edge import SECURITY_HEADERS
from pitchkeras.server.metrics import CONTENT_TYPE_LATEST
from pitchkeras.v1 import review_service_pb2 as pb

log = logging.getLogger("pitchkeras.server.http")
access_log = logging.getLogger("pitchkeras.server.access")  # the gRPC interceptor's log, one line per call

C = grpc.StatusCode
#: gRPC code -> HTTP status, as google.rpc.Code documents it (FAILED_PRECONDITION is 400 there, not 412:
#: 412 is about HTTP conditional headers, which this API does not use).
HTTP_STATUS = {
    C.OK: 200, C.CANCELLED: 499, C.UNKNOWN: 500, C.INVALID_ARGUMENT: 400, C.DEADLINE_EXCEEDED: 504,
    C.NOT_FOUND: 404, C.ALREADY_EXISTS: 409, C.PERMISSION_DENIED: 403, C.UNAUTHENTICATED: 401,
    C.RESOURCE_EXHAUSTED: 429, C.FAILED_PRECONDITION: 400, C.ABORTED: 409, C.OUT_OF_RANGE: 400,
    C.UNIMPLEMENTED: 501, C.INTERNAL: 500, C.UNAVAILABLE: 503, C.DATA_LOSS: 500,
}
# Errors aiohttp raises before a handler runs, named by the nearest canonical code.
_HTTP_ONLY_STATUS = {404: C.NOT_FOUND, 405: C.UNIMPLEMENTED, 413: C.INVALID_ARGUMENT, 400: C.INVALID_ARGUMENT}
SEED_KEYS = ("id", "text", "score", "genre", "length", "added", "selection_count")
_PROBE_ID = "0" * 24  # a well-formed id no populate run writes: the readiness probe's cheap store read
_WEB = "web"  # package data folder of the page
#: Deepest JSON nesting a request body may have; requests are a few flat fields.
MAX_JSON_DEPTH = 32
#: HTTP status of a call whose client went away before the answer (nginx's 499, "client closed request").
CLIENT_CLOSED = 499
# Content-Encodings a body may have, as zlib window bits (gzip: 16 + 15; deflate: zlib-wrapped, as RFC 9110 says).
_ENCODING_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]++")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


class HttpAbort(grpc.aio.AbortError):
    """What `HttpContext.abort` raises: the servicer's code and message, on their way to an HTTP status.

    Args:
        code: grpc.StatusCode. The canonical code.
        message: str. What was wrong.
        http_status: int. The HTTP status when it is not `HTTP_STATUS[code]` (415, 408); 0 for that one.
        headers: dict or None. Extra answer headers (`Retry-After`).
    """

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int = 0, headers=None):
        super().__init__(message)
        self.code, self.message = code, clip(message)
        self.http_status = http_status or HTTP_STATUS.get(code, 500)
        self.headers = headers or {}


class HttpContext:
    """The part of `grpc.aio.ServicerContext` the servicer uses, for a call that came over HTTP.

    Request headers are the call's metadata (lower-cased names), so an API key
    travels as `x-api-key: KEY` or `Authorization: Bearer KEY` over either protocol.
    """

    def __init__(self, request: web.Request):
        self._headers = request.headers

    def invocation_metadata(self):
        return tuple((name.lower(), value) for name, value in self._headers.items())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        retry = dict(trailing_metadata).get("retry-after")
        raise HttpAbort(code, details, headers={"Retry-After": retry} if retry else None)


def error_response(http_status: int, code: grpc.StatusCode, message: str, headers=None) -> web.Response:
    """An AIP-193 error: `{"error": {"code": HTTP status, "status": "CANONICAL_CODE", "message": ...}}`.

    A 401 says how to authenticate (`WWW-Authenticate`), as HTTP requires.
    """
    body = {"error": {"code": http_status, "status": code.name, "message": message}}
    headers = dict(headers or {})
    if http_status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="pitchkeras"')
    return web.json_response(body, status=http_status, headers=headers)


def framework_error(http_status: int, message: str) -> web.Response:
    """An AIP-193 error for what aiohttp refuses before any handler runs (a malformed request)."""
    code = _HTTP_ONLY_STATUS.get(http_status, C.INTERNAL if http_status >= 500 else C.INVALID_ARGUMENT)
    return error_response(http_status, code, message)


def json_depth_ok(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests at most `limit` deep, found without parsing it (parsers recurse per level).

    Strings are dropped, then every other character but brackets; each pass then removes the
    innermost empty pairs, so `limit` passes empty the brackets of JSON nested at most `limit` deep.
    Brackets that never pair up (not JSON) count as too deep.
    """
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    for _ in range(limit):
        if not brackets:
            return True
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    return not brackets


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding, at most `limit` bytes; HttpAbort when it cannot be decoded.

    Decoded here rather than by aiohttp, which can leave a reader waiting on a corrupt stream and does not
    bound what a small compressed body expands to.

    Args:
        raw: bytes. The body as sent.
        encoding: str. The Content-Encoding header ("" or "identity": none).
        limit: int. Most bytes the decoded body may have.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in _ENCODING_WBITS:
        raise HttpAbort(C.INVALID_ARGUMENT, f"unsupported Content-Encoding {echo(encoding)}; "
                        "send the body as is, gzip or deflate", http_status=415)
    decoder = zlib.decompressobj(_ENCODING_WBITS[encoding])
    try:
        data = decoder.decompress(raw, limit + 1)
    except zlib.error:
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body is not valid {echo(encoding)} data") from None
    if len(data) > limit:
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body is larger than {limit} bytes once decoded",
                        http_status=413)
    if not decoder.eof or decoder.unused_data:
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body is not valid {echo(encoding)} data "
                        "(the stream ends early, or data follows its end)")
    return data


def parse_json_object(raw: bytes, type_name: str) -> dict:
    """A request body as a JSON object; HttpAbort INVALID_ARGUMENT for anything else.

    Args:
        raw: bytes. The body as received (already decompressed).
        type_name: str. The request message's name, for the message.
    """
    if not json_depth_ok(raw):
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body is not JSON nested at most {MAX_JSON_DEPTH} levels deep "
                                            "(too deep, or brackets that do not pair up)")
    try:
        data = json.loads(raw or b"{}")
    except ValueError as err:  # UnicodeDecodeError included
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body is not JSON: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise HttpAbort(C.INVALID_ARGUMENT, f"request body must be a JSON object ({type_name})")
    return data


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def http_rules() -> list[tuple[str, str, str, str]]:
    """`(rpc name, HTTP verb, path template, body)` for every RPC, from the proto's `google.api.http` options."""
    rules = []
    for method in pb.DESCRIPTOR.services_by_name["ReviewService"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb is None or verb == "custom":
            continue
        path = getattr(rule, verb)
        if re.search(r"\{[^}]*[=*.]", path):  # `{name=pattern}` and nested fields are not needed by this API
            raise ValueError(f"{method.name}: path template {path!r} is more than simple `{{field}}` segments")
        rules.append((method.name, verb.upper(), path, rule.body))
    return rules


class HttpApi:
    """The aiohttp application of one `ReviewServer` (built by `create_server` when `http_port` is given).

    Args:
        server: ReviewServer. Its servicer, model slot, config and metrics are shared with gRPC.
    """

    def __init__(self, server):
        self.server = server
        self.servicer = server.servicer
        self.metrics = server.metrics
        self.app = web.Application(client_max_size=server.config.max_receive_bytes, middlewares=[self._middleware])
        self.app.on_response_prepare.append(_add_security_headers)
        self._page_files = _load_web_files()
        self._routes()

    # -- routing -------------------------------------------------------------------------
    def _add(self, verb: str, path: str, handler, label: str) -> None:
        async def labelled(request):
            return await handler(request)

        labelled.metric_method = label  # read by the middleware; unmatched routes have none
        self.app.router.add_route(verb, path, labelled)
        if verb == "GET":  # HTTP requires HEAD wherever GET is served; aiohttp sends the headers only
            self.app.router.add_route("HEAD", path, labelled)

    def _routes(self) -> None:
        methods = pb.DESCRIPTOR.services_by_name["ReviewService"].methods_by_name
        for name, verb, path, body in http_rules():
            streaming = methods[name].server_streaming
            self._add(verb, path, (self._sse_handler if streaming else self._rpc_handler)(name, body), name)
        self._add("GET", "/review", self._seed_pick, "GetReview")
        self._add("GET", "/review/", self._seed_pick, "GetReview")
        self._add("GET", "/review/{id}", self._seed_by_id, "GetById")
        self._add("GET", "/healthz", self._healthz, "healthz")
        self._add("GET", "/readyz", self._readyz, "readyz")
        self._add("GET", "/metrics", self._metrics, "metrics")
        self._add("GET", "/", self._index, "page")
        self._add("GET", "/r/{id}", self._review_page, "review_page")
        self._add("GET", "/static/{name}", self._static, "static")

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        label = getattr(request.match_info.handler, "metric_method", "unmatched")
        try:
            response = await handler(request)
        except HttpAbort as err:
            response = error_response(err.http_status, err.code, err.message, headers=err.headers)
            if err.http_status == 408:  # its body stalled: nothing more is coming worth waiting for
                response.force_close()
            if err.http_status == 429 and "Retry-After" not in response.headers:  # the servicer's own 429
                response.headers["Retry-After"] = str(max(1, round(1 / self.server.config.rate_per_s)))
        except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method, body too large
            code = _HTTP_ONLY_STATUS.get(err.status, C.UNKNOWN if err.status >= 500 else C.INVALID_ARGUMENT)
            message = {
                404: f"no route {request.method} {request.path}; see the API in protos/pitchkeras/v1/review_service.proto",
                405: f"{request.method} is not allowed on {request.path}",
                413: f"request body is larger than {self.server.config.max_receive_bytes} bytes",
            }.get(err.status, _one_line(err.text or err.reason))
            headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
            response = error_response(err.status, code, message, headers=headers)
        except ConnectionError:  # the client went away mid-request: nobody to answer; counted as cancelled
            response = web.Response(status=CLIENT_CLOSED, reason="Client Closed Request")
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here: logged with its traceback, answered without one
            log.exception("HTTP %s %s failed unexpectedly", request.method, request.path)
            response = error_response(500, C.INTERNAL, "internal error; see the server log")
        elapsed = time.perf_counter() - started
        self.metrics.observe_call("http", label, str(response.status), elapsed)
        level = logging.WARNING if response.status >= 500 else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "HTTP %s %s %d %.1f ms", request.method, request.path, response.status, elapsed * 1e3)
        return response

    # -- RPCs ----------------------------------------------------------------------------
    async def _call(self, name: str, message, request: web.Request):
        """Run the servicer's `name` on `message`; errors come out as HttpAbort."""
        return await getattr(self.servicer, name)(message, HttpContext(request))

    def _rpc_handler(self, name: str, body: str) -> Callable:
        parse = self._request_parser(name, body)

        async def handler(request: web.Request) -> web.Response:
            call = self._call(name, await parse(request), request)
            response = await (while_connected(request, call) if name in _HANGUP_CANCELS else call)
            return web.json_response(json_format.MessageToDict(response, always_print_fields_with_no_presence=True))

        return handler

    def _request_parser(self, name: str, body: str) -> Callable:
        """A coroutine turning an HTTP request into the RPC's request message.

        The key is checked first (anonymous callers cannot make us read or parse a body), then the body or
        the query, then the path fields, which win over the query as in gRPC transcoding.
        """
        method = pb.DESCRIPTOR.services_by_name["ReviewService"].methods_by_name[name]
        request_class = getattr(pb, method.input_type.name)

        async def parse(request: web.Request):
            message = request_class()
            if name in KEYED_METHODS:
                self._admit(request)
            if body:
                _parse(parse_json_object(await self._read_body(request), method.input_type.name), message,
                       "request body")
            else:
                _parse(_query_fields(request), message, "query")
            _parse(dict(request.match_info), message, "path")
            return message

        return parse

    def _admit(self, request: web.Request, *, spend: bool = False) -> None:
        """Check the caller's API key when the server has keys; `spend=False` only looks (before the body is
        read: the servicer spends the call of its rate), `spend=True` spends it (callers that bypass Generate)."""
        keys = self.servicer.api_keys
        if keys is None:
            return
        try:
            keys.check(HttpContext(request).invocation_metadata(), peer=request.remote or "", spend=spend)
        except AuthError as err:
            code = getattr(grpc.StatusCode, err.code_name)
            headers = {"Retry-After": err.retry_after} if code == C.RESOURCE_EXHAUSTED else None
            raise HttpAbort(code, str(err), headers=headers) from None

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, decoded: JSON only, within the body timeout; HttpAbort otherwise."""
        if request.content_type != "application/json":
            raise HttpAbort(C.INVALID_ARGUMENT, f"request body must be application/json, got "
                            f"{echo(request.headers.get('Content-Type', 'none'))}", http_status=415)
        timeout = self.server.config.body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                raw = await request.read()
        except TimeoutError:
            raise HttpAbort(C.DEADLINE_EXCEEDED, f"request body did not arrive within {timeout:g} s",
                            http_status=408) from None
        return decode_body(raw, request.headers.get("Content-Encoding", ""), self.server.config.max_receive_bytes)

    def _sse_handler(self, name: str, body: str) -> Callable:
        """A server-streaming RPC as `text/event-stream`: one `data:` event (proto3 JSON) per message.

        An error before the first message is an ordinary AIP-193 JSON answer
        with its HTTP status; after it, an `event: error` with the same body.
        A client that goes away cancels the call (the servicer's slot is freed).
        """
        parse = self._request_parser(name, body)

        async def handler(request: web.Request) -> web.StreamResponse:
            message = await parse(request)
            context = SseContext(request)
            try:
                await while_connected(request, getattr(self.servicer, name)(message, context))
            except ConnectionResetError:  # hung up while nothing was being written
                return context.response
            except HttpAbort as err:
                if not context.started:
                    raise
                status = err.http_status
                await context.send({"error": {"code": status, "status": err.code.name, "message": err.message}},
                                   event="error")
            except ClientGone:
                return context.response
            await context.response.write_eof()
            return context.response

        return handler

    # -- the seed's routes ---------------------------------------------------------------
    async def _seed_pick(self, request: web.Request) -> web.Response:
        message = pb.GetReviewRequest()
        _parse(_query_fields(request), message, "query")
        return web.json_response(_seed_json((await self._call("GetReview", message, request)).review))

    async def _seed_by_id(self, request: web.Request) -> web.Response:
        message = pb.GetByIdRequest(id=request.match_info["id"])
        return web.json_response(_seed_json((await self._call("GetById", message, request)).review))

    # -- operations ----------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready = not shutting down, model warm (or none configured), store reachable; 503 otherwise."""
        model = self.servicer.model
        store = "ok"
        try:
            await self.servicer._store(self.servicer.store.existing_ids, [_PROBE_ID])
        except PitchkerasError as err:  # the store's own message names no location
            store = _one_line(f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - any failure means not ready; a bug's text stays in the log
            log.warning("readiness probe of the store failed: %s: %s", type(err).__name__, err)
            store = f"{type(err).__name__}; see the server log"
        ready = not self.server.stopping and model.state in ("off", "ready") and store == "ok"
        body = {"status": "ready" if ready else "not ready", "model": model.state, "store": store,
                "shutting_down": self.server.stopping}
        if model.state == "failed":
            body["model_error"] = model.error
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    # -- the web page --------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page_files["index.html"], content_type="text/html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {".css": "text/css", ".js": "text/javascript"}
        suffix = name[name.rfind("."):] if "." in name else ""
        if name not in self._page_files or suffix not in types:  # the HTML templates are not static files
            raise HttpAbort(C.NOT_FOUND, f"no static file {name!r}")
        return web.Response(text=self._page_files[name], content_type=types[suffix])

    async def _review_page(self, request: web.Request) -> web.Response:
        """One review as a shareable page; every stored value is HTML-escaped."""
        template = string.Template(self._page_files["review.html"])
        try:
            review = (await self._call("GetById", pb.GetByIdRequest(id=request.match_info["id"]), request)).review
        except HttpAbort as err:
            status = HTTP_STATUS.get(err.code, 500)
            page = template.substitute(title="Review not found", heading=html.escape(f"{status} {err.code.name}"),
                                       score="", genre="", text=f"<p>{html.escape(err.message)}</p>", meta="")
            return web.Response(text=page, content_type="text/html", status=status)
        score = f"{review.score:.1f}" if review.HasField("score") else "-"
        genre = review.genre if review.HasField("genre") else "-"
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in review.text.split("\n") if p.strip())
        page = template.substitute(
            title=html.escape(f"{genre}, {score}: a pitchkeras review"),
            heading=html.escape(f"A {genre} review, scored {score}"),
            score=html.escape(score), genre=html.escape(genre), text=paragraphs,
            meta=html.escape(f"id {review.id} · {review.length} words · model {review.model_version or '-'}"),
        )
        return web.Response(text=page, content_type="text/html")


class ClientGone(asyncio.CancelledError):
    """The HTTP client closed the event stream: the call is cancelled, nothing is left to answer."""


class SseContext(HttpContext):
    """An `HttpContext` whose `write(message)` sends a server-sent event (for server-streaming RPCs)."""

    def __init__(self, request: web.Request):
        super().__init__(request)
        self._request = request
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",  # nginx (and proxies that follow it) must not buffer the stream
        })

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def write(self, message) -> None:
        await self.send(json_format.MessageToDict(message, always_print_fields_with_no_presence=True))

    async def send(self, data: dict, event: str = "") -> None:
        """One event: `event:` when named, then `data:` with `data` as one line of JSON."""
        head = f"event: {event}\n" if event else ""
        try:
            if not self.response.prepared:
                await self.response.prepare(self._request)
            await self.response.write(f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8"))
        except (ConnectionResetError, ConnectionError) as err:
            raise ClientGone("the client closed the event stream") from err


_HANGUP_CANCELS = ("Generate",)  # unary calls whose work stops when the client hangs up
_HANGUP_POLL_S = 0.05  # how often a running call looks for a hang-up: a fraction of one decode step


async def while_connected(request: web.Request, call):
    """Await `call`; when the client hangs up first, cancel it (freeing its decode rows) and raise
    ConnectionResetError. aiohttp does not cancel a handler whose client left."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_HANGUP_POLL_S)
            if done:
                return task.result()
            if _hung_up(request):
                raise ConnectionResetError("the client hung up before the answer")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def _hung_up(request: web.Request) -> bool:
    """Whether the client closed its side: the transport is gone, or its socket reads end-of-file (peeked on a
    duplicate descriptor, so nothing is consumed; it also sees a hang-up while aiohttp has paused reading)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as peer:
            return peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _query_fields(request: web.Request) -> dict[str, Any]:
    """Query parameters as proto3 JSON fields; empty values (`?score=&genre=`, an HTML form's) mean unset."""
    return {name: value for name, value in request.query.items() if value != ""}


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def _parse(data: dict, message, where: str) -> None:
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as err:
        raise HttpAbort(C.INVALID_ARGUMENT, f"bad {where}: {_one_line(err)}") from None


def _seed_json(review: pb.Review) -> dict:
    """The seed's keys (snake_case, numbers as numbers, absent conditions as null), then ours."""
    data = json_format.MessageToDict(review, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    data["selection_count"] = int(review.selection_count)  # proto3 JSON writes int64 as a string
    if review.HasField("seed"):
        data["seed"] = int(review.seed)
    out = {key: data.pop(key, None) for key in SEED_KEYS}
    out.update(data)
    return out


def _load_web_files() -> dict[str, str]:
    folder = resources.files("pitchkeras.server") / _WEB
    return {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir()
            if entry.is_file() and entry.name.rsplit(".", 1)[-1] in ("html", "css", "js")}
