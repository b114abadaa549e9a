"""The ReviewStore contract, run against every backend (SQLite and Firestore).

Firestore runs on Google's Cloud Firestore emulator (FIRESTORE_EMULATOR_HOST
when set, else one started for the session by `tests.store_fixtures`).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest

from pitchkeras.errors import InvalidArgument, NotFound, Unavailable
from pitchkeras.store import ConditionCount, Review, open_store, review_id

MODEL = "run-test"


def make_review(score=8.0, genre="Rock", index=0, **fields) -> Review:
    conditions = {"score": score, "genre": genre}
    return Review(
        id=review_id(MODEL, conditions, seed=7, index=index),
        text=fields.pop("text", f"Review number {index} of {genre} at {score}. It rocks."),
        score=score,
        genre=genre,
        model_version=MODEL,
        **fields,
    )


def test_add_reviews_is_idempotent(store):
    first = [make_review(index=i) for i in range(3)]
    assert store.add_reviews(first) == 3
    assert store.add_reviews(first) == 0
    assert store.add_reviews(first[:2] + [make_review(index=3)]) == 1
    assert store.count() == 4
    # A rerun must not reset what readers were already shown.
    shown = store.get_review()
    store.add_reviews([shown])
    assert store.get_by_id(shown.id).selection_count == 1


def test_add_reviews_counts_a_duplicate_in_one_call_once(store):
    review = make_review()
    assert store.add_reviews([review, review]) == 1
    assert store.count() == 1


def test_record_round_trip(store):
    review = make_review(
        score=7.5,
        genre="Pop/R&B",
        text="Bright hooks over a tired beat.",
        extra_conditions={"decade": "1990s"},
        temperature=0.7,
        top_k=40,
        top_p=0.95,
        seed=7,
        prompt="7.5\nPop/R&B\n",
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        selection_count=99,  # ignored: a new review has never been shown
    )
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    store.add_reviews([review])
    got = store.get_by_id(review.id)
    assert (got.id, got.text, got.score, got.genre) == (review.id, review.text, 7.5, "Pop/R&B")
    assert got.extra_conditions == {"decade": "1990s"}
    assert got.length == 6
    assert (got.model_version, got.temperature, got.top_k, got.top_p, got.seed) == (MODEL, 0.7, 40, 0.95, 7)
    assert got.prompt == "7.5\nPop/R&B\n"
    assert (got.repetition_penalty, got.no_repeat_ngram_size) == (1.2, 3)
    assert got.selection_count == 0
    assert got.added is not None and got.added.tzinfo is not None
    assert before <= got.added <= datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)


def test_get_review_hands_out_least_shown_and_increments(store):
    reviews = [make_review(index=i) for i in range(3)]
    store.add_reviews(reviews)
    first_round = [store.get_review(score=8.0, genre="Rock") for _ in range(3)]
    assert sorted(r.id for r in first_round) == sorted(r.id for r in reviews)
    assert [r.selection_count for r in first_round] == [1, 1, 1]
    fourth = store.get_review(score=8.0, genre="Rock")
    assert fourth.selection_count == 2
    assert store.get_by_id(fourth.id).selection_count == 2


def test_get_review_prefers_a_newly_added_unshown_review(store):
    old = make_review(index=0)
    store.add_reviews([old])
    assert store.get_review().id == old.id
    new = make_review(index=1)
    store.add_reviews([new])
    assert store.get_review().id == new.id
    assert {store.get_review().selection_count, store.get_review().selection_count} == {2}


def test_get_review_filters(store):
    rock8, jazz8, rock3 = make_review(8.0, "Rock"), make_review(8.0, "Jazz"), make_review(3.5, "Rock")
    store.add_reviews([rock8, jazz8, rock3])
    assert store.get_review(score=8.0, genre="Jazz").id == jazz8.id
    assert store.get_review(score=3.5).id == rock3.id
    assert store.get_review(genre="jazz").id == jazz8.id  # genre is case-insensitive
    assert store.get_review(score=8, genre="ROCK").id == rock8.id  # an int score and any case match
    assert store.get_review(score=8.04, genre="rock").id == rock8.id  # scores compare at one decimal


def test_get_review_not_found(store):
    with pytest.raises(NotFound):
        store.get_review()
    store.add_reviews([make_review(8.0, "Rock")])
    with pytest.raises(NotFound, match="score=1.0"):
        store.get_review(score=1.0)
    with pytest.raises(NotFound, match="Polka"):
        store.get_review(genre="Polka")
    with pytest.raises(NotFound):
        store.get_review(score=8.0, genre="Jazz")


@pytest.mark.parametrize("bad", [10.5, -1, "loud", float("nan")])
def test_bad_score_is_invalid_argument(store, bad):
    with pytest.raises(InvalidArgument, match="score"):
        store.get_review(score=bad)
    with pytest.raises(InvalidArgument, match="score"):
        store.count(score=bad)


def test_get_by_id_does_not_increment(store):
    review = make_review()
    store.add_reviews([review])
    assert store.get_by_id(review.id).selection_count == 0
    assert store.get_by_id(review.id).selection_count == 0


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "../../etc/passwd", "x" * 129, "caf\u00e9", None])
def test_get_by_id_malformed_is_invalid_argument(store, bad):
    with pytest.raises(InvalidArgument, match="malformed review id.*1 to 128 characters"):
        store.get_by_id(bad)


@pytest.mark.parametrize("rid", ["kx3Rq9ZbT0aWmPp2LsYe", "A", "seed_review-007", "f" * 128])
def test_opaque_ids_are_stored_and_served(store, rid):
    """One id rule for every backend: opaque [A-Za-z0-9_-]{1,128}, Firestore auto ids among them."""
    assert store.add_reviews([Review(id=rid, text="An opaque id.", score=6.0, genre="Jazz")]) == 1
    assert store.get_by_id(rid).text == "An opaque id."
    assert store.existing_ids([rid, "other"]) == {rid}
    assert store.get_review(score=6, genre="jazz").id == rid


def test_get_by_id_unknown_is_not_found(store):
    store.add_reviews([make_review()])
    with pytest.raises(NotFound, match="0" * 24):
        store.get_by_id("0" * 24)


def test_add_rejects_bad_records(store):
    with pytest.raises(InvalidArgument, match="malformed review id"):
        store.add_reviews([Review(id="no pe", text="fine")])
    with pytest.raises(InvalidArgument, match="text"):
        store.add_reviews([make_review(text="   ")])
    with pytest.raises(InvalidArgument, match="score"):
        store.add_reviews([Review(id="a" * 24, text="fine", score=11.0)])
    assert store.count() == 0


def test_existing_ids(store):
    present = [make_review(index=i) for i in range(3)]
    store.add_reviews(present)
    absent = [make_review(index=i).id for i in range(3, 6)]
    asked = [r.id for r in present] + absent + [present[0].id]
    assert store.existing_ids(asked) == {r.id for r in present}
    assert store.existing_ids([]) == set()


def test_existing_ids_many(store):
    reviews = [make_review(index=i) for i in range(1200)]
    assert store.add_reviews(reviews) == 1200
    asked = [r.id for r in reviews[::2]] + [make_review(index=i).id for i in range(5000, 5400)]
    assert store.existing_ids(asked) == {r.id for r in reviews[::2]}


def test_counts_genres_scores(store):
    store.add_reviews(
        [make_review(8.0, "Rock", i) for i in range(3)]
        + [make_review(2.5, "Rock", i) for i in range(2)]
        + [make_review(8.0, "Jazz", 0)]
    )
    assert store.counts() == [
        ConditionCount(score=8.0, genre="Jazz", count=1),
        ConditionCount(score=2.5, genre="Rock", count=2),
        ConditionCount(score=8.0, genre="Rock", count=3),
    ]
    assert store.count() == 6
    assert store.count(genre="rock") == 5
    assert store.count(score=8.0) == 4
    assert store.count(score=8.0, genre="ROCK") == 3
    assert store.count(score=9.0) == 0
    assert store.genres() == ["Jazz", "Rock"]
    assert store.scores() == [2.5, 8.0]


def test_corpus_without_conditions(store):
    reviews = [
        Review(id=review_id(MODEL, {}, seed=1, index=i), text=f"Plain text {i}.", model_version=MODEL)
        for i in range(2)
    ]
    assert store.add_reviews(reviews) == 2
    assert store.counts() == [ConditionCount(score=None, genre=None, count=2)]
    assert store.genres() == [] and store.scores() == []
    picked = {store.get_review().id, store.get_review().id}
    assert picked == {r.id for r in reviews}
    got = store.get_by_id(reviews[0].id)
    assert got.score is None and got.genre is None and got.conditions == {}
    with pytest.raises(NotFound):
        store.get_review(genre="Rock")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("mysql://host/db", "sqlite://, firestore://"),
        ("reviews.db", "no scheme"),
        ("sqlite://", "sqlite:///"),
        ("sqlite:///", "sqlite:///"),
        ("sqlite:///:memory:", "file path"),
        ("firestore://", "firestore://PROJECT"),
        ("firestore://proj/a/b", "collection"),
        ("firestore://proj/reviews?timeout=soon", "timeout"),
        ("firestore://proj/reviews?colour=red", "colour"),
    ],
)
def test_open_store_bad_uri(uri, message):
    with pytest.raises(InvalidArgument) as info:
        open_store(uri)
    assert message in str(info.value)


def test_open_store_sqlite_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///data/rel.db") as store:
        store.add_reviews([make_review()])
    assert (tmp_path / "data" / "rel.db").exists()
    absolute = tmp_path / "abs" / "x.db"
    with open_store(f"sqlite:///{absolute}") as store:  # sqlite:////tmp/... : four slashes
        assert store.count() == 0
    assert absolute.exists()


def test_sqlite_file_that_is_not_a_database_is_unavailable(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(Unavailable, match="junk.db"):
        open_store(f"sqlite:///{path}")


def test_open_store_firestore(firestore_emulator, monkeypatch):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    with open_store("firestore://pitchkeras-test/open-store-test?timeout=5") as store:
        assert store.collection_name == "open-store-test" and store.timeout == 5.0
        store.add_reviews([make_review()])
        assert store.get_review().selection_count >= 1
    with open_store("firestore://pitchkeras-test") as store:
        assert store.collection_name == "reviews"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_firestore_is_unavailable_not_a_hang(monkeypatch):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{_closed_port()}")
    with open_store("firestore://pitchkeras-test/reviews?timeout=1") as store:
        for call in (
            lambda: store.get_by_id("0" * 24),
            lambda: store.get_review(score=5.0),
            lambda: store.add_reviews([make_review()]),
            lambda: store.counts(),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable, match="unavailable"):
                call()
            # Generous bound for 2 loaded cores: the default would retry for 60 s.
            assert time.monotonic() - started < 20
