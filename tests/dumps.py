"""Fixture dumps for the prepare tests: the same tricky rows in every format `prepare` reads.

`ROWS` holds one review per case a real dump throws at the cleaner; each
`write_*` function writes them in one format (Kaggle SQLite, seed SQLite,
CSV, JSONL, Parquet) the way that format would really carry them: genre
lists as a `genres` table, a comma-separated cell or a JSON/Parquet list;
undecodable bytes as raw invalid UTF-8 inside a text value. `KEPT` and
`DROPPED` say what `prepare` must make of them with default options.

`write_big_kaggle` writes a large Kaggle-schema dump for the scale measurement.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import sqlite3
from pathlib import Path
from typing import Any, Optional, Sequence

NON_ASCII = "Beyoncé’s “Lemonade” — 東京の夜, naïve café ümlaut\u00a0and a no-break space. Ça marche très bien."
HUGE_CHARS = 200_000  # over csv's default 131,072-character field limit


@dataclasses.dataclass(frozen=True)
class Row:
    """One review: what the dump holds and what `prepare` must make of it.

    Args:
        case: str. Which tricky case this is.
        score: float, str or None. As stored (text for "score as text").
        genres: tuple of str. In dump order; empty = missing.
        text: str or bytes. Bytes are written raw (invalid UTF-8).
        expect: str. `kept` or the drop reason under default options.
        clean: str or None. The text `prepare` keeps (after normalisation).
    """

    case: str
    score: Any
    genres: tuple
    text: Any
    expect: str
    clean: Optional[str] = None


ROWS = (
    Row("plain", 8.4, ("rock",), "A plain review of a rock record that is long enough to keep.", "kept",
        "A plain review of a rock record that is long enough to keep."),
    Row("multi_genre", 7.1, ("electronic", "rap"), "This review belongs to two genres at once, electronic and rap.",
        "kept", "This review belongs to two genres at once, electronic and rap."),
    Row("missing_genre", 6.0, (), "A review whose genre the dump never recorded at all.", "missing_genre"),
    Row("missing_score", None, ("rock",), "A review whose score is missing from the dump entirely.", "missing_score"),
    Row("score_text", "8.4", ("jazz",), "The score of this jazz review was stored as text, not a number.", "kept",
        "The score of this jazz review was stored as text, not a number."),
    Row("unparseable_score", "n/a", ("jazz",), "The score of this jazz review cannot be parsed as a number.",
        "unparseable_score"),
    Row("too_short", 5.0, ("metal",), "Too short.", "too_short"),
    Row("too_long", 5.5, ("metal",), ("This metal review goes on and on. " * 300)[:10000] + "!", "too_long"),
    Row("crlf", 6.5, ("folk/country",), "Line one of a review written on Windows.\r\nLine two follows right here.\r\n",
        "kept", "Line one of a review written on Windows.\nLine two follows right here."),
    Row("non_ascii", 9.1, ("pop/r&b",), NON_ASCII, "kept", NON_ASCII),
    Row("duplicate", 8.4, ("rock",), "A plain review of a rock  record that is long enough to keep.  ", "duplicate"),
    Row("empty_text", 3.0, ("rock",), "", "empty_text"),
    Row("undecodable", 4.0, ("rock",), b"Broken bytes \xff\xfe in the middle of an otherwise fine review.",
        "undecodable"),
    Row("huge", 7.7, ("rock",), ("An enormous review that never stops talking. " * 5000)[:HUGE_CHARS].strip(),
        "too_long", ("An enormous review that never stops talking. " * 5000)[:HUGE_CHARS].strip()),
    Row("multiline", 6.2, ("experimental",),
        "A review in two paragraphs.\n\n\n\nThe second one has   extra spaces\tand a tab.", "kept",
        "A review in two paragraphs.\n\nThe second one has extra spaces and a tab."),
    Row("french", 7.0, ("rock",),
        "Ce disque est une réussite: les chansons sont belles, la production est soignée et la voix est superbe.",
        "kept",
        "Ce disque est une réussite: les chansons sont belles, la production est soignée et la voix est superbe."),
)

KEPT = tuple(r for r in ROWS if r.expect == "kept")


def dropped(rows: Sequence[Row] = ROWS) -> dict[str, int]:
    """Reason -> count that `prepare` must report with default options."""
    out: dict[str, int] = {}
    for r in rows:
        if r.expect != "kept":
            out[r.expect] = out.get(r.expect, 0) + 1
    return out


def _text_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


# -- SQLite ----------------------------------------------------------------------------------------------------------
def write_kaggle(path: str | Path, rows: Sequence[Row] = ROWS) -> Path:
    """The Kaggle schema: reviews + content + genres (a NULL genre row for a missing genre, as the real dump has)."""
    path = Path(path)
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE reviews (reviewid INTEGER, title TEXT, artist TEXT, url TEXT, score REAL, best_new_music INTEGER,
            author TEXT, author_type TEXT, pub_date TEXT, pub_weekday INTEGER, pub_day INTEGER, pub_month INTEGER,
            pub_year INTEGER);
        CREATE TABLE genres (reviewid INTEGER, genre TEXT);
        CREATE TABLE content (reviewid INTEGER, content TEXT);
        CREATE TABLE labels (reviewid INTEGER, label TEXT);
    """)
    for i, r in enumerate(rows, start=1):
        conn.execute("INSERT INTO reviews VALUES (?, ?, ?, ?, ?, 0, 'a writer', 'contributor', '2017-01-05', 3, 5, 1, "
                     "2017)", (i, f"album {i}", f"artist {i}", f"https://example.com/{i}", r.score))
        # CAST keeps invalid UTF-8 as TEXT (a plain bytes parameter would be stored as a BLOB).
        conn.execute("INSERT INTO content VALUES (?, CAST(? AS TEXT))", (i, _text_bytes(r.text)))
        for genre in r.genres or (None,):
            conn.execute("INSERT INTO genres VALUES (?, ?)", (i, genre))
        conn.execute("INSERT INTO labels VALUES (?, 'a label')", (i,))
    conn.commit()
    conn.close()
    return path


