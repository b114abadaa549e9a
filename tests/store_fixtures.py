"""Store fixtures shared by test modules: import the ones you use.

    from tests.store_fixtures import firestore_emulator, firestore_store, sqlite_store, store  # noqa: F401

`firestore_emulator` is the `host:port` of Google's Cloud Firestore emulator
for the whole session: FIRESTORE_EMULATOR_HOST when already set, else one the
fixture starts on a free port in its own process group and stops at the end.
Without the emulator installed, Firestore tests skip naming the Debian
package; under CI=true that is a failure. Each test uses its own collection.
`store` runs a test once per backend.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest

from pitchkeras.store.sqlite import SQLiteStore
from tests.emulator import PACKAGE, FirestoreEmulator, find_emulator

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("sqlite", "firestore")
PROJECT = "pitchkeras-test"


@pytest.fixture(scope="session")
def firestore_emulator():
    """`host:port` of Google's Firestore emulator (the running one, else one started for this session)."""
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        yield existing
        return
    if find_emulator() is None:
        message = f"the Cloud Firestore emulator is not installed (apt-get install {PACKAGE})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run the Firestore tests", pytrace=False)
        pytest.skip(message)
    with FirestoreEmulator() as emulator:
        yield emulator.host


SEED_FIELDS = {"text", "score", "genre", "length", "added", "selection_count"}


def write_like_the_seed(store, rows) -> list[str]:
    """Write (score, genre, text) rows exactly as the seed's script did: auto ids, its six fields, one batch."""
    from google.cloud import firestore

    collection = store._client.collection(store.collection_name)
    batch = store._client.batch()
    ids = []
    for score, genre, text in rows:
        ref = collection.document()  # a Firestore auto id: 20 characters
        batch.set(ref, {"text": text, "score": score, "genre": genre, "length": len(text),
                        "added": firestore.SERVER_TIMESTAMP, "selection_count": 0})
        ids.append(ref.id)
    batch.commit()
    return ids


@pytest.fixture
def firestore_store(firestore_emulator, monkeypatch):
    """A FirestoreStore on a fresh collection of the session's emulator."""
    from pitchkeras.store.firestore import FirestoreStore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    store = FirestoreStore(PROJECT, f"reviews-{uuid.uuid4().hex[:12]}", timeout=20.0, seed=0)
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
