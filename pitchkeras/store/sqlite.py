"""The embedded default store: one SQLite file in WAL mode.

Every pick is one write transaction (`BEGIN IMMEDIATE`, then a single
`UPDATE ... WHERE id = (least-shown match) RETURNING *`), so two callers, in
one process or in several, never get the same least-shown review for one
increment. WAL lets readers (`get_by_id`, `counts`) run while a pick writes.

Threads share one connection per thread; writers of one process queue on a
Python lock before SQLite's own lock, which is cheaper than SQLite's busy
handler (it sleeps in steps of up to 100 ms). Other processes wait on the
busy timeout.

Example:

    with open_store("sqlite:///reviews.db") as store:
        store.add_reviews([Review(id=review_id("run1", {"score": 8.0}, 0, 0), text="Loud.", score=8.0)])
        review = store.get_review(score=8.0)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import threading
from typing import Iterable, Iterator, Optional, Sequence

from pitchkeras.errors import InvalidArgument, NotFound, Unavailable
from pitchkeras.store.base import (
    SAMPLER_OPTIONS,
    ConditionCount,
    Review,
    ReviewStore,
    UnusableRecord,
    describe,
    review_from_record,
    review_to_record,
    validate_review_id,
    validate_score,
)

#: Seconds a connection waits for another process's write lock before Unavailable.
DEFAULT_BUSY_TIMEOUT_S = 30.0
# SQLite's default limit on host parameters is 32766 (3.32+); stay well under it.
_MAX_PARAMS = 900
# Reviews per write transaction in add_reviews: large enough to amortize the
# fsync, small enough that a pick never waits long behind a bulk load.
_ADD_CHUNK = 500

_COLUMN_NAMES = ("id", "text", "score", "genre", "extra_conditions", "length", "added", "selection_count",
                 "model_version", "seed", "prompt") + tuple(option.name for option in SAMPLER_OPTIONS)
_COLUMNS = ", ".join(_COLUMN_NAMES)
# A column per kept sampler setting, (name, type): added to a file that lacks it when the file is opened, so
# files written before a setting existed gain it (None: unknown) and a new setting needs no edit here.
_SAMPLER_COLUMNS = tuple((option.name, option.column_type) for option in SAMPLER_OPTIONS)

# The table as files have had it so far (columns in their order, so a new file is like an old one); a sampler
# setting added later is not written here: _SAMPLER_COLUMNS adds its column.
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS reviews (
        id TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        score REAL,
        genre TEXT,
        extra_conditions TEXT NOT NULL DEFAULT '{}',
        length INTEGER NOT NULL,
        added TEXT NOT NULL,
        selection_count INTEGER NOT NULL DEFAULT 0,
        model_version TEXT NOT NULL DEFAULT '',
        temperature REAL,
        top_k INTEGER,
        top_p REAL,
        seed INTEGER,
        prompt TEXT NOT NULL DEFAULT '',
        repetition_penalty REAL,
        no_repeat_ngram_size INTEGER
    )
    """,
    # One index per filter shape of get_review, each ending in the pick order
    # so the least-shown row is the first index entry (no sort).
    "CREATE INDEX IF NOT EXISTS reviews_genre_score_pick ON reviews "
    "(genre COLLATE NOCASE, score, selection_count, added, id)",
    "CREATE INDEX IF NOT EXISTS reviews_score_pick ON reviews (score, selection_count, added, id)",
    "CREATE INDEX IF NOT EXISTS reviews_pick ON reviews (selection_count, added, id)",
)

_INSERT_SQL = f"INSERT OR IGNORE INTO reviews ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMN_NAMES))})"

_PICK_SQL = (
    "UPDATE reviews SET selection_count = selection_count + 1 "
    "WHERE id = (SELECT id FROM reviews {where} ORDER BY selection_count, added, id LIMIT 1) "
    f"RETURNING {_COLUMNS}"
)
_WHERE_GENRE = "genre = ? COLLATE NOCASE"
_WHERE_SCORE = "score = ?"

_GET_BY_ID_SQL = f"SELECT {_COLUMNS} FROM reviews WHERE id = ?"
_EXISTING_IDS_SQL = "SELECT id FROM reviews WHERE id IN ({placeholders})"
_COUNTS_SQL = "SELECT score, genre, COUNT(*) FROM reviews GROUP BY score, genre"


