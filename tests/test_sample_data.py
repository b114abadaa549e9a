"""Tests for the bundled sample dump and the script that writes it."""

import importlib.util
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pitchkeras.sample_data import SAMPLE_DUMP

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_sample_dump.py"

KAGGLE_COLUMNS = {
    "reviews": [
        ("reviewid", "INTEGER"), ("title", "TEXT"), ("artist", "TEXT"), ("url", "TEXT"), ("score", "REAL"),
        ("best_new_music", "INTEGER"), ("author", "TEXT"), ("author_type", "TEXT"), ("pub_date", "TEXT"),
        ("pub_weekday", "INTEGER"), ("pub_day", "INTEGER"), ("pub_month", "INTEGER"), ("pub_year", "INTEGER"),
    ],
    "artists": [("reviewid", "INTEGER"), ("artist", "TEXT")],
    "genres": [("reviewid", "INTEGER"), ("genre", "TEXT")],
    "labels": [("reviewid", "INTEGER"), ("label", "TEXT")],
    "years": [("reviewid", "INTEGER"), ("year", "INTEGER")],
    "content": [("reviewid", "INTEGER"), ("content", "TEXT")],
}
SEED_GENRES = {"rock", "electronic", "rap", "pop/r&b", "experimental", "folk/country", "metal", "jazz"}


