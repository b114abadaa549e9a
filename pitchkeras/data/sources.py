"""Review dumps as pandas DataFrames: detect the format, then read it in chunks.

`open_source(path)` looks at the file's first bytes (and its extension) and
returns a `Source` whose `frames(columns)` yields DataFrames of the requested
columns, `CHUNK_ROWS` rows at a time:

- the public Kaggle Pitchfork SQLite dump: `pd.read_sql_query` over `reviews`
  joined with `content` on `reviewid` (text column `content`), with every
  `genres` row of a review gathered into a list under `genre`;
- the seed tutorial's single-table SQLite `reviews(genre, score, review)`, or
  any SQLite database with one table (or `--query` for anything else);
- CSV/TSV with a header row (`pd.read_csv`), JSON Lines (`pd.read_json`), and
  Parquet (pyarrow record batches turned into frames);
- gpt-2-simple's plain-text corpora: a `.txt` file, or a directory of them,
  whose documents are delimited by `<|startoftext|>`/`<|endoftext|>` (or
  `<|endoftext|>` alone), else one document per blank-line block.

Memory stays bounded: every reader is chunked; only the Kaggle genre table (a
few short strings per review) is held in memory.

Text that is not valid UTF-8 never raises: the value comes back as the
`UNDECODABLE` marker, so the caller can count and skip the row. A row that
cannot be parsed at all (a JSON Lines line that is not a JSON object, a CSV
line with more fields than the header) comes back with its `MALFORMED` column
True and its other columns empty.

Example:

>>> source = open_source("database.sqlite")
>>> source.kind, source.default_text_column
('kaggle', 'content')
>>> next(source.frames(["score", "genre", "content"])).iloc[0].to_dict()
{'score': 8.4, 'genre': ['rock'], 'content': 'The band ...', '__malformed__': False}
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from pitchkeras.conditioning import END_OF_TEXT, START_OF_TEXT
from pitchkeras.errors import InvalidArgument

CHUNK_ROWS = 1000  # rows per frame: amortises pandas' per-call overhead, bounds memory
MALFORMED = "__malformed__"  # the boolean column every frame carries: the row could not be parsed
TEXT_COLUMNS = ("text", "review", "content", "body", "bio", "biography", "description")  # detection order
SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".db3")
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
KAGGLE_TABLES = ("reviews", "content")  # `genres` is joined in when present
CSV_FIELD_LIMIT = 2**31 - 1  # reviews longer than csv's default 128 KiB field limit must just work

# Lone surrogates are what undecodable bytes become under errors="surrogateescape"
# (and what a JSON "\udc80" escape decodes to); neither can be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Undecodable:
    """Marker for a value whose bytes are not valid UTF-8."""

    def __repr__(self):
        return "UNDECODABLE"


UNDECODABLE = _Undecodable()
_BAD_LINE = object()  # what the CSV bad-line handler puts in each field of a line it rejects


def decode_value(value: Any) -> Any:
    """A raw value with its text decoded: `UNDECODABLE` when the bytes are not UTF-8.

    Lists (and the arrays pyarrow gives for list columns) come back as lists
    of decoded values; anything else as it was.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return UNDECODABLE
    if isinstance(value, str):
        return UNDECODABLE if _SURROGATE.search(value) else value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [decode_value(v) for v in value]
    return value


def objects(values: Iterable, index=None) -> pd.Series:
    """A Series of Python objects, never inferred as pandas' pyarrow-backed `str` dtype.

    Text stays as Python strings from reader to writer: pyarrow strings
    refuse the lone surrogates undecodable bytes become, and every
    per-value step would convert the whole column back and forth (copies
    that, on review-length texts, multiplied a chunk's memory).
    """
    return pd.Series(list(values), index=index, dtype=object)


