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
import logging
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from pitchkeras.errors import InvalidArgument, echo
from pitchkeras.sampling.config import SamplerConfig

log = logging.getLogger(__name__)

#: The one id rule of the contract: opaque, URL- and Firestore-safe. Covers the ids pitchkeras
#: generates and the 20-character auto ids Firestore gave the seed's documents.
REVIEW_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: The ids pitchkeras itself generates (`review_id`): 96 bits of sha256, lower-case hex.
GENERATED_ID_RE = re.compile(r"^[0-9a-f]{24}$")


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
    """Return `value` if it is a well-formed review id, else raise InvalidArgument.

    Ids are opaque strings of 1 to 128 characters from `[A-Za-z0-9_-]`.
    """
    if not isinstance(value, str) or not REVIEW_ID_RE.match(value):
        raise InvalidArgument(
            f"malformed review id {echo(value)}: expected 1 to 128 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


def validate_score(score: Optional[float]) -> Optional[float]:
    """Scores are in [0, 10], compared at one decimal."""
    if score is None:
        return None
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise InvalidArgument(f"score must be a number in [0, 10], got {echo(score)}") from None
    if math.isnan(score) or not 0.0 <= score <= 10.0:
        raise InvalidArgument(f"score must be in [0, 10], got {echo(score)}")
    return round(score, 1)


def word_count(text: str) -> int:
    return len(text.split())


#: The sampler settings a review keeps: every setting of each token's draw (`SamplerConfig.token_options()`).
SAMPLER_OPTIONS = SamplerConfig.token_options()
SAMPLER_FIELDS = tuple(option.name for option in SAMPLER_OPTIONS)


def _with_sampler_settings(cls):
    """Give the record class one field per kept sampler setting, None = unknown (written before it existed)."""
    for option in SAMPLER_OPTIONS:
        cls.__annotations__[option.name] = Optional[option.kind]
        setattr(cls, option.name, None)
    return cls


@dataclasses.dataclass
@_with_sampler_settings
class Review:
    """One stored review.

    Args:
        id: str. Opaque id, `[A-Za-z0-9_-]{1,128}`; generated ones are `review_id`'s 24 hex characters.
        text: str. The review body, post-processed.
        score: float or None. The score condition (one decimal), None for a corpus without it.
        genre: str or None. The genre condition, None for a corpus without it.
        extra_conditions: dict. Any other conditions (name -> value as str), not queryable.
        length: int. Words in `text`.
        added: datetime or None. Set by the store (server timestamp) on first write.
        selection_count: int. How many times `get_review` handed it out.
        model_version: str. The training run id of the model that wrote it.
        seed: int or None. The seed it was drawn with (None when unknown).
        prompt: str. The exact prompt text given to the model.
        temperature, top_k, top_p, ...: one field per `SAMPLER_FIELDS` setting, as
            it was drawn with (None when unknown, e.g. reviews written before it existed).
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
    seed: Optional[int] = None
    prompt: str = ""
    # then one Optional field per SAMPLER_FIELDS setting (_with_sampler_settings)

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

    @classmethod
    def from_sample(cls, sample, conditions: Mapping[str, Any], review_id: str = "") -> "Review":
        """The store record of a generated `sampling.Sample`, with its sampler settings as provenance.

        Args:
            sample: sampling.Sample. The generated, post-processed sample.
            conditions: dict. The requested (validated) conditions: an accepted
                sample's header matches them; a rejected one's may be garbage.
            review_id: str. Its id; empty until it is stored.
        """
        return cls(
            id=review_id,
            text=sample.text,
            score=conditions.get("score"),
            genre=conditions.get("genre"),
            extra_conditions={k: str(v) for k, v in conditions.items() if k not in ("score", "genre")},
            model_version=sample.model_version,
            seed=sample.seed,
            prompt=sample.prompt,
            **{name: getattr(sample.config, name) for name in SAMPLER_FIELDS},
        )


@dataclasses.dataclass(frozen=True)
class ConditionCount:
    """How many reviews a (score, genre) pair holds."""

    score: Optional[float]
    genre: Optional[str]
    count: int


# -- records: one validation and coercion for every backend ----------------------------------


class UnusableRecord(Exception):
    """A stored document that cannot be served as a review (no usable text)."""


def review_to_record(review: Review) -> dict[str, Any]:
    """The validated, typed fields every backend writes for a new review.

    `added` is left to the store (its own clock or a server timestamp);
    `selection_count` is 0, since a new review has never been shown, whatever the
    record says. `genre_key` is the case-folded genre that case-insensitive
    filters compare, for backends without case-insensitive equality.

    Raises:
        InvalidArgument: a malformed id, empty text, a score outside [0, 10] or a non-string genre.
    """
    validate_review_id(review.id)
    if not isinstance(review.text, str) or not review.text.strip():
        raise InvalidArgument(f"review {review.id}: text must be a non-empty string")
    if review.genre is not None and not isinstance(review.genre, str):
        raise InvalidArgument(f"review {review.id}: genre must be a string or None, got {review.genre!r}")
    return {
        "text": review.text,
        "score": validate_score(review.score),
        "genre": review.genre,
        "genre_key": genre_key(review.genre),
        "extra_conditions": {str(k): str(v) for k, v in (review.extra_conditions or {}).items()},
        "length": int(review.length),
        "selection_count": 0,
        "model_version": review.model_version or "",
        "seed": None if review.seed is None else int(review.seed),
        "prompt": review.prompt or "",
        **{option.name: None if getattr(review, option.name) is None else option.kind(getattr(review, option.name))
           for option in SAMPLER_OPTIONS},
    }


def genre_key(genre: Optional[str]) -> Optional[str]:
    """What genre filters compare: the case-folded genre."""
    return genre.casefold() if isinstance(genre, str) else None


def _as_float(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise TypeError


def _as_int(value):
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError


def _as_str(value):
    if isinstance(value, str):
        return value
    raise TypeError


def _as_datetime(value):
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    raise TypeError


def _as_conditions(value):
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    raise TypeError


# Every field a stored record may hold: (coercion, value when missing or unusable).
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "score": (_as_float, None),
    "genre": (_as_str, None),
    "extra_conditions": (_as_conditions, None),
    "length": (_as_int, 0),
    "added": (_as_datetime, None),
    "selection_count": (_as_int, 0),
    "model_version": (_as_str, ""),
    "seed": (_as_int, None),
    "prompt": (_as_str, ""),
    **{option.name: ({float: _as_float, int: _as_int}[option.kind], None) for option in SAMPLER_OPTIONS},
}


def review_from_record(review_id: str, record: Mapping[str, Any], *, source: str = "",
                       warn: Optional[Callable[[str], None]] = None) -> Review:
    """The Review for a stored record, tolerating records this project did not write.

    Missing optional fields take their defaults (None, 0 or ""); a field of an
    unexpected type is ignored with a logged reason, so one odd document (written
    by the seed's script or by hand) never fails a call. Unknown fields are ignored.

    Args:
        review_id: str. The record's id.
        record: mapping. The stored fields.
        source: str. Where it was read (the store's URI), for messages.
        warn: callable or None. Takes each warning line; None logs it at WARNING.

    Raises:
        UnusableRecord: the record has no non-empty text, so it cannot be served.
    """
    warn = warn or log.warning
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UnusableRecord(f"document {review_id} has no usable text ({type(text).__name__})")
    fields: dict[str, Any] = {}
    for name, (coerce, default) in _RECORD_FIELDS.items():
        value = record.get(name)
        if value is None:
            fields[name] = default
            continue
        try:
            fields[name] = coerce(value)
        except (TypeError, ValueError):
            warn(f"{source}: document {review_id}: field {name!r} has unexpected type "
                 f"{type(value).__name__} ({str(value)[:40]!r}); ignored")
            fields[name] = default
    if fields["score"] is not None and not 0.0 <= fields["score"] <= 10.0:
        warn(f"{source}: document {review_id}: score {fields['score']!r} is outside [0, 10]; ignored")
        fields["score"] = None
    fields["extra_conditions"] = fields["extra_conditions"] or {}
    return Review(id=review_id, text=text, **fields)


# Fields a migration leaves absent when a record lacks them: unknown conditions and time stay unknown.
_NOT_DEFAULTED = ("score", "genre", "added")


def missing_record_fields(record: Mapping[str, Any], model_version: str) -> Optional[dict[str, Any]]:
    """The schema fields `record` lacks, with their defaults; None when it has no usable text.

    What `ReviewStore.migrate` adds to a record another tool wrote: `genre_key`,
    the given `model_version`, `length` counted from the text, and each other
    field's default from `_RECORD_FIELDS` (`selection_count` 0 only when absent
    altogether). Never `text`, and never a field the record already has.
    """
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    defaults = {name: default for name, (_, default) in _RECORD_FIELDS.items() if name not in _NOT_DEFAULTED}
    defaults.update(genre_key=genre_key(record.get("genre")), model_version=model_version,
                    length=word_count(text), extra_conditions={})
    return {name: value for name, value in defaults.items() if name not in record}


def describe(score: Optional[float], genre: Optional[str]) -> str:
    """`score=8.0, genre='Rock'`: the filters of a pick, for messages."""
    parts = []
    if score is not None:
        parts.append(f"score={score}")
    if genre is not None:
        parts.append(f"genre={echo(genre)}")
    return ", ".join(parts) if parts else "any conditions"


@dataclasses.dataclass
class MigrationResult:
    """What `ReviewStore.migrate` did.

    Args:
        scanned: int. Documents read.
        updated: int. Documents that gained missing fields.
        current: int. Documents already at this project's schema.
        skipped: int. Documents left alone because they cannot be served (reasons logged).
    """

    scanned: int = 0
    updated: int = 0
    current: int = 0
    skipped: int = 0

    def summary(self) -> str:
        return (f"{self.scanned} document(s) scanned: {self.updated} migrated, {self.current} already current, "
                f"{self.skipped} skipped")


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

    def migrate(self, *, model_version: str = "seed", progress: bool = False) -> MigrationResult:
        """Bring records written by other tools (the seed's script) up to this project's schema.

        Adds only missing fields (`genre_key`, `model_version`, defaults of the
        others), never touching `text` or `selection_count`; idempotent, so a
        rerun (or a resumed interrupted run) changes nothing already done. A
        backend whose schema is enforced by the store itself has nothing to do.
        """
        total = self.count()
        return MigrationResult(scanned=total, current=total)

    def pick_stats(self) -> dict[str, int]:
        """Counters of this store's picks since it was opened (backend-specific names; {} when it keeps none).

        Firestore: `picks`, `lost_races` (claims another process won), `reads` (documents read).
        """
        return {}

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