def load_script():
    spec = importlib.util.spec_from_file_location("make_sample_dump", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def conn():
    conn = sqlite3.connect(f"file:{SAMPLE_DUMP}?mode=ro", uri=True)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def reviews(conn):
    """(reviewid, score, genres tuple, text) per review."""
    genres = {}
    for reviewid, genre in conn.execute("SELECT reviewid, genre FROM genres ORDER BY rowid"):
        genres.setdefault(reviewid, []).append(genre)
    rows = conn.execute(
        "SELECT r.reviewid, r.score, c.content FROM reviews r JOIN content c USING (reviewid) ORDER BY r.rowid")
    return [(rid, score, tuple(genres.get(rid, ())), text) for rid, score, text in rows]


def test_dump_ships_inside_the_package_and_is_small():
    assert SAMPLE_DUMP.name == "pitchfork_sample.sqlite"
    assert SAMPLE_DUMP.parent == REPO / "pitchkeras" / "sample_data"
    assert SAMPLE_DUMP.is_file()
    assert SAMPLE_DUMP.stat().st_size < 1024 * 1024


def test_importing_sample_data_does_not_import_tensorflow():
    code = "import sys, pitchkeras.sample_data as s; assert s.SAMPLE_DUMP.is_file(); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_schema_matches_the_kaggle_dump(conn):
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(KAGGLE_COLUMNS)
    for table, columns in KAGGLE_COLUMNS.items():
        info = [(name, kind) for _, name, kind, *_ in conn.execute(f"PRAGMA table_info({table})")]
        assert info == columns, table


def test_every_review_has_its_rows_in_every_table(conn, reviews):
    ids = [rid for rid, *_ in reviews]
    assert len(ids) == 300
    assert len(set(ids)) == len(ids)
    for table in ("artists", "labels", "years", "content", "genres"):
        linked = {rid for (rid,) in conn.execute(f"SELECT reviewid FROM {table}")}
        assert linked == set(ids), table
    # Per-review tables other than genres hold exactly one row each.
    for table in ("artists", "labels", "years", "content"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 300, table


def test_review_metadata_is_consistent(conn):
    import datetime

    for reviewid, title, artist, url, score, bnm, author, pub_date, weekday, day, month, year in conn.execute(
            "SELECT reviewid, title, artist, url, score, best_new_music, author, pub_date, pub_weekday, "
            "pub_day, pub_month, pub_year FROM reviews"):
        date = datetime.date.fromisoformat(pub_date)
        assert (date.weekday(), date.day, date.month, date.year) == (weekday, day, month, year)
        assert title == title.lower() and artist == artist.lower()  # the Kaggle dump lower-cases these
        assert url.startswith(f"https://reviews.example.com/albums/{reviewid}-")
        assert bnm in (0, 1) and (bnm == 0 or score >= 8.0)
        assert author


def test_all_eight_genres_a_few_double_and_a_few_null(reviews):
    genres = [g for *_, gs, _ in reviews for g in gs]
    assert set(genres) - {None} == SEED_GENRES
    per_review = [gs for _, _, gs, _ in reviews]
    assert 3 <= sum(len(gs) == 2 for gs in per_review) <= 20
    assert 3 <= sum(gs == (None,) for gs in per_review) <= 10


def test_scores_cover_the_whole_range_in_every_genre(reviews):
    scores = [score for _, score, _, _ in reviews]
    assert min(scores) == 0.0 and max(scores) == 10.0
    assert all(round(s, 1) == s for s in scores)
    for genre in SEED_GENRES:
        buckets = {int(score) for _, score, gs, _ in reviews if genre in gs}
        assert buckets == set(range(11)), genre
    # More mass in the middle-high range, like the real dump.
    assert sum(6.0 <= s < 8.5 for s in scores) > len(scores) / 3


def test_texts_are_unique_short_and_varied(script, reviews):
    texts = [text for *_, text in reviews]
    assert len(set(texts)) == len(texts)
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= 60 and max(lengths) <= 150
    for text in texts:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        assert 2 <= len(sentences) <= 6, text
    assert 5 <= sum("\n\n" in t for t in texts) <= 60
    assert sum(any(ord(c) > 127 for c in t) for t in texts) >= 10
    assert script.distinct_n(texts, 3) > 0.35
    overlap, i, j = script.max_pairwise_overlap(texts)
    assert overlap < 0.5, (texts[i], texts[j])


def test_corpus_measures_on_known_inputs(script):
    assert script.distinct_n(["a b c a b c"], 3) == pytest.approx(3 / 4)
    assert script.max_pairwise_overlap(["a b c d", "a b c d", "x y z"])[:1] == (1.0,)
    assert script.max_pairwise_overlap(["a b c d", "b c d e"])[0] == pytest.approx(1 / 3)


# A small hand-written sentiment lexicon, independent of the composer's tiers.
NEGATIVE = ("misfire", "skip it", "rough draft", "step backward", "never", "nothing", "filler", "sags", "tired",
            "flat", "cliché", "disaster", "faint praise", "cannot", "inert", "retreat", "limp", "tedious", "dismal",
            "clumsy", "forgettable", "struggle", "fails", "overstays", "gray", "rarely", "safe", "lukewarm", "timid")
POSITIVE = ("best", "essential", "masterful", "gorgeous", "revelation", "perfect", "trusting", "world of its own",
            "rewards", "soars", "authority", "payoff", "achievement", "thrilling", "confident", "vivid", "generous",
            "blooms", "radiates", "sharp", "breathtaking", "transcendent", "flawless", "monumental", "glows")


def sentiment(text):
    text = text.lower()
    return sum(text.count(w) for w in POSITIVE) - sum(text.count(w) for w in NEGATIVE)


def test_tone_follows_the_score(reviews):
    pans = [sentiment(t) for _, s, _, t in reviews if s < 4.0]
    raves = [sentiment(t) for _, s, _, t in reviews if s >= 8.3]
    assert len(pans) >= 20 and len(raves) >= 20
    assert sum(b < 0 for b in pans) / len(pans) > 0.8
    assert sum(b > 0 for b in raves) / len(raves) > 0.8
    middling = [sentiment(t) for _, s, _, t in reviews if 5.5 <= s < 7.0]
    assert sum(pans) / len(pans) < sum(middling) / len(middling) < sum(raves) / len(raves)


def test_genre_vocabulary_follows_the_genre(script, reviews):
    # Single-genre reviews use their own genre's words more than any other genre's.
    def words(genre):
        v = script.VOCAB[genre]
        return [w.lower() for key in ("instruments", "production", "vocals", "scene", "moves", "short")
                for w in v[key]]

    vocab = {g: words(g) for g in SEED_GENRES}
    hits = total = 0
    for _, _, gs, text in reviews:
        if len(gs) != 1 or gs[0] is None:
            continue
        lowered = text.lower()
        counts = {g: sum(w in lowered for w in ws) for g, ws in vocab.items()}
        total += 1
        hits += counts[gs[0]] == max(counts.values()) and counts[gs[0]] > 0
    assert hits / total > 0.85


def test_script_regenerates_the_packaged_dump_exactly(script, tmp_path):
    out = tmp_path / "dump.sqlite"
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)],
                            capture_output=True, text=True, check=True)
    assert "wrote 300 reviews" in result.stdout
    assert script.read_tables(out) == script.read_tables(SAMPLE_DUMP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.sqlite"]  # the temp file was renamed away


def test_other_seeds_give_other_reviews(script):
    a = script.build_rows(seed=1, num_reviews=100)
    b = script.build_rows(seed=2, num_reviews=100)
    assert len(a["content"]) == len(b["content"]) == 100
    assert a["content"] != b["content"]
    assert script.build_rows(seed=1, num_reviews=100) == a


def test_too_few_reviews_is_a_one_line_error(tmp_path):
    out = tmp_path / "dump.sqlite"
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out), "--num-reviews", "10"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "num_reviews must be at least 88" in result.stderr
    assert not out.exists()
