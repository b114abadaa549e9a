"""SQLite keeps each review's repetition settings, and files written before those columns existed still open."""

import sqlite3

from pitchkeras.store import Review, review_id
from pitchkeras.store.sqlite import SQLiteStore

# The reviews table as the first schema wrote it (before repetition_penalty / no_repeat_ngram_size).
OLD_SCHEMA = """
    CREATE TABLE reviews (
        id TEXT PRIMARY KEY, text TEXT NOT NULL, score REAL, genre TEXT,
        extra_conditions TEXT NOT NULL DEFAULT '{}', length INTEGER NOT NULL, added TEXT NOT NULL,
        selection_count INTEGER NOT NULL DEFAULT 0, model_version TEXT NOT NULL DEFAULT '',
        temperature REAL, top_k INTEGER, top_p REAL, seed INTEGER, prompt TEXT NOT NULL DEFAULT ''
    )
"""


def _review(index: int, **fields) -> Review:
    rid = review_id("run-test", {"score": 8.0, "genre": "Rock"}, seed=7, index=index)
    return Review(id=rid, text=f"Review {index}. It rocks.", score=8.0, genre="Rock", model_version="run-test",
                  **fields)


def test_repetition_settings_round_trip(tmp_path):
    with SQLiteStore(str(tmp_path / "reviews.db")) as store:
        store.add_reviews([_review(0, repetition_penalty=1.2, no_repeat_ngram_size=3), _review(1)])
        got = store.get_by_id(_review(0).id)
        assert (got.repetition_penalty, got.no_repeat_ngram_size) == (1.2, 3)
        unknown = store.get_by_id(_review(1).id)
        assert (unknown.repetition_penalty, unknown.no_repeat_ngram_size) == (None, None)


def test_a_file_from_the_old_schema_gains_the_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(OLD_SCHEMA)
    conn.execute("INSERT INTO reviews (id, text, score, genre, length, added) VALUES (?, 'Old. Fine.', 8.0, 'Rock', 2, "
                 "'2026-01-01T00:00:00+00:00')", (_review(5).id,))
    conn.commit()
    conn.close()
    with SQLiteStore(str(path)) as store:
        old = store.get_by_id(_review(5).id)
        assert old.text == "Old. Fine." and old.repetition_penalty is None
        store.add_reviews([_review(6, repetition_penalty=1.5, no_repeat_ngram_size=0)])
        assert store.get_by_id(_review(6).id).repetition_penalty == 1.5
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(reviews)")]
    assert columns[-2:] == ["repetition_penalty", "no_repeat_ngram_size"]