@contextlib.contextmanager
def _translate_errors(where: str = "") -> Iterator[None]:
    """Turn sqlite3 exceptions into the library's errors.

    Messages name the database only when `where` is given (opening it, for the
    operator); at serve time they reach callers, who must not learn where the store is.
    """
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise InvalidArgument(f"{where}rejected write: {exc}") from exc
    except sqlite3.OperationalError as exc:
        # Locked past the busy timeout, unable to open, disk I/O, read-only file.
        raise Unavailable(f"{where}SQLite is unavailable: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise Unavailable(f"{where}not a usable SQLite database: {exc}") from exc


def _path_from_uri(uri: str) -> str:
    """`sqlite:///rel/x.db` -> `rel/x.db`; `sqlite:////abs/x.db` -> `/abs/x.db`."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or len(uri) == len(prefix):
        raise InvalidArgument(
            f"bad SQLite store URI {uri!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = uri[len(prefix):]
    if path == ":memory:" or "?" in path:
        raise InvalidArgument(
            f"bad SQLite store URI {uri!r}: give a file path (in-memory and query options are not supported)"
        )
    return path


def _row_to_review(row: tuple, uri: str) -> Review:
    record = dict(zip(_COLUMN_NAMES, row))
    try:
        record["extra_conditions"] = json.loads(record["extra_conditions"] or "{}")
    except (TypeError, ValueError):
        record["extra_conditions"] = None  # review_from_record logs and defaults it
    try:
        return review_from_record(record.pop("id"), record, source=uri)
    except UnusableRecord as exc:
        raise NotFound(str(exc)) from None


def _review_to_row(review: Review, added: str) -> tuple:
    record = review_to_record(review)
    record.update(id=review.id, added=added,
                  extra_conditions=json.dumps(record["extra_conditions"], sort_keys=True))
    return tuple(record[name] for name in _COLUMN_NAMES)


class SQLiteStore(ReviewStore):
    """Reviews in one SQLite file (WAL), safe for many threads and processes.

    Args:
        path: str. The database file; created (with its parent folders) if missing.
        busy_timeout: float. Seconds to wait for another process's write lock
            before raising Unavailable.
    """

    def __init__(self, path: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S):
        self.path = path
        self.uri = "sqlite:///" + path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # Serializes this process's writers before they reach SQLite's lock.
        self._write_lock = threading.Lock()
        self._closed = False
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"{self.uri}: cannot create folder {parent}: {exc}") from exc
        with self._write_lock, _translate_errors(f"{self.uri}: "):
            conn = self._connection()
            # WAL is persistent in the file; setting it needs a moment without readers.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                present = {row[1] for row in conn.execute("PRAGMA table_info(reviews)")}
                for name, kind in _SAMPLER_COLUMNS:
                    if name not in present:
                        conn.execute(f"ALTER TABLE reviews ADD COLUMN {name} {kind}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @classmethod
    def from_uri(cls, uri: str) -> "SQLiteStore":
        """Open `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
        return cls(_path_from_uri(uri))

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise Unavailable("the store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            # NORMAL is durable across application crashes in WAL mode; only
            # an OS crash can lose the last commits, which a rerun regenerates.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def add_reviews(self, reviews: Iterable[Review]) -> int:
        added = 0
        chunk: list[tuple] = []
        for review in reviews:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat()
            chunk.append(_review_to_row(review, now))
            if len(chunk) >= _ADD_CHUNK:
                added += self._insert(chunk)
                chunk = []
        if chunk:
            added += self._insert(chunk)
        return added

    def _insert(self, rows: list[tuple]) -> int:
        with self._write_lock, _translate_errors():
            conn = self._connection()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_SQL, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before

    def get_review(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> Review:
        score = validate_score(score)
        clauses, params = [], []
        if genre is not None:
            clauses.append(_WHERE_GENRE)
            params.append(str(genre))
        if score is not None:
            clauses.append(_WHERE_SCORE)
            params.append(score)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._write_lock, _translate_errors():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(_PICK_SQL.format(where=where), params).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if row is None:
            raise NotFound(f"no review matches {describe(score, genre)}")
        return _row_to_review(row, self.uri)

    def get_by_id(self, review_id: str) -> Review:
        validate_review_id(review_id)
        with _translate_errors():
            row = self._connection().execute(_GET_BY_ID_SQL, (review_id,)).fetchone()
        if row is None:
            raise NotFound(f"no review with id {review_id}")
        return _row_to_review(row, self.uri)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))
        found: set[str] = set()
        with _translate_errors():
            conn = self._connection()
            for start in range(0, len(ids), _MAX_PARAMS):
                part = ids[start:start + _MAX_PARAMS]
                sql = _EXISTING_IDS_SQL.format(placeholders=", ".join("?" * len(part)))
                found.update(r[0] for r in conn.execute(sql, part))
        return found

    def counts(self) -> list[ConditionCount]:
        with _translate_errors():
            rows = self._connection().execute(_COUNTS_SQL).fetchall()
        return sorted((ConditionCount(score=s, genre=g, count=n) for s, g, n in rows), key=_count_order)

    def close(self) -> None:
        with self._connections_lock:
            self._closed = True
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()


def _count_order(c: ConditionCount):
    # Genre then score; a missing condition sorts first, as in SQL.
    return (c.genre is not None, c.genre or "", c.score is not None, c.score or 0.0)
