"""No caller left hanging: a failed prefill, a raising listener, a full queue, a client that hangs up (HTTP unary
and stream), a gRPC deadline each end only the request concerned, with its status, and the engine keeps serving;
dropping a generator and its engine frees the model."""

from __future__ import annotations

import gc
import json
import socket
import threading
import urllib.error
import urllib.request
import weakref

import grpc
import pytest

tf = pytest.importorskip("tensorflow")

from pitchkeras.errors import ResourceExhausted  # noqa: E402
from pitchkeras.sampling import GenerationRequest, Generator  # noqa: E402
from pitchkeras.sampling.engine import DecodeEngine  # noqa: E402
from pitchkeras.server import ServerConfig  # noqa: E402
from pitchkeras.v1 import review_service_pb2 as pb  # noqa: E402
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.serve_fixtures import ready_server, wait_for  # noqa: E402

ROCK = {"score": 8.0, "genre": "Rock"}
CONFIG = ServerConfig(max_batch_size=2, default_max_length=12, max_length_cap=40, num_samples_cap=4,
                      prompt_chars_cap=40, grace_s=5.0, warmup=False, max_waiting=2)
BODY = {"score": 8.0, "genre": "Rock", "seed": 5, "max_length": 40}


# -- the engine alone ---------------------------------------------------------------------------------------


def test_a_failed_prefill_ends_only_its_request(tiny_generator, monkeypatch):
    engine = DecodeEngine(tiny_generator, slots=2)
    program = engine._program
    prefill = program.prefill

    def failing(state, slot, prompt):
        if prompt.shape[1] > 16:  # the long prompt's bucket only
            raise MemoryError("injected: out of memory in prefill")
        return prefill(state, slot, prompt)

    monkeypatch.setattr(program, "prefill", failing)
    good = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 6)
    engine.step()
    bad = engine.submit(GenerationRequest(ROCK, "word " * 6, seed=2), None, 6)
    engine.run_until_idle()
    with pytest.raises(MemoryError, match="injected"):
        bad.result(timeout=0)
    assert bad.finish_reason == "error" and engine.counters.failed == 1
    assert good.result(timeout=0).raw and good.tokens == 6
    again = engine.generate([GenerationRequest(ROCK, "", seed=1)], None, 6)[0]
    assert again.raw == good.result().raw and engine.counters.active == 0


def test_a_raising_listener_ends_only_its_stream(tiny_generator):
    engine = DecodeEngine(tiny_generator, slots=2)
    heard = []

    def broken(item):
        raise RuntimeError("injected: the listener's socket is gone")

    bad = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 12, listener=broken)
    good = engine.submit(GenerationRequest(ROCK, "", seed=2), None, 12, listener=heard.append)
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="injected"):
        bad.result(timeout=0)
    assert bad.tokens < 12 and engine.counters.cancelled == 1
    assert heard[-1] is None and "".join(heard[:-1]) == good.result(timeout=0).raw[len(good.result().prompt):]
    assert engine.generate([GenerationRequest(ROCK, "", seed=3)], None, 4)[0].raw


def test_the_waiting_queue_is_bounded(tiny_generator):
    engine = DecodeEngine(tiny_generator, slots=1, max_waiting=2)
    streams = [engine.submit(GenerationRequest(ROCK, "", seed=i), None, 3) for i in range(2)]
    with pytest.raises(ResourceExhausted, match="bound is 2"):
        engine.submit(GenerationRequest(ROCK, "", seed=9), None, 3)
    assert engine.counters.rejected == 1 and engine.counters.waiting == 2
    engine.run_until_idle()
    assert all(s.result(timeout=0).raw for s in streams)
    assert engine.generate([GenerationRequest(ROCK, "", seed=9)], None, 3)[0].raw


def test_dropping_the_generator_and_engine_frees_the_model(tiny_model_dir):
    from pitchkeras.model import load_model

    generator = Generator(load_model(tiny_model_dir), batch_size=2, max_new_tokens=4)
    engine = DecodeEngine(generator, slots=2)
    engine.start()
    stream = engine.submit(GenerationRequest(ROCK, "", seed=1), None, 4)
    assert stream.result(timeout=120).raw
    engine.close()
    freed = weakref.ref(generator._backbone)
    del generator, engine, stream
    for _ in range(3):  # cycles through tf.function closures may take more than one pass
        gc.collect()
    assert freed() is None, [type(r).__name__ for r in gc.get_referrers(freed())]


