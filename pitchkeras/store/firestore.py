"""Cloud Firestore store: one document per review in one collection.

`firestore://PROJECT[/COLLECTION][?timeout=SECONDS&candidates=K&database=NAME]`; the
collection defaults to `reviews`, the timeout (the deadline of every call,
retries included) to 10 s. Credentials come from Application Default
Credentials or GOOGLE_APPLICATION_CREDENTIALS; when FIRESTORE_EMULATOR_HOST
is set the client itself talks to that emulator instead. The client library
is imported lazily, so `pitchkeras.store` works without it.

Documents hold the Review fields plus `genre_key` (the case-folded genre),
which is what genre filters compare, since Firestore has no case-insensitive
equality. The composite indexes these queries need are in
`firestore.indexes.json` at the repository root (`firebase deploy --only
firestore:indexes`); emulators do not check indexes, production does.

Example:

    with open_store("firestore://my-project/reviews") as store:
        review = store.get_review(score=8.0, genre="Rock")
"""

from __future__ import annotations

import collections
import contextlib
import random
import time
import urllib.parse
from typing import Any, Iterable, Iterator, Optional, Sequence

from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pitchkeras.store.base import (
    ConditionCount,
    Review,
    ReviewStore,
    validate_review_id,
    validate_score,
)

DEFAULT_COLLECTION = "reviews"
#: Seconds every store call may take, retries of transient errors included.
DEFAULT_TIMEOUT_S = 10.0
#: Least-shown documents a pick reads; it chooses at random among the ties.
DEFAULT_CANDIDATES = 4
# Candidates a contended pick may read (it doubles `candidates` per lost race).
_MAX_CANDIDATES = 64
# Backoff after a pick lost a race for a document (seconds, doubled per loss).
_BASE_BACKOFF_S = 0.005
_MAX_BACKOFF_S = 0.25

# Firestore's limits: 500 writes per BatchWrite, 10 MiB per request. Stay
# under the size with margin for field names and protobuf framing.
_MAX_WRITES_PER_BATCH = 500
_MAX_BATCH_BYTES = 8 * 1024 * 1024
_FIELD_OVERHEAD_BYTES = 512
# Document references per BatchGetDocuments in existing_ids.
_MAX_GETS_PER_CALL = 300
# google.rpc.Code values in BatchWrite statuses.
_CODE_OK = 0
_CODE_ALREADY_EXISTS = 6
_URI_OPTIONS = ("timeout", "database", "candidates")


def _parse_uri(uri: str) -> dict[str, Any]:
    """`firestore://PROJECT[/COLLECTION][?timeout=S&candidates=K&database=D]` -> constructor kwargs."""
    parts = urllib.parse.urlsplit(uri)
    usage = "use firestore://PROJECT[/COLLECTION][?timeout=SECONDS&candidates=K&database=NAME]"
    if parts.scheme != "firestore" or not parts.netloc:
        raise InvalidArgument(f"bad Firestore store URI {uri!r}: {usage}")
    collection = parts.path.strip("/") or DEFAULT_COLLECTION
    if "/" in collection or (collection.startswith("__") and collection.endswith("__")):
        raise InvalidArgument(
            f"bad Firestore collection {collection!r} in {uri!r}: one top-level collection name, not a path"
        )
    kwargs: dict[str, Any] = {"project": parts.netloc, "collection": collection}
    options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - set(_URI_OPTIONS))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {', '.join(unknown)} in {uri!r}; allowed: {', '.join(_URI_OPTIONS)}")
    if "timeout" in options:
        try:
            kwargs["timeout"] = float(options["timeout"][-1])
        except ValueError:
            kwargs["timeout"] = -1.0
        if not kwargs["timeout"] > 0:
            raise InvalidArgument(f"timeout in {uri!r} must be a positive number of seconds")
    if "candidates" in options:
        value = options["candidates"][-1]
        if not value.isdigit() or int(value) < 1:
            raise InvalidArgument(f"candidates in {uri!r} must be a whole number >= 1")
        kwargs["candidates"] = int(value)
    if "database" in options:
        kwargs["database"] = options["database"][-1]
    return kwargs


