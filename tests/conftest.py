"""The suite's shared set-up: session fixtures every test module sees without importing them.

pytest loads this file before any test module, so this is where a session
fixture is one instance for the whole run (per pytest-xdist worker). Test
modules never import fixtures by name: they ask for them as arguments.

Fixtures (see each one's docstring):
- Stores: `firestore_emulator` (`host:port`), `firestore_emulator_process`
  (the `FirestoreEmulator`, for tests that freeze or restart it),
  `firestore_store`, `sqlite_store`, `store` (each backend in turn).
- Serving: `pool_uri`, `hostile_uri`, `tiny_model_dir` and `tiny_generator`
  (the serving shape: three genres, untrained).
- Sampling: `sampling_model_dir`, `sampling_model` (the sampling shape: the
  corpus of tests/test_sampling.py, two genres, untrained).

Parallel: pyproject.toml's addopts run the suite on pytest-xdist workers (`-n auto`, at most 4, `--dist
loadfile`: a module's tests and module fixtures stay on one worker; `-n 0` runs it in one process). Each worker
has its own session fixtures, so "once" below means once per worker. The workers' thread pools are left as they
are (measured on 2 cores: capping each worker to one thread was slower, BUILD_NOTES.md).

Session set-up:
- The persistent compile cache is on for the session, in a directory of its
  own (`PITCHKERAS_COMPILE_CACHE`, inherited by CLI children; TensorFlow's
  XLA flag set here, before anything imports TensorFlow), so a program one
  test compiled is loaded, not compiled again, by the next process or
  Generator that needs it. Removed at the end.
- XLA's LLVM back end runs without its optimizations (`XLA_FLAGS`, inherited
  by every child): the suite's tiny programs compile faster than they run.
- Python's cyclic garbage collector is off while the test modules import
  (TensorFlow, Keras, keras-hub: about 840,000 objects that live for the
  whole run), which are then frozen out of every later collection; full
  collections of what the tests make run a tenth as often as Python's
  default (`GC_THRESHOLDS`). The JAX worker does the same.
- The JAX worker children (tests/jax_child.py) are stopped at the end.
- Every child process the run starts is counted by kind; the counts are
  printed at the end, and the run fails if it started more than one
  Firestore emulator or more than `jax_child.MAX_WORKERS` JAX workers.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import shutil
import subprocess
import tempfile
import threading

import pytest

# -- XLA's LLVM back end without its optimizations, before anything imports TensorFlow or JAX -----------------
# The suite's models are tiny, so its XLA time is compiling, not running: without LLVM's optimization passes a
# program compiles faster and runs a little slower (measured: BUILD_NOTES.md, "Sixth pass"). The programs' HLO and
# buffer assignment (what the memory plans read) come from the same passes either way, and every numeric check
# passes with it. Every child (the CLI, the JAX worker) inherits it; a run can still set its own XLA_FLAGS beside it.
_NO_LLVM_OPT = "--xla_backend_optimization_level=0"
if _NO_LLVM_OPT not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_LLVM_OPT}".strip()

# -- the garbage collector, off until the test modules have imported (pytest_collection_finish) ------------
gc.disable()

# Hypothesis runs its plugins when first imported; trio's checks that its random generator has a referrer, and
# frozen referrers are invisible to gc.get_referrers, so Hypothesis is imported before anything is frozen.
import hypothesis  # noqa: E402,F401

from pitchkeras import compile_cache  # noqa: E402
from tests import jax_child  # noqa: E402

# -- the compile cache, before any test module imports TensorFlow -------------------------------------------

_SESSION_CACHE = tempfile.mkdtemp(prefix="pitchkeras-test-compile-")
os.environ[compile_cache.ENV_VAR] = _SESSION_CACHE  # the CLI's default in every child
compile_cache.enable(_SESSION_CACHE)  # this process: TF_XLA_FLAGS now, JAX when a Generator first compiles


def pytest_sessionstart(session):
    if session.config.pluginmanager.hasplugin("dsession"):  # pytest-xdist's controller never imports test modules
        jax_child.gc_after_imports()


def pytest_collection_finish(session):
    """Everything imported so far (the frameworks, every test module) out of the collector's work; on with the
    suite's thresholds (`jax_child.GC_THRESHOLDS`: measured in BUILD_NOTES.md, "Seventh pass")."""
    jax_child.gc_after_imports()


# -- child processes, counted by kind ---------------------------------------------------------------------

CHILDREN: collections.Counter = collections.Counter()
EMULATORS_STARTED: list[str] = []  # host:port of each Firestore emulator a fixture started (restarts not counted)
MAX_EMULATORS = 1
_real_popen_init = subprocess.Popen.__init__


