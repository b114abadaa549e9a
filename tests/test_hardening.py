"""Hostile but ordinary clients at both edges (real sockets, one keyed server): every mistake is a 4xx or the
right gRPC code, never 500/INTERNAL/UNKNOWN, never a traceback, store location or library version."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import time
import zlib

import grpc
import pytest

from pitchkeras.client import review_client
from pitchkeras.errors import NotFound, Unavailable
from pitchkeras.server import ApiKeys, BackgroundServer
from pitchkeras.server import auth
from pitchkeras.store import open_store
from pitchkeras.v1 import review_service_pb2 as pb
from tests.serve_fixtures import SERVER_CONFIG, pool_reviews, wait_for
from tests.test_http import assert_error, metric_samples, request

C = grpc.StatusCode
KEY = "hardening-key"
UNKNOWN_ID = "f" * 24
GENERATE = "/v1/reviews:generate"
SERVICE = pb.DESCRIPTOR.services_by_name["ReviewService"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with API keys (burst 10) and HTTP, over a pool of stored reviews; no model."""
    folder = tmp_path_factory.mktemp("hardening")
    uri = f"sqlite:///{folder}/pool.db"
    with open_store(uri) as store:
        store.add_reviews(pool_reviews())
    keys = ApiKeys([KEY], rate=0.01, burst=10)
    with BackgroundServer(uri, config=SERVER_CONFIG, api_keys=keys, http_port=0) as background:
        background.db_path = str(folder)
        yield background


