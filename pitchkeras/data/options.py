"""`PrepareOptions`: how `prepare` reads, cleans, formats and splits a dump.

Apart from `prepare` (which loads pandas) so the command line can build its flags from these defaults without
importing it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pitchkeras.conditioning import REVIEW_CONDITIONS
from pitchkeras.errors import InvalidArgument

MULTI_GENRE = ("first", "all")
TEXT_KINDS = ("txt", "txt-dir")  # sources with a text column only


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How `prepare` reads, cleans, formats and splits a dump.

    Args:
        query: str or None. SQLite only: the SELECT to read instead of the detected schema.
        text_column: str or None. The column holding the text (default: detected: `content` for the Kaggle dump,
            else the first of text/review/content/body/bio/biography/description).
        condition_columns: tuple of str or None. The conditions, in prompt order; `name=column` reads condition
            `name` from another column. `()` for a plain corpus. None (default): `score`, `genre` for tables, none
            for a `.txt` corpus (it holds text only).
        multi_genre: str. `first` keeps a review's first genre; `all` emits one example per genre.
        min_chars: int. Texts shorter than this (after cleaning) are dropped.
        max_chars: int. Texts longer than this are dropped.
        drop_multiline: bool. Drop texts that contain a newline (the seed tutorial's filter); by default inner
            newlines are kept.
        language: str or None. Keep only texts `langid` classifies as this ISO 639-1 code (e.g. `en`).
        delimiters: bool. Wrap each `examples.csv` row in `<|startoftext|>`/`<|endoftext|>` for gpt-2-simple.
        val_fraction: float. Share of examples in `val.csv`, in [0, 1).
        seed: int. Seeds the split hash; another seed gives another split.
        progress: bool. Show a tqdm bar on large inputs.

    Raises:
        InvalidArgument: an option is out of range (the message names the flag).
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
        if self.multi_genre not in MULTI_GENRE:
            raise InvalidArgument(f"--multi-genre must be one of {', '.join(MULTI_GENRE)}, got {self.multi_genre!r}")
        if self.min_chars < 0:
            raise InvalidArgument(f"--min-chars must be >= 0, got {self.min_chars}")
        if self.max_chars < max(1, self.min_chars):
            raise InvalidArgument(f"--max-chars ({self.max_chars}) must be >= 1 and >= --min-chars ({self.min_chars})")
        if not 0 <= self.val_fraction < 1:
            raise InvalidArgument(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not -2**63 <= self.seed < 2**63:  # it salts the split hash as 8 signed bytes
            raise InvalidArgument(f"--seed must fit in 64 bits (-2**63 to 2**63 - 1), got {self.seed}")
        names = list(self.conditions)
        if len(names) != len(self.condition_columns or ()) or not all(names):
            raise InvalidArgument(f"--condition-columns must name each condition once, got "
                                  f"{','.join(self.condition_columns)!r}")

    @property
    def conditions(self) -> dict[str, str]:
        """Condition name -> source column, from `condition_columns` (`name=column`, or `name` alone)."""
        pairs = (spec.partition("=")[::2] for spec in self.condition_columns or ())
        return {name.strip(): column.strip() or name.strip() for name, column in pairs}

    def for_source(self, source) -> "PrepareOptions":
        """These options with `condition_columns` decided for `source` when left to it."""
        if self.condition_columns is not None:
            return self
        return dataclasses.replace(self, condition_columns=() if source.kind in TEXT_KINDS else REVIEW_CONDITIONS)


def parse_condition_columns(text: str) -> tuple[str, ...]:
    """`"score,genre"` -> `("score", "genre")`; `""` -> `()` (a plain corpus)."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())
