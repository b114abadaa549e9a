"""Turn a review dump into conditioned training examples.

`prepare(source, out_dir)` streams rows from any dump `open_source` knows,
cleans them, formats each with `PromptFormat.example` (the one prompt format),
and writes to `out_dir`:

- `examples.csv`: every kept example, one per row, single column, no header,
  csv-quoted so multi-line examples survive (with `delimiters=True` each is
  wrapped in gpt-2-simple's `<|startoftext|>`/`<|endoftext|>`);
- `train.csv` / `val.csv`: the same examples (never wrapped: the tf.data
  pipeline adds the model's own `<|endoftext|>` tokens), split by a seeded
  hash of the review text, so adding rows to the dump moves no existing
  example across the split and every genre variant of a review lands on the
  same side;
- `stats.json` and `stats.png` (see `pitchkeras.data.stats`).

Rows are dropped, and counted per reason, for: `malformed_row`,
`undecodable` (bytes that are not UTF-8), `empty_text`, `missing_<condition>`,
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
import csv
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
from typing import Any, Iterable, Optional

from pitchkeras.conditioning import NUMERIC_CONDITIONS, REVIEW_CONDITIONS, PromptFormat
from pitchkeras.data.pipeline import read_examples
from pitchkeras.data.sources import UNDECODABLE, Source, detect_text_column, find_column, open_source
from pitchkeras.data.stats import DatasetStats
from pitchkeras.errors import InvalidArgument
from pitchkeras.model import atomic_write_text

MULTI_GENRE = ("first", "all")
TEXT_KINDS = ("txt", "txt-dir")  # sources with a text column only
MULTI_VALUE_CONDITION = "genre"  # the one condition a row may hold several values of
LANGUAGE_SAMPLE_CHARS = 2000  # langid reads this much of each text: enough to decide, bounded cost
PROGRESS_MIN_ROWS = 5000  # smaller inputs finish before a bar is worth drawing
PROGRESS_MIN_BYTES = 5 << 20

# ASCII horizontal whitespace only (NBSP and friends are kept as written). Patterns match only what
# changes (not every single space), and each runs only when a plain `in` finds work for it: a regex
# that stops at every space is ~5x slower on long reviews.
_SPACES = re.compile(r"[\t\x0b\x0c][ \t\x0b\x0c]*| [ \t\x0b\x0c]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # control characters that never belong in prose
_LINE_EDGES = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How `prepare` reads, cleans, formats and splits a dump.

    Args:
        query: str or None. SQLite only: the SELECT to read instead of the
            detected schema.
        text_column: str or None. The column holding the text (default:
            detected: `content` for the Kaggle dump, else the first of
            text/review/content/body/bio/biography/description).
        condition_columns: tuple of str or None. The conditions, in prompt
            order; `name=column` reads condition `name` from another column.
            `()` for a plain corpus. None (default): `score`, `genre` for
            tables, none for a `.txt` corpus (it holds text only).
        multi_genre: str. `first` keeps a review's first genre; `all` emits
            one example per genre.
        min_chars: int. Texts shorter than this (after cleaning) are dropped.
        max_chars: int. Texts longer than this are dropped.
        drop_multiline: bool. Drop texts that contain a newline (the seed
            tutorial's filter); by default inner newlines are kept.
        language: str or None. Keep only texts `langid` classifies as this
            ISO 639-1 code (e.g. `en`).
        delimiters: bool. Wrap each `examples.csv` row in
            `<|startoftext|>`/`<|endoftext|>` for gpt-2-simple.
        val_fraction: float. Share of examples in `val.csv`, in [0, 1).
        seed: int. Seeds the split hash; another seed gives another split.
        progress: bool. Show a tqdm bar on large inputs.
    """

    query: Optional[str] = None
    text_column: Optional[str] = None
    condition_columns: Optional[tuple[str, ...]] = None  # None: score,genre for tables; () for .txt corpora
    multi_genre: str = "first"  # or "all": one example per genre
    min_chars: int = 20
    max_chars: int = 10000  # gpt-2-simple's csv reader chokes on longer fields; GPT-2 sees 1024 tokens anyway
    drop_multiline: bool = False
    language: Optional[str] = None
    delimiters: bool = False
    val_fraction: float = 0.05
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.condition_columns is not None:
            object.__setattr__(self, "condition_columns", tuple(self.condition_columns))

    def for_source(self, source: Source) -> "PrepareOptions":
        """These options with `condition_columns` decided for `source` when left to it."""
        if self.condition_columns is not None:
            return self
        return dataclasses.replace(self, condition_columns=() if source.kind in TEXT_KINDS else REVIEW_CONDITIONS)


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


