"""Firestore-only behaviour, on Google's emulator: seed-written collections, migrate, errors that tell the truth."""

from __future__ import annotations

import logging
import uuid

import pytest

from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pitchkeras.store import ConditionCount, Review
from tests.store_fixtures import PROJECT, SEED_FIELDS, write_like_the_seed

SEED_ROWS = [
    (8.0, "Rap", "A dense, funny record that never sits still."),
    (8.0, "Rap", "The beats knock and the verses land."),
    (8.0, "Rap", "Long, but worth every minute of it."),
    (8.0, "Rock", "Guitars, mostly, and a lot of them."),
    (3.5, "Rap", "It sounds like a demo left in the sun."),
]


def test_a_seed_collection_is_served_as_it_is(firestore_store):
    ids = write_like_the_seed(firestore_store, SEED_ROWS)
    rap8 = set(ids[:3])
    # The genre filter matches the stored genre whatever the caller's case; picks rotate through the pair.
    first = [firestore_store.get_review(score=8.0, genre=genre) for genre in ("Rap", "rap", "RAP")]
    assert {r.id for r in first} == rap8 and [r.selection_count for r in first] == [1, 1, 1]
    assert firestore_store.get_review(score=8, genre="rap").selection_count == 2
    # GetById of an auto id answers it, without counting; absent fields are defaults, not errors.
    review = firestore_store.get_by_id(ids[3])
    assert (review.text, review.score, review.genre, review.selection_count) == (SEED_ROWS[3][2], 8.0, "Rock", 0)
    assert review.model_version == "" and review.prompt == "" and review.top_p is None and review.extra_conditions == {}
    assert review.added.tzinfo is not None
    assert firestore_store.get_review(genre="rock").id == ids[3]
    assert firestore_store.count(genre="RAP") == 4 and firestore_store.count(score=8.0, genre="Rap") == 3
    assert firestore_store.genres() == ["Rap", "Rock"]
    with pytest.raises(NotFound):
        firestore_store.get_review(score=8.0, genre="Jazz")


def test_documents_of_unexpected_shape_are_skipped_not_a_failure(firestore_store, caplog):
    collection = firestore_store._client.collection(firestore_store.collection_name)
    collection.document("odd-types").set({"text": "Fine text, odd fields.", "score": 6.0, "genre": "Jazz",
                                          "length": "many", "selection_count": 0, "top_k": "forty",
                                          "added": "not a date"})
    collection.document("no-text").set({"score": 6.0, "genre": "Jazz", "selection_count": 0})
    with caplog.at_level(logging.WARNING, logger="pitchkeras"):
        odd = firestore_store.get_by_id("odd-types")
        assert (odd.top_k, odd.added, odd.length) == (None, None, 4)  # ignored, with the length recomputed
        with pytest.raises(NotFound, match="no usable text"):
            firestore_store.get_by_id("no-text")
        # The text-less document is as least-shown as the other, but only the servable one is handed out.
        picks = [firestore_store.get_review(genre="jazz") for _ in range(3)]
    assert [p.id for p in picks] == ["odd-types"] * 3
    assert firestore_store.get_by_id("odd-types").selection_count == 3
    assert "'top_k' has unexpected type str" in caplog.text and "no usable text" in caplog.text
    collection.document("no-text").delete()
    collection.document("odd-types").delete()
    collection.document("only-junk").set({"score": 6.0, "genre": "Jazz", "selection_count": 0, "text": 42})
    with pytest.raises(NotFound, match="no review matches"):  # junk alone is not a review (logged)
        firestore_store.get_review(genre="Jazz")


def _stored(store) -> dict[str, dict]:
    return {s.id: s.to_dict() for s in store._client.collection(store.collection_name).stream()}


def test_migrate_brings_a_seed_collection_to_the_schema_and_a_rerun_changes_nothing(firestore_store):
    ids = write_like_the_seed(firestore_store, SEED_ROWS)
    firestore_store.get_review(score=8.0, genre="Rap")  # shown once before the migration
    collection = firestore_store._client.collection(firestore_store.collection_name)
    collection.document("never-counted").set({"text": "A review nobody counted.", "score": 5.0, "genre": "Jazz"})
    before = _stored(firestore_store)
    assert set(before[ids[0]]) == SEED_FIELDS

    result = firestore_store.migrate(model_version="seed")
    assert (result.scanned, result.updated, result.current, result.skipped) == (6, 6, 0, 0)
    after = _stored(firestore_store)
    for doc_id, data in after.items():
        old = before[doc_id]
        assert data["text"] == old["text"]
        assert data["selection_count"] == old.get("selection_count", 0)  # never touched when present
        assert data["genre_key"] == old["genre"].casefold() and data["model_version"] == "seed"
        assert data["length"] == old.get("length", len(old["text"].split()))  # the seed's own length kept
    assert after["never-counted"]["selection_count"] == 0  # absent: now pickable

    again = firestore_store.migrate(model_version="other")
    assert (again.scanned, again.updated, again.current) == (6, 0, 6)
    assert _stored(firestore_store) == after
    # Served as before, now through genre_key as well.
    assert firestore_store.get_review(genre="jazz").id == "never-counted"
    assert sorted(c.count for c in firestore_store.counts()) == [1, 1, 1, 3]


