"""Turn a review dump into conditioned training examples.

`prepare(source, out_dir)` reads any dump `open_source` knows as pandas DataFrames, a chunk of rows at a time; each
chunk goes through the filters (one boolean mask each over the chunk, `_filter_rows`; cleaning in `cleaning.py`),
becomes examples formatted by `PromptFormat` (the one prompt format), is deduplicated against every example kept so
far, split, and written to `out_dir` (`outputs.py`):

- `examples.csv`: every kept example, one per row, single column, no header, csv-quoted so multi-line examples
  survive (with `delimiters=True` each is wrapped in gpt-2-simple's `<|startoftext|>`/`<|endoftext|>`);
- `train.csv` / `val.csv`: the same examples (never wrapped: the tf.data pipeline adds the model's own
  `<|endoftext|>` tokens), split by a seeded hash of the review text, so adding rows to the dump moves no existing
  example across the split and every genre variant of a review lands on the same side;
- `stats.json` and `stats.png` (see `pitchkeras.data.stats`).

Rows are dropped, and counted per reason, for: `malformed_row` (a JSON Lines line that is not an object, a CSV
line with more fields than the header), `undecodable` (bytes that are not UTF-8), `empty_text`,
`missing_<condition>`, `unparseable_<condition>` (a numeric condition such as a score that is not a number),
`multiline`, `too_short`, `too_long`, `language` and `duplicate` (an exact repeat of an example already kept).

Every output is written to a temp file and renamed (`pitchkeras.io`), so a crash or Ctrl-C never leaves a
half-written dataset; rerunning simply rewrites it. A previous run's `stats.json` is removed before the new files
land and the new one is written last, so `stats.json` present means all five files belong to one complete run.

>>> result = prepare("database.sqlite", "data", options=PrepareOptions(val_fraction=0.05))
>>> result.kept, result.dropped
(18360, {'duplicate': 4, 'missing_genre': 25, ...})
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from pitchkeras.conditioning import NUMERIC_CONDITIONS, PromptFormat
from pitchkeras.data.cleaning import categories, normalize_text, numbers, parse_number, texts  # noqa: F401 - public
from pitchkeras.data.language import LanguageIdentifier, language_identifier
from pitchkeras.data.options import TEXT_KINDS, PrepareOptions, parse_condition_columns  # noqa: F401 - public names
from pitchkeras.data.outputs import Outputs, SplitEdges, csv_rows
from pitchkeras.data.sources import MALFORMED, UNDECODABLE, Source, detect_text_column, find_column, open_source
from pitchkeras.data.stats import DatasetStats
from pitchkeras.errors import InvalidArgument
from pitchkeras.io import atomic_write_json

MULTI_VALUE_CONDITION = "genre"  # the one condition a row may hold several values of
LANGUAGE_SAMPLE_CHARS = 2000  # langid reads this much of each text: enough to decide, bounded cost
PROGRESS_MIN_ROWS, PROGRESS_MIN_BYTES = 5000, 5 << 20  # smaller inputs finish before a bar is worth drawing
POSITION, TEXT, COIN, EXAMPLE = "__position__", "__text__", "__coin__", "__example__"  # arrays beside the conditions


@dataclasses.dataclass
class PrepareResult:
    """What `prepare` wrote and counted.

    Args:
        out_dir, examples_path, train_path, val_path, stats_path, plot_path: Path. The directory and its files.
        read: int. Rows read from the source.
        kept, train, val: int. Examples written (one per row, or per genre with `multi_genre="all"`), in all and in
            `train.csv` and `val.csv`.
        dropped: dict. Reason -> rows (examples, for `duplicate`) dropped.
        stats: dict. The content of `stats.json`.
        kind: str. The source's kind (`kaggle`, `seed`, `csv`, ...).
        warnings: list of str. What the reader noticed that the user should hear about.
        seconds: float. How long the run took.
        reader_fallbacks: int. Times the reader fell back to a slower parser the input needed.
    """

    out_dir: Path
    examples_path: Path
    train_path: Path
    val_path: Path
    stats_path: Path
    plot_path: Path
    read: int
    kept: int
    train: int
    val: int
    dropped: dict
    stats: dict
    kind: str = ""
    warnings: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    reader_fallbacks: int = 0


def _split_hash(text: str, seed: int) -> float:
    """A stable uniform number in [0, 1) for a review text: the split's coin."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big") / 2**64


def _example_key(example: str) -> bytes:
    return hashlib.blake2b(example.encode("utf-8"), digest_size=16).digest()