def parse_condition_columns(text: str) -> tuple[str, ...]:
    """`"score,genre"` -> `("score", "genre")`; `""` -> `()` (a plain corpus)."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


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
    if value is None:
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


class _Outputs:
    """The three CSVs, written to temp files in `out_dir` and renamed into place by `commit`."""

    NAMES = ("examples.csv", "train.csv", "val.csv")

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tmp = {}
        self.files = {}
        self.writers = {}
        try:
            for name in self.NAMES:
                fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
                self.tmp[name] = Path(tmp)
                self.files[name] = os.fdopen(fd, "w", encoding="utf-8", newline="")
                self.writers[name] = csv.writer(self.files[name], lineterminator="\n").writerow
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, example: str) -> None:
        self.writers[name]((example,))

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
    kept_rows = [row for row in read_examples(outputs.tmp[source]) if row not in moved]
    atomic_write_text(outputs.tmp[source], _csv_text(kept_rows))
    with open(outputs.tmp[target], "a", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for row in moved:
            writer.writerow((row,))


def _csv_text(rows: Iterable[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow((row,))
    return buffer.getvalue()


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, *,
            options: Optional[PrepareOptions] = None) -> PrepareResult:
    """Read a dump, clean it, and write conditioned examples, a split and statistics.

    Rows stream from the source in chunks; only one 16-byte hash per kept
    example, one length per kept example and small counters are held, so
    memory stays bounded on large dumps.

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
    source_path = Path(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"{out_dir}: exists and is not a directory")

    identifier = _language_identifier(options.language) if options.language else None

    src = open_source(source_path, query=options.query)
    try:
        options = options.for_source(src)
        names = tuple(spec.partition("=")[0].strip() for spec in options.condition_columns)
        fmt = PromptFormat(conditions=names, numeric=tuple(n for n in names if n in NUMERIC_CONDITIONS))
        text_column, conditions = _resolve_columns(src, options)
        created = not out_dir.exists()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            outputs = _Outputs(out_dir)
        except OSError as err:
            raise InvalidArgument(f"{out_dir}: cannot write the dataset there ({err.strerror or err})") from None
        try:
            counts = _run(src, text_column, conditions, fmt, identifier, options, outputs)
            if counts["kept"] == 0:
                raise InvalidArgument(_nothing_left_message(source_path, counts))
            _ensure_both_splits(outputs, counts, options)
            # A previous run's stats.json must not outlive its CSVs: it marks a complete dataset
            # and carries the prompt format that training reads.
            (out_dir / "stats.json").unlink(missing_ok=True)
            plot_path = counts["stats"].plot(out_dir / "stats.png")
            outputs.commit()
            # stats.json goes last: its presence says the whole dataset was written.
            stats = _stats_json(src, text_column, conditions, options, counts, started)
            stats_path = atomic_write_text(out_dir / "stats.json",
                                           json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
            _readable(stats_path)
        except BaseException as err:
            outputs.discard()
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a failed first run leaves nothing behind, not even an empty directory
            if isinstance(err, OSError):  # disk full, permissions, a file vanishing mid-run: one line
                raise InvalidArgument(f"{err.filename or out_dir}: {err.strerror or err}") from None
            raise
    finally:
        src.close()

    return PrepareResult(
        out_dir=out_dir,
        examples_path=out_dir / "examples.csv",
        train_path=out_dir / "train.csv",
        val_path=out_dir / "val.csv",
        stats_path=stats_path,
        plot_path=plot_path,
        read=counts["read"],
        kept=counts["kept"],
        train=counts["train"],
        val=counts["val"],
        dropped=dict(counts["dropped"]),
        stats=stats,
    )


def _run(src: Source, text_column: str, conditions: dict[str, str], fmt: PromptFormat, identifier,
         options: PrepareOptions, outputs: _Outputs) -> dict:
    """The streaming loop: read, clean, format, dedupe, split, count."""
    from tqdm import tqdm

    dropped = collections.Counter()
    stats = DatasetStats(fmt)
    seen = set()  # 16-byte hashes of kept examples, not the texts: bounded memory
    read = kept = train = val = extra = 0
    lowest = (2.0, [])  # (split hash, examples): moved to val if val would be empty
    highest = (-1.0, [])
    wanted = list(dict.fromkeys([text_column, *conditions.values()]))
    multi_all = options.multi_genre == "all"

    large = src.total is None or src.total >= (PROGRESS_MIN_BYTES if src.unit == "B" else PROGRESS_MIN_ROWS)
    bar = tqdm(total=src.total, unit=src.unit, unit_scale=src.unit == "B", desc=f"prepare {src.path.name}",
               disable=not (options.progress and large), mininterval=0.5, file=sys.stderr)
    with bar:
        for row in src.rows(wanted):
            read += 1
            if read % 512 == 0:
                bar.update(src.position - bar.n)
            if row is None:
                dropped["malformed_row"] += 1
                continue
            if any(v is UNDECODABLE or (isinstance(v, list) and any(x is UNDECODABLE for x in v))
                   for v in row.values()):
                dropped["undecodable"] += 1
                continue
            raw = row[text_column]
            text = normalize_text(raw if isinstance(raw, str) else ("" if raw is None else str(raw)))
            if not text:
                dropped["empty_text"] += 1
                continue

            # Conditions: one dict per example this row yields (several only for --multi-genre all).
            values, reason = {}, None
            variants = None
            for name, column in conditions.items():
                if name in fmt.numeric:
                    try:
                        number = parse_number(row[column])
                    except ValueError:
                        reason = f"unparseable_{name}"
                        break
                    if number is None:
                        reason = f"missing_{name}"
                        break
                    values[name] = number
                else:
                    found = _category_values(row[column], multi=name == MULTI_VALUE_CONDITION)
                    if not found:
                        reason = f"missing_{name}"
                        break
                    if name == MULTI_VALUE_CONDITION and multi_all:
                        variants = (name, found)
                    values[name] = found[0]
            if reason:
                dropped[reason] += 1
                continue

            if options.drop_multiline and "\n" in text:
                dropped["multiline"] += 1
                continue
            if len(text) < options.min_chars:
                dropped["too_short"] += 1
                continue
            if len(text) > options.max_chars:
                dropped["too_long"] += 1
                continue
            if identifier is not None and identifier.classify(text[:LANGUAGE_SAMPLE_CHARS]) != options.language:
                dropped["language"] += 1
                continue

            if variants:
                name, found = variants
                per_example = [{**values, name: v} for v in found]
                extra += len(found) - 1
            else:
                per_example = [values]
            coin = _split_hash(text, options.seed)
            for example_values in per_example:
                example = fmt.example(example_values, text)
                key = hashlib.blake2b(example.encode("utf-8"), digest_size=16).digest()
                if key in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(key)
                kept += 1
                stats.add(example_values, text)
                outputs.write("examples.csv", fmt.gpt2_simple(example) if options.delimiters else example)
                if coin < options.val_fraction:
                    outputs.write("val.csv", example)
                    val += 1
                else:
                    outputs.write("train.csv", example)
                    train += 1
                if coin < lowest[0]:
                    lowest = (coin, [example])
                elif coin == lowest[0]:
                    lowest[1].append(example)
                if coin > highest[0]:
                    highest = (coin, [example])
                elif coin == highest[0]:
                    highest[1].append(example)
        bar.update(max(0, src.position - bar.n))
    return {"read": read, "kept": kept, "train": train, "val": val, "multi_genre_extra": extra,
            "dropped": dropped, "stats": stats, "lowest": lowest[1], "highest": highest[1]}


def _ensure_both_splits(outputs: _Outputs, counts: dict, options: PrepareOptions) -> None:
    """On tiny datasets the hash may leave a split empty: move the nearest review's examples over.

    Training reads `val.csv` for evaluation, so an empty one would fail later
    and less clearly. Only happens when a split would otherwise be empty.
    """
    if counts["kept"] < 2 or options.val_fraction == 0:
        return
    if counts["val"] == 0:
        moved = set(counts["lowest"])
        if len(moved) < counts["kept"]:
            _move_examples(outputs, moved, "train.csv", "val.csv")
            counts["train"] -= len(moved)
            counts["val"] += len(moved)
    elif counts["train"] == 0:
        moved = set(counts["highest"])
        if len(moved) < counts["kept"]:
            _move_examples(outputs, moved, "val.csv", "train.csv")
            counts["val"] -= len(moved)
            counts["train"] += len(moved)


def _nothing_left_message(path: Path, counts: dict) -> str:
    if counts["read"] == 0:
        return f"{path}: no rows to read (the source is empty)"
    reasons = ", ".join(f"{reason}: {n}" for reason, n in counts["dropped"].most_common())
    return (f"{path}: nothing left after filtering; read {counts['read']} rows, dropped {reasons} "
            "(loosen the filter that removed most, e.g. --min-chars/--max-chars/--language, or check the columns)")


def _stats_json(src: Source, text_column: str, conditions: dict[str, str], options: PrepareOptions,
                counts: dict, started: float) -> dict:
    summary = counts["stats"].summary()
    return {
        "read": counts["read"],
        "kept": counts["kept"],
        "dropped": dict(counts["dropped"].most_common()),
        # read + multi_genre_extra == kept + sum(dropped): `all` turns one row into one example per genre.
        "multi_genre_extra": counts["multi_genre_extra"],
        "train": counts["train"],
        "val": counts["val"],
        **summary,
        "source": {"path": str(src.path), "kind": src.kind, "text_column": text_column,
                   "condition_columns": conditions},
        "warnings": list(src.warnings),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        "seconds": round(time.perf_counter() - started, 3),
    }
