"""Turn a review dump into conditioned training examples.

`prepare(source, out_dir)` reads any dump `open_source` knows as pandas
DataFrames, a chunk of rows at a time; each chunk goes through the filters
(one boolean mask each, `_filter_rows`), becomes examples formatted with
`PromptFormat.example` (the one prompt format), is deduplicated against every
example kept so far, split, and written to `out_dir`:

- `examples.csv`: every kept example, one per row, single column, no header,
  csv-quoted so multi-line examples survive (with `delimiters=True` each is
  wrapped in gpt-2-simple's `<|startoftext|>`/`<|endoftext|>`);
- `train.csv` / `val.csv`: the same examples (never wrapped: the tf.data
  pipeline adds the model's own `<|endoftext|>` tokens), split by a seeded
  hash of the review text, so adding rows to the dump moves no existing
  example across the split and every genre variant of a review lands on the
  same side;
- `stats.json` and `stats.png` (see `pitchkeras.data.stats`).

Rows are dropped, and counted per reason, for: `malformed_row` (a JSON
Lines line that is not an object, a CSV line with more fields than the
header), `undecodable` (bytes that are not UTF-8), `empty_text`, `missing_<condition>`,
`unparseable_<condition>` (a numeric condition such as a score that is not a
number), `multiline`, `too_short`, `too_long`, `language` and `duplicate`
(an exact repeat of an example already kept).

Every output is written to a temp file and renamed, so a crash or Ctrl-C
never leaves a half-written dataset; rerunning simply rewrites it. A
previous run's `stats.json` is removed before the new files land and the new
one is written last, so `stats.json` present means all five files belong to
one complete run.

Example:

>>> result = prepare("database.sqlite", "data", options=PrepareOptions(val_fraction=0.05))
>>> result.kept, result.dropped
(18360, {'duplicate': 4, 'missing_genre': 25, ...})
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pitchkeras.conditioning import NUMERIC_CONDITIONS, PromptFormat
from pitchkeras.data.options import MULTI_GENRE, TEXT_KINDS, PrepareOptions, parse_condition_columns  # noqa: F401
from pitchkeras.data.pipeline import read_examples
from pitchkeras.data.sources import (
    MALFORMED, UNDECODABLE, Source, detect_text_column, find_column, objects, open_source)
from pitchkeras.data.stats import DatasetStats
from pitchkeras.errors import InvalidArgument
from pitchkeras.model import atomic_write_text

MULTI_VALUE_CONDITION = "genre"  # the one condition a row may hold several values of
LANGUAGE_SAMPLE_CHARS = 2000  # langid reads this much of each text: enough to decide, bounded cost
PROGRESS_MIN_ROWS = 5000  # smaller inputs finish before a bar is worth drawing
PROGRESS_MIN_BYTES = 5 << 20
TEXT, COIN, EXAMPLE = "__text__", "__coin__", "__example__"  # the working columns a chunk gains

# ASCII horizontal whitespace only (NBSP and friends are kept as written). Patterns match only what
# changes (not every single space), and each runs only when a plain `in` finds work for it: a regex
# that stops at every space is ~5x slower on long reviews.
_SPACES = re.compile(r"[\t\x0b\x0c][ \t\x0b\x0c]*| [ \t\x0b\x0c]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # control characters that never belong in prose
_LINE_EDGES = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclasses.dataclass
class PrepareResult:
    """What `prepare` wrote and counted.

    Args:
        out_dir: Path. The output directory.
        examples_path: Path. `examples.csv`.
        train_path: Path. `train.csv`.
        val_path: Path. `val.csv`.
        stats_path: Path. `stats.json`.
        plot_path: Path. `stats.png`.
        read: int. Rows read from the source.
        kept: int. Examples written (one per row, or per genre with `multi_genre="all"`).
        train: int. Examples in `train.csv`.
        val: int. Examples in `val.csv`.
        dropped: dict. Reason -> rows (examples, for `duplicate`) dropped.
        stats: dict. The content of `stats.json`.
        kind: str. The source's kind (`kaggle`, `seed`, `csv`, ...).
        warnings: list of str. What the reader noticed that the user should hear about.
        seconds: float. How long the run took.
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


