"""Review dumps as a stream of rows: detect the format, then read it in chunks.

`open_source(path)` looks at the file's first bytes (and its extension) and
returns a `Source` that streams rows as dicts of the requested columns:

- the public Kaggle Pitchfork SQLite dump: `reviews` joined with `content` on
  `reviewid` (text column `content`), with every `genres` row of a review
  gathered into a list under `genre`;
- the seed tutorial's single-table SQLite `reviews(genre, score, review)`, or
  any SQLite database with one table (or `--query` for anything else);
- CSV/TSV with a header row, JSON Lines, and Parquet;
- gpt-2-simple's plain-text corpora: a `.txt` file, or a directory of them,
  whose documents are delimited by `<|startoftext|>`/`<|endoftext|>` (or
  `<|endoftext|>` alone), else one document per blank-line block.

Memory stays bounded: SQLite is read with `fetchmany`, CSV and JSONL line by
line, Parquet with `iter_batches`; only the Kaggle genre table (a few short
strings per review) is held in memory.

Text that is not valid UTF-8 never raises: the value comes back as the
`UNDECODABLE` marker, so the caller can count and skip the row. A JSONL line
that is not a JSON object comes back as `None` (a malformed row).

Example:

>>> source = open_source("database.sqlite")
>>> source.kind, source.default_text_column
('kaggle', 'content')
>>> next(source.rows(["score", "genre", "content"]))
{'score': 8.4, 'genre': ['rock'], 'content': 'The band ...'}
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from pitchkeras.errors import InvalidArgument

FETCH_ROWS = 1000  # rows per sqlite fetchmany / parquet batch: amortises call overhead, bounds memory
TEXT_COLUMNS = ("text", "review", "content", "body", "bio", "biography", "description")  # detection order
SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".db3")
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"  # gpt-2-simple's document delimiters
KAGGLE_TABLES = ("reviews", "content")  # `genres` is joined in when present

# Lone surrogates are what undecodable bytes become under errors="surrogateescape"
# (and what a JSON "\udc80" escape decodes to); neither can be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Undecodable:
    """Marker for a value whose bytes are not valid UTF-8."""

    def __repr__(self):
        return "UNDECODABLE"


UNDECODABLE = _Undecodable()


def decode_value(value: Any) -> Any:
    """A raw value with its text decoded: `UNDECODABLE` when the bytes are not UTF-8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return UNDECODABLE
    if isinstance(value, str):
        return UNDECODABLE if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def _quote(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


class Source:
    """A readable dump: its columns, a default text column, and a row stream.

    Attributes:
        path: Path. The file.
        kind: str. `kaggle`, `seed`, `sqlite-table`, `sqlite-query`, `csv`, `jsonl`, `parquet`,
            `txt` or `txt-dir`.
        columns: tuple of str. The column names rows can be asked for.
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

    def rows(self, columns: Sequence[str]) -> Iterator[Optional[dict]]:
        """Yield one dict per row holding `columns` (decoded), or None for a malformed row."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} ({', '.join(self.columns)})"

    def close(self):
        pass


# -- SQLite --------------------------------------------------------------------------------------------------------
class SqliteSource(Source):
    """A SELECT over a SQLite database, read `FETCH_ROWS` at a time."""

    def __init__(self, path, conn, kind, select, columns, default_text_column=None, total=None, genres=None):
        super().__init__(path, columns, default_text_column, total)
        self.kind = kind
        self.conn = conn
        self._select = select  # callable(columns) -> (sql, output column names)
        self._genres = genres  # reviewid -> [raw genre], for the Kaggle schema

    def rows(self, columns):
        sql, names = self._select(columns)
        try:
            cursor = self.conn.execute(sql)
            while True:
                chunk = cursor.fetchmany(FETCH_ROWS)
                if not chunk:
                    break
                for raw in chunk:
                    row = dict(zip(names, raw))
                    if self._genres is not None and "genre" in columns:
                        row["genre"] = self._genres.get(row.get("reviewid"), [])
                    yield {name: decode_value(row.get(name)) for name in columns}
                self.position += len(chunk)
        except sqlite3.Error as err:
            raise InvalidArgument(f"{self.path}: SQLite error while reading: {err}") from None

    def close(self):
        self.conn.close()


def _table_columns(conn, table: str) -> list[str]:
    return [row[1].decode() if isinstance(row[1], bytes) else row[1]
            for row in conn.execute(f"PRAGMA table_info({_quote(table)})")]


def _open_sqlite(path: Path, query: Optional[str]) -> SqliteSource:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.text_factory = bytes  # decode ourselves: invalid UTF-8 is counted, not raised
        tables = [name.decode() for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
    except sqlite3.Error as err:
        raise InvalidArgument(f"{path}: not a readable SQLite database ({err})") from None
    found = ", ".join(tables) or "none"

    def count(table):
        return conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0]

    try:
        if query is not None:
            try:
                cursor = conn.execute(query)
            except sqlite3.Error as err:
                raise InvalidArgument(f"{path}: --query failed: {err} (tables found: {found})") from None
            columns = [d[0] for d in cursor.description or ()]
            cursor.close()
            if not columns:
                raise InvalidArgument(f"{path}: --query returned no columns; it must be a SELECT")

            def select_query(wanted):
                return query, columns

            return SqliteSource(path, conn, "sqlite-query", select_query, columns)

        if all(t in tables for t in KAGGLE_TABLES) and "reviewid" in _table_columns(conn, "reviews") \
                and "reviewid" in _table_columns(conn, "content"):
            review_columns = [c for c in _table_columns(conn, "reviews") if c not in ("content", "genre")]
            columns = review_columns + ["content"]
            genres = None
            if "genres" in tables and {"reviewid", "genre"} <= set(_table_columns(conn, "genres")):
                # Several genre rows per review, in dump order; the first is the review's first genre.
                genres = {}
                for reviewid, genre in conn.execute("SELECT reviewid, genre FROM genres ORDER BY rowid"):
                    genres.setdefault(reviewid, []).append(genre)
                columns.append("genre")

            def select_kaggle(wanted):
                picked = [c for c in wanted if c in review_columns]
                exprs = [f"r.{_quote(c)}" for c in picked]
                names = list(picked)
                if "content" in wanted:
                    exprs.append("c.content")
                    names.append("content")
                if genres is not None and "genre" in wanted and "reviewid" not in picked:
                    exprs.append("r.reviewid")
                    names.append("reviewid")
                # LEFT JOIN: a review without a content row is read (and counted as empty), not lost.
                sql = (f"SELECT {', '.join(exprs) or 'r.reviewid'} FROM reviews r "
                       "LEFT JOIN content c ON c.reviewid = r.reviewid ORDER BY r.rowid")
                return sql, names

            return SqliteSource(path, conn, "kaggle", select_kaggle, columns, "content", count("reviews"), genres)

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

        def select_table(wanted):
            # No ORDER BY: a table scan is already in rowid order, and a view has no rowid.
            return f"SELECT {', '.join(_quote(c) for c in wanted) or '1'} FROM {_quote(table)}", list(wanted)

        source = SqliteSource(path, conn, kind, select_table, columns, total=count(table))
        source.table = table
        return source
    except InvalidArgument:
        conn.close()
        raise
    except sqlite3.Error as err:
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


def _csv_limit():
    # Reviews longer than csv's default 128 KiB field limit must just work.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class CsvSource(Source):
    """A CSV/TSV file with a header row, read line by line."""

    kind = "csv"
    unit = "B"

    def __init__(self, path, delimiter):
        self.path = path
        self.delimiter = delimiter
        _csv_limit()
        with self._open()[0] as f:
            try:
                header = next(csv.reader(f, delimiter=delimiter), None)
            except csv.Error as err:
                raise InvalidArgument(f"{path}: malformed CSV header ({err})") from None
        if not header or not any(h.strip() for h in header):
            raise InvalidArgument(f"{path}: empty CSV (no header row)")
        header = [h.strip() for h in header]
        if header[0].startswith("\ufeff"):  # a UTF-8 byte-order mark from Excel
            header[0] = header[0][1:]
        super().__init__(path, header, total=path.stat().st_size)

    def _open(self):
        counter = _CountingReader(open(self.path, "rb", buffering=0))
        text = io.TextIOWrapper(io.BufferedReader(counter, 1 << 20), encoding="utf-8",
                                errors="surrogateescape", newline="")
        return text, counter

    def rows(self, columns):
        index = [self.columns.index(c) for c in columns]
        text, counter = self._open()
        with text:
            reader = csv.reader(text, delimiter=self.delimiter)
            try:
                next(reader, None)  # header
                for n, record in enumerate(reader):
                    if not record:
                        continue  # a blank line is not a row
                    yield {c: decode_value(record[i]) if i < len(record) and record[i] != "" else None
                           for c, i in zip(columns, index)}
                    if n % 256 == 0:
                        self.position = counter.count
            except csv.Error as err:
                raise InvalidArgument(f"{self.path}: malformed CSV near line {reader.line_num}: {err}") from None
        self.position = counter.count


# -- JSON Lines ----------------------------------------------------------------------------------------------------
class JsonlSource(Source):
    """A JSON Lines file: one object per line, read line by line."""

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

    def rows(self, columns):
        with open(self.path, "rb", buffering=1 << 20) as f:
            for line in f:
                self.position += len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    yield None
                    continue
                yield {c: decode_value(record.get(c)) for c in columns}


# -- Parquet -------------------------------------------------------------------------------------------------------
class ParquetSource(Source):
    """A Parquet file read in record batches (only the requested columns)."""

    kind = "parquet"

    def __init__(self, path):
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise InvalidArgument(f"{path}: not a readable Parquet file ({err})") from None
        super().__init__(path, self.file.schema_arrow.names, total=self.file.metadata.num_rows)

    def rows(self, columns):
        import pyarrow as pa

        try:
            for batch in self.file.iter_batches(batch_size=FETCH_ROWS, columns=list(columns)):
                values = []
                for name in columns:
                    array = batch.column(batch.schema.get_field_index(name))
                    # Strings go through bytes so invalid UTF-8 is counted like everywhere else.
                    if pa.types.is_string(array.type):
                        array = array.cast(pa.binary())
                    elif pa.types.is_large_string(array.type):
                        array = array.cast(pa.large_binary())
                    values.append(array.to_pylist())
                for row in zip(*values):
                    yield {name: decode_value(v) for name, v in zip(columns, row)}
                self.position += batch.num_rows
        except pa.ArrowException as err:
            raise InvalidArgument(f"{self.path}: Parquet error while reading: {err}") from None


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
    Rows have one column, `text`.
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

    def rows(self, columns):
        whole = []  # files read as one document: no delimiter, no blank line
        for path in self.files:
            delimited = _has_delimiter(path)
            documents = 0
            for document in self._documents(path, delimited):
                documents += 1
                yield {c: decode_value(document) if c == "text" else None for c in columns}
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
