"""prepare's cleaning, over a chunk's columns: texts normalised, numeric conditions parsed, categories cleaned.

`normalize_text` and `parse_number` define the cleaning of one value; the column functions apply them where they can
change something: `texts` visits only the texts a one-pass pyarrow mask finds something to clean in, and conditions
(a handful of values repeated over many rows) are parsed once per distinct value (`per_value`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# ASCII horizontal whitespace only (NBSP and friends are kept as written). Patterns match only what
# changes (not every single space), and each runs only when a plain `in` finds work for it.
_SPACES = re.compile(r"[\t\x0b\x0c][ \t\x0b\x0c]*| [ \t\x0b\x0c]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # control characters that never belong in prose
_LINE_EDGES = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")
# A text with none of the above, no CR and no space or newline at an end is already normal.
_UNCLEAN = r"[\r\t\x0b\x0c\x00-\x08\x0e-\x1f\x7f]|  | \n|\n |\n\n\n"
_EDGES = (" ", "\n")


def normalize_text(text: str) -> str:
    """Clean whitespace and line endings, keeping every other character as written.

    CRLF and CR become LF; control characters go; runs of spaces and tabs become one space; spaces around a newline
    go; three or more newlines become one blank line; the ends are trimmed. Non-ASCII characters (including no-break
    spaces) are left byte for byte.
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
    if isinstance(value, (bool, np.bool_)):
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


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def texts(column: pd.Series) -> np.ndarray:
    """A text column as Python strings, normalised ("" when missing)."""
    out = np.array([v if isinstance(v, str) else "" if _missing(v) else str(v) for v in column], dtype=object)
    # Most texts are already clean: one pass of RE2 over the chunk (as pyarrow has it) finds those that are not.
    arrow = pa.array(column) if isinstance(column.dtype, pd.StringDtype) else pa.array(out, type=pa.large_string())
    dirty = pc.match_substring_regex(arrow, _UNCLEAN).fill_null(False).to_numpy(zero_copy_only=False)
    dirty |= np.fromiter((t.startswith(_EDGES) or t.endswith(_EDGES) for t in out), dtype=bool, count=len(out))
    out[dirty] = [normalize_text(t) for t in out[dirty]]
    return out


def per_value(column: pd.Series, function) -> np.ndarray:
    """`function` of each value of `column` (NA passed as None), computed once per distinct value."""
    try:
        codes, uniques = pd.factorize(column, use_na_sentinel=True)
    except TypeError:  # unhashable values (a JSON list inside a list): value by value
        codes, uniques = np.arange(len(column)), column.to_numpy(dtype=object)
    results = np.fromiter(map(function, [*uniques, None]), dtype=object, count=len(uniques) + 1)
    return results[codes]  # code -1 (NA) picks the last


def _number(value) -> float:
    """NaN when missing, +inf when present but not a finite number."""
    try:
        number = parse_number(value)
    except ValueError:
        return math.inf
    return math.nan if number is None else number


def numbers(column: pd.Series) -> np.ndarray:
    """A numeric condition column as floats: NaN where missing, +inf where not a finite number."""
    return per_value(column, _number).astype(float)


def _values(cell, multi: bool) -> tuple:
    """A cell's condition values, whitespace collapsed, in order, without blanks or repeats: a list's items, text
    split at commas for a multi-valued condition, else the cell."""
    if _missing(cell):
        return ()
    cells = cell if isinstance(cell, list) else str(cell).split(",") if multi else [cell]
    values = ("" if _missing(value) else " ".join(str(value).split()) for value in cells)
    return tuple(dict.fromkeys(value for value in values if value))


def categories(column: pd.Series, multi: bool) -> np.ndarray:
    """Every row's values (a tuple each; empty when missing)."""
    return per_value(column, functools.partial(_values, multi=multi))
