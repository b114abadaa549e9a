"""Review dumps as pandas DataFrames: detect the format, then read it in chunks.

`open_source(path)` looks at the file's first bytes (and its extension) and returns a `Source` whose
`frames(columns)` yields DataFrames of the requested columns, `CHUNK_ROWS` rows at a time, each read with the reader
pandas has for it: `pd.read_sql_query` for SQLite (the Kaggle dump's `reviews` LEFT JOIN `content`, with every
`genres` row of a review gathered into a list under `genre`; the seed's one table `reviews(genre, score, review)`,
any one table, or `--query`), `pd.read_csv` (C parser) for CSV/TSV with a header row, `pd.read_json(lines=True,
chunksize=)` for JSON Lines, pyarrow record batches for Parquet, and gpt-2-simple's `.txt` corpora (a file or a
directory; documents between `<|startoftext|>`/`<|endoftext|>`, or `<|endoftext|>` alone, else one per blank-line
block). Every reader is chunked, so memory stays bounded; only the Kaggle genre table (a few short strings per
review) is held whole.

Text comes back as `str` (objects, or pandas' `str` dtype where the reader makes it). Text that is not valid UTF-8
never raises: its cell comes back missing and the row's `UNDECODABLE` column True, so the caller can count and skip
the row. A row that cannot be parsed at all (a JSON Lines line that is not an object, a CSV line with more fields
than the header) has `MALFORMED` True.

>>> source = open_source("database.sqlite")
>>> source.kind, source.default_text_column
('kaggle', 'content')
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import re
import sqlite3
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from pitchkeras.conditioning import END_OF_TEXT, START_OF_TEXT
from pitchkeras.errors import InvalidArgument

CHUNK_ROWS = 1000  # rows per frame: amortises pandas' per-call overhead, bounds memory
MALFORMED = "__malformed__"  # boolean column of every frame: the row could not be parsed
UNDECODABLE = "__undecodable__"  # boolean column of every frame: a value's bytes were not UTF-8
TEXT_COLUMNS = ("text", "review", "content", "body", "bio", "biography", "description")  # detection order
SQLITE_MAGIC, PARQUET_MAGIC = b"SQLite format 3\x00", b"PAR1"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".db3")
CSV_SUFFIXES, JSONL_SUFFIXES, TEXT_SUFFIXES = (".csv", ".tsv"), (".jsonl", ".ndjson", ".json"), (".txt",)
KAGGLE_TABLES = ("reviews", "content")  # `genres` is joined in when present
CSV_FIELD_LIMIT = 2**31 - 1  # the python parser reads through the csv module, whose default is 128 KiB a field

# Lone surrogates are what undecodable bytes become under errors="surrogateescape"
# (and what a JSON "\udc80" escape decodes to); neither can be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
_BAD = object()  # a value that failed to decode, inside this module only
_BAD_LINE = object()  # what the CSV bad-line handler puts in each field of a line it rejects
_decode = functools.partial(str, encoding="utf-8", errors="surrogateescape")
_DELIMITERS = re.compile(re.escape(START_OF_TEXT) + "|" + re.escape(END_OF_TEXT))


def _decode_value(value):
    """bytes -> str, lists element-wise; `_BAD` for what is not UTF-8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return _BAD
    if isinstance(value, str):
        return _BAD if _SURROGATE.search(value) else value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_decode_value(v) for v in value]
    return value