def raw_http(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read the answer until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def keyed_headers(**extra) -> dict:
    return {"x-api-key": KEY, "Content-Type": "application/json", **extra}


# -- request bodies --------------------------------------------------------------------------------


def test_deeply_nested_json_is_400_not_a_recursion_error(keyed, caplog):
    nested = '{"score": ' + "[" * 5000 + "]" * 5000 + "}"
    with caplog.at_level(logging.INFO):
        assert_error(request(keyed.http_port, "POST", GENERATE, nested, keyed_headers()), 400, "INVALID_ARGUMENT",
                     "nested")
    assert "RecursionError" not in caplog.text


def test_anonymous_callers_are_refused_before_the_body_is_read(keyed):
    # Headers promise a megabyte that never comes: a server that reads bodies first would wait for it.
    head = (f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {SERVER_CONFIG.max_receive_bytes}\r\n\r\n{{").encode()
    started = time.monotonic()
    answer = raw_http(keyed.http_port, head, timeout=5.0)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("encoding, body, status, message", [
    ("gzip", b"\x1f\x8b\x08\x00garbage that is not deflate data", 400, "not valid 'gzip' data"),
    ("gzip", gzip.compress(b'{"score": 8, "genre": "Rock"}')[:16], 400, "ends early"),
    ("deflate", b"not a zlib stream at all", 400, "not valid 'deflate' data"),
    ("deflate", b"{}", 400, "not valid 'deflate' data"),
    ("br", b"whatever", 415, "unsupported Content-Encoding 'br'"),
    pytest.param("gzip", gzip.compress(b" " * (SERVER_CONFIG.max_receive_bytes + 1)), 413, "once decoded",
                 id="gzip-bomb"),
], ids=["gzip-garbage", "gzip-cut", "deflate-garbage", "deflate-json", "br", "gzip-bomb"])
def test_corrupt_content_encoding_is_4xx(keyed, encoding, body, status, message):
    assert_error(request(keyed.http_port, "POST", GENERATE, body, keyed_headers(**{"Content-Encoding": encoding})),
                 status, "INVALID_ARGUMENT", message)


def test_valid_compressed_bodies_still_work(keyed):
    body = zlib.compress(json.dumps({"score": 8, "genre": "Rock"}).encode())
    # Past the body: this server has no model.
    assert_error(request(keyed.http_port, "POST", GENERATE, body, keyed_headers(**{"Content-Encoding": "deflate"})),
                 400, "FAILED_PRECONDITION", "--model")


def test_post_bodies_must_be_json(keyed):
    body = json.dumps({"score": 8})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert_error(request(keyed.http_port, "POST", GENERATE, body, {"x-api-key": KEY, "Content-Type": kind}),
                     415, "INVALID_ARGUMENT", "application/json")
    assert_error(request(keyed.http_port, "POST", GENERATE, body, {"x-api-key": KEY, "Content-Type": ""}), 415,
                 "INVALID_ARGUMENT")
    charset = keyed_headers(**{"Content-Type": "application/json; charset=utf-8"})
    assert request(keyed.http_port, "POST", GENERATE, body, charset)[0] == 400  # FAILED_PRECONDITION: no model


def test_a_client_that_disconnects_mid_upload_is_counted_as_cancelled(keyed, caplog):
    before = metric_samples(keyed.http_port)
    head = (f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 5000\r\n\r\n{{\"score\": ").encode()
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", keyed.http_port)) as sock:
            sock.sendall(head)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        key = ("pitchkeras_requests_total", (("code", "499"), ("method", "Generate"), ("protocol", "http")))
        while metric_samples(keyed.http_port).get(key, 0) == before.get(key, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
    after = metric_samples(keyed.http_port)
    assert after.get(key, 0) == before.get(key, 0) + 1
    code500 = ("pitchkeras_requests_total", (("code", "500"), ("method", "Generate"), ("protocol", "http")))
    assert after.get(code500, 0) == before.get(code500, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("499" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"x-api-key: \xff\xfe\xc3(", b"Authorization: Bearer \xff\xfe\xc3("])
def test_keys_that_are_not_utf8_are_401(keyed, header):
    data = (f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\n".encode() + header + b"\r\n\r\n{}")
    answer = raw_http(keyed.http_port, data)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b"UNAUTHENTICATED" in answer


def test_401_says_how_to_authenticate_and_429_when_to_retry(tmp_path, pool_uri):
    keys = ApiKeys([KEY], rate=0.01, burst=1)
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, api_keys=keys, http_port=0) as background:
        port = background.http_port
        status, response, _ = request(port, "POST", GENERATE, {}, {"Content-Type": "application/json"})
        assert status == 401 and response.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert request(port, "POST", GENERATE, {}, keyed_headers())[0] == 400  # no model
        status, response, _ = request(port, "POST", GENERATE, {}, keyed_headers())
        assert status == 429 and int(response.getheader("Retry-After")) >= 1


def test_repeated_failed_keys_are_rate_limited(tmp_path, pool_uri):
    keys = ApiKeys([KEY], rate=0.01, burst=2)
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, api_keys=keys, http_port=0) as background:
        wrong = {"x-api-key": "guess", "Content-Type": "application/json"}
        statuses = [request(background.http_port, "POST", GENERATE, {}, wrong)[0] for _ in range(4)]
        assert statuses == [403, 403, 429, 429]
        channel = grpc.insecure_channel(f"127.0.0.1:{background.port}")
        try:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/{SERVICE.full_name}/Generate")(
                    pb.GenerateRequest().SerializeToString(), metadata=(("x-api-key", "guess"),), timeout=10)
            assert caught.value.code() == C.RESOURCE_EXHAUSTED  # the same peer, over gRPC
        finally:
            channel.close()
        assert request(background.http_port, "POST", GENERATE, {}, keyed_headers())[0] == 400  # right key: past


def test_one_definition_of_the_api_key_header():
    assert review_client.API_KEY_HEADER is auth.API_KEY_HEADER


# -- HTTP hygiene ----------------------------------------------------------------------------------


GET_PATHS = ("/review/", "/review", f"/review/{UNKNOWN_ID}", "/v1/reviews:pick", f"/v1/reviews/{UNKNOWN_ID}",
             "/v1/conditions", "/healthz", "/readyz", "/metrics", "/", f"/r/{UNKNOWN_ID}", "/static/app.js",
             "/v1/models", "/v1/models/no-such-model", "/v1/openapi.json")


def test_head_is_answered_on_every_get_route(keyed):
    routes = {r.method for r in keyed.server.http_app.router.routes()}  # every GET route is in GET_PATHS
    assert "GET" in routes
    for path in GET_PATHS:
        get_status = request(keyed.http_port, "GET", path)[0]
        conn = http.client.HTTPConnection("127.0.0.1", keyed.http_port, timeout=10)
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert response.status == get_status, path
        assert response.read() == b""
        conn.close()


def test_every_get_route_is_covered_by_the_head_test(keyed):
    templates = {r.resource.canonical for r in keyed.server.http_app.router.routes() if r.method == "GET"}
    covered = {"/review/", "/review", "/review/{id}", "/v1/reviews:pick", "/v1/reviews/{id}", "/v1/conditions",
               "/healthz", "/readyz", "/metrics", "/", "/r/{id}", "/static/{name}", "/v1/models", "/v1/models/{model}",
               "/v1/openapi.json"}
    assert templates <= covered, templates - covered


@pytest.mark.parametrize("path", ["/", "/review/", f"/v1/reviews/{UNKNOWN_ID}", "/static/app.js", "/nowhere"])
def test_security_headers_and_no_version_banner(keyed, path):
    _, response, _ = request(keyed.http_port, "GET", path)
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    policy = response.getheader("Content-Security-Policy", "")
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert response.getheader("Referrer-Policy") == "no-referrer"
    server = response.getheader("Server") or ""
    assert "aiohttp" not in server.lower() and "python" not in server.lower()


def test_the_page_has_no_inline_script_or_style(keyed):
    _, _, page = request(keyed.http_port, "GET", "/")
    assert "<script>" not in page and "<style" not in page and " style=" not in page and " onclick=" not in page


def test_framework_parse_errors_are_one_warning_per_peer_without_traceback(pool_uri, caplog):
    with caplog.at_level(logging.DEBUG), BackgroundServer(pool_uri, config=SERVER_CONFIG, http_port=0) as background:
        for _ in range(5):
            answer = raw_http(background.http_port, b"GET / HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n")
            assert answer.split(b" ", 2)[1] == b"400" and b'"INVALID_ARGUMENT"' in answer, answer[:200]
            assert b"aiohttp" not in answer and b"nosniff" in answer
    framework = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(framework) == 1, [r.getMessage() for r in framework]
    assert framework[0].levelno == logging.WARNING and not framework[0].exc_info
    assert not [r for r in caplog.records if r.exc_info]


# -- no internals in answers -----------------------------------------------------------------------


def test_not_found_names_no_store_location(keyed):
    for path in (f"/review/{UNKNOWN_ID}", f"/v1/reviews/{UNKNOWN_ID}"):
        status, _, body = request(keyed.http_port, "GET", path)
        assert status == 404
        text = json.dumps(body)
        assert "sqlite" not in text and keyed.db_path not in text and "pool.db" not in text
    status, _, page = request(keyed.http_port, "GET", f"/r/{UNKNOWN_ID}")
    assert status == 404 and keyed.db_path not in page and "sqlite" not in page
    channel = grpc.insecure_channel(f"127.0.0.1:{keyed.port}")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(f"/{SERVICE.full_name}/GetById")(
                pb.GetByIdRequest(id=UNKNOWN_ID).SerializeToString(), timeout=10)
        assert caught.value.code() == C.NOT_FOUND
        assert "sqlite" not in caught.value.details() and keyed.db_path not in caught.value.details()
    finally:
        channel.close()


def test_store_misses_name_no_location(store):
    store.add_reviews(pool_reviews()[:1])
    messages = []
    for miss in (lambda: store.get_by_id(UNKNOWN_ID), lambda: store.get_review(score=1.0),
                 lambda: store.get_review(genre="Polka" * 50)):
        with pytest.raises(NotFound) as caught:
            miss()
        messages.append(str(caught.value))
    secrets = [store.uri] + [getattr(store, name) for name in ("path", "project", "collection_name")
                             if hasattr(store, name)]
    for message in messages:
        assert not [s for s in secrets if s in message], (message, secrets)
        assert len(message) < 300
    assert UNKNOWN_ID in messages[0] and "score=1.0" in messages[1]


def test_firestore_picks_recover_after_claims_fail_in_an_outage(firestore_store, monkeypatch):
    """Found by the outage test: a claim that failed (not lost) must not retire the version it tried."""
    firestore_store.add_reviews(pool_reviews()[:3])
    real_claim = type(firestore_store)._claim

    def unreachable(self, snapshot, deadline):
        raise Unavailable("Firestore is unavailable (DeadlineExceeded); retry")

    monkeypatch.setattr(type(firestore_store), "_claim", unreachable)
    for _ in range(3):  # one failed claim per review
        with pytest.raises(Unavailable):
            firestore_store.get_review()
    monkeypatch.setattr(type(firestore_store), "_claim", real_claim)
    picked = [firestore_store.get_review() for _ in range(3)]
    assert sorted(r.selection_count for r in picked) == [1, 1, 1]


# -- gRPC: bytes that are not the request message --------------------------------------------------


def _bad_payload(kind: str, message_type):
    """Bytes that are not a `message_type`: garbage, a length past the end, or a string field not in UTF-8."""
    if kind == "garbage":
        return b"\xff" * 11  # a varint that never ends
    if kind == "truncated":
        return b"\x0a\x0aRo"  # field 1, length 10, 2 bytes follow
    strings = [f for f in message_type.fields if f.type == f.TYPE_STRING]
    if not strings:
        return None
    return bytes([(strings[0].number << 3) | 2]) + b"\x03\xff\xfe\xc3"


@pytest.mark.parametrize("kind", ["garbage", "truncated", "invalid-utf8"])
def test_undecodable_requests_are_invalid_argument_logged_and_counted(keyed, kind, caplog):
    before = metric_samples(keyed.http_port)
    sent = []
    channel = grpc.insecure_channel(f"127.0.0.1:{keyed.port}")
    with caplog.at_level(logging.INFO, logger="pitchkeras.server.access"):
        try:
            for method in SERVICE.methods:
                payload = _bad_payload(kind, method.input_type)
                if payload is None:
                    continue
                path = f"/{SERVICE.full_name}/{method.name}"
                call = channel.unary_stream(path) if method.server_streaming else channel.unary_unary(path)
                with pytest.raises(grpc.RpcError) as caught:
                    result = call(payload, timeout=10, metadata=(("x-api-key", KEY),))
                    if method.server_streaming:
                        list(result)
                assert caught.value.code() == C.INVALID_ARGUMENT, (method.name, caught.value.details())
                assert "not a valid pitchkeras.v1." in caught.value.details(), method.name
                sent.append(method.name)
        finally:
            channel.close()
        assert sent
        keys = {name: ("pitchkeras_requests_total", (("code", "INVALID_ARGUMENT"), ("method", name), ("protocol", "grpc")))
                for name in sent}
        # The server counts and logs a call just after its status went out, so the last call's count and line can trail
        # the client's error by a moment: wait for them (a bounded wait, not a timing assertion).
        def settled():
            counts = metric_samples(keyed.http_port)
            return all(counts.get(key, 0) > before.get(key, 0) for key in keys.values()) and all(
                f"ReviewService/{name} INVALID_ARGUMENT" in caplog.text for name in sent)

        wait_for(settled, limit_s=10)
        after = metric_samples(keyed.http_port)
    for name in sent:
        assert after.get(keys[name], 0) == before.get(keys[name], 0) + 1, name
        assert f"ReviewService/{name} INVALID_ARGUMENT" in caplog.text, name


def test_a_huge_genre_is_invalid_argument_with_a_short_echo(keyed):
    channel = grpc.insecure_channel(f"127.0.0.1:{keyed.port}")
    try:
        for request_ in (pb.GetReviewRequest(genre="A" * 20000), pb.GetReviewRequest(genre="<" * 20000 + "Rock")):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/{SERVICE.full_name}/GetReview")(request_.SerializeToString(), timeout=10)
            assert caught.value.code() == C.INVALID_ARGUMENT
            assert len(caught.value.details()) < 600 and "unknown genre" in caught.value.details()
    finally:
        channel.close()
    status, _, body = request(keyed.http_port, "GET", "/review/?genre=" + "A" * 6000)
    assert status == 400 and len(body["error"]["message"]) < 600


def test_a_server_streaming_rpc_gets_the_same_guard_log_and_count(caplog):
    """What StreamGenerate will get once the .proto has it: the guard, the access log and the count."""
    import asyncio

    from pitchkeras.server.handlers import _guarded, safe_deserializer
    from pitchkeras.server.interceptor import LoggingInterceptor
    from pitchkeras.server.metrics import ServerMetrics

    async def stream(request, context):
        for index in range(3):
            yield pb.GetByIdResponse(review=pb.Review(id=f"{request.genre}-{index}"))

    async def main():
        metrics = ServerMetrics()
        server = grpc.aio.server(interceptors=[LoggingInterceptor(metrics)])
        handler = grpc.unary_stream_rpc_method_handler(
            _guarded(stream, server_streaming=True), request_deserializer=safe_deserializer(pb.GetReviewRequest),
            response_serializer=pb.GetByIdResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, {"Fake": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream(f"/{SERVICE.full_name}/Fake")
                ids = [pb.GetByIdResponse.FromString(r).review.id
                       async for r in call(pb.GetReviewRequest(genre="Rock").SerializeToString(), timeout=10)]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    [r async for r in call(b"\xff" * 11, timeout=10)]
        finally:
            await server.stop(None)
        return ids, caught.value, metrics

    with caplog.at_level(logging.INFO, logger="pitchkeras.server.access"):
        ids, error, metrics = asyncio.run(main())
    assert ids == ["Rock-0", "Rock-1", "Rock-2"]
    assert error.code() == C.INVALID_ARGUMENT and "not a valid pitchkeras.v1.GetReviewRequest" in error.details()
    assert "ReviewService/Fake OK" in caplog.text and "ReviewService/Fake INVALID_ARGUMENT" in caplog.text
    rendered = metrics.render().decode()
    assert 'method="Fake",protocol="grpc"' in rendered and 'code="INVALID_ARGUMENT",method="Fake"' in rendered