def normalize_text(text: str) -> str:
    """Clean whitespace and line endings, keeping every other character as written.

    CRLF and CR become LF; control characters go; runs of spaces and tabs
    become one space; spaces around a newline go; three or more newlines become
    one blank line; the ends are trimmed. Non-ASCII characters (including
    no-break spaces) are left byte for byte.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)  # first, so "a \x00 b" becomes "a b", not "a  b"
    if "  " in text or "\t" in text or "\x0b" in text or "\x0c" in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _LINE_EDGES.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip(" \n")


def parse_number(value: Any) -> Optional[float]:
    """A numeric condition value as a finite float; None when missing.

    Raises:
        ValueError: the value is present but not a finite number (`"n/a"`, `"inf"`).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isnan(number):
            return None  # pandas/Parquet spell a missing number NaN
    else:
        text = str(value).strip()
        if not text:
            return None
        number = float(text)  # ValueError for "n/a", "8,4", ...
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _category_values(value: Any, multi: bool) -> list[str]:
    """The cleaned values of a categorical condition (several only for `genre`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    values = value if isinstance(value, list) else ([value] if not multi else str(value).split(","))
    cleaned = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        v = " ".join(str(v).split())
        if v and v not in cleaned:
            cleaned.append(v)
    return cleaned


def _split_hash(text: str, seed: int) -> float:
    """A stable uniform number in [0, 1) for a review text: the split's coin."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big") / 2**64


class LanguageIdentifier:
    """langid.py's naive Bayes language classifier, with its feature counting vectorised.

    Same model, same answers as `langid.classify` (tested), about ten times
    faster on review-length texts: langid's own `instance2fv` adds every
    feature count into a numpy array one scalar at a time, ~8 ms per
    2,000-character text here, which would dominate `prepare --language`.
    The byte-level automaton still runs in a Python loop (it is sequential);
    the per-state feature lists become one gather and one `bincount`.

    Args:
        identifier: langid.langid.LanguageIdentifier. The loaded model.
    """

    def __init__(self, identifier):
        import numpy as np

        self.langid = identifier  # the reference implementation (tests compare against it)
        self.classes = tuple(str(c) for c in identifier.nb_classes)
        self._nextmove = identifier.tk_nextmove
        self._ptc = np.asarray(identifier.nb_ptc)  # (features, classes) log P(feature | class)
        self._pc = np.asarray(identifier.nb_pc)  # (classes,) log P(class)
        n_states = len(self._nextmove) >> 8
        # CSR layout of tk_output (state -> feature indices): ptr[s]:ptr[s + 1] slices `features`.
        lengths = np.zeros(n_states + 1, dtype=np.int64)
        for state, outputs in identifier.tk_output.items():
            lengths[state + 1] = len(outputs)
        self._ptr = np.cumsum(lengths)
        self._features = np.zeros(int(self._ptr[-1]), dtype=np.int64)
        for state, outputs in identifier.tk_output.items():
            self._features[self._ptr[state]:self._ptr[state + 1]] = outputs

    def classify(self, text: str) -> str:
        """The ISO 639-1 code of the most likely language of `text`."""
        import numpy as np

        nextmove = self._nextmove
        state = 0
        visited = []
        for byte in text.encode("utf-8"):
            state = nextmove[(state << 8) + byte]
            visited.append(state)
        scores = self._pc
        if visited:
            states, counts = np.unique(np.asarray(visited, dtype=np.int64), return_counts=True)
            starts = self._ptr[states]
            lengths = self._ptr[states + 1] - starts
            total = int(lengths.sum())
            if total:
                # Positions of every state's feature slice, laid end to end.
                offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
                features = self._features[offsets]
                fv = np.bincount(features, weights=np.repeat(counts, lengths), minlength=len(self._ptc))
                present = np.flatnonzero(fv)
                scores = fv[present] @ self._ptc[present].astype(np.float64) + self._pc
        return self.classes[int(np.argmax(scores))]


