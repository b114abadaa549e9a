"""StreamGenerate over gRPC and as server-sent events: deltas before the review, the same text as Generate,
a cancelled stream frees its engine slot."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from pitchkeras.server import ServerConfig
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import ready_server, wait_for

# Lengths up to 48 tokens: long enough to cancel a stream mid-way on the tiny model (context 64).
CONFIG = ServerConfig(max_batch_size=4, default_max_length=12, max_length_cap=48, num_samples_cap=4,
                      prompt_chars_cap=40, grace_s=5.0, warmup=False)
REQUEST = dict(score=8.0, genre="Rock", seed=7, max_length=12, temperature=0.9)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_generator):
    with ready_server(tmp_path_factory.mktemp("stream"), tiny_generator, CONFIG, http_port=0) as background:
        yield background


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(f"localhost:{served.port}") as channel:
        yield pb_grpc.ReviewServiceStub(channel)


def sse_events(port: int, body: dict) -> list[tuple[str, dict]]:
    """POST /v1/reviews:streamGenerate; the (event, data) pairs of the answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/reviews:streamGenerate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"].startswith("no-cache") and response.headers["X-Accel-Buffering"] == "no"
        blocks = response.read().decode("utf-8").split("\n\n")
    events = []
    for block in filter(None, blocks):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


def test_stream_deltas_then_the_review_same_text_as_generate(stub):
    chunks = list(stub.StreamGenerate(pb.GenerateRequest(**REQUEST, store=True), timeout=60))
    deltas = [c.delta for c in chunks[:-1]]
    assert len(deltas) >= 2 and all(c.WhichOneof("chunk") == "delta" for c in chunks[:-1])
    final = chunks[-1].review
    assert chunks[-1].WhichOneof("chunk") == "review"
    assert final.raw == final.review.prompt + "".join(deltas)
    unary = stub.Generate(pb.GenerateRequest(**REQUEST), timeout=60).reviews[0]
    assert unary.raw == final.raw and unary.review.text == final.review.text
    if final.status == pb.SAMPLE_STATUS_ACCEPTED:
        assert final.stored and final.review.id and final.review.HasField("added")


def test_server_sent_events_carry_the_same_stream(served, stub):
    events = sse_events(served.http_port, dict(REQUEST, store=False))
    assert all(name == "message" for name, _ in events)
    deltas = [data["delta"] for _, data in events[:-1]]
    final = events[-1][1]["review"]
    assert len(deltas) >= 2 and final["raw"] == final["review"]["prompt"] + "".join(deltas)
    grpc_final = list(stub.StreamGenerate(pb.GenerateRequest(**REQUEST), timeout=60))[-1].review
    assert final["raw"] == grpc_final.raw and final["status"] in ("SAMPLE_STATUS_ACCEPTED", "SAMPLE_STATUS_REJECTED")


@pytest.mark.parametrize("body, message", [
    (dict(REQUEST, num_samples=2), "StreamGenerate writes one review"),
    (dict(REQUEST, temperature=5), "temperature must be in (0, 2]"),
    (dict(REQUEST, genre="Polka"), "known:"),
])
def test_a_bad_stream_request_is_an_ordinary_400(served, stub, body, message):
    with pytest.raises(urllib.error.HTTPError) as caught:
        sse_events(served.http_port, body)
    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == 400 and error["status"] == "INVALID_ARGUMENT" and message in error["message"]
    with pytest.raises(grpc.RpcError) as rpc_error:
        list(stub.StreamGenerate(pb.GenerateRequest(**body), timeout=60))
    assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in rpc_error.value.details()


def test_a_cancelled_stream_frees_its_slot(served, stub, monkeypatch):
    engine = served.server.model.batcher.engine
    counters = engine.counters
    step = engine.step

    def slow_step():  # 48 tokens take seconds, so a cancel or a deadline lands mid-stream on any machine
        time.sleep(0.1)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    cancelled, finished = counters.cancelled, counters.finished
    call = stub.StreamGenerate(pb.GenerateRequest(**dict(REQUEST, max_length=48, seed=70)), timeout=60)
    first = next(call)
    assert first.WhichOneof("chunk") == "delta"
    call.cancel()
    assert wait_for(lambda: counters.cancelled == cancelled + 1 and counters.active == 0), counters
    # A deadline that passes mid-stream ends it the same way.
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stub.StreamGenerate(pb.GenerateRequest(**dict(REQUEST, max_length=48, seed=71)), timeout=1.0):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: counters.cancelled == cancelled + 2 and counters.active == 0), counters
    assert counters.finished == finished


def test_the_python_client_streams_and_its_last_item_is_the_review(served):
    from pitchkeras.client import ReviewClient

    with ReviewClient(f"localhost:{served.port}") as client:
        items = list(client.stream_generate(**REQUEST))
        unary = client.generate(**REQUEST)[0]
    deltas, final = items[:-1], items[-1]
    assert all(isinstance(d, str) for d in deltas) and len(deltas) >= 2
    assert final.raw == final.review.prompt + "".join(deltas) == unary.raw