def _decoded(column: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """`column` with bytes decoded, and which rows held undecodable text (their cells then missing)."""
    clean = np.zeros(len(column), dtype=bool)
    if column.dtype != object:
        return column, clean
    kind = pd.api.types.infer_dtype(column, skipna=True)
    if kind in ("floating", "integer", "mixed-integer-float"):
        return column.infer_objects(), clean
    if kind in ("string", "empty"):
        try:  # only non-ASCII text can hold a lone surrogate, and UTF-8 refuses those: the fast check
            "".join(v for v in column if isinstance(v, str) and not v.isascii()).encode("utf-8")
            return column, clean
        except UnicodeEncodeError:
            bad = column.str.contains(_SURROGATE, na=False).to_numpy(dtype=bool)
            return column.mask(bad), bad
    values = column.map(_decode_value)  # lists, bytes, mixed: value by value
    bad = values.map(lambda v: v is _BAD or (isinstance(v, list) and any(x is _BAD for x in v)))
    return values.mask(bad), bad.to_numpy(dtype=bool)


def _frame(data: pd.DataFrame, columns: Sequence[str], malformed=False) -> pd.DataFrame:
    """`columns` of `data` decoded (missing columns read as empty), with `MALFORMED` and `UNDECODABLE`."""
    out, undecodable = {}, np.zeros(len(data), dtype=bool)
    for name in columns:
        values = data[name] if name in data.columns else pd.Series(None, index=data.index, dtype=object)
        out[name], bad = _decoded(values)
        undecodable |= bad
    return pd.DataFrame(out, index=data.index).assign(**{MALFORMED: malformed, UNDECODABLE: undecodable})


class Source:
    """A readable dump: its columns, a default text column, and a chunked frame reader.

    Attributes:
        path: Path. The file.
        kind: str. `kaggle`, `seed`, `sqlite-table`, `sqlite-query`, `csv`, `jsonl`, `parquet`, `txt`, `txt-dir`.
        columns: tuple of str. What frames can be asked for.
        default_text_column: str or None. The text column this kind implies.
        total, unit, position: int or None, str, int. Progress: units (`rows` or `B`) in all and read so far.
        warnings: list of str. What the reader noticed that the user should hear about.
        fallbacks: int. Times a fast reader gave way to a slower one the input needed (CSV's python parser).
    """

    kind, unit = "?", "rows"

    def __init__(self, path: Path, columns: Sequence[str], default_text_column: Optional[str] = None,
                 total: Optional[int] = None):
        self.path, self.columns, self.default_text_column, self.total = path, tuple(columns), default_text_column, total
        self.position, self.warnings, self.fallbacks = 0, [], 0

    def frames(self, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        """Yield DataFrames of `columns` plus `MALFORMED` and `UNDECODABLE`, in source order."""
        raise NotImplementedError

    def close(self):
        pass


# -- SQLite --------------------------------------------------------------------------------------------------------
def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_text(raw: bytes):
    """TEXT as str; bytes that are not UTF-8 stay bytes (pandas keeps such a column as objects; `_decoded` flags)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class SqliteSource(Source):
    """A SELECT over a SQLite database, read with `pd.read_sql_query` `CHUNK_ROWS` at a time."""

    def __init__(self, path, conn, kind, select, columns, default_text_column=None, total=None, genres=None):
        super().__init__(path, columns, default_text_column, total)
        self.kind, self.conn = kind, conn
        self._select = select  # callable(columns) -> SQL
        self._genres = genres  # reviewid -> [genre], for the Kaggle schema

    def frames(self, columns):
        def frame(chunk):
            if self._genres is not None and "genre" in columns:
                chunk["genre"] = chunk["reviewid"].map(lambda r: self._genres.get(r, []))
            self.position += len(chunk)
            return _frame(chunk, columns)

        try:  # `yield from map`: no reference to a chunk stays here while the caller works on it
            yield from map(frame, pd.read_sql_query(self._select(columns), self.conn, chunksize=CHUNK_ROWS))
        except (sqlite3.Error, pd.errors.DatabaseError) as err:
            raise InvalidArgument(f"{self.path}: SQLite error while reading: {err}") from None

    def close(self):
        self.conn.close()


def _open_sqlite(path: Path, query: Optional[str]) -> SqliteSource:
    """Read-only; `--query` if given, else the Kaggle schema if present, else the one table (the seed's)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.text_factory = _sqlite_text
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
    except sqlite3.Error as err:
        raise InvalidArgument(f"{path}: not a readable SQLite database ({err})") from None
    found = ", ".join(tables) or "none"
    try:
        if query is not None:
            try:
                columns = [d[0] for d in conn.execute(query).description or ()]
            except sqlite3.Error as err:
                raise InvalidArgument(f"{path}: --query failed: {err} (tables found: {found})") from None
            if not columns:
                raise InvalidArgument(f"{path}: --query returned no columns; it must be a SELECT")
            return SqliteSource(path, conn, "sqlite-query", lambda wanted: query, columns)
        if all(t in tables and "reviewid" in _table_columns(conn, t) for t in KAGGLE_TABLES):
            return _kaggle_source(path, conn, tables)
        if "reviews" not in tables and len(tables) != 1:
            raise InvalidArgument(
                f"{path}: no known tables (expected Kaggle `reviews`+`content`, or one table like seed "
                f"`reviews(genre, score, review)`); tables found: {found}; pass --query to choose")
        table = "reviews" if "reviews" in tables else tables[0]
        columns = _table_columns(conn, table)
        kind = "seed" if {"genre", "score", "review"} <= set(columns) else "sqlite-table"
        total = conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0]
        # No ORDER BY: a table scan is already in rowid order, and a view has no rowid.
        return SqliteSource(path, conn, kind, lambda wanted: f"SELECT {', '.join(map(_quote, wanted)) or '1'} "
                            f"FROM {_quote(table)}", columns, total=total)
    except BaseException as err:
        conn.close()
        if isinstance(err, (sqlite3.Error, pd.errors.DatabaseError)):
            raise InvalidArgument(f"{path}: SQLite error: {err}") from None
        raise


def _table_columns(conn, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({_quote(table)})")]


def _kaggle_source(path: Path, conn, tables: list[str]) -> SqliteSource:
    """reviews LEFT JOIN content (a review without content is read, and counted as empty), genres per review."""
    review_columns = [c for c in _table_columns(conn, "reviews") if c not in ("content", "genre")]
    genres = None
    if "genres" in tables and {"reviewid", "genre"} <= set(_table_columns(conn, "genres")):
        table = pd.read_sql_query("SELECT reviewid, genre FROM genres ORDER BY rowid", conn)
        genres = table.groupby("reviewid", sort=False)["genre"].agg(list).to_dict()  # in dump order: first first

    def select(wanted):
        picked = [c for c in wanted if c in review_columns]
        if genres is not None and "genre" in wanted and "reviewid" not in picked:
            picked.append("reviewid")
        exprs = [f"r.{_quote(c)}" for c in picked] + (["c.content"] if "content" in wanted else [])
        return (f"SELECT {', '.join(exprs) or 'r.reviewid'} FROM reviews r "
                "LEFT JOIN content c ON c.reviewid = r.reviewid ORDER BY r.rowid")

    columns = review_columns + ["content"] + (["genre"] if genres is not None else [])
    total = conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]
    return SqliteSource(path, conn, "kaggle", select, columns, "content", total, genres)


# -- CSV -----------------------------------------------------------------------------------------------------------
class CsvSource(Source):
    """A CSV/TSV file with a header row, read with `pd.read_csv` in chunks.

    pandas' C parser reads it. Only a file with a line of more fields than the header (an unquoted delimiter in the
    text) needs the python parser, the one that takes a bad-line handler: such a line comes back as a `MALFORMED`
    row, not as a row whose text is some other column's. The C parser stops at that line; the python one reads the
    file again, from the first row not yet yielded (`fallbacks` counts it).
    """

    kind, unit = "csv", "B"

    def __init__(self, path, delimiter):
        self.path, self.delimiter = path, delimiter
        try:
            header = [h.strip() for h in self._read(path, "c", nrows=0).columns]
        except pd.errors.EmptyDataError:
            raise InvalidArgument(f"{path}: empty CSV (no header row)") from None
        except (pd.errors.ParserError, ValueError) as err:
            raise InvalidArgument(f"{path}: malformed CSV header ({err})") from None
        if not any(header):
            raise InvalidArgument(f"{path}: empty CSV (no header row)")
        super().__init__(path, [header[0].removeprefix("\ufeff"), *header[1:]], total=path.stat().st_size)

    def _read(self, f, engine, **kwargs):
        if engine == "python":  # it reads through the csv module, whose field size limit is lifted
            csv.field_size_limit(CSV_FIELD_LIMIT)
            kwargs["on_bad_lines"] = lambda line: [_BAD_LINE] * len(self.columns)
        return pd.read_csv(f, sep=self.delimiter, engine=engine, dtype=object, keep_default_na=False,
                           na_filter=False, encoding="utf-8", encoding_errors="surrogateescape", **kwargs)

    def frames(self, columns):
        index, done = [self.columns.index(c) for c in columns], 0  # rows yielded: the python parser skips them
        for engine in ("c", "python"):
            with open(self.path, "rb") as f:
                try:
                    for chunk in self._read(f, engine, chunksize=CHUNK_ROWS):
                        chunk = chunk.iloc[max(0, done - int(chunk.index[0])) if len(chunk) else 0:]
                        bad = chunk.iloc[:, 0].map(lambda v: v is _BAD_LINE).to_numpy(dtype=bool)
                        picked = chunk.iloc[:, index].set_axis(list(columns), axis=1)
                        picked.loc[bad] = None
                        self.position, done = f.tell(), done + len(chunk)
                        if len(chunk):
                            yield _frame(picked, columns, malformed=bad)
                    return
                except (pd.errors.ParserError, ValueError) as err:
                    if engine == "python" or "Expected" not in str(err):
                        raise InvalidArgument(f"{self.path}: malformed CSV: {err}") from None
            self.fallbacks += 1


# -- JSON Lines ----------------------------------------------------------------------------------------------------
class _Lines:
    """A file's lines as text for `pd.read_json`, keeping those read since the last `batch()`."""

    def __init__(self, f):
        self.f, self.lines, self.bytes = f, [], 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.f)
        self.bytes += len(line)
        self.lines.append(_decode(line))
        return self.lines[-1]

    def read(self, size: int = -1) -> str:  # makes it file-like to pandas; unused with chunksize
        return "".join(self)

    def batch(self) -> list[str]:
        lines, self.lines = self.lines, []
        return [line for line in lines if line.strip()]


class JsonlSource(Source):
    """A JSON Lines file: `pd.read_json(lines=True, chunksize=CHUNK_ROWS)`.

    A chunk that pandas refuses (a line that is not a JSON object, or text that is not UTF-8) is read again line by
    line, so only the bad lines are lost, each counted as `MALFORMED`.
    """

    kind, unit = "jsonl", "B"

    def __init__(self, path):
        with open(path, "rb") as f:
            number, line = next(((n, line) for n, line in enumerate(f, start=1) if line.strip()), (0, b""))
        if not number:
            raise InvalidArgument(f"{path}: empty file (no JSON object)")
        try:
            first = json.loads(_decode(line))
        except ValueError as err:
            raise InvalidArgument(f"{path}: not JSON Lines (line {number}: {err})") from None
        if not isinstance(first, dict):
            raise InvalidArgument(f"{path}: not JSON Lines (line {number} is a JSON {type(first).__name__}, "
                                  "expected one object per line)")
        super().__init__(path, list(first), total=path.stat().st_size)

    def frames(self, columns):
        with open(self.path, "rb", buffering=1 << 20) as f:
            lines = _Lines(f)
            reader = pd.read_json(lines, lines=True, chunksize=CHUNK_ROWS, dtype=False, precise_float=True)
            while True:
                try:
                    frame = next(reader)
                except StopIteration:
                    return
                except (ValueError, UnicodeError):  # a line that is not JSON, or text that is not UTF-8
                    frame = None
                batch, self.position = lines.batch(), lines.bytes
                if frame is not None and len(frame) == len(batch) and all(t.lstrip()[:1] == "{" for t in batch):
                    yield _frame(frame.reset_index(drop=True), columns)
                elif batch:
                    records = [_json_object(line) for line in batch]
                    data = pd.DataFrame({c: pd.Series([(r or {}).get(c) for r in records], dtype=object)
                                         for c in columns})
                    yield _frame(data, columns, malformed=np.array([r is None for r in records], dtype=bool))


def _json_object(line: str) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# -- Parquet -------------------------------------------------------------------------------------------------------
class ParquetSource(Source):
    """A Parquet file read as record batches of `CHUNK_ROWS` rows, each turned into a frame.

    Not `pd.read_parquet`: it reads whole files (or whole row groups, a million rows each by pyarrow's default), and
    memory must stay bounded.
    """

    kind = "parquet"

    def __init__(self, path):
        import pyarrow.parquet as pq  # lazy: only Parquet needs it

        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise InvalidArgument(f"{path}: not a readable Parquet file ({err})") from None
        super().__init__(path, self.file.schema_arrow.names, total=self.file.metadata.num_rows)

    def frames(self, columns):
        def checked(array):  # a string column that is not valid UTF-8 is read as bytes, decoded value by value
            if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
                try:
                    array.validate(full=True)
                except pa.ArrowInvalid:
                    return array.cast(pa.large_binary())
            return array

        try:
            for batch in self.file.iter_batches(batch_size=CHUNK_ROWS, columns=list(columns)):
                arrays = [checked(batch.column(batch.schema.get_field_index(c))) for c in columns]
                self.position += batch.num_rows
                yield _frame(pa.RecordBatch.from_arrays(arrays, names=list(columns)).to_pandas(), columns)
        except pa.ArrowException as err:
            raise InvalidArgument(f"{self.path}: Parquet error while reading: {err}") from None


# -- plain text (gpt-2-simple corpora) -----------------------------------------------------------------------------
class TextSource(Source):
    """gpt-2-simple's `.txt` corpora: one file or a directory of them, one row (column `text`) per document.

    A file that holds `<|startoftext|>` or `<|endoftext|>` is cut at every delimiter and each non-blank piece is a
    document (so both `<|startoftext|>...<|endoftext|>` pairs and `<|endoftext|>` alone work). A file without any
    delimiter is split into blank-line blocks; one without blank lines either is a single document, which is named
    in `warnings`.
    """

    unit = "B"

    def __init__(self, path: Path):
        self.kind = "txt-dir" if path.is_dir() else "txt"
        self.files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES) \
            if path.is_dir() else [path]
        if not self.files:
            raise InvalidArgument(f"{path}: a directory with no .txt files (expected a gpt-2-simple corpus)")
        super().__init__(path, ("text",), "text", total=sum(p.stat().st_size for p in self.files))

    def frames(self, columns):
        whole: list[str] = []  # files read as one document: no delimiter, no blank line
        documents = (document for path in self.files for document in self._documents(path, whole))
        while batch := list(itertools.islice(documents, CHUNK_ROWS)):
            yield _frame(pd.DataFrame({"text": pd.Series(batch, dtype=object)}), columns)
        if whole and (self.kind == "txt" or len(whole) < len(self.files)):
            # Warn when it is likely a mistake: a single file, or some files of a directory but not all.
            self.warnings.append(
                f"{', '.join(whole[:3])}{' and others' if len(whole) > 3 else ''}: no <|endoftext|> delimiter "
                f"and no blank line, read as one document each; separate documents with <|endoftext|> "
                "or a blank line")

    def _documents(self, path: Path, whole: list[str]) -> Iterator[str]:
        """The documents of one file, streamed line by line."""
        delimited, lines, blocks = _has_delimiter(path), [], 0
        with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as f:
            for line in f:
                self.position += len(line.encode("utf-8", errors="surrogateescape"))
                if delimited:
                    *ended, rest = _DELIMITERS.split(line)  # every piece but the last ends at a delimiter
                    for piece in ended:
                        document, lines = "".join(lines) + piece, []
                        if document.strip():
                            yield document
                    lines.append(rest)
                elif line.strip():
                    lines.append(line)
                elif lines:  # a blank line ends a block
                    yield "".join(lines)
                    lines, blocks = [], blocks + 1
        if "".join(lines).strip():
            yield "".join(lines)
            blocks += 1
        if not delimited and blocks == 1:
            whole.append(path.name)