@dataclasses.dataclass
class RunCounts:
    """What one pass over a source counted (`read`, `kept`, `train`, `val`, `multi_genre_extra`: examples beyond
    one per row; `dropped`: reason -> count, in the order each first occurred) and kept track of (`stats`, the
    kept examples' statistics; `edges`, the examples at the lowest and highest split hash)."""

    stats: DatasetStats
    read: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    multi_genre_extra: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    edges: SplitEdges = dataclasses.field(default_factory=SplitEdges)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run needs to know besides the rows: columns (condition name -> source column), format, filters."""

    text_column: str
    conditions: dict
    fmt: PromptFormat
    identifier: Optional[LanguageIdentifier]
    options: PrepareOptions
    exploded: Optional[str]  # the condition `multi_genre="all"` turns into one example per value, if any


class _Drops:
    """One chunk's drops: reason -> [count, first row position], merged into `RunCounts.dropped` in row order."""

    def __init__(self):
        self.found: dict[str, list[int]] = {}

    def mark(self, positions: np.ndarray, keep: np.ndarray, mask, reason: str) -> None:
        """Take the rows `mask` selects out of `keep` (in place), those still in it counted under `reason`."""
        hit = keep & np.asarray(mask, dtype=bool)
        if hit.any():
            known = self.found.setdefault(reason, [0, int(positions[hit.argmax()])])
            known[0] += int(hit.sum())
        keep &= ~hit

    def merge_into(self, dropped: collections.Counter) -> None:
        # A reason's place in stats.json (among equal counts) is where it first occurred in the dump.
        for reason, (count, _) in sorted(self.found.items(), key=lambda item: item[1][1]):
            dropped[reason] += count


# -- the run: one pass over the source, a chunk (DataFrame) at a time --------------------------------------------
def _run(src: Source, plan: _Plan, outputs: Outputs) -> RunCounts:
    """The streaming loop: read a chunk, filter it, turn it into examples, dedupe, split, write, count."""
    from tqdm import tqdm  # lazy: start-up time of the CLI

    counts = RunCounts(DatasetStats(plan.fmt))
    seen: set[bytes] = set()  # 16-byte hashes of kept examples, not the texts: bounded memory
    large = src.total is None or src.total >= (PROGRESS_MIN_BYTES if src.unit == "B" else PROGRESS_MIN_ROWS)
    with tqdm(total=src.total, unit=src.unit, unit_scale=src.unit == "B", desc=f"prepare {src.path.name}",
              disable=not (plan.options.progress and large), mininterval=0.5, file=sys.stderr) as bar:
        for frame in src.frames(list(dict.fromkeys([plan.text_column, *plan.conditions.values()]))):
            drops = _Drops()
            # Row positions in the whole dump: they order the drop reasons as they were met.
            rows = _filter_rows(frame, np.arange(counts.read, counts.read + len(frame)), plan, drops)
            counts.read, frame = counts.read + len(frame), None  # the chunk's columns go before its examples come
            _write_examples(_dedupe(_examples(rows, plan, counts), seen, drops), plan, outputs, counts)
            drops.merge_into(counts.dropped)
            bar.update(max(0, src.position - bar.n))
            pa.default_memory_pool().release_unused()  # pyarrow's allocator keeps freed chunks otherwise
    return counts


def _filter_rows(frame: pd.DataFrame, positions: np.ndarray, plan: _Plan, drops: _Drops) -> dict:
    """Each filter a mask over the chunk, a row counted under the first that drops it.

    Returns the kept rows as arrays: `POSITION`, `TEXT` (cleaned), each condition's values (a categorical one: the
    tuple of a row's values).
    """
    options, keep = plan.options, np.ones(len(frame), dtype=bool)
    reject = functools.partial(drops.mark, positions, keep)  # reject(mask, reason)
    reject(frame[MALFORMED], "malformed_row")
    reject(frame[UNDECODABLE], "undecodable")
    text = texts(frame[plan.text_column])
    length = np.fromiter(map(len, text), dtype=np.int64, count=len(text))
    reject(length == 0, "empty_text")
    rows = {POSITION: positions, TEXT: text}
    for name, column in plan.conditions.items():
        if name in plan.fmt.numeric:
            rows[name] = numbers(frame[column])
            reject(np.isinf(rows[name]), f"unparseable_{name}")
            reject(np.isnan(rows[name]), f"missing_{name}")
        else:
            rows[name] = categories(frame[column], multi=name == MULTI_VALUE_CONDITION)
            reject(np.fromiter(map(len, rows[name]), dtype=np.int64, count=len(frame)) == 0, f"missing_{name}")
    if options.drop_multiline:
        reject(np.fromiter(("\n" in t for t in text), dtype=bool, count=len(text)), "multiline")
    reject(length < options.min_chars, "too_short")
    reject(length > options.max_chars, "too_long")
    if plan.identifier is not None:
        other = np.zeros(len(frame), dtype=bool)
        other[keep] = [plan.identifier.classify(t[:LANGUAGE_SAMPLE_CHARS]) != options.language for t in text[keep]]
        reject(other, "language")
    return {name: values[keep] for name, values in rows.items()}