def _object_frame(records: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame({name: objects(values) for name, values in records.items()})


def _decoded(frame: pd.DataFrame, columns: Sequence[str], malformed=False) -> pd.DataFrame:
    """`columns` of `frame`, decoded, with the `MALFORMED` column (missing columns read as empty)."""
    out = pd.DataFrame(index=frame.index)
    for name in columns:
        values = frame[name] if name in frame.columns else [None] * len(frame)
        out[name] = objects(map(decode_value, values), index=frame.index)
    out[MALFORMED] = malformed
    return out


def _quote(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


class Source:
    """A readable dump: its columns, a default text column, and a chunked frame reader.

    Attributes:
        path: Path. The file.
        kind: str. `kaggle`, `seed`, `sqlite-table`, `sqlite-query`, `csv`, `jsonl`, `parquet`,
            `txt` or `txt-dir`.
        columns: tuple of str. The column names frames can be asked for.
        default_text_column: str or None. The text column this kind implies.
        total: int or None. Progress units in the whole input (rows or bytes), if known.
        unit: str. `rows` or `B`.
        position: int. Progress units read so far.
        warnings: list of str. Things the reader noticed that the user should hear about.
    """

    kind = "?"
    unit = "rows"

    def __init__(self, path: Path, columns: Sequence[str], default_text_column: Optional[str] = None,
                 total: Optional[int] = None):
        self.path = path
        self.columns = tuple(columns)
        self.default_text_column = default_text_column
        self.total = total
        self.position = 0
        self.warnings: list[str] = []

    def frames(self, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        """Yield DataFrames of `columns` (decoded) plus `MALFORMED`, in source order."""
        raise NotImplementedError

    def close(self):
        pass


# -- SQLite --------------------------------------------------------------------------------------------------------
class SqliteSource(Source):
    """A SELECT over a SQLite database, read with `pd.read_sql_query` `CHUNK_ROWS` at a time."""

    def __init__(self, path, conn, kind, select, columns, default_text_column=None, total=None, genres=None):
        super().__init__(path, columns, default_text_column, total)
        self.kind = kind
        self.conn = conn
        self._select = select  # callable(columns) -> SQL
        self._genres = genres  # reviewid -> [raw genre], for the Kaggle schema

    def frames(self, columns):
        try:
            for chunk in pd.read_sql_query(self._select(columns), self.conn, chunksize=CHUNK_ROWS):
                if self._genres is not None and "genre" in columns:
                    chunk["genre"] = [self._genres.get(r, []) for r in chunk["reviewid"]]
                self.position += len(chunk)
                yield _decoded(chunk, columns)
        except (sqlite3.Error, pd.errors.DatabaseError) as err:
            raise InvalidArgument(f"{self.path}: SQLite error while reading: {err}") from None

    def close(self):
        self.conn.close()


def _table_columns(conn, table: str) -> list[str]:
    return [row[1].decode() if isinstance(row[1], bytes) else row[1]
            for row in conn.execute(f"PRAGMA table_info({_quote(table)})")]


def _connect(path: Path) -> tuple[sqlite3.Connection, list[str]]:
    """A read-only connection that hands text back as bytes (invalid UTF-8 is counted, not raised), and its tables."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.text_factory = bytes
        tables = [name.decode() for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
    except sqlite3.Error as err:
        raise InvalidArgument(f"{path}: not a readable SQLite database ({err})") from None
    return conn, tables


def _count(conn, table: str) -> int:
    return conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0]


def _query_source(path: Path, conn, query: str, found: str) -> SqliteSource:
    """`--query`: whatever SELECT the user wrote."""
    try:
        cursor = conn.execute(query)
    except sqlite3.Error as err:
        raise InvalidArgument(f"{path}: --query failed: {err} (tables found: {found})") from None
    columns = [d[0] for d in cursor.description or ()]
    cursor.close()
    if not columns:
        raise InvalidArgument(f"{path}: --query returned no columns; it must be a SELECT")
    return SqliteSource(path, conn, "sqlite-query", lambda wanted: query, columns)


def _is_kaggle(conn, tables: list[str]) -> bool:
    return all(t in tables and "reviewid" in _table_columns(conn, t) for t in KAGGLE_TABLES)


def _kaggle_genres(conn, tables: list[str]) -> Optional[dict]:
    """reviewid -> its genres in dump order (the first is the review's first genre), or None without a table."""
    if "genres" not in tables or not {"reviewid", "genre"} <= set(_table_columns(conn, "genres")):
        return None
    genres = pd.read_sql_query("SELECT reviewid, genre FROM genres ORDER BY rowid", conn)
    return genres.groupby("reviewid", sort=False)["genre"].agg(list).to_dict()


def _kaggle_source(path: Path, conn, tables: list[str]) -> SqliteSource:
    """The Kaggle dump: reviews LEFT JOIN content, genres gathered per review."""
    review_columns = [c for c in _table_columns(conn, "reviews") if c not in ("content", "genre")]
    genres = _kaggle_genres(conn, tables)
    columns = review_columns + ["content"] + (["genre"] if genres is not None else [])

    def select(wanted):
        picked = [c for c in wanted if c in review_columns]
        if genres is not None and "genre" in wanted and "reviewid" not in picked:
            picked.append("reviewid")
        exprs = [f"r.{_quote(c)}" for c in picked] + (["c.content"] if "content" in wanted else [])
        # LEFT JOIN: a review without a content row is read (and counted as empty), not lost.
        return (f"SELECT {', '.join(exprs) or 'r.reviewid'} FROM reviews r "
                "LEFT JOIN content c ON c.reviewid = r.reviewid ORDER BY r.rowid")

    return SqliteSource(path, conn, "kaggle", select, columns, "content", _count(conn, "reviews"), genres)


def _table_source(path: Path, conn, tables: list[str], found: str) -> SqliteSource:
    """One table: the seed's `reviews(genre, score, review)` or any other."""
    if "reviews" in tables:
        table = "reviews"
    elif len(tables) == 1:
        table = tables[0]
    else:
        raise InvalidArgument(
            f"{path}: no known tables (expected Kaggle `reviews`+`content`, or one table like seed "
            f"`reviews(genre, score, review)`); tables found: {found}; pass --query to choose")
    columns = _table_columns(conn, table)
    kind = "seed" if {"genre", "score", "review"} <= set(columns) else "sqlite-table"

    def select(wanted):
        # No ORDER BY: a table scan is already in rowid order, and a view has no rowid.
        return f"SELECT {', '.join(_quote(c) for c in wanted) or '1'} FROM {_quote(table)}"

    return SqliteSource(path, conn, kind, select, columns, total=_count(conn, table))


def _open_sqlite(path: Path, query: Optional[str]) -> SqliteSource:
    conn, tables = _connect(path)
    found = ", ".join(tables) or "none"
    try:
        if query is not None:
            return _query_source(path, conn, query, found)
        if _is_kaggle(conn, tables):
            return _kaggle_source(path, conn, tables)
        return _table_source(path, conn, tables, found)
    except InvalidArgument:
        conn.close()
        raise
    except (sqlite3.Error, pd.errors.DatabaseError) as err:
        conn.close()
        raise InvalidArgument(f"{path}: SQLite error: {err}") from None


# -- CSV -----------------------------------------------------------------------------------------------------------
class _CountingReader(io.RawIOBase):
    """A raw byte stream that counts what was read (progress in bytes for text readers)."""

    def __init__(self, raw):
        self.raw = raw
        self.count = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def close(self):
        self.raw.close()
        super().close()


def _open_counted(path: Path) -> tuple[io.TextIOWrapper, _CountingReader]:
    """`path` as text (invalid UTF-8 kept as lone surrogates, newlines as written), and its byte counter."""
    counter = _CountingReader(open(path, "rb", buffering=0))
    text = io.TextIOWrapper(io.BufferedReader(counter, 1 << 20), encoding="utf-8",
                            errors="surrogateescape", newline="")
    return text, counter


class CsvSource(Source):
    """A CSV/TSV file with a header row, read with `pd.read_csv` in chunks.

    The python engine keeps the csv module's quoting rules, and is the one
    that takes a bad-line handler: a line with more fields than the header
    comes back as a `MALFORMED` row (counted by the caller), not as a row
    whose text is some other column's.
    """

    kind = "csv"
    unit = "B"

    def __init__(self, path, delimiter):
        self.path = path
        self.delimiter = delimiter
        _raise_csv_limit()
        with _open_counted(path)[0] as f:
            try:
                header = list(self._read(f, nrows=0).columns)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
                if isinstance(err, pd.errors.EmptyDataError):
                    raise InvalidArgument(f"{path}: empty CSV (no header row)") from None
                raise InvalidArgument(f"{path}: malformed CSV header ({err})") from None
        header = [h.strip() for h in header]
        if not any(header):
            raise InvalidArgument(f"{path}: empty CSV (no header row)")
        if header[0].startswith("\ufeff"):  # a UTF-8 byte-order mark from Excel
            header[0] = header[0][1:]
        super().__init__(path, header, total=path.stat().st_size)

    def _read(self, f, **kwargs):
        width = getattr(self, "columns", None)
        return pd.read_csv(
            f, sep=self.delimiter, engine="python", dtype=object, keep_default_na=False, na_filter=False,
            on_bad_lines=lambda line: [_BAD_LINE] * len(width or line), **kwargs)

    def frames(self, columns):
        index = [self.columns.index(c) for c in columns]
        text, counter = _open_counted(self.path)
        with text:
            try:
                for chunk in self._read(text, chunksize=CHUNK_ROWS):
                    bad = chunk.iloc[:, 0].map(lambda v: v is _BAD_LINE).to_numpy(dtype=bool)
                    picked = chunk.iloc[:, index].set_axis(list(columns), axis=1)
                    picked.loc[bad] = None
                    self.position = counter.count
                    yield _decoded(picked, columns, malformed=bad)
            except (pd.errors.ParserError, ValueError) as err:
                raise InvalidArgument(f"{self.path}: malformed CSV: {err}") from None


def _raise_csv_limit():
    import csv

    csv.field_size_limit(CSV_FIELD_LIMIT)  # pandas' python engine reads through the csv module


# -- JSON Lines ----------------------------------------------------------------------------------------------------
class JsonlSource(Source):
    """A JSON Lines file: `pd.read_json(lines=True)` on each chunk of `CHUNK_ROWS` lines.

    A chunk that pandas refuses (a line that is not a JSON object, or text
    that is not UTF-8) is read again line by line, so only the bad lines are
    lost, each counted as `MALFORMED`.
    """

    kind = "jsonl"
    unit = "B"

    def __init__(self, path):
        columns = None
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    first = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except ValueError as err:
                    raise InvalidArgument(f"{path}: not JSON Lines (line {number}: {err})") from None
                if not isinstance(first, dict):
                    raise InvalidArgument(
                        f"{path}: not JSON Lines (line {number} is a JSON {type(first).__name__}, "
                        "expected one object per line)")
                columns = list(first)
                break
        if columns is None:
            raise InvalidArgument(f"{path}: empty file (no JSON object)")
        super().__init__(path, columns, total=path.stat().st_size)

    def frames(self, columns):
        with open(self.path, "rb", buffering=1 << 20) as f:
            for lines in _batches(f, CHUNK_ROWS):
                self.position += sum(len(line) for line in lines)
                texts = [line.decode("utf-8", errors="surrogateescape") for line in lines if line.strip()]
                if texts:
                    yield _json_frame(texts, columns)


def _json_frame(lines: list[str], columns: Sequence[str]) -> pd.DataFrame:
    """One frame of JSON Lines: pandas' parser, else line by line (a bad line becomes a `MALFORMED` row)."""
    if all(line.lstrip().startswith("{") for line in lines):
        try:
            frame = pd.read_json(io.StringIO("".join(lines)), lines=True, dtype=False, precise_float=True)
        except (ValueError, UnicodeError):
            pass  # a line that is not JSON, or text that is not UTF-8: read line by line below
        else:
            if len(frame) == len(lines):
                return _decoded(frame, columns)
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else None)
    bad = np.array([r is None for r in records])
    frame = _object_frame({c: [None if r is None else r.get(c) for r in records] for c in columns})
    return _decoded(frame, columns, malformed=bad)


# -- Parquet -------------------------------------------------------------------------------------------------------
class ParquetSource(Source):
    """A Parquet file read as record batches of `CHUNK_ROWS` rows, each turned into a frame.

    Not `pd.read_parquet`: it reads whole files (or whole row groups, a
    million rows each by pyarrow's default), and memory must stay bounded.
    """

    kind = "parquet"

    def __init__(self, path):
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise InvalidArgument(f"{path}: not a readable Parquet file ({err})") from None
        super().__init__(path, self.file.schema_arrow.names, total=self.file.metadata.num_rows)

    def frames(self, columns):
        import pyarrow as pa

        try:
            for batch in self.file.iter_batches(batch_size=CHUNK_ROWS, columns=list(columns)):
                # Strings go through bytes so invalid UTF-8 is counted like everywhere else.
                arrays = [_as_binary(pa, batch.column(batch.schema.get_field_index(c))) for c in columns]
                frame = pa.RecordBatch.from_arrays(arrays, names=list(columns)).to_pandas()
                self.position += batch.num_rows
                yield _decoded(frame, columns)
        except pa.ArrowException as err:
            raise InvalidArgument(f"{self.path}: Parquet error while reading: {err}") from None


def _as_binary(pa, array):
    if pa.types.is_string(array.type):
        return array.cast(pa.binary())
    if pa.types.is_large_string(array.type):
        return array.cast(pa.large_binary())
    return array


# -- plain text (gpt-2-simple corpora) -----------------------------------------------------------------------------
_DELIMITERS = re.compile(re.escape(START_OF_TEXT) + "|" + re.escape(END_OF_TEXT))


def _has_delimiter(path: Path) -> bool:
    """Whether `path` holds a gpt-2-simple delimiter (streamed: bounded memory on large files)."""
    tail = b""
    needles = (START_OF_TEXT.encode(), END_OF_TEXT.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-(len(END_OF_TEXT) + 2):]  # a delimiter split across two chunks
    return False


class TextSource(Source):
    """gpt-2-simple's `.txt` corpora: one file or a directory of them, one row per document.

    A file that holds `<|startoftext|>` or `<|endoftext|>` is cut at every
    delimiter and each non-blank piece is a document (so both
    `<|startoftext|>...<|endoftext|>` pairs and `<|endoftext|>` alone work).
    A file without any delimiter is split into blank-line blocks; one without
    blank lines either is a single document, which is named in `warnings`.
    Frames have one column, `text`.
    """

    unit = "B"

    def __init__(self, path: Path):
        if path.is_dir():
            self.kind = "txt-dir"
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise InvalidArgument(f"{path}: a directory with no .txt files (expected a gpt-2-simple corpus)")
        else:
            self.kind = "txt"
            files = [path]
        self.files = files
        super().__init__(path, ("text",), "text", total=sum(p.stat().st_size for p in files))

    def frames(self, columns):
        for documents in _batches(self._all_documents(), CHUNK_ROWS):
            yield _decoded(_object_frame({"text": documents}), columns)

    def _all_documents(self) -> Iterator[str]:
        whole = []  # files read as one document: no delimiter, no blank line
        for path in self.files:
            delimited = _has_delimiter(path)
            documents = 0
            for document in self._documents(path, delimited):
                documents += 1
                yield document
            if not delimited and documents == 1:
                whole.append(path.name)
        if whole and (self.kind == "txt" or len(whole) < len(self.files)):
            # Warn when it is likely a mistake: a single file, or some files of a directory but not all.
            self.warnings.append(
                f"{', '.join(whole[:3])}{' and others' if len(whole) > 3 else ''}: no <|endoftext|> delimiter "
                f"and no blank line, read as one document each; separate documents with <|endoftext|> "
                "or a blank line")

    def _documents(self, path: Path, delimited: bool) -> Iterator[str]:
        """The documents of one file, streamed line by line."""
        lines: list[str] = []
        with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as f:
            for line in f:
                self.position += len(line.encode("utf-8", errors="surrogateescape"))
                if delimited:
                    pieces = _DELIMITERS.split(line)
                    for piece in pieces[:-1]:  # every piece but the last ends at a delimiter
                        lines.append(piece)
                        document = "".join(lines)
                        lines = []
                        if document.strip():
                            yield document
                    lines.append(pieces[-1])
                elif line.strip():
                    lines.append(line)
                elif lines:  # a blank line ends a block
                    yield "".join(lines)
                    lines = []
        document = "".join(lines)
        if document.strip():
            yield document


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- detection -----------------------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """The format of `path`: `sqlite`, `parquet`, `csv`, `jsonl` or `txt` (a file or a directory).

    Magic bytes decide for SQLite and Parquet; text formats go by extension,
    then by a look at the first bytes. A directory is a `.txt` corpus.

    Raises:
        InvalidArgument: the file is missing, empty, or of no known format.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"{path}: no such file")
    if path.is_dir():
        return "txt"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        raise InvalidArgument(f"{path}: cannot read ({err.strerror or err})") from None
    suffix = path.suffix.lower()
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if not head.strip():
        raise InvalidArgument(f"{path}: empty file")
    if suffix in SQLITE_SUFFIXES:
        raise InvalidArgument(f"{path}: not a SQLite database (no SQLite header)")
    if suffix == ".parquet":
        raise InvalidArgument(f"{path}: not a Parquet file (no PAR1 header)")
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "txt"
    text = head.decode("utf-8", errors="replace")
    if b"\x00" not in head:
        if text.lstrip("\ufeff \t\r\n").startswith("{"):
            return "jsonl"
        first_line = text.splitlines()[0] if text.splitlines() else ""
        if "," in first_line or "\t" in first_line:
            return "csv"
    raise InvalidArgument(
        f"{path}: unknown format; expected a SQLite database, a Parquet file, CSV/TSV with a header row, "
        "JSON Lines (.jsonl), or a gpt-2-simple .txt corpus (a file or a directory)")


def open_source(path: str | Path, *, query: Optional[str] = None) -> Source:
    """Detect the format of `path` and open it for streaming.

    Args:
        path: str. The dump: SQLite (Kaggle or seed schema, or one table),
            CSV/TSV, JSON Lines, Parquet, or a `.txt` corpus (file or directory).
        query: str or None. For SQLite only: the SELECT to read instead of
            the detected schema.

    Raises:
        InvalidArgument: the file is missing, of no known format, or has no
            known tables; the message names the file and what was found.
    """
    path = Path(path)
    fmt = detect_format(path)
    if query is not None and fmt != "sqlite":
        raise InvalidArgument(f"{path}: --query applies to SQLite databases only; this is a {fmt} file")
    if fmt == "sqlite":
        return _open_sqlite(path, query)
    if fmt == "parquet":
        return ParquetSource(path)
    if fmt == "txt":
        return TextSource(path)
    if fmt == "csv":
        return CsvSource(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    return JsonlSource(path)


def find_column(source: Source, name: str, what: str) -> str:
    """The source column matching `name` (exact, else case-insensitive).

    Raises:
        InvalidArgument: no such column; the message lists the columns found.
    """
    if name in source.columns:
        return name
    folded = [c for c in source.columns if c.casefold() == name.casefold()]
    if len(folded) == 1:
        return folded[0]
    raise InvalidArgument(
        f"{source.path}: unknown column {name!r} for {what}; columns found ({source.kind}): "
        f"{', '.join(source.columns) or 'none'}")


def detect_text_column(source: Source) -> str:
    """The text column: the kind's default, else the first of `TEXT_COLUMNS` present.

    Raises:
        InvalidArgument: none found; the message lists the columns found.
    """
    if source.default_text_column:
        return source.default_text_column
    folded = {c.casefold(): c for c in source.columns}
    for candidate in TEXT_COLUMNS:
        if candidate in folded:
            return folded[candidate]
    raise InvalidArgument(
        f"{source.path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); columns found "
        f"({source.kind}): {', '.join(source.columns) or 'none'}; pass --text-column")