def _has_delimiter(path: Path) -> bool:
    """Whether `path` holds a gpt-2-simple delimiter (read line by line, as `_documents` reads it)."""
    with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as f:
        return any(START_OF_TEXT in line or END_OF_TEXT in line for line in f)


# -- detection -----------------------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """The format of `path`: `sqlite`, `parquet`, `csv`, `jsonl` or `txt` (a file or a directory).

    Magic bytes decide for SQLite and Parquet; text formats go by extension, then by a look at the first bytes.

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
    for magic, fmt in ((SQLITE_MAGIC, "sqlite"), (PARQUET_MAGIC, "parquet")):
        if head.startswith(magic):
            return fmt
    if not head.strip():
        raise InvalidArgument(f"{path}: empty file")
    if suffix in SQLITE_SUFFIXES:
        raise InvalidArgument(f"{path}: not a SQLite database (no SQLite header)")
    if suffix == ".parquet":
        raise InvalidArgument(f"{path}: not a Parquet file (no PAR1 header)")
    for suffixes, fmt in ((CSV_SUFFIXES, "csv"), (JSONL_SUFFIXES, "jsonl"), (TEXT_SUFFIXES, "txt")):
        if suffix in suffixes:
            return fmt
    text = head.decode("utf-8", errors="replace")
    first_line = (text.splitlines() or [""])[0]
    if b"\x00" not in head and text.lstrip("\ufeff \t\r\n").startswith("{"):
        return "jsonl"
    if b"\x00" not in head and ("," in first_line or "\t" in first_line):
        return "csv"
    raise InvalidArgument(
        f"{path}: unknown format; expected a SQLite database, a Parquet file, CSV/TSV with a header row, "
        "JSON Lines (.jsonl), or a gpt-2-simple .txt corpus (a file or a directory)")