def _examples(rows: dict, plan: _Plan, counts: RunCounts) -> dict:
    """One example per row (per value of the exploded condition with `multi_genre="all"`), with its split hash."""
    rows[COIN] = np.array([_split_hash(t, plan.options.seed) for t in rows[TEXT]], dtype=float)
    if plan.exploded:
        values = rows.pop(plan.exploded)
        index = np.repeat(np.arange(len(values)), np.fromiter(map(len, values), dtype=np.int64, count=len(values)))
        counts.multi_genre_extra += len(index) - len(values)
        rows = {name: column[index] for name, column in rows.items()}
        rows[plan.exploded] = np.array([value for row in values for value in row], dtype=object)
    for name in plan.fmt.conditions:
        if name not in plan.fmt.numeric and name != plan.exploded:  # a categorical condition: its first value
            rows[name] = np.array([row[0] for row in rows[name]], dtype=object)
    end = plan.fmt.end_text
    rows[EXAMPLE] = np.array([p + t + end for p, t in zip(_prompts(rows, plan.fmt), rows[TEXT])], dtype=object)
    return rows


def _prompts(rows: dict, fmt: PromptFormat) -> list[str]:
    """Each row's prompt (start text and header lines), formatted once per distinct combination of values."""
    known: dict[tuple, str] = {}
    keys = zip(*(rows[name].tolist() for name in fmt.conditions)) if fmt.conditions else [()] * len(rows[TEXT])
    return [known[k] if k in known else known.setdefault(k, fmt.prompt(dict(zip(fmt.conditions, k)))) for k in keys]


def _dedupe(rows: dict, seen: set, drops: _Drops) -> dict:
    """`rows` without exact repeats of an example already kept (in this chunk or before)."""
    keys = map(_example_key, rows[EXAMPLE])
    repeated = np.array([key in seen or seen.add(key) for key in keys], dtype=bool)  # add() gives None: False
    keep = np.ones(len(repeated), dtype=bool)
    drops.mark(rows[POSITION], keep, repeated, "duplicate")
    return {name: values[keep] for name, values in rows.items()}


def _write_examples(rows: dict, plan: _Plan, outputs: Outputs, counts: RunCounts) -> None:
    """Write the kept examples, split by their hash, and count them."""
    examples, to_val = rows[EXAMPLE], rows[COIN] < plan.options.val_fraction
    if not len(examples):
        return
    lines = csv_rows(examples)
    outputs.write("examples.csv", csv_rows(map(plan.fmt.gpt2_simple, examples)) if plan.options.delimiters else lines)
    outputs.write("val.csv", lines[to_val])
    outputs.write("train.csv", lines[~to_val])
    counts.kept += len(examples)
    counts.val += int(to_val.sum())
    counts.train += len(examples) - int(to_val.sum())
    counts.stats.add({name: rows[name].tolist() for name in plan.fmt.conditions}, map(len, rows[TEXT]))
    counts.edges.track(rows[COIN], examples)


def _nothing_left_message(path: Path, counts: RunCounts) -> str:
    if counts.read == 0:
        return f"{path}: no rows to read (the source is empty)"
    reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.dropped.most_common())
    return (f"{path}: nothing left after filtering; read {counts.read} rows, dropped {reasons} "
            "(loosen the filter that removed most, e.g. --min-chars/--max-chars/--language, or check the columns)")


def _stats_json(src: Source, plan: _Plan, counts: RunCounts, started: float) -> dict:
    return {
        "read": counts.read,
        "kept": counts.kept,
        "dropped": dict(counts.dropped.most_common()),
        # read + multi_genre_extra == kept + sum(dropped): `all` turns one row into one example per genre.
        "multi_genre_extra": counts.multi_genre_extra,
        "train": counts.train,
        "val": counts.val,
        **counts.stats.summary(),
        "source": {"path": str(src.path), "kind": src.kind, "text_column": plan.text_column,
                   "condition_columns": plan.conditions},
        "warnings": list(src.warnings),
        "options": {k: v for k, v in dataclasses.asdict(plan.options).items() if k != "progress"},
        "seconds": round(time.perf_counter() - started, 3),
    }