def write_seed(path: str | Path, rows: Sequence[Row] = ROWS) -> Path:
    """The seed tutorial's single table `reviews(genre, score, review)`; several genres comma-separated."""
    path = Path(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE reviews (genre TEXT, score, review TEXT)")  # untyped score: text stays text
    for r in rows:
        conn.execute("INSERT INTO reviews VALUES (?, ?, CAST(? AS TEXT))",
                     (",".join(r.genres) or None, r.score, _text_bytes(r.text)))
    conn.commit()
    conn.close()
    return path


# -- flat files ------------------------------------------------------------------------------------------------------
def write_csv(path: str | Path, rows: Sequence[Row] = ROWS) -> Path:
    """CSV with a header; genres comma-separated in one cell; invalid UTF-8 written raw."""
    path = Path(path)
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "score", "genre", "text"])
        for i, r in enumerate(rows, start=1):
            text = r.text.decode("utf-8", errors="surrogateescape") if isinstance(r.text, bytes) else r.text
            writer.writerow([i, "" if r.score is None else r.score, ",".join(r.genres), text])
    return path


def write_jsonl(path: str | Path, rows: Sequence[Row] = ROWS, malformed_line: bool = False) -> Path:
    """JSON Lines; genres as a list; invalid UTF-8 raw inside the string; optionally one broken line."""
    path = Path(path)
    with open(path, "wb") as f:
        for i, r in enumerate(rows, start=1):
            record = {"id": i, "score": r.score, "genre": list(r.genres), "text": "\x00TEXT\x00"}
            line = json.dumps(record, ensure_ascii=False).encode("utf-8")
            # Splice the raw bytes in so invalid UTF-8 reaches the file as it would from a broken exporter.
            body = json.dumps(r.text, ensure_ascii=False).encode("utf-8") if isinstance(r.text, str) \
                else b'"' + r.text + b'"'
            f.write(line.replace(b'"\\u0000TEXT\\u0000"', body) + b"\n")
            if malformed_line and i == 2:
                f.write(b'{"id": 999, "score": 5.0, "genre": ["rock"], "text": "cut off\n')
    return path


def write_parquet(path: str | Path, rows: Sequence[Row] = ROWS) -> Path:
    """Parquet; genres as list<string>; the undecodable text stored as-is in a string column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    scores = [None if r.score is None else str(r.score) for r in rows]  # one type per column: text scores
    texts = pa.array([_text_bytes(r.text) for r in rows], type=pa.binary()).view(pa.string())  # no validation
    table = pa.table({
        "id": pa.array(range(1, len(rows) + 1), type=pa.int64()),
        "score": pa.array(scores, type=pa.string()),
        "genre": pa.array([list(r.genres) for r in rows], type=pa.list_(pa.string())),
        "text": texts,
    })
    pq.write_table(table, path)
    return path


WRITERS = {"kaggle": write_kaggle, "seed": write_seed, "csv": write_csv, "jsonl": write_jsonl,
           "parquet": write_parquet}
SUFFIXES = {"kaggle": ".sqlite", "seed": ".sqlite", "csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}


# -- scale -----------------------------------------------------------------------------------------------------------
WORDS = ("the record guitar drums bass synth vocal album song band hook chorus verse bridge loud quiet bright dark "
         "warm cold sharp slow fast dense sparse tender brutal glossy raw producer label debut sequel tour studio "
         "riff groove tempo melody harmony rhythm lyric texture noise silence feedback echo reverb sample loop beat "
         "club scene city night morning winter summer river highway memory heartbreak joy anger faith doubt").split()
GENRES = ("rock", "electronic", "rap", "pop/r&b", "experimental", "folk/country", "metal", "jazz", "global")


def write_big_kaggle(path: str | Path, reviews: int = 20_000, mean_chars: int = 5_000, seed: int = 0) -> Path:
    """A Kaggle-schema dump of `reviews` random-word reviews (about `reviews * mean_chars` bytes of text)."""
    rng = random.Random(seed)
    path = Path(path)
    if path.exists():
        path.unlink()
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE reviews (reviewid INTEGER, title TEXT, artist TEXT, url TEXT, score REAL, best_new_music INTEGER,
            author TEXT, author_type TEXT, pub_date TEXT, pub_weekday INTEGER, pub_day INTEGER, pub_month INTEGER,
            pub_year INTEGER);
        CREATE TABLE genres (reviewid INTEGER, genre TEXT);
        CREATE TABLE content (reviewid INTEGER, content TEXT);
    """)
    for i in range(1, reviews + 1):
        target = rng.randint(mean_chars // 2, mean_chars * 3 // 2)
        words = rng.choices(WORDS, k=target // 6)
        paragraphs = [" ".join(words[j:j + 120]).capitalize() + "." for j in range(0, len(words), 120)]
        conn.execute("INSERT INTO reviews VALUES (?, ?, ?, ?, ?, 0, 'a writer', '', '2017-01-05', 3, 5, 1, 2017)",
                     (i, f"album {i}", f"artist {i}", f"https://example.com/{i}", round(rng.uniform(0, 10), 1)))
        conn.execute("INSERT INTO content VALUES (?, ?)", (i, "\n\n".join(paragraphs)))
        for genre in rng.sample(GENRES, rng.choice((1, 1, 1, 2))):
            conn.execute("INSERT INTO genres VALUES (?, ?)", (i, genre))
    conn.commit()
    conn.close()
    return path