def open_source(path: str | Path, *, query: Optional[str] = None) -> Source:
    """Detect the format of `path` and open it for streaming; `query` (SQLite only) replaces the schema's SELECT.

    Raises:
        InvalidArgument: the file is missing, of no known format, or has no known tables; the message names the file
            and what was found.
    """
    path = Path(path)
    fmt = detect_format(path)
    if query is not None and fmt != "sqlite":
        raise InvalidArgument(f"{path}: --query applies to SQLite databases only; this is a {fmt} file")
    if fmt == "sqlite":
        return _open_sqlite(path, query)
    if fmt == "csv":
        return CsvSource(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    return {"parquet": ParquetSource, "txt": TextSource, "jsonl": JsonlSource}[fmt](path)


def find_column(source: Source, name: str, what: str) -> str:
    """The source column matching `name` (exact, else case-insensitive); InvalidArgument lists those found."""
    folded = [c for c in source.columns if c.casefold() == name.casefold()]
    if name in source.columns or len(folded) == 1:
        return name if name in source.columns else folded[0]
    raise InvalidArgument(
        f"{source.path}: unknown column {name!r} for {what}; columns found ({source.kind}): "
        f"{', '.join(source.columns) or 'none'}")


def detect_text_column(source: Source) -> str:
    """The kind's default text column, else the first of `TEXT_COLUMNS` present; InvalidArgument if none."""
    folded = {c.casefold(): c for c in source.columns}
    found = [folded[c] for c in TEXT_COLUMNS if c in folded]
    if source.default_text_column or found:
        return source.default_text_column or found[0]
    raise InvalidArgument(
        f"{source.path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); columns found "
        f"({source.kind}): {', '.join(source.columns) or 'none'}; pass --text-column")
