"""The Python client, `pitchkeras client`, `pitchkeras serve` in a subprocess, and the Node.js client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pitchkeras.cli import main
from pitchkeras.client import ReviewClient, ServiceError
from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pitchkeras.server import ApiKeys, BackgroundServer
from pitchkeras.store.base import GENERATED_ID_RE
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import SERVER_CONFIG, FlakyStore, pool_reviews, ready_server, self_signed_cert

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_ID = "0" * 24
C = grpc.StatusCode


@pytest.fixture
def server(pool_uri):
    with BackgroundServer(pool_uri, config=SERVER_CONFIG) as background:
        yield background


@pytest.fixture
def target(server):
    return f"127.0.0.1:{server.port}"


def _free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- import cost ---------------------------------------------------------------------------------

HEAVY = ("tensorflow", "keras", "keras_hub", "jax", "torch")


@pytest.mark.parametrize("code", [
    "import pitchkeras.client",
    "import pitchkeras.cli; pitchkeras.cli.build_parser(); import pitchkeras.commands.client",
])
def test_client_imports_no_tensorflow(code):
    # A fresh interpreter: this test process has TensorFlow loaded already by other tests.
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "grpc" in loaded or "pitchkeras" in loaded  # the probe really imported something
    assert not loaded & set(HEAVY), f"`{code}` imported {sorted(loaded & set(HEAVY))}"


# -- ReviewClient --------------------------------------------------------------------------------


def test_client_returns_review_records(target):
    with ReviewClient(target, timeout=10) as client:
        picked = client.get_review(score=8, genre="rap")
        assert (picked.score, picked.genre, picked.selection_count) == (8.0, "Rap", 1)
        assert GENERATED_ID_RE.match(picked.id) and picked.added is not None and picked.added.tzinfo is not None
        again = client.get_by_id(picked.id)
        assert again.selection_count == 1  # the permalink does not count as shown
        expected = next(r for r in pool_reviews() if r.id == picked.id)
        assert (again.text, again.seed, again.top_p, again.prompt, again.model_version) == (
            expected.text, expected.seed, expected.top_p, expected.prompt, expected.model_version)


@pytest.mark.parametrize("call, error, code, message", [
    (lambda c: c.get_review(score=11), InvalidArgument, C.INVALID_ARGUMENT, "[0, 10]"),
    (lambda c: c.get_review(genre="Polka"), InvalidArgument, C.INVALID_ARGUMENT, "Jazz, Rap, Rock"),
    (lambda c: c.get_review(score=5), NotFound, C.NOT_FOUND, "no review matches"),
    (lambda c: c.get_by_id("x/y z"), InvalidArgument, C.INVALID_ARGUMENT, "malformed"),
    (lambda c: c.get_by_id(UNKNOWN_ID), NotFound, C.NOT_FOUND, UNKNOWN_ID),
    (lambda c: c.generate(score=8, genre="Rock"), FailedPrecondition, C.FAILED_PRECONDITION, "--model"),
], ids=["score", "genre", "no-match", "malformed-id", "unknown-id", "no-model"])
def test_client_raises_library_errors_with_the_status(target, call, error, code, message):
    with ReviewClient(target) as client:
        with pytest.raises(error) as raised:
            call(client)
    assert raised.value.code == code and message in raised.value.details
    assert str(raised.value).startswith(f"{code.name}: ")


def test_get_by_id_is_retried_on_unavailable(tmp_path):
    store = FlakyStore(str(tmp_path / "flaky.db"), method="get_by_id", fail_next=1)
    store.add_reviews(pool_reviews())
    wanted = pool_reviews()[3].id
    with BackgroundServer(store, config=SERVER_CONFIG) as background, \
            ReviewClient(f"127.0.0.1:{background.port}") as client:
        assert client.get_by_id(wanted).id == wanted
    assert store.calls == 2  # one injected outage, one retry


def test_get_review_is_never_retried(tmp_path):
    store = FlakyStore(str(tmp_path / "flaky.db"), method="get_review", fail_next=1)
    store.add_reviews(pool_reviews())
    with BackgroundServer(store, config=SERVER_CONFIG) as background, \
            ReviewClient(f"127.0.0.1:{background.port}") as client:
        with pytest.raises(Unavailable, match="injected outage"):
            client.get_review()
        assert store.calls == 1  # a retry could count a review as shown twice
        assert client.get_review().selection_count == 1  # the caller decides to try again
    assert store.calls == 2


@pytest.fixture
def black_hole():
    """A port that accepts TCP connections and never answers: only a deadline ends a call to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("method", ["get_review", "get_by_id", "generate"])
def test_every_call_has_a_deadline(black_hole, method):
    args = {"get_review": (), "get_by_id": (UNKNOWN_ID,), "generate": ()}[method]
    with ReviewClient(black_hole, timeout=0.5, generate_timeout=0.5) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The future's timeout only keeps a missing deadline from hanging the suite.
            outcome = pool.submit(_raised, getattr(client, method), *args).result(timeout=60)
    assert isinstance(outcome, ServiceError) and outcome.code == C.DEADLINE_EXCEEDED, outcome


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - returned for the assertion
        return err
    return None