@functools.lru_cache(maxsize=1)
def _langid_model() -> LanguageIdentifier:
    from langid.langid import LanguageIdentifier as LangidModel, model

    # Unpacking langid's model takes seconds; classification does not mutate it, so one serves every run.
    return LanguageIdentifier(LangidModel.from_modelstring(model, norm_probs=False))


def _language_identifier(language: str) -> LanguageIdentifier:
    identifier = _langid_model()
    if language not in identifier.classes:
        raise InvalidArgument(
            f"--language {language!r} is not a language langid knows; use an ISO 639-1 code such as "
            f"{', '.join(sorted(identifier.classes)[:12])}, ...")
    return identifier


def _validate(options: PrepareOptions) -> None:
    if options.multi_genre not in MULTI_GENRE:
        raise InvalidArgument(f"--multi-genre must be one of {', '.join(MULTI_GENRE)}, got {options.multi_genre!r}")
    if options.min_chars < 0:
        raise InvalidArgument(f"--min-chars must be >= 0, got {options.min_chars}")
    if options.max_chars < max(1, options.min_chars):
        raise InvalidArgument(f"--max-chars ({options.max_chars}) must be >= 1 and >= --min-chars "
                              f"({options.min_chars})")
    if not 0 <= options.val_fraction < 1:
        raise InvalidArgument(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    if not -2**63 <= options.seed < 2**63:  # it salts the split hash as 8 signed bytes
        raise InvalidArgument(f"--seed must fit in 64 bits (-2**63 to 2**63 - 1), got {options.seed}")
    names = [c.split("=", 1)[0].strip() for c in options.condition_columns or ()]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidArgument(f"--condition-columns must name each condition once, got "
                              f"{','.join(options.condition_columns)!r}")


def _resolve_columns(source: Source, options: PrepareOptions) -> tuple[str, dict[str, str]]:
    """(text column, {condition: column}), checked against what the source has."""
    if options.text_column:
        text_column = find_column(source, options.text_column, "--text-column")
    else:
        text_column = detect_text_column(source)
    conditions = {}
    if options.condition_columns and source.kind in TEXT_KINDS:
        raise InvalidArgument(f"{source.path}: a .txt corpus holds text only, it has no "
                              f"{', '.join(options.condition_columns)} column; drop --condition-columns "
                              "(or pass --no-conditions), or prepare a table (CSV, JSONL, SQLite) instead")
    for spec in options.condition_columns:
        name, _, column = spec.partition("=")
        name, column = name.strip(), (column.strip() or name.strip())
        try:
            conditions[name] = find_column(source, column, "--condition-columns")
        except InvalidArgument as err:
            raise InvalidArgument(f"{err}; pass --condition-columns NAME=COLUMN,... or --no-conditions "
                                  "for a plain corpus") from None
    return text_column, conditions


def _readable(path: Path) -> None:
    """Give a mkstemp file (always 0600) the mode a plain open() would have had."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_csv(f, examples: pd.Series) -> None:
    """Append `examples` to an open file: one csv-quoted field per row, `\\n` line ends, no header."""
    if len(examples):
        examples.to_frame().to_csv(f, header=False, index=False, lineterminator="\n")


class _Outputs:
    """The three CSVs, written to temp files in `out_dir` and renamed into place by `commit`."""

    NAMES = ("examples.csv", "train.csv", "val.csv")

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tmp = {}
        self.files = {}
        try:
            for name in self.NAMES:
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
                self.tmp[name] = Path(tmp)
                self.files[name] = os.fdopen(fd, "w", encoding="utf-8", newline="")
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, examples: pd.Series) -> None:
        _write_csv(self.files[name], examples)

    def close(self):
        for f in self.files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def commit(self) -> None:
        self.close()
        for name in self.NAMES:
            _readable(self.tmp[name])
            os.replace(self.tmp[name], self.out_dir / name)

    def discard(self) -> None:
        for f in self.files.values():
            f.close()
        for tmp in self.tmp.values():
            if tmp.exists():
                tmp.unlink()


def _move_examples(outputs: _Outputs, moved: set[str], source: str, target: str) -> None:
    """Move the examples in `moved` from one split's temp file to the other's (tiny datasets only)."""
    outputs.close()
    rows = pd.Series(read_examples(outputs.tmp[source]), dtype=object)
    with open(outputs.tmp[source], "w", encoding="utf-8", newline="") as f:
        _write_csv(f, rows[~rows.isin(moved)])
    with open(outputs.tmp[target], "a", encoding="utf-8", newline="") as f:
        _write_csv(f, pd.Series(list(moved), dtype=object))


# -- the run: one pass over the source, a chunk (DataFrame) at a time --------------------------------------------
@dataclasses.dataclass
class _Edge:
    """The examples at the lowest (or highest) split hash so far: what moves if a split would be empty."""

    coin: float
    examples: list


@dataclasses.dataclass
class RunCounts:
    """What one pass over a source counted and kept track of.

    Args:
        stats: DatasetStats. The kept examples' statistics.
        read: int. Rows read.
        kept: int. Examples written.
        train: int. Examples in `train.csv`.
        val: int. Examples in `val.csv`.
        multi_genre_extra: int. Examples beyond one per row (`multi_genre="all"`).
        dropped: collections.Counter. Reason -> count, in the order each reason first occurred.
        lowest: _Edge. The examples with the lowest split hash.
        highest: _Edge. The examples with the highest split hash.
    """

    stats: DatasetStats
    read: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    multi_genre_extra: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lowest: _Edge = dataclasses.field(default_factory=lambda: _Edge(2.0, []))
    highest: _Edge = dataclasses.field(default_factory=lambda: _Edge(-1.0, []))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run needs to know besides the rows: columns, format, filters."""

    text_column: str
    conditions: dict  # condition name -> source column
    fmt: PromptFormat
    identifier: Optional[LanguageIdentifier]
    options: PrepareOptions

    @property
    def wanted(self) -> list[str]:
        return list(dict.fromkeys([self.text_column, *self.conditions.values()]))

    @property
    def exploded(self) -> Optional[str]:
        """The condition `multi_genre="all"` turns into one example per value, if any."""
        multi = self.options.multi_genre == "all" and MULTI_VALUE_CONDITION in self.conditions
        return MULTI_VALUE_CONDITION if multi else None


class _Drops:
    """One chunk's drops: reason -> (count, first row position), merged into `RunCounts.dropped` in row order."""

    def __init__(self):
        self.found: dict[str, list[int]] = {}

    def drop(self, rows: pd.DataFrame, mask, reason: str) -> pd.DataFrame:
        """`rows` without those `mask` selects, counted under `reason`."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return rows
        count, first = int(mask.sum()), int(rows.index[mask][0])
        known = self.found.setdefault(reason, [0, first])
        known[0] += count
        known[1] = min(known[1], first)
        return rows[~mask]

    def merge_into(self, dropped: collections.Counter) -> None:
        # A reason's place in stats.json (among equal counts) is where it first occurred in the dump.
        for reason, (count, _) in sorted(self.found.items(), key=lambda item: item[1][1]):
            dropped[reason] += count


def _run(src: Source, plan: _Plan, outputs: _Outputs) -> RunCounts:
    """The streaming loop: read a chunk, clean it, turn it into examples, dedupe, split, write, count."""
    counts = RunCounts(DatasetStats(plan.fmt))
    seen: set[bytes] = set()  # 16-byte hashes of kept examples, not the texts: bounded memory
    with _progress_bar(src, plan.options) as bar:
        for frame in src.frames(plan.wanted):
            # Row positions in the whole dump: they order the drop reasons as they were met.
            frame.index = pd.RangeIndex(counts.read, counts.read + len(frame))
            counts.read += len(frame)
            drops = _Drops()
            rows = _filter_rows(_select(frame, plan), plan, drops)
            examples = _dedupe(_examples(rows, plan, counts), seen, drops)
            _write_examples(examples, plan, outputs, counts)
            drops.merge_into(counts.dropped)
            bar.update(max(0, src.position - bar.n))
    return counts


def _progress_bar(src: Source, options: PrepareOptions):
    """A tqdm bar in the source's units, shown only for large inputs."""
    from tqdm import tqdm

    large = src.total is None or src.total >= (PROGRESS_MIN_BYTES if src.unit == "B" else PROGRESS_MIN_ROWS)
    return tqdm(total=src.total, unit=src.unit, unit_scale=src.unit == "B", desc=f"prepare {src.path.name}",
                disable=not (options.progress and large), mininterval=0.5, file=sys.stderr)


def _select(frame: pd.DataFrame, plan: _Plan) -> pd.DataFrame:
    """The text and each condition's column, named `TEXT` and by condition name."""
    columns = {TEXT: frame[plan.text_column], MALFORMED: frame[MALFORMED]}
    columns.update({name: frame[column] for name, column in plan.conditions.items()})
    return pd.DataFrame(columns, index=frame.index)


def _undecodable(rows: pd.DataFrame) -> pd.Series:
    """Rows holding a value (or a list element) whose bytes were not UTF-8."""
    def bad(value):
        return value is UNDECODABLE or (isinstance(value, list) and any(v is UNDECODABLE for v in value))

    return rows.drop(columns=MALFORMED).map(bad).any(axis=1)


def _filter_rows(rows: pd.DataFrame, plan: _Plan, drops: _Drops) -> pd.DataFrame:
    """Each filter in turn, a row counted under the first that drops it: the cleaned, conditioned rows."""
    options = plan.options
    rows = drops.drop(rows, rows[MALFORMED], "malformed_row")
    rows = drops.drop(rows, _undecodable(rows), "undecodable").drop(columns=MALFORMED)
    rows[TEXT] = objects((normalize_text(_as_text(value)) for value in rows[TEXT]), index=rows.index)
    rows = drops.drop(rows, rows[TEXT] == "", "empty_text")
    for name in plan.conditions:
        rows = _condition(rows, name, plan, drops)
    if options.drop_multiline:
        rows = drops.drop(rows, rows[TEXT].map(lambda text: "\n" in text), "multiline")
    rows = drops.drop(rows, rows[TEXT].map(len) < options.min_chars, "too_short")
    rows = drops.drop(rows, rows[TEXT].map(len) > options.max_chars, "too_long")
    if plan.identifier is not None:
        language = rows[TEXT].map(lambda text: plan.identifier.classify(text[:LANGUAGE_SAMPLE_CHARS]))
        rows = drops.drop(rows, language != options.language, "language")
    return rows


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


_UNPARSEABLE = object()


def _number_or_unparseable(value: Any):
    try:
        return parse_number(value)
    except ValueError:
        return _UNPARSEABLE


def _condition(rows: pd.DataFrame, name: str, plan: _Plan, drops: _Drops) -> pd.DataFrame:
    """`rows` with condition `name` parsed (numeric) or cleaned (categorical); the rows without one dropped."""
    if name in plan.fmt.numeric:
        rows[name] = objects(map(_number_or_unparseable, rows[name]), index=rows.index)
        rows = drops.drop(rows, rows[name].map(lambda v: v is _UNPARSEABLE), f"unparseable_{name}")
        return drops.drop(rows, rows[name].isna(), f"missing_{name}")
    multi = name == MULTI_VALUE_CONDITION
    rows[name] = objects((_category_values(value, multi) for value in rows[name]), index=rows.index)
    rows = drops.drop(rows, rows[name].map(len) == 0, f"missing_{name}")
    if name != plan.exploded:
        rows[name] = objects((found[0] for found in rows[name]), index=rows.index)
    return rows


def _examples(rows: pd.DataFrame, plan: _Plan, counts: RunCounts) -> pd.DataFrame:
    """One example per row (per genre with `multi_genre="all"`), with its split hash."""
    rows[COIN] = rows[TEXT].map(lambda text: _split_hash(text, plan.options.seed))
    if plan.exploded:
        counts.multi_genre_extra += int((rows[plan.exploded].map(len) - 1).sum())
        rows = rows.explode(plan.exploded)
    names = list(plan.fmt.conditions)
    values = rows[names].to_dict("records")
    rows[EXAMPLE] = objects((plan.fmt.example(v, text) for v, text in zip(values, rows[TEXT])), index=rows.index)
    return rows


def _example_key(example: str) -> bytes:
    return hashlib.blake2b(example.encode("utf-8"), digest_size=16).digest()


def _dedupe(rows: pd.DataFrame, seen: set, drops: _Drops) -> pd.DataFrame:
    """`rows` without exact repeats of an example already kept (in this chunk or before)."""
    keys = rows[EXAMPLE].map(_example_key)
    repeated = keys.duplicated().to_numpy() | keys.map(seen.__contains__).to_numpy(dtype=bool)
    seen.update(keys[~repeated])
    return drops.drop(rows, repeated, "duplicate")


def _write_examples(rows: pd.DataFrame, plan: _Plan, outputs: _Outputs, counts: RunCounts) -> None:
    """Write the kept examples, split by their hash, and count them."""
    if rows.empty:
        return
    examples, to_val = rows[EXAMPLE], (rows[COIN] < plan.options.val_fraction).to_numpy()
    wrapped = objects(map(plan.fmt.gpt2_simple, examples), index=examples.index) if plan.options.delimiters else None
    outputs.write("examples.csv", examples if wrapped is None else wrapped)
    outputs.write("val.csv", examples[to_val])
    outputs.write("train.csv", examples[~to_val])
    counts.kept += len(rows)
    counts.val += int(to_val.sum())
    counts.train += int((~to_val).sum())
    counts.stats.add_frame(rows[list(plan.fmt.conditions)], rows[TEXT])
    _track_edges(rows, counts)


def _track_edges(rows: pd.DataFrame, counts: RunCounts) -> None:
    low, high = float(rows[COIN].min()), float(rows[COIN].max())
    for edge, coin, beyond in ((counts.lowest, low, low < counts.lowest.coin),
                               (counts.highest, high, high > counts.highest.coin)):
        at_coin = rows.loc[(rows[COIN] == coin).to_numpy(), EXAMPLE].tolist()
        if beyond:
            edge.coin, edge.examples = coin, at_coin
        elif coin == edge.coin:
            edge.examples.extend(at_coin)


def _ensure_both_splits(outputs: _Outputs, counts: RunCounts, options: PrepareOptions) -> None:
    """On tiny datasets the hash may leave a split empty: move the nearest review's examples over.

    Training reads `val.csv` for evaluation, so an empty one would fail later
    and less clearly. Only happens when a split would otherwise be empty.
    """
    if counts.kept < 2 or options.val_fraction == 0:
        return
    if counts.val == 0:
        _move_edge(outputs, counts, counts.lowest, "train", "val")
    elif counts.train == 0:
        _move_edge(outputs, counts, counts.highest, "val", "train")


def _move_edge(outputs: _Outputs, counts: RunCounts, edge: _Edge, source: str, target: str) -> None:
    """Move the examples of `edge` from split `source` to split `target`, unless that would empty `source`."""
    moved = set(edge.examples)
    if len(moved) < counts.kept:
        _move_examples(outputs, moved, f"{source}.csv", f"{target}.csv")
        setattr(counts, source, getattr(counts, source) - len(moved))
        setattr(counts, target, getattr(counts, target) + len(moved))


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

    Rows stream from the source as DataFrames of `CHUNK_ROWS` rows; only one
    16-byte hash per kept example, one length per kept example and small
    counters outlive a chunk, so memory stays bounded on large dumps.

    Args:
        source: str. The dump: Kaggle or seed SQLite, CSV/TSV, JSONL, Parquet,
            or a gpt-2-simple `.txt` corpus (a file or a directory of them).
        out_dir: str. Where `examples.csv`, `train.csv`, `val.csv`,
            `stats.json` and `stats.png` go (created if missing).
        options: PrepareOptions or None. Defaults to `PrepareOptions()`.

    Returns:
        A `PrepareResult` with the paths and counts.

    Raises:
        InvalidArgument: the source is missing or unreadable, a column is
            unknown (the columns found are listed), an option is out of
            range, or no example is left after filtering (the message says
            which filter removed how many).
    """
    options = options or PrepareOptions()
    _validate(options)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"{out_dir}: exists and is not a directory")
    identifier = _language_identifier(options.language) if options.language else None
    src = open_source(Path(source), query=options.query)
    try:
        plan = _plan(src, options, identifier)
        created = not out_dir.exists()
        outputs = _open_outputs(out_dir)
        try:
            counts = _run(src, plan, outputs)
            if counts.kept == 0:
                raise InvalidArgument(_nothing_left_message(Path(source), counts))
            _ensure_both_splits(outputs, counts, plan.options)
            return _write_dataset(src, plan, counts, outputs, started)
        except BaseException as err:
            _discard(outputs, out_dir, created)
            if isinstance(err, OSError):  # disk full, permissions, a file vanishing mid-run: one line
                raise InvalidArgument(f"{err.filename or out_dir}: {err.strerror or err}") from None
            raise
    finally:
        src.close()


def _plan(src: Source, options: PrepareOptions, identifier: Optional[LanguageIdentifier]) -> _Plan:
    """The options decided for `src`, its columns resolved, and the prompt format they imply."""
    options = options.for_source(src)
    names = tuple(spec.partition("=")[0].strip() for spec in options.condition_columns)
    fmt = PromptFormat(conditions=names, numeric=tuple(n for n in names if n in NUMERIC_CONDITIONS))
    text_column, conditions = _resolve_columns(src, options)
    return _Plan(text_column, conditions, fmt, identifier, options)


def _open_outputs(out_dir: Path) -> _Outputs:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _Outputs(out_dir)
    except OSError as err:
        raise InvalidArgument(f"{out_dir}: cannot write the dataset there ({err.strerror or err})") from None


def _discard(outputs: _Outputs, out_dir: Path, created: bool) -> None:
    outputs.discard()
    if created and not any(out_dir.iterdir()):
        out_dir.rmdir()  # a failed first run leaves nothing behind, not even an empty directory


def _write_dataset(src: Source, plan: _Plan, counts: RunCounts, outputs: _Outputs, started: float) -> PrepareResult:
    """Put the CSVs in place, then the plot, then `stats.json` last: its presence says the dataset is whole."""
    out_dir = outputs.out_dir
    # A previous run's stats.json must not outlive its CSVs: it marks a complete dataset
    # and carries the prompt format that training reads.
    (out_dir / "stats.json").unlink(missing_ok=True)
    plot_path = counts.stats.plot(out_dir / "stats.png")
    outputs.commit()
    stats = _stats_json(src, plan, counts, started)
    stats_path = atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    _readable(stats_path)
    return PrepareResult(
        out_dir=out_dir, examples_path=out_dir / "examples.csv", train_path=out_dir / "train.csv",
        val_path=out_dir / "val.csv", stats_path=stats_path, plot_path=plot_path, read=counts.read,
        kept=counts.kept, train=counts.train, val=counts.val, dropped=dict(counts.dropped), stats=stats,
        kind=src.kind, warnings=list(src.warnings), seconds=stats["seconds"])
