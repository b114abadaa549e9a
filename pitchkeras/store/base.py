"""The ReviewStore contract: what every backend (SQLite, Firestore) must do.

Code above the store (populate, the server, the demo) depends on this module
only. Backends raise the library's errors (`pitchkeras.errors`), never a
driver's.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import hashlib
import json
import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from pitchkeras.errors import InvalidArgument

REVIEW_ID_RE = re.compile(r"^[0-9a-f]{24}$")  # 96 bits of sha256, lower-case hex


def review_id(model_version: str, conditions: Mapping[str, Any], seed: int, index: int) -> str:
    """The deterministic id of a generated review.

    Derived from model_version + conditions + seed + index, so re-running a
    populate job (or running it sharded on many machines) never duplicates.
    """
    canonical = {
        k: (round(float(v), 1) if isinstance(v, (int, float)) else str(v))
        for k, v in sorted(conditions.items())
        if v is not None
    }
    key = json.dumps([model_version, canonical, int(seed), int(index)], sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def validate_review_id(value: str) -> str:
    """Return `value` if it is a well-formed review id, else raise InvalidArgument."""
    if not isinstance(value, str) or not REVIEW_ID_RE.match(value):
        raise InvalidArgument(
            f"malformed review id {value!r}: expected 24 lower-case hex characters"
        )
    return value


def validate_score(score: Optional[float]) -> Optional[float]:
    """Scores are in [0, 10], compared at one decimal."""
    if score is None:
        return None
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise InvalidArgument(f"score must be a number in [0, 10], got {score!r}") from None
    if math.isnan(score) or not 0.0 <= score <= 10.0:
        raise InvalidArgument(f"score must be in [0, 10], got {score!r}")
    return round(score, 1)


def word_count(text: str) -> int:
    return len(text.split())


@dataclasses.dataclass
class Review:
    """One stored review.

    Args:
        id: str. Deterministic id (`review_id`); 24 lower-case hex characters.
        text: str. The review body, post-processed.
        score: float or None. The score condition (one decimal), None for a corpus without it.
        genre: str or None. The genre condition, None for a corpus without it.
        extra_conditions: dict. Any other conditions (name -> value as str), not queryable.
        length: int. Words in `text`.
        added: datetime or None. Set by the store (server timestamp) on first write.
        selection_count: int. How many times `get_review` handed it out.
        model_version: str. The training run id of the model that wrote it.
        temperature, top_k, top_p, seed: sampler settings used (None when unknown).
        prompt: str. The exact prompt text given to the model.
        repetition_penalty, no_repeat_ngram_size: the sampler's repetition
            settings (None when unknown, e.g. reviews written before they existed).
    """

    id: str
    text: str
    score: Optional[float] = None
    genre: Optional[str] = None
    extra_conditions: dict = dataclasses.field(default_factory=dict)
    length: int = 0
    added: Optional[datetime.datetime] = None
    selection_count: int = 0
    model_version: str = ""
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    prompt: str = ""
    repetition_penalty: Optional[float] = None
    no_repeat_ngram_size: Optional[int] = None

    def __post_init__(self):
        if not self.length:
            self.length = word_count(self.text)
        if self.score is not None:
            self.score = round(float(self.score), 1)

    @property
    def conditions(self) -> dict[str, Any]:
        """All conditions of this review, score and genre included when set."""
        out: dict[str, Any] = dict(self.extra_conditions)
        if self.score is not None:
            out["score"] = self.score
        if self.genre is not None:
            out["genre"] = self.genre
        return out

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["added"] = self.added.isoformat() if self.added else None
        return data


@dataclasses.dataclass(frozen=True)
class ConditionCount:
    """How many reviews a (score, genre) pair holds."""

    score: Optional[float]
    genre: Optional[str]
    count: int


class ReviewStore(abc.ABC):
    """Where generated reviews live. Use as a context manager or call `close()`."""

    #: URI this store was opened with (for messages).
    uri: str = ""

    @abc.abstractmethod
    def add_reviews(self, reviews: Iterable[Review]) -> int:
        """Write reviews; ids already present are left untouched (idempotent).

        Returns:
            The number of reviews newly added.
        """

    @abc.abstractmethod
    def get_review(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> Review:
        """The least-shown review matching the filters, with its selection_count
        incremented atomically in the same transaction (the returned record shows
        the new count). Two concurrent callers never both get the same
        least-shown review for one increment.

        Raises:
            NotFound: nothing matches.
            InvalidArgument: a bad score.
        """

    @abc.abstractmethod
    def get_by_id(self, review_id: str) -> Review:
        """The review with this id, without incrementing (the permalink).

        Raises:
            InvalidArgument: a malformed id.
            NotFound: no such review.
        """

    @abc.abstractmethod
    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` already stored (for resumable jobs)."""

    @abc.abstractmethod
    def counts(self) -> list[ConditionCount]:
        """Reviews per (score, genre) pair, sorted by genre then score."""

    def count(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> int:
        """Reviews matching the filters (genre compared case-insensitively)."""
        score = validate_score(score)
        return sum(
            c.count
            for c in self.counts()
            if (score is None or c.score == score)
            and (genre is None or (c.genre or "").casefold() == genre.casefold())
        )

    def genres(self) -> list[str]:
        """The genres present, sorted."""
        return sorted({c.genre for c in self.counts() if c.genre is not None})

    def scores(self) -> list[float]:
        """The scores present, sorted."""
        return sorted({c.score for c in self.counts() if c.score is not None})

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