def test_migrate_leaves_documents_of_this_project_alone(firestore_store):
    review = Review(id="a" * 24, text="Ours already.", score=7.0, genre="Metal", model_version="run-1")
    firestore_store.add_reviews([review])
    before = _stored(firestore_store)
    assert firestore_store.migrate().summary() == "1 document(s) scanned: 0 migrated, 1 already current, 0 skipped"
    assert _stored(firestore_store) == before


def test_store_migrate_cli(firestore_store, cli):
    write_like_the_seed(firestore_store, SEED_ROWS)  # (the fixture points FIRESTORE_EMULATOR_HOST at the emulator)
    uri = f"firestore://{PROJECT}/{firestore_store.collection_name}"

    code, out, err = cli("store", "migrate", "--store", uri)
    assert code == 0, err
    assert out.strip() == f"migrate {uri}: 5 document(s) scanned: 5 migrated, 0 already current, 0 skipped"
    assert "migrate: 100%" in err and "5/5" in err  # the progress bar
    _, out, err = cli("store", "migrate", "--store", uri, "--no-progress")
    assert out.strip().endswith("0 migrated, 5 already current, 0 skipped") and not err
    _, out, _ = cli("store", "counts", "--store", uri)
    assert out.splitlines()[-1] == "5 review(s) in 3 pair(s)"
    code, _, err = cli("store", "migrate", "--store", "firestore://")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "firestore://PROJECT" in err


def test_a_rejected_write_is_invalid_argument_not_retryable(firestore_store):
    with pytest.raises(InvalidArgument, match="reserved"):
        firestore_store.add_reviews([Review(id="__reserved__", text="Firestore refuses this id.")])
    with pytest.raises(InvalidArgument, match="longer than"):
        firestore_store.add_reviews([Review(id="b" * 24, text="word " * 250_000)])  # over 1 MiB


def test_a_permanent_status_inside_batch_write_is_not_unavailable(firestore_store, monkeypatch):
    """Per-write PERMISSION_DENIED (security rules) cannot be produced here: the emulator lets admin
    clients past its rules. So the response the server would send is built as its real proto."""
    from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch
    from google.cloud.firestore_v1.types import BatchWriteResponse
    from google.rpc import status_pb2

    def denied(batch, **kwargs):
        return BatchWriteResponse(status=[status_pb2.Status(code=7, message="Missing or insufficient permissions.")
                                          for _ in range(len(batch))])

    monkeypatch.setattr(BulkWriteBatch, "commit", denied)
    with pytest.raises(FailedPrecondition, match="insufficient permissions"):
        firestore_store.add_reviews([Review(id="c" * 24, text="Denied.")])


def test_missing_credentials_are_one_clear_line(tmp_path, monkeypatch, cli):
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    # A key file that is not there fails at once (no metadata-server probe leaves this machine).
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    from pitchkeras.store import open_store

    with pytest.raises(FailedPrecondition) as info:
        open_store("firestore://some-project/reviews")
    message = str(info.value)
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "application-default", "FIRESTORE_EMULATOR_HOST"):
        assert name in message
    code, _, err = cli("serve", "--store", "firestore://p/reviews", "--port", "0")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("pitchkeras serve: error: firestore://p/reviews: no Google")
    assert "Traceback" not in err


def test_pick_on_an_emptied_collection_is_not_found(firestore_store, firestore_emulator):
    firestore_store.add_reviews([Review(id="d" * 24, text="Soon gone.", score=9.0, genre="Global")])
    assert firestore_store.counts() == [ConditionCount(9.0, "Global", 1)]
    from tests.emulator import clear_emulator

    clear_emulator(firestore_emulator, PROJECT)  # the emulator's REST reset of every document of the project
    with pytest.raises(NotFound):
        firestore_store.get_review()
    assert firestore_store.counts() == []


def test_unreachable_firestore_fails_fast_as_unavailable(monkeypatch):
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
    from pitchkeras.store.firestore import FirestoreStore

    with FirestoreStore(PROJECT, f"gone-{uuid.uuid4().hex[:8]}", timeout=1.0) as store:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.migrate()
        assert time.monotonic() - started < 20  # the client's default would retry for 60 s
