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
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import string
import time
from importlib import resources
from typing import Any, Callable

import grpc
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import json_format

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


class HttpAbort(grpc.aio.AbortError):
    """What `HttpContext.abort` raises: the servicer's code and message, on their way to an HTTP status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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
        raise HttpAbort(code, details)


def error_response(http_status: int, code: grpc.StatusCode, message: str, headers=None) -> web.Response:
    """An AIP-193 error: `{"error": {"code": HTTP status, "status": "CANONICAL_CODE", "message": ...}}`."""
    body = {"error": {"code": http_status, "status": code.name, "message": message}}
    return web.json_response(body, status=http_status, headers=headers)


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
        self._page_files = _load_web_files()
        self._routes()

    # -- routing -------------------------------------------------------------------------
    def _add(self, verb: str, path: str, handler, label: str) -> None:
        async def labelled(request):
            return await handler(request)

        labelled.metric_method = label  # read by the middleware; unmatched routes have none
        self.app.router.add_route(verb, path, labelled)

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
            response = error_response(HTTP_STATUS.get(err.code, 500), err.code, err.message)
        except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method, body too large
            code = _HTTP_ONLY_STATUS.get(err.status, C.UNKNOWN if err.status >= 500 else C.INVALID_ARGUMENT)
            message = {
                404: f"no route {request.method} {request.path}; see the API in protos/pitchkeras/v1/review_service.proto",
                405: f"{request.method} is not allowed on {request.path}",
                413: f"request body is larger than {self.server.config.max_receive_bytes} bytes",
            }.get(err.status, _one_line(err.text or err.reason))
            headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
            response = error_response(err.status, code, message, headers=headers)
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
        parse = _request_parser(name, body)

        async def handler(request: web.Request) -> web.Response:
            response = await self._call(name, await parse(request), request)
            return web.json_response(json_format.MessageToDict(response, always_print_fields_with_no_presence=True))

        return handler

    def _sse_handler(self, name: str, body: str) -> Callable:
        """A server-streaming RPC as `text/event-stream`: one `data:` event (proto3 JSON) per message.

        An error before the first message is an ordinary AIP-193 JSON answer
        with its HTTP status; after it, an `event: error` with the same body.
        A client that goes away cancels the call (the servicer's slot is freed).
        """
        parse = _request_parser(name, body)

        async def handler(request: web.Request) -> web.StreamResponse:
            message = await parse(request)
            context = SseContext(request)
            try:
                await getattr(self.servicer, name)(message, context)
            except HttpAbort as err:
                if not context.started:
                    raise
                status = HTTP_STATUS.get(err.code, 500)
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
        except Exception as err:  # noqa: BLE001 - any failure means not ready; the reason is shown
            store = _one_line(f"{type(err).__name__}: {err}")
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


def _request_parser(name: str, body: str) -> Callable:
    """A coroutine turning an HTTP request into the RPC's request message (body, or query, then path fields)."""
    method = pb.DESCRIPTOR.services_by_name["ReviewService"].methods_by_name[name]
    request_class = getattr(pb, method.input_type.name)

    async def parse(request: web.Request):
        message = request_class()
        if body:
            raw = await request.read()
            try:
                data = json.loads(raw or b"{}")
            except ValueError as err:
                raise HttpAbort(C.INVALID_ARGUMENT, f"request body is not JSON: {err}") from None
            if not isinstance(data, dict):
                raise HttpAbort(C.INVALID_ARGUMENT, f"request body must be a JSON object ({method.input_type.name})")
            _parse(data, message, "request body")
        else:
            _parse(_query_fields(request), message, "query")
        # Path fields win over the query, as in gRPC transcoding.
        _parse(dict(request.match_info), message, "path")
        return message

    return parse


def _query_fields(request: web.Request) -> dict[str, Any]:
    """Query parameters as proto3 JSON fields; empty values (`?score=&genre=`, an HTML form's) mean unset."""
    return {name: value for name, value in request.query.items() if value != ""}


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