class FirestoreStore(ReviewStore):
    """Reviews in a Cloud Firestore collection.

    `get_review` queries the `candidates` least-shown matching documents,
    picks one at random among those tied for the lowest selection_count, and
    claims it in a transaction that re-reads that one document and, if its
    count is still the one the query saw, applies the `Increment(1)`
    transform. If another caller claimed it first (the count moved, or the
    server aborted the commit), the pick queries again with twice the
    candidates (up to 64) after a short jittered backoff, until the call's
    deadline.

    Fairness vs contention: the claimed review is always least-shown when
    the transaction commits (counts only grow, and its count is unchanged),
    so hand-outs stay level: concurrent picks over equal reviews hand each
    out the same number of times, and never a shown review while an unshown
    one remains. The price is retries under contention. Putting the query
    itself inside the transaction would make every candidate part of the
    read set, so concurrent picks on one filter would all conflict; measured
    on the test server with 64 threads, two thirds of those picks exhausted
    their retries. Claiming only the chosen document limits conflicts to
    callers that chose the same review, and doubling the candidates after a
    lost race spreads contended callers over more of the ties while an
    uncontended pick reads only `candidates` documents (each a billed read).
    Measured on the test server (2 loaded cores, 64 threads x 4 picks over
    64 reviews): 1591 lost races with a fixed 4 candidates, 516 with the
    doubling, no failed pick either way. `candidates=1` is strictly ordered
    and fully serialized. New reviews inserted during a pick can be missed
    by it (the next pick takes them). Increments are never lost: the server
    applies the transform inside the committed transaction.

    Args:
        project: str. Google Cloud project id.
        collection: str. Top-level collection holding the reviews.
        database: str or None. Named Firestore database; None for `(default)`.
        timeout: float. Deadline in seconds of each call, retries included.
        candidates: int. Least-shown documents read per pick.
        seed: int or None. Seeds the choice among ties (tests).
    """

    def __init__(
        self,
        project: str,
        collection: str = DEFAULT_COLLECTION,
        *,
        database: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        candidates: int = DEFAULT_CANDIDATES,
        seed: Optional[int] = None,
    ):
        if candidates < 1:
            raise InvalidArgument(f"candidates must be >= 1, got {candidates}")
        self.project = project
        self.collection_name = collection
        self.uri = f"firestore://{project}/{collection}"
        self.timeout = float(timeout)
        self.candidates = int(candidates)
        self._random = random.Random(seed)
        try:
            from google.cloud import firestore
        except ImportError as exc:
            raise FailedPrecondition(
                "the Firestore store needs google-cloud-firestore: pip install google-cloud-firestore"
            ) from exc
        self._firestore = firestore
        with self._translate_errors():
            kwargs = {"project": project}
            if database:
                kwargs["database"] = database
            self._client = firestore.Client(**kwargs)
            _bound_deadlines(self._client, self.timeout)
        self._collection = self._client.collection(collection)

    @classmethod
    def from_uri(cls, uri: str) -> "FirestoreStore":
        """Open `firestore://PROJECT[/COLLECTION][?timeout=SECONDS&candidates=K&database=NAME]`."""
        return cls(**_parse_uri(uri))

    # -- errors -------------------------------------------------------------

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn google.api_core / google.auth exceptions into the library's errors."""
        from google.api_core import exceptions as gexc

        try:
            yield
        except gexc.InvalidArgument as exc:
            raise InvalidArgument(f"{self.uri}: {exc.message}") from exc
        except gexc.NotFound as exc:
            raise NotFound(f"{self.uri}: {exc.message}") from exc
        except (gexc.FailedPrecondition, gexc.PermissionDenied, gexc.Unauthenticated) as exc:
            # Missing composite index (the message links to create it) or credentials without access.
            raise FailedPrecondition(f"{self.uri}: {exc.message}") from exc
        except gexc.GoogleAPIError as exc:
            # Unavailable, deadline exceeded, retries exhausted, aborted, internal.
            raise Unavailable(f"{self.uri}: Firestore is unavailable: {exc}") from exc
        except Exception as exc:
            from google.auth import exceptions as auth_exc

            if isinstance(exc, auth_exc.GoogleAuthError):
                raise Unavailable(
                    f"{self.uri}: no usable Google credentials ({exc}); set GOOGLE_APPLICATION_CREDENTIALS, "
                    "run `gcloud auth application-default login`, or set FIRESTORE_EMULATOR_HOST"
                ) from exc
            raise

    def _call_options(self) -> dict[str, Any]:
        from google.api_core import retry as retries

        return {"retry": retries.Retry(timeout=self.timeout), "timeout": self.timeout}

    # -- conversions --------------------------------------------------------

    @staticmethod
    def _to_document(review: Review, server_timestamp) -> dict[str, Any]:
        validate_review_id(review.id)
        if not isinstance(review.text, str) or not review.text.strip():
            raise InvalidArgument(f"review {review.id}: text must be a non-empty string")
        if review.genre is not None and not isinstance(review.genre, str):
            raise InvalidArgument(f"review {review.id}: genre must be a string or None, got {review.genre!r}")
        return {
            "text": review.text,
            "score": validate_score(review.score),
            "genre": review.genre,
            "genre_key": review.genre.casefold() if review.genre is not None else None,
            "extra_conditions": {str(k): str(v) for k, v in (review.extra_conditions or {}).items()},
            "length": int(review.length),
            "added": server_timestamp,
            "selection_count": 0,  # a new review has never been shown, whatever the record says
            "model_version": review.model_version or "",
            "temperature": None if review.temperature is None else float(review.temperature),
            "top_k": None if review.top_k is None else int(review.top_k),
            "top_p": None if review.top_p is None else float(review.top_p),
            "seed": None if review.seed is None else int(review.seed),
            "prompt": review.prompt or "",
        }

    @staticmethod
    def _to_review(doc_id: str, data: dict[str, Any]) -> Review:
        return Review(
            id=doc_id,
            text=data.get("text", ""),
            score=data.get("score"),
            genre=data.get("genre"),
            extra_conditions=dict(data.get("extra_conditions") or {}),
            length=int(data.get("length") or 0),
            added=data.get("added"),
            selection_count=int(data.get("selection_count") or 0),
            model_version=data.get("model_version", ""),
            temperature=data.get("temperature"),
            top_k=data.get("top_k"),
            top_p=data.get("top_p"),
            seed=data.get("seed"),
            prompt=data.get("prompt", ""),
        )

    def _filtered(self, score: Optional[float], genre: Optional[str]):
        query = self._collection
        if genre is not None:
            query = query.where(filter=self._firestore.FieldFilter("genre_key", "==", str(genre).casefold()))
        if score is not None:
            query = query.where(filter=self._firestore.FieldFilter("score", "==", score))
        return query

    # -- the contract -------------------------------------------------------

    def add_reviews(self, reviews: Iterable[Review]) -> int:
        """Create each review unless its id exists (per document, not all-or-nothing).

        Sent as BatchWrite requests of at most 500 writes and ~8 MB. A create
        whose document already exists fails alone with ALREADY_EXISTS and is
        not counted. If a request is retried after a transient error, the
        creates it had already applied come back ALREADY_EXISTS, so the
        returned count can undercount then; the data is right either way.
        """
        from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch

        added = 0
        seen: set[str] = set()
        batch, batch_bytes = BulkWriteBatch(self._client), 0
        for review in reviews:
            data = self._to_document(review, self._firestore.SERVER_TIMESTAMP)
            if review.id in seen:
                continue  # BatchWrite forbids two writes to one document; the second is a duplicate anyway
            seen.add(review.id)
            size = len(review.text.encode()) + len(data["prompt"].encode()) + _FIELD_OVERHEAD_BYTES
            if len(batch) >= _MAX_WRITES_PER_BATCH or (len(batch) and batch_bytes + size > _MAX_BATCH_BYTES):
                added += self._commit_creates(batch)
                batch, batch_bytes = BulkWriteBatch(self._client), 0
            batch.create(self._collection.document(review.id), data)
            batch_bytes += size
        if len(batch):
            added += self._commit_creates(batch)
        return added

    def _commit_creates(self, batch) -> int:
        with self._translate_errors():
            response = batch.commit(**self._call_options())
        added = 0
        for status in response.status:
            if status.code == _CODE_OK:
                added += 1
            elif status.code != _CODE_ALREADY_EXISTS:
                raise Unavailable(f"{self.uri}: a review write failed (code {status.code}): {status.message}")
        return added

    def get_review(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> Review:
        score = validate_score(score)
        ordered = self._filtered(score, genre).order_by("selection_count")
        options = self._call_options()
        increment = self._firestore.Increment(1)

        @self._firestore.transactional
        def claim(transaction, ref, expected_count):
            # Only the chosen document is in the read set, so only callers that
            # chose the same document conflict.
            snapshot = next(iter(transaction.get(ref, **options)))
            if not snapshot.exists or snapshot.get("selection_count") != expected_count:
                return None  # another caller took it first
            transaction.update(ref, {"selection_count": increment})
            return snapshot

        # Lost races are retried until the call's deadline: each one means
        # another caller's pick succeeded, so the system as a whole progresses.
        deadline = time.monotonic() + self.timeout
        lost_races = 0
        while True:
            # Each lost race doubles the candidates read, so concurrent callers spread
            # over more of the tied documents; an uncontended pick reads only a few.
            limit = min(self.candidates << min(lost_races, 16), max(self.candidates, _MAX_CANDIDATES))
            with self._translate_errors():
                snapshots = list(ordered.limit(limit).stream(**options))
            if not snapshots:
                raise NotFound(f"no review matches {_describe(score, genre)} in {self.uri}")
            least = snapshots[0].get("selection_count")
            chosen = self._random.choice([s for s in snapshots if s.get("selection_count") == least])
            with self._translate_errors():
                try:
                    claimed = claim(self._client.transaction(), chosen.reference, least)
                except ValueError as exc:
                    # The client raises ValueError both when every attempt was
                    # aborted and when its rollback after a failed
                    # BeginTransaction finds no transaction; the API error behind it says which.
                    cause = _api_error_behind(exc)
                    if cause is None:
                        raise
                    from google.api_core import exceptions as gexc

                    if not isinstance(cause, gexc.Aborted):
                        raise cause from exc
                    claimed = None
            if claimed is not None:
                review = self._to_review(claimed.id, claimed.to_dict())
                review.selection_count += 1  # the increment this transaction committed
                return review
            lost_races += 1
            # Jittered backoff spreads out callers that keep choosing the same documents.
            pause = self._random.uniform(0, min(_MAX_BACKOFF_S, _BASE_BACKOFF_S * 2**lost_races))
            if time.monotonic() + pause > deadline:
                raise Unavailable(
                    f"{self.uri}: gave up picking a review after {lost_races} lost races in "
                    f"{self.timeout:g} s of contention; retry"
                )
            time.sleep(pause)

    def get_by_id(self, review_id: str) -> Review:
        validate_review_id(review_id)
        with self._translate_errors():
            snapshot = self._collection.document(review_id).get(**self._call_options())
        if not snapshot.exists:
            raise NotFound(f"no review with id {review_id} in {self.uri}")
        return self._to_review(snapshot.id, snapshot.to_dict())

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))
        found: set[str] = set()
        with self._translate_errors():
            for start in range(0, len(ids), _MAX_GETS_PER_CALL):
                refs = [self._collection.document(validate_review_id(i)) for i in ids[start:start + _MAX_GETS_PER_CALL]]
                # An empty field mask: existence only, no review text over the wire.
                for snapshot in self._client.get_all(refs, field_paths=[], **self._call_options()):
                    if snapshot.exists:
                        found.add(snapshot.id)
        return found

    def counts(self) -> list[ConditionCount]:
        """Reviews per (score, genre) pair.

        Firestore has no GROUP BY, so this streams a projection of every
        document (score and genre only): one billed read per review. Use
        `count(score=, genre=)` for one pair; it is an aggregation query.
        """
        tally: collections.Counter = collections.Counter()
        with self._translate_errors():
            for snapshot in self._collection.select(["score", "genre"]).stream(**self._call_options()):
                data = snapshot.to_dict()
                tally[(data.get("score"), data.get("genre"))] += 1
        return sorted(
            (ConditionCount(score=s, genre=g, count=n) for (s, g), n in tally.items()),
            key=lambda c: (c.genre is not None, c.genre or "", c.score is not None, c.score or 0.0),
        )

    def count(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> int:
        score = validate_score(score)
        with self._translate_errors():
            result = self._filtered(score, genre).count(alias="n").get(**self._call_options())
        return int(result[0][0].value)

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()


def _api_error_behind(exc: BaseException):
    """The google.api_core error this exception was raised from or while handling, if any."""
    from google.api_core import exceptions as gexc

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, gexc.GoogleAPIError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _bound_deadlines(client, timeout: float) -> None:
    """Cap every RPC of `client`, retries included, at `timeout` seconds.

    Most calls take `retry=`/`timeout=`, but the transaction's BeginTransaction,
    Commit and Rollback use the defaults of the generated client (retry
    UNAVAILABLE for 60 s), so an unreachable Firestore would hang a pick for a
    minute. The defaults live on the transport's wrapped methods; this keeps
    each method's own retry predicate and only shortens its deadline.
    """
    transport = client._firestore_api._transport
    for wrapped in transport._wrapped_methods.values():
        retry = getattr(wrapped, "_retry", None)
        if retry is not None and hasattr(retry, "with_timeout"):
            wrapped._retry = retry.with_timeout(timeout)
        if getattr(wrapped, "_timeout", None) is not None:
            wrapped._timeout = min(wrapped._timeout, timeout)


def _describe(score: Optional[float], genre: Optional[str]) -> str:
    parts = []
    if score is not None:
        parts.append(f"score={score}")
    if genre is not None:
        parts.append(f"genre={genre!r}")
    return ", ".join(parts) if parts else "any conditions"
