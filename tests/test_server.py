"""The gRPC server in-process (port 0): every RPC, the error table, health, reflection, shutdown, batching, keys."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pitchkeras.errors import Unavailable
from pitchkeras.server import ApiKeys, BackgroundServer, ServerConfig
from pitchkeras.store import open_store
from pitchkeras.store.base import GENERATED_ID_RE
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import SERVER_CONFIG, FlakyStore, pool_reviews, ready_server, self_signed_cert
from tests.store_fixtures import write_like_the_seed

C = grpc.StatusCode
CONFIG = SERVER_CONFIG


@pytest.fixture
def server(pool_uri):
    with BackgroundServer(pool_uri, config=CONFIG) as background:
        yield background


def _stub(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.ReviewServiceStub(channel)


@pytest.fixture
def stub(server):
    channel, stub = _stub(server.port)
    yield stub
    channel.close()


def _code(call, request, **kwargs):
    try:
        call(request, timeout=30, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return C.OK, ""


# -- happy paths -----------------------------------------------------------------------------------


def test_get_review_hands_out_the_least_shown_and_counts_it(stub):
    matching = {r.id for r in pool_reviews() if r.score == 8.0 and r.genre == "Rock"}
    first = stub.GetReview(pb.GetReviewRequest(score=8.0, genre="Rock"), timeout=10).review
    second = stub.GetReview(pb.GetReviewRequest(score=8.0, genre="Rock"), timeout=10).review
    assert {first.id, second.id} == matching  # both shown once before any repeats
    assert first.selection_count == second.selection_count == 1
    third = stub.GetReview(pb.GetReviewRequest(score=8.0, genre="Rock"), timeout=10).review
    assert third.selection_count == 2
    assert first.score == 8.0 and first.genre == "Rock" and first.text.startswith("A Rock record")
    assert first.model_version == "pool-v1" and first.HasField("added") and first.top_p == pytest.approx(0.95)


def test_get_review_filters_are_optional_and_genre_is_case_insensitive(stub):
    assert stub.GetReview(pb.GetReviewRequest(genre="jAZZ"), timeout=10).review.genre == "Jazz"
    assert stub.GetReview(pb.GetReviewRequest(score=3.0), timeout=10).review.score == 3.0
    assert GENERATED_ID_RE.match(stub.GetReview(pb.GetReviewRequest(), timeout=10).review.id)


def test_get_by_id_returns_every_field_and_does_not_count(stub):
    expected = pool_reviews()[0]
    for _ in range(2):
        review = stub.GetById(pb.GetByIdRequest(id=expected.id), timeout=10).review
    assert review.selection_count == 0
    assert (review.id, review.text, review.score, review.genre, review.seed, review.prompt, review.length) == (
        expected.id, expected.text, expected.score, expected.genre, expected.seed, expected.prompt, expected.length)


# -- the error table ---------------------------------------------------------------------------------

UNKNOWN_ID = "0" * 24
BAD_INPUTS = [
    ("GetReview", pb.GetReviewRequest(score=10.5), C.INVALID_ARGUMENT, "[0, 10]"),
    ("GetReview", pb.GetReviewRequest(score=-0.1), C.INVALID_ARGUMENT, "[0, 10]"),
    ("GetReview", pb.GetReviewRequest(score=math.nan), C.INVALID_ARGUMENT, "[0, 10]"),
    ("GetReview", pb.GetReviewRequest(genre="Polka"), C.INVALID_ARGUMENT, "Jazz, Rap, Rock"),
    ("GetReview", pb.GetReviewRequest(genre="  "), C.INVALID_ARGUMENT, "genre must not be empty"),
    ("GetReview", pb.GetReviewRequest(score=5.0), C.NOT_FOUND, "score=5.0"),
    ("GetReview", pb.GetReviewRequest(score=5.0, genre="rock"), C.NOT_FOUND, "no review matches"),
    ("GetById", pb.GetByIdRequest(id="no such/id"), C.INVALID_ARGUMENT, "1 to 128 characters"),
    ("GetById", pb.GetByIdRequest(id="x" * 129), C.INVALID_ARGUMENT, "malformed"),
    ("GetById", pb.GetByIdRequest(id="kx3Rq9ZbT0aWmPp2LsYe"), C.NOT_FOUND, "kx3Rq9ZbT0aWmPp2LsYe"),  # a Firestore auto id
    ("GetById", pb.GetByIdRequest(id=""), C.INVALID_ARGUMENT, "malformed"),
    ("GetById", pb.GetByIdRequest(id=UNKNOWN_ID), C.NOT_FOUND, UNKNOWN_ID),
    ("Generate", pb.GenerateRequest(score=8.0, genre="Rock"), C.FAILED_PRECONDITION, "--model"),
]


@pytest.mark.parametrize("method, request_, code, message", BAD_INPUTS,
                         ids=[f"{m}-{c.name}-{i}" for i, (m, _, c, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_get_their_documented_code(stub, method, request_, code, message):
    got, details = _code(getattr(stub, method), request_)
    assert got == code, details
    assert message in details


def test_oversized_requests_are_refused(stub):
    # ServerConfig.max_receive_bytes (1 MiB): grpc core refuses before any handler runs.
    code, details = _code(stub.GetById, pb.GetByIdRequest(id="a" * (2 << 20)))
    assert code == C.RESOURCE_EXHAUSTED, details


def test_an_empty_store_is_not_found_for_any_genre(tmp_path):
    with BackgroundServer(f"sqlite:///{tmp_path}/empty.db", config=CONFIG) as background:
        channel, stub = _stub(background.port)
        code, details = _code(stub.GetReview, pb.GetReviewRequest(genre="Rap"))
        channel.close()
    assert code == C.NOT_FOUND and "no review matches" in details, details


def test_store_failure_is_unavailable_never_unknown(pool_uri):
    store = open_store(pool_uri)
    with BackgroundServer(store, config=CONFIG) as background:
        channel, stub = _stub(background.port)
        store.close()  # the backend goes away under a running server
        for method, request in (("GetReview", pb.GetReviewRequest()), ("GetById", pb.GetByIdRequest(id=UNKNOWN_ID))):
            code, details = _code(getattr(stub, method), request)
            assert code == C.UNAVAILABLE and "closed" in details, (method, code, details)
        channel.close()


class BrokenStore(FlakyStore):
    def get_review(self, **kwargs):
        raise ZeroDivisionError("a bug, not a domain error")


def test_unexpected_exceptions_are_internal_with_a_logged_traceback(tmp_path, caplog):
    with BackgroundServer(BrokenStore(str(tmp_path / "b.db"), method="none", fail_next=0), config=CONFIG) as bg:
        channel, stub = _stub(bg.port)
        with caplog.at_level(logging.INFO):
            code, details = _code(stub.GetReview, pb.GetReviewRequest())
        channel.close()
    assert code == C.INTERNAL and "server log" in details
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    # The access log line: method, status, latency.
    assert any("/pitchkeras.v1.ReviewService/GetReview INTERNAL" in r.getMessage() and " ms" in r.getMessage()
               for r in caplog.records)


# -- health, reflection, shutdown ------------------------------------------------------------------


def _health(port, service=""):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    finally:
        channel.close()


def test_health_serves_at_once_without_a_model(server):
    assert _health(server.port) == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.port, "pitchkeras.v1.ReviewService") == health_pb2.HealthCheckResponse.SERVING


class GatedWarmup:
    """Wraps a generator so warm-up blocks until the test opens the gate (warm-ups start from `example_prompt`)."""

    def __init__(self, generator):
        self.generator, self.gate = generator, threading.Event()

    def example_prompt(self):
        assert self.gate.wait(60), "test never opened the warm-up gate"
        return self.generator.example_prompt()

    def __getattr__(self, name):
        return getattr(self.generator, name)


@pytest.mark.slow
def test_health_is_not_serving_until_the_model_is_warm(pool_uri, tiny_generator):
    gated = GatedWarmup(tiny_generator)
    config = ServerConfig(**{**CONFIG.__dict__, "warmup": True})
    with BackgroundServer(pool_uri, generator=gated, config=config) as bg:
        assert _health(bg.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        channel, stub = _stub(bg.port)
        code, details = _code(stub.Generate, pb.GenerateRequest(score=8.0, genre="Rock"))
        assert code == C.UNAVAILABLE and "warming up" in details
        assert stub.GetReview(pb.GetReviewRequest(), timeout=10).review.id  # stored reviews still served
        gated.gate.set()
        assert bg.wait_until_ready(60) == "ready"
        assert _health(bg.port) == health_pb2.HealthCheckResponse.SERVING
        channel.close()


def test_reflection_lists_and_describes_the_service(server):
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "pitchkeras.v1.ReviewService" in database.get_services()
    assert "grpc.health.v1.Health" in database.get_services()
    service = descriptor_pool.DescriptorPool(database).FindServiceByName("pitchkeras.v1.ReviewService")
    assert [m.name for m in service.methods] == ["GetReview", "GetById", "Generate", "StreamGenerate", "ListConditions"]
    channel.close()


def test_graceful_shutdown_finishes_in_flight_calls(tmp_path):
    store = FlakyStore(str(tmp_path / "slow.db"), method="get_by_id", fail_next=0, delay_s=0.5)
    store.add_reviews(pool_reviews())
    ids = [r.id for r in pool_reviews()][:8]
    background = BackgroundServer(store, config=CONFIG).start()
    channel, stub = _stub(background.port)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(stub.GetById, pb.GetByIdRequest(id=i), timeout=30) for i in ids]
        assert store.wait_for_calls(len(ids)) == len(ids)  # all 8 are inside the store
        stopper = threading.Thread(target=background.stop, kwargs={"grace": 10.0})
        stopper.start()
        # Health flips to NOT_SERVING before anything else.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert [c.result().review.id for c in calls] == ids  # no in-flight call lost
        stopper.join(30)
    code, _ = _code(stub.GetById, pb.GetByIdRequest(id=ids[0]))
    assert code == C.UNAVAILABLE  # nobody listens any more
    channel.close()


def test_64_concurrent_get_review_calls_never_share_a_review(tmp_path):
    from pitchkeras.store import Review, review_id

    uri = f"sqlite:///{tmp_path}/64.db"
    with open_store(uri) as store:
        store.add_reviews([Review(id=review_id("v", {"score": 7.0}, 0, i), text=f"Number {i}.", score=7.0,
                                  genre="Rock") for i in range(64)])
    with BackgroundServer(uri, config=CONFIG) as background:
        channel, stub = _stub(background.port)
        barrier = threading.Barrier(64)

        def pick(_):
            barrier.wait(30)
            return stub.GetReview(pb.GetReviewRequest(score=7.0), timeout=60).review

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            picked = list(pool.map(pick, range(64)))
        channel.close()
    assert len({r.id for r in picked}) == 64
    assert {r.selection_count for r in picked} == {1}


# -- API keys and TLS ----------------------------------------------------------------------------


def test_api_keys_guard_generate_with_a_rate_limit(pool_uri, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# service keys\nalpha-key\n\nbeta-key  # ops\n")
    now = [100.0]
    keys = ApiKeys.from_file(str(key_file), rate=1.0, burst=2, clock=lambda: now[0])
    with BackgroundServer(pool_uri, config=CONFIG, api_keys=keys) as background:
        channel, stub = _stub(background.port)
        request = pb.GenerateRequest(score=8.0, genre="Rock")
        assert _code(stub.Generate, request)[0] == C.UNAUTHENTICATED
        assert _code(stub.Generate, request, metadata=(("x-api-key", "gamma-key"),))[0] == C.PERMISSION_DENIED
        beta = (("x-api-key", "beta-key"),)
        # Past the key check, this server has no model: the key was accepted.
        assert [_code(stub.Generate, request, metadata=beta)[0] for _ in range(3)] == [
            C.FAILED_PRECONDITION, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED]
        assert _code(stub.Generate, request, metadata=(("authorization", "Bearer alpha-key"),))[0] == (
            C.FAILED_PRECONDITION)  # each key has its own bucket
        now[0] += 1.0  # one second refills one token
        assert _code(stub.Generate, request, metadata=beta)[0] == C.FAILED_PRECONDITION
        assert stub.GetReview(pb.GetReviewRequest(), timeout=10).review.id  # reads need no key
        channel.close()


def test_tls(pool_uri, tmp_path):
    from pitchkeras.client import ReviewClient

    cert, key = self_signed_cert(tmp_path)
    with BackgroundServer(pool_uri, host="localhost", config=CONFIG, tls_cert=cert.read_bytes(),
                          tls_key=key.read_bytes()) as background:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with ReviewClient(f"localhost:{background.port}", credentials=credentials) as client:
            assert client.get_review(genre="Rap").genre == "Rap"
        # A plaintext client cannot talk to a TLS server: the handshake fails, the call is UNAVAILABLE.
        with ReviewClient(f"localhost:{background.port}", timeout=5.0) as plaintext:
            with pytest.raises(Unavailable):
                plaintext.get_review()


# -- Generate on a real (tiny) model -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, tiny_generator):
    with ready_server(tmp_path_factory.mktemp("gen"), tiny_generator, CONFIG) as background:
        yield background


GENERATE_BAD_INPUTS = [
    (dict(score=8.0, genre="Rock", max_length=0), "max_length must be in [1, 16]"),
    (dict(score=8.0, genre="Rock", max_length=17), "max_length must be in [1, 16]"),
    (dict(score=8.0, genre="Rock", num_samples=0), "num_samples must be in [1, 4]"),
    (dict(score=8.0, genre="Rock", num_samples=5), "num_samples must be in [1, 4]"),
    (dict(score=8.0, genre="Rock", temperature=0.0), "temperature must be in (0, 2]"),
    (dict(score=8.0, genre="Rock", temperature=2.5), "temperature must be in (0, 2]"),
    (dict(score=8.0, genre="Rock", temperature=math.nan), "temperature"),
    (dict(score=8.0, genre="Rock", top_p=0.0), "top_p must be in (0, 1]"),
    (dict(score=8.0, genre="Rock", top_p=1.5), "top_p must be in (0, 1]"),
    (dict(score=8.0, genre="Rock", top_k=-1), "top_k must be >= 0"),
    (dict(score=8.0, genre="Rock", repetition_penalty=0.0), "repetition_penalty must be in (0, 10]"),
    (dict(score=8.0, genre="Rock", no_repeat_ngram_size=-2), "no_repeat_ngram_size must be >= 0"),
    (dict(score=8.0, genre="Rock", seed=-1), "seed must be in"),
    (dict(score=8.0, genre="Rock", prompt="x" * 41), "at most 40"),
    (dict(score=11.0, genre="Rock"), "[0, 10]"),
    (dict(score=8.0, genre="Polka"), "known: Rock, Jazz, Rap"),
    (dict(genre="Rock"), "missing condition(s) score"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fields, message", GENERATE_BAD_INPUTS, ids=[m for _, m in GENERATE_BAD_INPUTS])
def test_generate_bad_inputs_are_invalid_argument(model_server, fields, message):
    channel, stub = _stub(model_server.port)
    code, details = _code(stub.Generate, pb.GenerateRequest(**fields))
    channel.close()
    assert code == C.INVALID_ARGUMENT and message in details, details


@pytest.mark.slow
def test_generate_stores_and_is_deterministic(model_server):
    channel, stub = _stub(model_server.port)
    request = pb.GenerateRequest(score=8.0, genre="rock", seed=11, num_samples=4, store=True, temperature=0.9)
    first = stub.Generate(request, timeout=120).reviews
    again = stub.Generate(request, timeout=120).reviews
    assert [g.raw for g in first] == [g.raw for g in again]  # same request + seed -> same text
    assert [g.review.seed for g in first] == [11, 12, 13, 14]
    accepted = [g for g in first if g.status == pb.SAMPLE_STATUS_ACCEPTED]
    assert accepted, [g.rejection_reason for g in first]
    for item in first:
        assert item.review.genre == "Rock" and item.review.score == 8.0  # respelt as the model knows it
        assert item.review.model_version == "tiny-test-v1" and item.review.temperature == pytest.approx(0.9)
        assert item.raw.startswith("8.0\nRock\n")
        if item.status == pb.SAMPLE_STATUS_ACCEPTED:
            assert item.stored and GENERATED_ID_RE.match(item.review.id) and item.review.HasField("added")
            stored = stub.GetById(pb.GetByIdRequest(id=item.review.id), timeout=10).review
            assert stored.text == item.review.text and stored.seed == item.review.seed
        else:
            assert not item.stored and not item.review.id and item.rejection_reason
    assert [g.review.id for g in first] == [g.review.id for g in again]  # ids are deterministic too
    not_stored = stub.Generate(pb.GenerateRequest(score=8.0, genre="Rock", seed=11, num_samples=1), timeout=120)
    assert not not_stored.reviews[0].stored and not not_stored.reviews[0].review.id
    channel.close()


@pytest.mark.slow
def test_generate_repetition_settings_are_used_and_stored(model_server):
    channel, stub = _stub(model_server.port)
    plain = pb.GenerateRequest(score=8.0, genre="Rock", seed=21, num_samples=4, store=True)
    guarded = pb.GenerateRequest(score=8.0, genre="Rock", seed=21, num_samples=4, store=True,
                                 repetition_penalty=1.5, no_repeat_ngram_size=2)
    without = stub.Generate(plain, timeout=120).reviews
    with_guards = stub.Generate(guarded, timeout=120).reviews
    assert [g.raw for g in with_guards] != [g.raw for g in without]  # the settings reach the sampler
    for item in with_guards:
        assert item.review.repetition_penalty == pytest.approx(1.5) and item.review.no_repeat_ngram_size == 2
        if item.stored:
            stored = stub.GetById(pb.GetByIdRequest(id=item.review.id), timeout=10).review
            assert (stored.repetition_penalty, stored.no_repeat_ngram_size) == (1.5, 2)
            assert item.review.id not in {g.review.id for g in without}  # other settings, other ids
    assert all((g.review.repetition_penalty, g.review.no_repeat_ngram_size) == (1.0, 0) for g in without)
    channel.close()


@pytest.mark.slow
def test_concurrent_generate_calls_share_the_engine_steps(model_server):
    counters = model_server.server.model.batcher.engine.counters
    channel, stub = _stub(model_server.port)
    together = stub.Generate(pb.GenerateRequest(score=3.0, genre="Jazz", seed=40, num_samples=4), timeout=120)
    steps, row_steps = counters.steps, counters.row_steps
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        singles = list(pool.map(
            lambda i: stub.Generate(pb.GenerateRequest(score=3.0, genre="Jazz", seed=40 + i), timeout=120),
            range(4)))
    channel.close()
    # Four calls of at most 8 tokens each: rows shared steps (fewer steps than rows decoded).
    assert counters.row_steps - row_steps > counters.steps - steps
    # A row's output does not depend on its batch mates or on when it joined.
    assert [s.reviews[0].raw for s in singles] == [g.raw for g in together.reviews]


# -- Firestore, on Google's emulator -----------------------------------------------------------------


def test_serve_a_seed_written_firestore_collection_under_16_concurrent_clients(firestore_store):
    """16 clients x 8 GetReview on one pair of a collection the seed's script wrote: no error, level counts."""
    ids = write_like_the_seed(firestore_store, [(8.0, "Rap", f"Seed review number {i}. It is fine.")
                                                for i in range(3)] + [(8.0, "Rock", "Another pair.")])
    uri = f"firestore://pitchkeras-test/{firestore_store.collection_name}"
    errors, picked = [], []
    with BackgroundServer(uri, config=CONFIG) as background:
        channel, stub = _stub(background.port)
        with channel:
            barrier = threading.Barrier(16)

            def client():
                barrier.wait()
                for _ in range(8):
                    try:
                        picked.append(stub.GetReview(pb.GetReviewRequest(score=8.0, genre="rap"), timeout=30).review.id)
                    except grpc.RpcError as err:
                        errors.append(err.code())

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                for future in [pool.submit(client) for _ in range(16)]:
                    future.result()
            permalink = stub.GetById(pb.GetByIdRequest(id=ids[3]), timeout=10).review
    assert errors == [] and len(picked) == 128
    assert sorted(collections.Counter(picked).values()) == [42, 43, 43]  # spread 1 over the pair's 3 reviews
    assert (permalink.id, permalink.text, permalink.genre, permalink.selection_count) == (
        ids[3], "Another pair.", "Rock", 0)