def test_api_key_is_sent_on_generate(pool_uri):
    keys = ApiKeys(["k-1"], rate=100.0, burst=10)
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, api_keys=keys) as background:
        target = f"127.0.0.1:{background.port}"
        with ReviewClient(target) as anonymous:
            with pytest.raises(ServiceError) as raised:
                anonymous.generate(score=8, genre="Rock")
            assert raised.value.code == C.UNAUTHENTICATED
        with ReviewClient(target, api_key="k-1") as keyed:
            with pytest.raises(FailedPrecondition):  # past the key check; this server has no model
                keyed.generate(score=8, genre="Rock")


def test_timeouts_must_be_positive():
    with pytest.raises(InvalidArgument, match="timeouts must be > 0"):
        ReviewClient("127.0.0.1:1", timeout=0)


# -- `pitchkeras client` -------------------------------------------------------------------------


def _cli(capsys, *argv):
    """Run `pitchkeras ARGV` in-process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_get_review_and_get_print_the_review(capsys, target):
    code, out, err = _cli(capsys, "client", "get-review", "--target", target, "--score", "8", "--genre", "Jazz")
    assert code == 0, err
    header, text = out.rstrip("\n").split("\n")
    assert header.startswith("id ") and "score 8.0 | genre Jazz | shown 1x | model pool-v1" in header
    assert text.startswith("A Jazz record at 8.0.")
    review_id = header.split()[1]
    code, out, err = _cli(capsys, "client", "get", review_id, "--target", target, "--json")
    assert code == 0, err
    (line,) = out.splitlines()
    record = json.loads(line)
    assert record["id"] == review_id and record["genre"] == "Jazz" and record["selection_count"] == 1
    assert record["text"] == text


@pytest.mark.parametrize("argv, message", [
    (["get-review", "--score", "11"], "INVALID_ARGUMENT: score must be in [0, 10], got 11.0"),
    (["get-review", "--genre", "Polka"], "INVALID_ARGUMENT: unknown genre 'Polka'"),
    (["get-review", "--score", "5"], "NOT_FOUND: no review matches"),
    (["get", "x/y"], "INVALID_ARGUMENT: malformed review id 'x/y'"),
    (["get", UNKNOWN_ID], f"NOT_FOUND: no review with id {UNKNOWN_ID}"),
    (["generate", "--score", "8", "--genre", "Rock"], "FAILED_PRECONDITION: this server has no model"),
    (["get-review", "--ca-cert", "missing.pem"], "missing.pem: no such file"),
    (["get-review", "--score", "loud"], "argument --score: invalid float value: 'loud'"),
], ids=["score", "genre", "not-found", "malformed-id", "unknown-id", "no-model", "ca-cert", "argparse"])
def test_cli_errors_are_one_line_and_exit_2(capsys, target, argv, message):
    action, *rest = argv
    code, out, err = _cli(capsys, "client", action, "--target", target, *rest)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_cli_reports_an_unreachable_server(capsys):
    code, out, err = _cli(capsys, "client", "get", UNKNOWN_ID, "--target", f"127.0.0.1:{_free_port()}",
                          "--timeout", "5")
    assert code == 2 and len(err.splitlines()) == 1 and "UNAVAILABLE" in err, err


def test_cli_connects_with_tls(capsys, pool_uri, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with BackgroundServer(pool_uri, host="localhost", config=SERVER_CONFIG, tls_cert=cert.read_bytes(),
                          tls_key=key.read_bytes()) as background:
        code, out, err = _cli(capsys, "client", "get-review", "--target", f"localhost:{background.port}",
                              "--ca-cert", str(cert), "--genre", "Rock", "--json")
    assert code == 0, err
    assert json.loads(out)["genre"] == "Rock"


@pytest.fixture(scope="module")
def model_target(tmp_path_factory, tiny_generator):
    with ready_server(tmp_path_factory.mktemp("cli-gen"), tiny_generator) as background:
        yield f"127.0.0.1:{background.port}"


@pytest.mark.slow
def test_cli_generate(capsys, model_target):
    # Four samples, then one: the batch shapes tests/test_server.py compiles too.
    code, out, err = _cli(capsys, "client", "generate", "--target", model_target, "--score", "8", "--genre", "rock",
                          "--seed", "5", "--nsamples", "4", "--temperature", "0.9", "--store", "--json")
    assert code == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    assert [i["review"]["seed"] for i in items] == [5, 6, 7, 8]
    assert all(i["review"]["genre"] == "Rock" and i["raw"].startswith("8.0\nRock\n") for i in items)
    stored = [i for i in items if i["stored"]]
    assert stored and all(i["accepted"] and GENERATED_ID_RE.match(i["review"]["id"]) for i in stored)
    code, out, err = _cli(capsys, "client", "get", stored[0]["review"]["id"], "--target", model_target, "--json")
    assert code == 0 and json.loads(out)["text"] == stored[0]["review"]["text"]

    code, out, err = _cli(capsys, "client", "generate", "--target", model_target, "--score", "3", "--genre", "Jazz",
                          "--seed", "1")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("(not stored) | score 3.0 | genre Jazz") or first.startswith("(rejected: "), out

    code, out, err = _cli(capsys, "client", "generate", "--target", model_target, "--score", "3", "--genre", "Jazz",
                          "--temperature", "3")
    assert code == 2 and "INVALID_ARGUMENT: temperature must be in (0, 2], got 3.0" in err


# -- `pitchkeras serve` in its own process --------------------------------------------------------


def _pitchkeras(*argv, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pitchkeras.cli", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _read_line(stream, timeout: float) -> str:
    """The next line of a child's output, or '' if none comes in time."""
    box = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def test_serve_and_client_processes_with_graceful_sigterm(pool_uri):
    db = pool_uri[len("sqlite:///"):]
    server = _pitchkeras("serve", "--store", pool_uri, "--port", "0", "--grace", "20")
    try:
        line = _read_line(server.stdout, 60)
        assert line.startswith("serving on 127.0.0.1:"), (line, server.stderr.read() if server.poll() else "")
        target = line.split()[-1]

        # Another shell: `pitchkeras client get-review`.
        client = subprocess.run([sys.executable, "-m", "pitchkeras.cli", "client", "get-review", "--target", target,
                                 "--score", "8", "--genre", "Rap", "--json"], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout)["genre"] == "Rap"

        channel = grpc.insecure_channel(target)
        stub = pb_grpc.ReviewServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        # Hold SQLite's write lock from here, so the server's next pick waits inside the store.
        lock = sqlite3.connect(db, isolation_level=None, timeout=10)
        lock.execute("BEGIN IMMEDIATE")
        in_flight = stub.GetReview.future(pb.GetReviewRequest(genre="Jazz"), timeout=60)
        # Same connection, sent later: once this read (WAL, no lock) is answered, the server has the pick too.
        assert stub.GetById(pb.GetByIdRequest(id=pool_reviews()[0].id), timeout=30).review.id
        assert not in_flight.done()

        server.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # health flips first
        watch.cancel()  # an open Watch stream is an in-flight call too: it would hold shutdown for the grace
        lock.execute("ROLLBACK")
        lock.close()
        assert in_flight.result().review.genre == "Jazz"  # the in-flight call finished
        assert server.wait(30) == 0
        assert "shutting down" in server.stderr.read()
        channel.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_rejects_bad_flags_in_one_line(tmp_path, cli):
    code, _, err = cli("serve", "--store", f"sqlite:///{tmp_path}/x.db", "--port", "70000")
    assert code == 2 and err.strip() == "pitchkeras serve: error: --port must be in [0, 65535], got 70000"