# -- through the server -------------------------------------------------------------------------------------


class Gate:
    """Holds the engine thread before each step until steps are let through, one `allow()` each."""

    def __init__(self, engine, monkeypatch):
        self._permits = threading.Semaphore(0)
        self.open = False
        step = engine.step

        def gated():
            if not self.open:
                self._permits.acquire()
            return step()

        monkeypatch.setattr(engine, "step", gated)

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._permits.release()

    def release(self) -> None:
        self.open = True
        self.allow(1000)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_generator):
    with ready_server(tmp_path_factory.mktemp("faults"), tiny_generator, CONFIG, http_port=0) as background:
        # Compile the shapes the gated tests meet (BODY's length, one row) before any gate counts steps: a shape
        # compiling off the engine thread would use up a test's allowed steps while its request waits for it.
        with grpc.insecure_channel(f"localhost:{background.port}") as channel:
            pb_grpc.ReviewServiceStub(channel).Generate(pb.GenerateRequest(**BODY), timeout=120)
        yield background


@pytest.fixture
def gate(served, monkeypatch):
    engine = served.server.model.batcher.engine
    assert wait_for(lambda: engine.counters.active == 0 and engine.counters.waiting == 0)
    gate = Gate(engine, monkeypatch)
    yield gate
    gate.release()
    assert wait_for(lambda: engine.counters.active == 0 and engine.counters.waiting == 0)


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(f"localhost:{served.port}") as channel:
        yield pb_grpc.ReviewServiceStub(channel)


def still_serving(stub) -> None:
    (review,) = stub.Generate(pb.GenerateRequest(score=8.0, genre="Rock", seed=3, max_length=4), timeout=60).reviews
    assert review.raw


def test_a_full_queue_answers_resource_exhausted_and_429_with_retry_after(served, gate, stub):
    counters = served.server.model.batcher.engine.counters
    waiting = [stub.Generate.future(pb.GenerateRequest(score=8.0, genre="Rock", seed=s, max_length=4), timeout=60)
               for s in (1, 2)]
    assert wait_for(lambda: counters.waiting == 2)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(score=8.0, genre="Rock", seed=9, max_length=4), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(caught.value.trailing_metadata())["retry-after"] == "1"
    request = urllib.request.Request(f"http://127.0.0.1:{served.http_port}/v1/reviews:generate",
                                     data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
    assert json.loads(refused.value.read())["error"]["status"] == "RESOURCE_EXHAUSTED"
    gate.release()
    assert all(len(call.result().reviews) == 1 for call in waiting)
    still_serving(stub)


def test_a_grpc_deadline_cancels_the_row(served, gate, stub):
    counters = served.server.model.batcher.engine.counters
    cancelled, prefills = counters.cancelled, counters.prefills
    call = stub.Generate.future(pb.GenerateRequest(score=8.0, genre="Rock", seed=4, max_length=40), timeout=1.5)
    gate.allow(3)  # joins, decodes two tokens
    assert wait_for(lambda: counters.prefills == prefills + 1)
    with pytest.raises(grpc.RpcError) as caught:
        call.result()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.allow(2)  # the next step boundary: the row leaves
    assert wait_for(lambda: counters.cancelled == cancelled + 1 and counters.active == 0), counters
    gate.release()
    still_serving(stub)


def raw_http(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path", ["/v1/reviews:generate", "/v1/reviews:streamGenerate"], ids=["unary", "stream"])
def test_an_http_client_hanging_up_cancels_its_row(served, gate, stub, path):
    engine = served.server.model.batcher.engine
    counters = engine.counters
    cancelled, prefills, finished = counters.cancelled, counters.prefills, counters.finished
    sock = raw_http(served.http_port, path, BODY)
    gate.allow(3)
    assert wait_for(lambda: counters.prefills == prefills + 1 and counters.active == 1)
    if "stream" in path:
        received = b""
        while b"data:" not in received:  # the stream has started (the headers may come in a segment of their own)
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    sock.close()
    # The server notices the hang-up and cancels the stream: seen on its row while the gate holds the steps, or
    # already counted when the engine was still running its allowed steps as the hang-up landed (a loaded machine).
    assert wait_for(lambda: counters.cancelled == cancelled + 1
                    or any(row and row.stream.expired(0) for row in engine._rows))
    gate.allow(2)
    assert wait_for(lambda: counters.cancelled == cancelled + 1 and counters.active == 0), counters
    assert counters.finished == finished
    gate.release()
    still_serving(stub)

