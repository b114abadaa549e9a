"""Store fixtures shared by test modules: import the ones you use.

    from tests.store_fixtures import firestore_emulator, firestore_store, sqlite_store, store  # noqa: F401

`firestore_emulator` is the `host:port` of a Firestore endpoint for the whole
session: FIRESTORE_EMULATOR_HOST when already set (a real emulator), else our
protocol server (`python -m tests.firestore_server --port 0`) in a subprocess.
`store` runs a test once per backend.
"""

from __future__ import annotations

import os
import pathlib
import select
import subprocess
import sys
import uuid

import pytest

from pitchkeras.store.sqlite import SQLiteStore

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_STARTUP_TIMEOUT_S = 60.0
BACKENDS = ("sqlite", "firestore")


def start_firestore_server() -> tuple[subprocess.Popen, str]:
    """Start `python -m tests.firestore_server --port 0`; return (process, host:port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.firestore_server", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], _STARTUP_TIMEOUT_S)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the Firestore test server did not start (exit code {proc.returncode})")
    return proc, line


@pytest.fixture(scope="session")
def firestore_emulator():
    """`host:port` of a Firestore emulator (the running one, else our server)."""
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        yield existing
        return
    proc, address = start_firestore_server()
    try:
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def firestore_store(firestore_emulator, monkeypatch):
    """A FirestoreStore on a fresh collection of the session's emulator."""
    from pitchkeras.store.firestore import FirestoreStore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    store = FirestoreStore("pitchkeras-test", f"reviews-{uuid.uuid4().hex[:12]}", timeout=20.0, seed=0)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path):
    store = SQLiteStore(str(tmp_path / "reviews.db"))
    yield store
    store.close()


@pytest.fixture(params=BACKENDS)
def store(request):
    """Each backend in turn, empty."""
    return request.getfixturevalue(f"{request.param}_store")
