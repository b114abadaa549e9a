"""HTTP/JSON beside gRPC (real sockets, one server): seed and /v1 routes, AIP-193 errors, health, metrics, workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.parse

import grpc
import pytest
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families

from pitchkeras.errors import Unavailable
from pitchkeras.server import ApiKeys, BackgroundServer
from pitchkeras.server.http_api import HTTP_STATUS, SEED_KEYS, http_rules
from pitchkeras.store import open_store
from pitchkeras.store.sqlite import SQLiteStore
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import HOSTILE, SERVER_CONFIG, FlakyStore, pool_reviews

C = grpc.StatusCode
UNKNOWN_ID = "f" * 24


@pytest.fixture
def server(pool_uri):
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, http_port=0) as background:
        yield background


def request(port: int, method: str, path: str, body=None, headers=None):
    """One HTTP/1.1 call; returns (status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if body is not None:  # POST bodies must say they are JSON
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read().decode("utf-8")
        kind = response.getheader("Content-Type", "")
        return response.status, response, json.loads(raw) if kind.startswith("application/json") else raw
    finally:
        conn.close()


def get(port: int, path: str, **query):
    return request(port, "GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))


def assert_error(result, status: int, code: str, *fragments: str):
    got_status, _, body = result
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "status", "message"}, body
    assert body["error"]["code"] == status and body["error"]["status"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    assert "Traceback" not in body["error"]["message"]


def metric_samples(port: int) -> dict:
    status, response, text = get(port, "/metrics")
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _stub(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.ReviewServiceStub(channel)


# -- the seed's routes -----------------------------------------------------------------------------


def test_seed_pick_answers_the_seeds_keys_and_counts_the_pick(server):
    matching = {r.id for r in pool_reviews() if r.score == 8.0 and r.genre == "Rock"}
    status, _, first = get(server.http_port, "/review/", score="8.0", genre="Rock")
    assert status == 200
    assert list(first)[:len(SEED_KEYS)] == list(SEED_KEYS)  # the seed's keys first, then ours
    assert first["id"] in matching and first["score"] == 8.0 and first["genre"] == "Rock"
    assert first["selection_count"] == 1 and isinstance(first["selection_count"], int)
    assert first["length"] == len(first["text"].split()) and first["added"].endswith("Z")
    assert first["model_version"] == "pool-v1" and first["seed"] in (0, 1)
    _, _, second = get(server.http_port, "/review", score="8", genre="rock")  # without the slash, any case
    assert {first["id"], second["id"]} == matching


def test_seed_filters_are_optional_and_empty_means_unset(server):
    status, _, review = get(server.http_port, "/review/", score="", genre="")
    assert status == 200 and review["id"] in {r.id for r in pool_reviews()}
    assert get(server.http_port, "/review/", genre="Jazz")[2]["genre"] == "Jazz"


def test_seed_permalink_does_not_count(server):
    _, _, picked = get(server.http_port, "/review/", score="3.0", genre="Rap")
    for _ in range(2):
        status, _, same = get(server.http_port, f"/review/{picked['id']}")
    assert status == 200 and same["id"] == picked["id"] and same["text"] == picked["text"]
    assert same["selection_count"] == picked["selection_count"] == 1


@pytest.mark.parametrize("path, query, status, code, message", [
    ("/review/", {"score": "11"}, 400, "INVALID_ARGUMENT", "score must be in [0, 10], got 11.0"),
    ("/review/", {"score": "abc"}, 400, "INVALID_ARGUMENT", "Couldn't parse float: abc"),
    ("/review/", {"score": "NaN"}, 400, "INVALID_ARGUMENT", "score must be in [0, 10]"),
    ("/review/", {"genre": "Polka"}, 400, "INVALID_ARGUMENT", "unknown genre 'Polka'"),
    ("/review/", {"colour": "red"}, 400, "INVALID_ARGUMENT", 'no field named "colour"'),
    (f"/review/{UNKNOWN_ID}", {}, 404, "NOT_FOUND", UNKNOWN_ID),
    ("/review/not-an-id!", {}, 400, "INVALID_ARGUMENT", "malformed review id"),
    ("/v1/reviews:pick", {"score": "-1"}, 400, "INVALID_ARGUMENT", "score must be in [0, 10]"),
    (f"/v1/reviews/{UNKNOWN_ID}", {}, 404, "NOT_FOUND", UNKNOWN_ID),
])
def test_bad_requests_get_a_json_error_with_the_mapped_status(server, path, query, status, code, message):
    assert_error(get(server.http_port, path, **query), status, code, message)


# -- /v1: the proto's mapping ----------------------------------------------------------------------


def test_v1_routes_are_read_from_the_proto_options():
    assert http_rules() == [
        ("GetReview", "GET", "/v1/reviews:pick", ""),
        ("GetById", "GET", "/v1/reviews/{id}", ""),
        ("Generate", "POST", "/v1/reviews:generate", "*"),
        ("StreamGenerate", "POST", "/v1/reviews:streamGenerate", "*"),
        ("ListConditions", "GET", "/v1/conditions", ""),
    ]


def test_v1_answers_the_same_fields_as_grpc(server):
    channel, stub = _stub(server.port)
    try:
        expected = pool_reviews()[0]
        by_grpc = stub.GetById(pb.GetByIdRequest(id=expected.id), timeout=10)
        status, _, by_http = get(server.http_port, f"/v1/reviews/{expected.id}")
        assert status == 200
        assert json_format.ParseDict(by_http, pb.GetByIdResponse()) == by_grpc
        assert by_http["review"]["selectionCount"] == "0"  # proto3 JSON: lowerCamelCase, int64 as a string

        conditions_grpc = stub.ListConditions(pb.ListConditionsRequest(), timeout=10)
        status, _, conditions_http = get(server.http_port, "/v1/conditions")
        assert status == 200 and json_format.ParseDict(conditions_http, pb.ListConditionsResponse()) == conditions_grpc
    finally:
        channel.close()
    status, _, picked = get(server.http_port, "/v1/reviews:pick", score="8", genre="jazz")
    assert status == 200 and picked["review"]["genre"] == "Jazz" and picked["review"]["selectionCount"] == "1"


def test_list_conditions_counts_every_pair(server, tmp_path):
    channel, stub = _stub(server.port)
    try:
        listed = stub.ListConditions(pb.ListConditionsRequest(), timeout=10)
    finally:
        channel.close()
    with open_store(server.server.store.uri) as store:
        counts = store.counts()
    assert [(c.score, c.genre, c.count) for c in listed.conditions] == [(c.score, c.genre, c.count) for c in counts]
    assert list(listed.genres) == ["Jazz", "Rap", "Rock"] and list(listed.scores) == [3.0, 8.0]
    assert listed.total == len(pool_reviews())
    with BackgroundServer(f"sqlite:///{tmp_path}/empty.db", config=SERVER_CONFIG, http_port=0) as empty:
        status, _, body = get(empty.http_port, "/v1/conditions")
    assert status == 200 and body == {"conditions": [], "genres": [], "scores": [], "total": "0"}


def test_generate_without_a_model_is_failed_precondition_over_http(server):
    assert_error(request(server.http_port, "POST", "/v1/reviews:generate", {"score": 8, "genre": "Rock"}),
                 400, "FAILED_PRECONDITION", "pitchkeras serve --model DIR")


def test_generate_over_http_uses_the_servicer_keys_and_limits(pool_uri, tmp_path, tiny_generator):
    keys = ApiKeys(["secret-key"], rate=1e-6, burst=1)
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, generator=tiny_generator, api_keys=keys,
                          http_port=0) as background:
        assert background.wait_until_ready(timeout=300) == "ready"
        port, body = background.http_port, {"score": 8.0, "genre": "rock", "seed": 3, "numSamples": 2, "store": True}
        assert_error(request(port, "POST", "/v1/reviews:generate", body), 401, "UNAUTHENTICATED", "x-api-key")
        assert_error(request(port, "POST", "/v1/reviews:generate", body, {"x-api-key": "wrong"}),
                     403, "PERMISSION_DENIED")
        status, _, answer = request(port, "POST", "/v1/reviews:generate", body, {"Authorization": "Bearer secret-key"})
        assert status == 200, answer
        assert [r["review"]["seed"] for r in answer["reviews"]] == ["3", "4"]
        assert all(r["review"]["genre"] == "Rock" for r in answer["reviews"])  # respelled as the model knows it
        assert_error(request(port, "POST", "/v1/reviews:generate", body, {"x-api-key": "secret-key"}),
                     429, "RESOURCE_EXHAUSTED", "rate limit")
        metrics = metric_samples(port)
    assert metrics["pitchkeras_generate_batch_size_count", ()] >= 1
    assert metrics["pitchkeras_generate_tokens_total", ()] >= 2 * SERVER_CONFIG.default_max_length
    assert metrics["pitchkeras_model_state", (("pitchkeras_model_state", "ready"),)] == 1.0
    assert metrics["pitchkeras_requests_total", (("code", "429"), ("method", "Generate"), ("protocol", "http"))] == 1


@pytest.mark.parametrize("body, message", [
    ({"temperature": 5}, "temperature must be in (0, 2]"),
    ({"numSamples": 99}, "num_samples must be in [1, 4]"),
    ({"unknown_field": 1}, 'no field named "unknown_field"'),
    ({"seed": "x"}, "Failed to parse seed field"),
    ([1, 2], "must be a JSON object"),
    ("{not json", "not JSON"),
])
def test_generate_body_errors_are_400(pool_uri, tiny_generator, body, message):
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, generator=tiny_generator, http_port=0) as background:
        background.wait_until_ready(timeout=300)
        assert_error(request(background.http_port, "POST", "/v1/reviews:generate", body), 400, "INVALID_ARGUMENT",
                     message)


# -- errors the framework raises; the server keeps serving -----------------------------------------


def test_unknown_route_wrong_method_and_oversized_body_are_json_errors(server):
    port = server.http_port
    assert_error(get(port, "/nowhere"), 404, "NOT_FOUND", "no route GET /nowhere")
    status, response, _ = request(port, "DELETE", "/v1/conditions")
    assert status == 405 and "GET" in response.getheader("Allow")
    assert_error(request(port, "PUT", "/review/"), 405, "UNIMPLEMENTED", "PUT is not allowed")
    oversized = "x" * (SERVER_CONFIG.max_receive_bytes + 1)
    assert_error(request(port, "POST", "/v1/reviews:generate", oversized), 413, "INVALID_ARGUMENT",
                 f"larger than {SERVER_CONFIG.max_receive_bytes} bytes")
    assert get(port, "/review/", score="8")[0] == 200  # still serving


def test_every_grpc_code_has_an_http_status():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert [HTTP_STATUS[c] for c in (C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.NOT_FOUND,
                                     C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.UNAVAILABLE, C.INTERNAL)] == [
        400, 401, 403, 404, 429, 400, 503, 500]


class _BrokenStore(SQLiteStore):
    """get_by_id has a bug; existing_ids (the readiness probe) finds the store down."""

    def get_by_id(self, review_id):
        raise RuntimeError("a bug with a secret path /etc/x in it")

    def existing_ids(self, ids):
        raise Unavailable(f"{self.uri}: injected outage")


def test_unexpected_errors_are_500_without_a_traceback_and_store_outages_503(tmp_path, pool_uri, caplog):
    with BackgroundServer(_BrokenStore(f"{tmp_path}/broken.db"), config=SERVER_CONFIG, http_port=0) as broken:
        assert_error(get(broken.http_port, f"/review/{UNKNOWN_ID}"), 500, "INTERNAL", "see the server log")
        assert "/etc/x" not in get(broken.http_port, f"/v1/reviews/{UNKNOWN_ID}")[2]["error"]["message"]
        status, _, ready = get(broken.http_port, "/readyz")
        assert status == 503 and ready["status"] == "not ready" and "injected outage" in ready["store"]
        assert get(broken.http_port, "/healthz")[0] == 200  # alive, just not ready
        errors = metric_samples(broken.http_port)
    assert errors["pitchkeras_store_errors_total", (("error", "Unavailable"), ("operation", "existing_ids"))] == 1
    assert "GetById failed unexpectedly" in caplog.text
    flaky = FlakyStore(f"{tmp_path}/flaky.db", method="get_review", fail_next=1)
    flaky.add_reviews(pool_reviews())
    with BackgroundServer(flaky, config=SERVER_CONFIG, http_port=0) as background:
        assert_error(get(background.http_port, "/review/"), 503, "UNAVAILABLE", "injected outage")
        assert get(background.http_port, "/review/")[0] == 200
    flaky.close()


# -- health and metrics ----------------------------------------------------------------------------


def test_health_and_readiness(server):
    assert get(server.http_port, "/healthz")[:1] == (200,)
    status, _, ready = get(server.http_port, "/readyz")
    assert status == 200 and ready == {"status": "ready", "model": "off", "store": "ok", "shutting_down": False}


def test_metrics_count_both_protocols(server):
    port = server.http_port
    channel, stub = _stub(server.port)
    try:
        for _ in range(3):
            stub.GetReview(pb.GetReviewRequest(score=8.0), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.GetById(pb.GetByIdRequest(id=UNKNOWN_ID), timeout=10)
    finally:
        channel.close()
    get(port, "/review/", score="3")
    get(port, "/review/", score="11")
    get(port, "/no/such/route")
    samples = metric_samples(port)

    def count(protocol, method, code):
        return samples.get(("pitchkeras_requests_total", (("code", code), ("method", method),
                                                          ("protocol", protocol))), 0)

    assert count("grpc", "GetReview", "OK") == 3 and count("grpc", "GetById", "NOT_FOUND") == 1
    assert count("http", "GetReview", "200") == 1 and count("http", "GetReview", "400") == 1
    assert count("http", "unmatched", "404") == 1
    assert samples["pitchkeras_request_duration_seconds_count",
                   (("code", "OK"), ("method", "GetReview"), ("protocol", "grpc"))] == 3
    assert samples["pitchkeras_model_state", (("pitchkeras_model_state", "off"),)] == 1.0
    assert samples["pitchkeras_store_pick_lost_races_total", ()] == 0  # SQLite picks in one statement
    assert samples["pitchkeras_server_info", (("pid", str(os.getpid())),)] == 1.0
    assert count("http", "metrics", "200") == 0  # a scrape is counted once it has answered
    assert metric_samples(port)[("pitchkeras_requests_total",
                                 (("code", "200"), ("method", "metrics"), ("protocol", "http")))] == 1


# -- the page, server side -------------------------------------------------------------------------


def test_review_page_escapes_stored_text(hostile_uri):
    with BackgroundServer(hostile_uri, config=SERVER_CONFIG, http_port=0) as background:
        status, response, page = get(background.http_port, f"/r/{HOSTILE.id}")
        assert status == 200 and response.getheader("Content-Type").startswith("text/html")
        assert "&lt;script&gt;document.title=&quot;owned&quot;&lt;/script&gt;" in page
        assert "<script>document" not in page and "<b>" not in page and "<img" not in page
        assert "&lt;i&gt;Rock&lt;/i&gt;" in page
        status, _, missing = get(background.http_port, f"/r/{UNKNOWN_ID}")
        assert status == 404 and "404 NOT_FOUND" in missing and UNKNOWN_ID in missing
        status, _, index = get(background.http_port, "/")
        assert status == 200 and '<script src="/static/app.js"></script>' in index
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            status, response, _ = get(background.http_port, f"/static/{name}")
            assert status == 200 and response.getheader("Content-Type").startswith(kind)
        assert_error(get(background.http_port, "/static/review.html"), 404, "NOT_FOUND")


# -- the command line: both protocols at once, and --workers ---------------------------------------


def _serve(*args: str) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "pitchkeras.cli", "serve", "--log-level", "WARNING",
                                "--grace", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [process.stdout.readline().strip(), process.stdout.readline().strip()]
    if not lines[0].startswith("serving on ") or not lines[1].startswith("http on http://"):
        process.kill()
        raise AssertionError(f"serve did not start: {lines} {process.stderr.read()[-2000:]}")
    return process, lines


def test_serve_workers_share_both_ports(pool_uri):
    process, lines = _serve("--store", pool_uri, "--port", "0", "--http-port", "0", "--workers", "2")
    try:
        grpc_port = int(lines[0].rsplit(":", 1)[1])
        http_port = int(lines[1].rstrip("/").rsplit(":", 1)[1])
        pids = set()
        for _ in range(64):  # fresh connections; SO_REUSEPORT hashes each to one of the two workers
            _, _, text = get(http_port, "/metrics")
            pids.update(s.labels["pid"] for f in text_string_to_metric_families(text) for s in f.samples
                        if s.name == "pitchkeras_server_info")
            if len(pids) == 2:
                break
        assert len(pids) == 2 and str(process.pid) not in pids, pids
        status, _, review = get(http_port, "/review/", score="8.0", genre="Rock")
        assert status == 200 and set(SEED_KEYS) <= set(review)
        channel, stub = _stub(grpc_port)
        try:
            assert stub.GetById(pb.GetByIdRequest(id=review["id"]), timeout=10).review.text == review["text"]
        finally:
            channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize("flags, message", [
    (["--http-port", "70000"], "--http-port must be in [0, 65535]"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_serve_bad_http_flags_are_one_line_exit_2(pool_uri, flags, message, cli):
    code, _, err = cli("serve", "--store", pool_uri, "--port", "0", *flags)
    assert code == 2 and err.strip().count("\n") == 0 and message in err, err


# -- model failure and shutdown --------------------------------------------------------------------


def test_a_model_that_failed_to_load_is_not_ready_and_generate_says_why(pool_uri, tmp_path):
    pytest.importorskip("tensorflow")
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, model_dir=str(tmp_path / "missing"),
                          http_port=0) as background:
        assert background.wait_until_ready(timeout=120) == "failed"
        status, _, ready = get(background.http_port, "/readyz")
        assert status == 503 and ready["model"] == "failed" and ready["model_error"], ready
        assert_error(request(background.http_port, "POST", "/v1/reviews:generate", {"score": 8, "genre": "Rock"}),
                     400, "FAILED_PRECONDITION", "the model failed to load")
        assert get(background.http_port, "/review/", score="8")[0] == 200  # stored reviews still served
        samples = metric_samples(background.http_port)
    assert samples["pitchkeras_model_state", (("pitchkeras_model_state", "failed"),)] == 1.0


def test_shutdown_finishes_in_flight_http_calls_then_stops_listening(tmp_path):
    import concurrent.futures
    import threading

    store = FlakyStore(str(tmp_path / "slow.db"), method="get_by_id", fail_next=0, delay_s=0.5)
    store.add_reviews(pool_reviews())
    ids = [r.id for r in pool_reviews()][:8]
    background = BackgroundServer(store, config=SERVER_CONFIG, http_port=0).start()
    port = background.http_port
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(get, port, f"/review/{i}") for i in ids]
        assert store.wait_for_calls(len(ids)) == len(ids)  # all 8 are inside the store
        stopper = threading.Thread(target=background.stop, kwargs={"grace": 10.0})
        stopper.start()
        assert [(c.result()[0], c.result()[2]["id"]) for c in calls] == [(200, i) for i in ids]  # none lost
        stopper.join(30)
    with pytest.raises(ConnectionRefusedError):
        get(port, "/healthz")
    store.close()


def test_with_tls_the_http_port_speaks_https_with_the_same_certificate(pool_uri, tmp_path):
    import ssl

    from tests.serve_fixtures import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    with BackgroundServer(pool_uri, host="localhost", config=SERVER_CONFIG, tls_cert=cert.read_bytes(),
                          tls_key=key.read_bytes(), http_port=0) as background:
        assert background.server.https
        conn = http.client.HTTPSConnection("localhost", background.http_port, timeout=30,
                                           context=ssl.create_default_context(cafile=str(cert)))
        try:
            conn.request("GET", "/review/?genre=Rap")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["genre"] == "Rap"
        finally:
            conn.close()
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # plaintext is refused
            get(background.http_port, "/healthz")


class _GatedGenerator:
    """The real tiny generator, whose warm-up waits until the test opens the gate."""

    def __init__(self, inner, gate):
        self._inner, self._gate = inner, gate

    def warmup(self, **kwargs):
        assert self._gate.wait(120), "the test never opened the warm-up gate"

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_not_ready_while_the_model_warms_up(pool_uri, tiny_generator):
    import dataclasses
    import threading

    gate = threading.Event()
    config = dataclasses.replace(SERVER_CONFIG, warmup=True)
    with BackgroundServer(pool_uri, config=config, generator=_GatedGenerator(tiny_generator, gate),
                          http_port=0) as background:
        port = background.http_port
        status, _, ready = get(port, "/readyz")
        assert status == 503 and ready["model"] == "loading", ready
        assert_error(request(port, "POST", "/v1/reviews:generate", {"score": 8, "genre": "Rock"}), 503, "UNAVAILABLE",
                     "still loading")
        assert get(port, "/review/", score="8")[0] == 200  # stored reviews are served meanwhile
        gate.set()
        assert background.wait_until_ready(timeout=120) == "ready"
        assert get(port, "/readyz")[:1] == (200,)