# -- prepare: open, run, write -----------------------------------------------------------------------------------
def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, *,
            options: Optional[PrepareOptions] = None) -> PrepareResult:
    """Read a dump, clean it, and write conditioned examples, a split and statistics.

    Rows stream from the source as DataFrames of `CHUNK_ROWS` rows; only one 16-byte hash per kept example, one
    length per kept example and small counters outlive a chunk, so memory stays bounded on large dumps.

    Args:
        source: str. The dump: Kaggle or seed SQLite, CSV/TSV, JSONL, Parquet, or a gpt-2-simple `.txt` corpus (a
            file or a directory of them).
        out_dir: str. Where `examples.csv`, `train.csv`, `val.csv`, `stats.json` and `stats.png` go (created if
            missing).
        options: PrepareOptions or None. Defaults to `PrepareOptions()`.

    Returns:
        A `PrepareResult` with the paths and counts.

    Raises:
        InvalidArgument: the source is missing or unreadable, a column is unknown (the columns found are listed), an
            option is out of range, or no example is left after filtering (the message says which filter removed how
            many).
    """
    options = options or PrepareOptions()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"{out_dir}: exists and is not a directory")
    identifier = language_identifier(options.language) if options.language else None
    src = open_source(Path(source), query=options.query)
    try:
        plan = _plan(src, options, identifier)
        created = not out_dir.exists()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            outputs = Outputs(out_dir)
        except OSError as err:
            raise InvalidArgument(f"{out_dir}: cannot write the dataset there ({err.strerror or err})") from None
        try:
            counts = _run(src, plan, outputs)
            if counts.kept == 0:
                raise InvalidArgument(_nothing_left_message(Path(source), counts))
            counts.edges.ensure_both_splits(outputs, counts, plan.options.val_fraction)
            return _write_dataset(src, plan, counts, outputs, started)
        except BaseException as err:
            outputs.discard()
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a failed first run leaves nothing behind, not even an empty directory
            if isinstance(err, OSError):  # disk full, permissions, a file vanishing mid-run: one line
                raise InvalidArgument(f"{err.filename or out_dir}: {err.strerror or err}") from None
            raise
    finally:
        src.close()


def _plan(src: Source, options: PrepareOptions, identifier: Optional[LanguageIdentifier]) -> _Plan:
    """The options decided for `src`, its columns checked against what it has, and the prompt format they imply."""
    options = options.for_source(src)
    if options.text_column:
        text_column = find_column(src, options.text_column, "--text-column")
    else:
        text_column = detect_text_column(src)
    if options.condition_columns and src.kind in TEXT_KINDS:
        raise InvalidArgument(f"{src.path}: a .txt corpus holds text only, it has no "
                              f"{', '.join(options.condition_columns)} column; drop --condition-columns "
                              "(or pass --no-conditions), or prepare a table (CSV, JSONL, SQLite) instead")
    conditions = {}
    for name, column in options.conditions.items():
        try:
            conditions[name] = find_column(src, column, "--condition-columns")
        except InvalidArgument as err:
            raise InvalidArgument(f"{err}; pass --condition-columns NAME=COLUMN,... or --no-conditions "
                                  "for a plain corpus") from None
    fmt = PromptFormat(conditions=tuple(conditions), numeric=tuple(n for n in conditions if n in NUMERIC_CONDITIONS))
    multi = options.multi_genre == "all" and MULTI_VALUE_CONDITION in conditions
    return _Plan(text_column, conditions, fmt, identifier, options, MULTI_VALUE_CONDITION if multi else None)


def _write_dataset(src: Source, plan: _Plan, counts: RunCounts, outputs: Outputs, started: float) -> PrepareResult:
    """Put the CSVs in place, then the plot, then `stats.json` last: its presence says the dataset is whole."""
    out_dir = outputs.out_dir
    # A previous run's stats.json must not outlive its CSVs: it marks a complete dataset
    # and carries the prompt format that training reads.
    (out_dir / "stats.json").unlink(missing_ok=True)
    plot_path = counts.stats.plot(out_dir / "stats.png")
    outputs.commit()
    stats = _stats_json(src, plan, counts, started)
    stats_path = atomic_write_json(out_dir / "stats.json", stats)
    return PrepareResult(
        out_dir=out_dir, examples_path=out_dir / "examples.csv", train_path=out_dir / "train.csv",
        val_path=out_dir / "val.csv", stats_path=stats_path, plot_path=plot_path, read=counts.read,
        kept=counts.kept, train=counts.train, val=counts.val, dropped=dict(counts.dropped), stats=stats,
        kind=src.kind, warnings=list(src.warnings), seconds=stats["seconds"], reader_fallbacks=src.fallbacks)