# -- Node.js ------------------------------------------------------------------------------------

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="session")
def node_client():
    """tests/node with its npm dependencies installed (`npm ci` from the lock file on first use)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node.js client test)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "proto-loader").is_dir():
        npm = shutil.which("npm")
        result = None if npm is None else subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, capture_output=True,
            text=True, timeout=600)
        if result is None or result.returncode != 0:
            why = "npm is not installed" if result is None else (result.stderr.strip().splitlines() or ["?"])[-1]
            message = f"cannot install the Node.js client's dependencies (cd tests/node && npm ci): {why}"
            if os.environ.get("CI"):
                pytest.fail(message)  # CI reaches the npm registry: a failure there is a real one
            pytest.skip(message)
    return NODE_DIR / "client.js"


def test_node_client_calls_the_python_server(target, node_client):
    def node(*args):
        result = subprocess.run(["node", str(node_client), target, *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode in (0, 1), result.stderr
        return result.returncode, json.loads(result.stdout)

    code, picked = node("get-review", "--score", "3", "--genre", "rap")
    assert code == 0 and picked["method"] == "GetReview", picked
    review = picked["review"]
    assert (review["score"], review["genre"], review["selection_count"]) == (3.0, "Rap", 1)
    expected = next(r for r in pool_reviews() if r.id == review["id"])
    assert review["text"] == expected.text and review["prompt"] == expected.prompt and review["top_p"] == 0.95
    assert review["added"].endswith("Z")

    code, same = node("get", review["id"])
    assert code == 0 and same["review"]["id"] == review["id"] and same["review"]["selection_count"] == 1

    code, missing = node("get", UNKNOWN_ID)
    assert code == 1 and missing["error"]["code"] == "NOT_FOUND" and UNKNOWN_ID in missing["error"]["details"]
    code, bad = node("get-review", "--score", "11")
    assert code == 1 and bad["error"]["code"] == "INVALID_ARGUMENT" and "[0, 10]" in bad["error"]["details"]