def _kind(args, env) -> str:
    argv = [str(a) for a in ([args] if isinstance(args, (str, bytes)) else list(args))]
    jax = " on JAX" if (env or os.environ).get("KERAS_BACKEND") == "jax" else ""
    if not argv:
        return "?"
    if "cloud_firestore_emulator" in argv[0]:
        return "Firestore emulator launcher"
    if argv[0].endswith("/pitchkeras"):  # the installed console script
        return f"pitchkeras {argv[1] if len(argv) > 1 else ''} (console script under test)"
    if len(argv) > 2 and argv[1] == "-m":
        if argv[2] == "tests.jax_child":
            return "JAX worker (tests/jax_child.py)"
        if argv[2] == "pitchkeras.cli":
            command = next((a for a in argv[3:] if not a.startswith("-")), "")
            return f"pitchkeras {command} (CLI under test{jax})"
        return f"python -m {argv[2]}{jax}"
    if len(argv) > 1 and argv[1] == "-c":
        return f"python -c script{jax}"
    if len(argv) > 1 and argv[1].endswith(".py"):
        return f"python {os.path.basename(argv[1])}{jax}"
    return os.path.basename(argv[0])


def _counting_popen_init(self, args, *rest, **kwargs):
    try:
        kind = _kind(args, kwargs.get("env"))
    except Exception:  # noqa: BLE001 - counting must never stop a child from starting
        kind = "?"
    CHILDREN[kind] += 1
    _real_popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _counting_popen_init


# Fixtures that train, build a model (and compile its decode loop) or install something: a test that needs one
# (directly or through another fixture) is `slow`, wherever it is defined, so `-m "not slow"` never waits for them.
SLOW_FIXTURES = {
    "reference", "single_device", "multiworker",  # tests/test_train.py: fine-tuning runs
    "first_run",  # tests/test_quickstart.py: `pitchkeras demo` in a process
    "tiny_model_dir", "tiny_generator", "sampling_model_dir", "sampling_model",  # this file's shared models
    "model_dir", "unigram_model_dir", "int8_model", "dirs",  # a module's own model (generate CLI, cache, report, ...)
    "written",  # tests/test_file_modes.py: every writing command once (a fine-tuning and a report among them)
    "gs",  # tests/test_convert.py: a gpt-2-simple run trained with gpt-2-simple's own code
    "plans",  # tests/test_plan.py: compiled memory plans on the JAX worker
    "node_client",  # tests/test_client.py: `npm ci`
}


def pytest_collection_modifyitems(items):
    """`slow` on every test that needs a SLOW_FIXTURES fixture."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


_WORKER_REPORTS: dict = {}  # pytest-xdist: each worker's own counts, sent back when it finishes


def _counts() -> dict:
    return {"emulators": list(EMULATORS_STARTED), "jax_workers": list(jax_child.WORKERS_STARTED),
            "children": dict(CHILDREN)}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    report = getattr(node, "workeroutput", {}).get("pitchkeras_children")
    if report:
        _WORKER_REPORTS[node.gateway.id] = json.loads(report)


def pytest_terminal_summary(terminalreporter):
    reports = _WORKER_REPORTS or {"this process": _counts()}
    terminalreporter.write_sep("-", "child processes this run started")
    for name, report in sorted(reports.items()):
        workers = collections.Counter(report["jax_workers"])
        terminalreporter.write_line(
            f"{name}: Firestore emulators: {len(report['emulators'])} (at most {MAX_EMULATORS}); JAX workers: "
            f"{len(report['jax_workers'])} (by device count {dict(workers)}; at most {jax_child.MAX_WORKERS})")
        for kind, count in collections.Counter(report["children"]).most_common():
            terminalreporter.write_line(f"  {count:4d}  {kind}")


def pytest_sessionfinish(session):
    jax_child.stop_workers()
    _stop_emulator()
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller checks and prints
        workeroutput["pitchkeras_children"] = json.dumps(_counts())
        return
    problems = []
    for name, report in sorted((_WORKER_REPORTS or {"this process": _counts()}).items()):
        if len(report["emulators"]) > MAX_EMULATORS:
            problems.append(f"{name}: {len(report['emulators'])} Firestore emulators started ({report['emulators']}); "
                            f"the suite shares one (the firestore_emulator fixture)")
        if len(report["jax_workers"]) > jax_child.MAX_WORKERS:
            problems.append(f"{name}: {len(report['jax_workers'])} JAX workers started (device counts "
                            f"{report['jax_workers']}); tests/jax_child.py keeps one per device count")
    if problems:
        session.config.get_terminal_writer().line("SESSION CHECK FAILED: " + "; ".join(problems), red=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- stores ------------------------------------------------------------------------------------------------

_emulator: dict = {}
_emulator_lock = threading.Lock()


def _stop_emulator() -> None:
    with _emulator_lock:
        emulator = _emulator.pop("process", None)
    if emulator is not None:
        emulator.__exit__(None, None, None)


@pytest.fixture(scope="session")
def firestore_emulator_process():
    """The session's own `FirestoreEmulator` (started on first use, stopped when the run ends).

    Tests may freeze it (`freeze()`/`resume()`: SIGSTOP/SIGCONT its process group) or stop and `start()` it
    again on the same port; every other test uses its own collection, so none depends on the emulator's earlier
    data.
    """
    from tests.emulator import PACKAGE, FirestoreEmulator, find_emulator

    with _emulator_lock:
        if "process" not in _emulator:
            if find_emulator() is None:
                message = f"the Cloud Firestore emulator is not installed (apt-get install {PACKAGE})"
                if os.environ.get("CI") == "true":
                    pytest.fail(message + "; CI must run the Firestore tests", pytrace=False)
                pytest.skip(message)
            _emulator["process"] = FirestoreEmulator().start()
            EMULATORS_STARTED.append(_emulator["process"].host)
        return _emulator["process"]


@pytest.fixture(scope="session")
def firestore_emulator(request):
    """`host:port` of Google's Firestore emulator: FIRESTORE_EMULATOR_HOST when already set, else the session's."""
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        return existing
    return request.getfixturevalue("firestore_emulator_process").host


@pytest.fixture
def firestore_store(firestore_emulator, monkeypatch):
    """A FirestoreStore on a fresh collection of the session's emulator."""
    import uuid

    from pitchkeras.store.firestore import FirestoreStore
    from tests.store_fixtures import PROJECT

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    store = FirestoreStore(PROJECT, f"reviews-{uuid.uuid4().hex[:12]}", timeout=20.0, seed=0)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path):
    from pitchkeras.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "reviews.db"))
    yield store
    store.close()


@pytest.fixture(params=("sqlite", "firestore"))
def store(request):
    """Each backend in turn, empty."""
    return request.getfixturevalue(f"{request.param}_store")


# -- serving -----------------------------------------------------------------------------------------------


@pytest.fixture
def pool_uri(tmp_path):
    """An SQLite store URI holding `serve_fixtures.pool_reviews()`."""
    from pitchkeras.store import open_store
    from tests.serve_fixtures import pool_reviews

    uri = f"sqlite:///{tmp_path}/pool.db"
    with open_store(uri) as store:
        store.add_reviews(pool_reviews())
    return uri


@pytest.fixture
def hostile_uri(tmp_path):
    """An SQLite store URI holding only `serve_fixtures.HOSTILE` (markup in every field a page shows)."""
    from pitchkeras.store import open_store
    from tests.serve_fixtures import HOSTILE

    uri = f"sqlite:///{tmp_path}/hostile.db"
    with open_store(uri) as store:
        store.add_reviews([HOSTILE])
    return uri


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The serving shape: an untrained tiny model (default TinyConfig, context 64) whose tokenizer learnt
    `serve_fixtures.TRAIN_TEXTS` (three genres, as the pool's reviews), saved as a model directory."""
    pytest.importorskip("tensorflow")
    from pitchkeras.conditioning import REVIEWS
    from pitchkeras.model import ModelInfo, build_tiny_causal_lm, save_model_dir
    from tests.serve_fixtures import GENRES, TRAIN_TEXTS

    lm = build_tiny_causal_lm(TRAIN_TEXTS, sequence_length=64)
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": list(GENRES)}, "tiny-test-v1", "tiny", 64)
    return save_model_dir(lm, info, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    """A real Generator on the serving model (batches of 4, 8 new tokens). Post-processing is relaxed (no
    sentence or header checks): an untrained model writes no sentences, and these tests are about serving."""
    from pitchkeras.model import load_model
    from pitchkeras.postprocess import PostprocessOptions
    from pitchkeras.sampling import Generator

    relaxed = PostprocessOptions(strip_to_last_start=False, check_conditions=False,
                                 reject_second_document=False, require_sentence=False, trim_to_sentence=False)
    return Generator(load_model(tiny_model_dir), batch_size=4, max_new_tokens=8, postprocess_options=relaxed)


# -- sampling ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sampling_model_dir(tmp_path_factory):
    """The sampling shape: an untrained tiny model (default TinyConfig, context 64) whose tokenizer learnt
    tests/test_sampling.py's TEXTS (Rock and Jazz), saved as a model directory. Shared by the sampler,
    engine, quantization and backend tests, which compare its texts across backends and engines."""
    pytest.importorskip("tensorflow")
    from pitchkeras.conditioning import REVIEWS
    from pitchkeras.model import ModelInfo, build_tiny_causal_lm, save_model_dir
    from tests.test_sampling import TEXTS

    lm = build_tiny_causal_lm(TEXTS, sequence_length=64)
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, "test-v1", "tiny", 64)
    return save_model_dir(lm, info, tmp_path_factory.mktemp("sampling-model") / "model")


@pytest.fixture(scope="session")
def sampling_model(sampling_model_dir):
    """The sampling shape, loaded (one instance for the session: tests must not change its weights)."""
    from pitchkeras.model import load_model

    return load_model(sampling_model_dir)


# -- the CLI in this process -------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys):
    """`cli(*argv)` runs `pitchkeras ARGV...` in this process: `(exit code, stdout, stderr)`.

    For usage errors and other answers that need no process of their own (a fresh interpreter costs seconds).
    """
    from pitchkeras.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
