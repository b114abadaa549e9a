"""Cloud Firestore store: one document per review in one collection.

`firestore://PROJECT[/COLLECTION][?timeout=SECONDS&candidates=K&database=NAME]`; the
collection defaults to `reviews`, the timeout (the deadline of every call,
retries included) to 10 s. Credentials come from Application Default
Credentials or GOOGLE_APPLICATION_CREDENTIALS; when FIRESTORE_EMULATOR_HOST
is set the client itself talks to that emulator instead. The client library
is imported lazily, so `pitchkeras.store` works without it.

Documents hold the Review fields plus `genre_key` (the case-folded genre),
which genre filters compare, since Firestore has no case-insensitive
equality. Collections written by the seed's script (auto ids; `text, score,
genre, length, added, selection_count` only) are served as they are: a genre
filter also matches the usual spellings of the stored `genre` itself, and
`migrate()` (`pitchkeras store migrate`) adds the missing fields. The
composite indexes these queries need are in `firestore.indexes.json` at the
repository root; emulators do not check indexes, production does.

Example:

    with open_store("firestore://my-project/reviews") as store:
        review = store.get_review(score=8.0, genre="Rock")
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import logging
import random
import re
import threading
import time
import urllib.parse
from typing import Any, Iterable, Iterator, Optional, Sequence

from google.rpc import code_pb2

from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pitchkeras.store.base import (
    GENERATED_ID_RE,
    ConditionCount,
    MigrationResult,
    Review,
    ReviewStore,
    UnusableRecord,
    describe,
    genre_key,
    missing_record_fields,
    review_from_record,
    review_to_record,
    validate_review_id,
    validate_score,
)

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "reviews"
#: Seconds every store call may take, retries of transient errors included.
DEFAULT_TIMEOUT_S = 10.0
#: Least-shown documents one read of a pick returns (each a billed read).
DEFAULT_CANDIDATES = 8
# Pause after a round whose every candidate another pick claimed first: a few ms with jitter,
# so the callers that lost do not all read the same next documents at the same instant.
_MAX_ROUND_PAUSE_S = 0.004
# After a lost race, this process's reads of that filter spread over the ties for this long.
_SPREAD_FOR_S = 1.0
_NEVER = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
# A shared read is used for at most this long: reviews added since are then seen by the next pick.
_POOL_TTL_S = 0.5

# Firestore's limits: 500 writes per BatchWrite, 10 MiB per request. Stay
# under the size with margin for field names and protobuf framing.
_MAX_WRITES_PER_BATCH = 500
_MAX_BATCH_BYTES = 8 * 1024 * 1024
_FIELD_OVERHEAD_BYTES = 512
# Document references per BatchGetDocuments in existing_ids.
_MAX_GETS_PER_CALL = 300
# Documents read per page by migrate().
_MIGRATE_PAGE = 300
# What each google.rpc.Code of a BatchWrite status means for the write.
_PERMANENT_CODES = {code_pb2.INVALID_ARGUMENT: InvalidArgument, code_pb2.NOT_FOUND: NotFound,
                    code_pb2.PERMISSION_DENIED: FailedPrecondition, code_pb2.FAILED_PRECONDITION: FailedPrecondition,
                    code_pb2.UNAUTHENTICATED: FailedPrecondition}
_RETRIED_CODES = {code_pb2.DEADLINE_EXCEEDED, code_pb2.RESOURCE_EXHAUSTED, code_pb2.ABORTED, code_pb2.INTERNAL,
                  code_pb2.UNAVAILABLE}
# Firestore names documents `projects/P/databases/D/documents/C/ID`; messages to callers show none of that.
_RESOURCE_NAME_RE = re.compile(r"projects/\S+")
_URI_OPTIONS = ("timeout", "database", "candidates")
# Firestore auto ids: 20 characters of this alphabet.
_AUTO_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CREDENTIALS_HELP = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run "
    "`gcloud auth application-default login` (Application Default Credentials), "
    "or set FIRESTORE_EMULATOR_HOST=host:port for an emulator"
)


def _without_names(message: str) -> str:
    """A Firestore message with its resource names (project, database, collection) cut out."""
    return _RESOURCE_NAME_RE.sub("<document>", str(message))


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


def genre_spellings(genre: str) -> list[str]:
    """The spellings of `genre` a document without `genre_key` may hold ("rap" -> Rap, RAP, ...)."""
    forms = (genre, genre.casefold(), genre.lower(), genre.upper(), genre.title(), genre.capitalize())
    return list(dict.fromkeys(forms))


class FirestoreStore(ReviewStore):
    """Reviews in a Cloud Firestore collection.

    The pick (`get_review`) takes no lock and opens no transaction:

    1. Read the `candidates` least-shown matching documents (a plain, strongly
       consistent query). Their lowest selection_count is L. When all of them
       are tied at L, there may be more ties than were read, so a second read
       takes up to `candidates` documents with count L from a random point of
       the id order: concurrent pickers then start on different documents
       instead of all on the first ones.
    2. Claim one of the documents at L, in random order, with a single write
       that carries the precondition "unchanged since my read" (its
       `update_time`) and the server-side `Increment(1)` transform. Exactly one
       of the callers that read a version can claim it; the others get
       FAILED_PRECONDITION and try their next candidate at L.
    3. When every candidate at L was taken by others, read again (each lost
       race is another caller's success, so the system progresses), until
       the call's deadline.

    Only documents at the lowest count seen are ever claimed, and a claim
    holds only if the count is still L, so no review is handed out while a
    matching review with a lower count was visible to the pick and
    unclaimed: over equal reviews, concurrent picks hand each out in turn.
    Increments are never lost: the server applies them. Picks of one pair
    spread their writes over the documents tied for least-shown, so each
    document of a pair of N reviews is written about once per N picks of that
    pair (see BUILD_NOTES.md for Firestore's per-document write guidance).
    New reviews inserted during a pick can be missed by it (the next pick
    takes them).

    Args:
        project: str. Google Cloud project id.
        collection: str. Top-level collection holding the reviews.
        database: str or None. Named Firestore database; None for `(default)`.
        timeout: float. Deadline in seconds of each call, retries included.
        candidates: int. Documents one read of a pick returns.
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
        self._stats_lock = threading.Lock()
        self._stats = collections.Counter()
        self._warned: set[str] = set()
        # Per filter: the candidates this process read and has not handed to a pick yet.
        self._picks: dict[tuple, _PickState] = {}
        self._picks_changed = threading.Condition(threading.Lock())
        try:
            from google.cloud import firestore
        except ImportError as exc:
            raise FailedPrecondition(
                "the Firestore store needs google-cloud-firestore: pip install google-cloud-firestore"
            ) from exc
        self._firestore = firestore
        with self._translate_errors(f"{self.uri}: "):  # opening: the operator's message may name the store
            kwargs = {"project": project}
            if database:
                kwargs["database"] = database
            self._client = firestore.Client(**kwargs)
        self._collection = self._client.collection(collection)

    @classmethod
    def from_uri(cls, uri: str) -> "FirestoreStore":
        """Open `firestore://PROJECT[/COLLECTION][?timeout=SECONDS&candidates=K&database=NAME]`."""
        return cls(**_parse_uri(uri))

    # -- errors and call options ----------------------------------------------------------

    @contextlib.contextmanager
    def _translate_errors(self, where: str = "") -> Iterator[None]:
        """Turn google.api_core / google.auth exceptions into the library's errors.

        Messages name the store only when `where` is given (opening it); at serve time they reach callers,
        who must not learn the project or collection, so Firestore's resource names are cut out too.
        """
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            yield
        except gexc.InvalidArgument as exc:
            raise InvalidArgument(f"{where}Firestore rejected the request: {_without_names(exc.message)}") from exc
        except gexc.NotFound as exc:
            raise NotFound(f"{where}Firestore found no such document: {_without_names(exc.message)}") from exc
        except (gexc.FailedPrecondition, gexc.PermissionDenied, gexc.Unauthenticated) as exc:
            # Missing composite index (the message links to create it) or credentials without access.
            raise FailedPrecondition(f"{where}Firestore refused the request: {_without_names(exc.message)}") from exc
        except gexc.GoogleAPIError as exc:
            # Unavailable, deadline exceeded, retries exhausted, aborted, internal.
            raise Unavailable(f"{where}Firestore is unavailable ({type(exc).__name__}); retry") from exc
        except auth_exc.DefaultCredentialsError as exc:
            raise FailedPrecondition(f"{where}no Google credentials found: {_CREDENTIALS_HELP}") from exc
        except auth_exc.GoogleAuthError as exc:
            raise FailedPrecondition(
                f"{where}unusable Google credentials ({type(exc).__name__}); {_CREDENTIALS_HELP}") from exc

    def _call_options(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """The client's public `retry=`/`timeout=`: transient errors retried until the deadline."""
        from google.api_core import retry as retries

        timeout = self.timeout if timeout is None else max(timeout, 0.001)
        return {"retry": retries.Retry(timeout=timeout), "timeout": timeout}

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def pick_stats(self) -> dict[str, int]:
        """Counters since the store was opened: `picks`, `lost_races` (claims another pick won), `reads`."""
        with self._stats_lock:
            return {"picks": self._stats["picks"], "lost_races": self._stats["lost_races"],
                    "reads": self._stats["reads"]}

    # -- queries ----------------------------------------------------------------------------

    def _filtered(self, score: Optional[float], genre: Optional[str]):
        from google.cloud.firestore_v1 import FieldFilter, Or

        query = self._collection
        if genre is not None:
            genre = str(genre)
            # genre_key covers every spelling this project wrote; the plain `genre` spellings cover
            # documents the seed's script wrote, which have no genre_key until migrated.
            query = query.where(filter=Or([
                FieldFilter("genre_key", "==", genre_key(genre)),
                FieldFilter("genre", "in", genre_spellings(genre)),
            ]))
        if score is not None:
            query = query.where(filter=FieldFilter("score", "==", score))
        return query

    def _stream(self, query, deadline: float) -> list:
        with self._translate_errors():
            snapshots = list(query.stream(**self._call_options(deadline - time.monotonic())))
        self._count("reads", max(1, len(snapshots)))
        return snapshots

    def _least_shown(self, filtered, deadline: float, *, limit: int, spread: bool) -> list[tuple[Any, Review]]:
        """(snapshot, review) of the servable documents tied for the lowest selection_count, in the order to try.

        Reads the `limit` least-shown documents; with `spread` (picks of other
        processes are competing) and all of them tied, a second read takes a
        window of the ties from a random id on. Documents that cannot be served
        (no text) are passed over, logged once.
        """
        from google.cloud.firestore_v1 import FieldFilter

        ordered = filtered.order_by("selection_count").limit(limit)
        servable: list[tuple[Any, Review]] = []
        page = self._stream(ordered, deadline)
        while page:
            servable = self._servable(page)
            if servable or len(page) < limit:
                break
            page = self._stream(ordered.start_after(page[-1]), deadline)  # a page of junk: read on
        if not servable:
            return []
        least = servable[0][1].selection_count
        ties = [(s, r) for s, r in servable if r.selection_count == least]
        if spread and len(ties) == limit and limit > 1:
            # Maybe more ties than one read returns: take a window of them from a random id on.
            start = self._random_id_like([s for s, _ in ties])
            at_least = filtered.where(filter=FieldFilter("selection_count", "==", least))
            window = self._stream(
                at_least.where(filter=FieldFilter("__name__", ">=", self._collection.document(start)))
                .order_by("__name__").limit(limit), deadline)
            if len(window) < limit:  # wrap around to the start of the id order
                window += self._stream(at_least.order_by("__name__").limit(limit - len(window)), deadline)
            unique = list({s.id: s for s in window}.values())
            ties = [(s, r) for s, r in self._servable(unique) if r.selection_count == least] or ties
        self._random.shuffle(ties)
        return ties

    def _servable(self, snapshots) -> list[tuple[Any, Review]]:
        out = []
        for snapshot in snapshots:
            try:
                out.append((snapshot, review_from_record(snapshot.id, snapshot.to_dict(), source=self.uri,
                                                         warn=self._warn_once)))
            except UnusableRecord as exc:
                self._warn_once(f"{exc}; not handed out")
        return out

    def _warn_once(self, message: str) -> None:
        """Log each distinct warning once per store (picks read the same odd documents again and again)."""
        with self._stats_lock:
            if message in self._warned or len(self._warned) >= 10_000:
                return
            self._warned.add(message)
        log.warning("%s", message)

    def _random_id_like(self, samples) -> str:
        """A random point of the id order, in the alphabet the ids use (ours hex, Firestore's alphanumeric)."""
        if all(GENERATED_ID_RE.match(s.id) for s in samples):
            return "".join(self._random.choice("0123456789abcdef") for _ in range(24))
        return "".join(self._random.choice(_AUTO_ID_ALPHABET) for _ in range(20))

    def _claim(self, snapshot, deadline: float) -> Optional[int]:
        """Increment the document if unchanged since `snapshot`; its new count, or None if another pick won."""
        from google.api_core import exceptions as gexc

        option = self._client.write_option(last_update_time=snapshot.update_time)
        try:
            with self._translate_errors():
                result = snapshot.reference.update(
                    {"selection_count": self._firestore.Increment(1)}, option=option,
                    **self._call_options(deadline - time.monotonic()))
        except (FailedPrecondition, NotFound) as exc:
            cause = exc.__cause__
            # FAILED_PRECONDITION: the version we read is gone (claimed); NOT_FOUND: deleted meanwhile.
            if isinstance(cause, (gexc.FailedPrecondition, gexc.NotFound)):
                return None
            raise
        return int(result.transform_results[0].integer_value)

    # -- the contract -------------------------------------------------------------------------

    def add_reviews(self, reviews: Iterable[Review]) -> int:
        """Create each review unless its id exists (per document, not all-or-nothing).

        Sent as BatchWrite requests of at most 500 writes and `_MAX_BATCH_BYTES`. A create
        whose document already exists fails alone with ALREADY_EXISTS and is
        not counted. Writes that fail transiently (ABORTED, UNAVAILABLE, ...) are
        sent again until the deadline; a permanent failure (INVALID_ARGUMENT,
        PERMISSION_DENIED, ...) raises the matching error at once. If a request
        is retried after a transient error, the creates it had already applied
        come back ALREADY_EXISTS, so the returned count can undercount then;
        the data is right either way.
        """
        added = 0
        seen: set[str] = set()
        pending: list[tuple[Any, dict]] = []
        pending_bytes = 0
        for review in reviews:
            data = review_to_record(review)
            data["added"] = self._firestore.SERVER_TIMESTAMP
            if review.id in seen:
                continue  # BatchWrite forbids two writes to one document; the second is a duplicate anyway
            seen.add(review.id)
            size = len(review.text.encode()) + len(data["prompt"].encode()) + _FIELD_OVERHEAD_BYTES
            if len(pending) >= _MAX_WRITES_PER_BATCH or (pending and pending_bytes + size > _MAX_BATCH_BYTES):
                added += self._create_all(pending)
                pending, pending_bytes = [], 0
            pending.append((self._collection.document(review.id), data))
            pending_bytes += size
        if pending:
            added += self._create_all(pending)
        return added

    def _create_all(self, writes: list[tuple[Any, dict]]) -> int:
        """Create these documents in one BatchWrite, re-sending transient failures; the number created."""
        from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch

        deadline = time.monotonic() + self.timeout
        added, attempt = 0, 0
        while writes:
            batch = BulkWriteBatch(self._client)
            for ref, data in writes:
                batch.create(ref, data)
            with self._translate_errors():
                response = batch.commit(**self._call_options(deadline - time.monotonic()))
            retry = []
            for (ref, data), status in zip(writes, response.status):
                if status.code == code_pb2.OK:
                    added += 1
                elif status.code == code_pb2.ALREADY_EXISTS:
                    pass
                elif status.code in _RETRIED_CODES:
                    retry.append((ref, data))
                else:
                    error = _PERMANENT_CODES.get(status.code, Unavailable)
                    raise error(f"writing review {ref.id} failed ({code_pb2.Code.Name(status.code)}): "
                                f"{_without_names(status.message)}")
            writes, attempt = retry, attempt + 1
            if writes:
                pause = min(1.0, 0.05 * 2**attempt)
                if time.monotonic() + pause > deadline:
                    raise Unavailable(f"{len(writes)} review write(s) still failing transiently "
                                      f"after {self.timeout:g} s; retry")
                time.sleep(pause)
        return added

    def get_review(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> Review:
        score = validate_score(score)
        deadline = time.monotonic() + self.timeout
        state = self._pick_state(score, genre)
        lost_races = 0
        while True:
            # The threads of this process share one read per filter: one reads, the others take
            # distinct candidates from what it read, so they neither race each other nor re-read.
            with self._picks_changed:
                while not state.pool and state.reading:
                    if not self._picks_changed.wait(max(0.0, deadline - time.monotonic())):
                        break
                if state.pool and time.monotonic() - state.read_at > _POOL_TTL_S:
                    state.pool = []  # an old read may miss reviews added since; read again
                candidate = state.pool.pop() if state.pool else None
                read = candidate is None and not state.reading
                if read:
                    state.reading = True
                elif candidate is not None:
                    state.claiming.add(candidate[0].id)
            if read:
                try:
                    # After a lost race (another process competes) a read spreads over the ties.
                    fresh = self._least_shown(state.query, deadline, limit=self.candidates,
                                              spread=time.monotonic() < state.spread_until)
                finally:
                    with self._picks_changed:
                        state.reading = False
                        self._picks_changed.notify_all()
                if not fresh:
                    raise NotFound(f"no review matches {describe(score, genre)}")
                with self._picks_changed:
                    # Not what this process is claiming right now, nor versions it already claimed or
                    # lost: a read can predate those claims.
                    state.pool = [c for c in fresh if c[0].id not in state.claiming
                                  and not c[0].update_time <= state.gone.get(c[0].id, _NEVER)]
                    state.read_at = time.monotonic()
                    if not state.pool:
                        self._picks_changed.wait(_MAX_ROUND_PAUSE_S)  # let one of those claims finish
                continue
            if candidate is not None:
                snapshot, review = candidate
                answered = False
                try:
                    new_count = self._claim(snapshot, deadline)
                    answered = True
                finally:
                    with self._picks_changed:
                        state.claiming.discard(snapshot.id)
                        if len(state.gone) >= 4096:
                            state.gone.clear()
                        if answered:  # claimed or lost: that version is gone either way
                            state.gone[snapshot.id] = snapshot.update_time
                        # A claim that failed (the store unreachable) may not have changed the document: its
                        # version stays a candidate, else an outage could leave every version "gone" here and
                        # each later pick of the filter would find nothing to claim.
                        self._picks_changed.notify_all()
                if new_count is not None:
                    review.selection_count = new_count
                    self._count("picks")
                    return review
                # Another process claimed it since the read: the rest of that read is suspect too.
                lost_races += 1
                self._count("lost_races")
                with self._picks_changed:
                    state.pool = []
                    state.spread_until = time.monotonic() + _SPREAD_FOR_S
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"gave up picking a review after {lost_races} lost races in "
                    f"{self.timeout:g} s of contention; retry"
                )
            if candidate is not None:
                time.sleep(self._random.uniform(0, _MAX_ROUND_PAUSE_S))

    def _pick_state(self, score: Optional[float], genre: Optional[str]) -> "_PickState":
        key = (score, genre_key(genre))
        with self._picks_changed:
            state = self._picks.get(key)
            if state is None:
                if len(self._picks) >= 4096:  # bounded: forget idle filters
                    for old in [k for k, v in self._picks.items() if not (v.reading or v.pool or v.claiming)]:
                        del self._picks[old]
                state = self._picks[key] = _PickState(query=self._filtered(score, genre))
            return state

    def get_by_id(self, review_id: str) -> Review:
        validate_review_id(review_id)
        with self._translate_errors():
            snapshot = self._collection.document(review_id).get(**self._call_options())
        if not snapshot.exists:
            raise NotFound(f"no review with id {review_id}")
        try:
            return review_from_record(snapshot.id, snapshot.to_dict(), source=self.uri)
        except UnusableRecord as exc:
            raise NotFound(f"review {review_id} cannot be served: {exc}") from None

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
        Documents whose score or genre has an unexpected type are left out (logged).
        """
        tally: collections.Counter = collections.Counter()
        odd = 0
        with self._translate_errors():
            for snapshot in self._collection.select(["score", "genre"]).stream(**self._call_options()):
                data = snapshot.to_dict()
                score, genre = data.get("score"), data.get("genre")
                if not (score is None or (isinstance(score, (int, float)) and not isinstance(score, bool))) \
                        or not (genre is None or isinstance(genre, str)):
                    odd += 1
                    continue
                tally[(None if score is None else round(float(score), 1), genre)] += 1
        if odd:
            log.warning("%s: %d document(s) with a non-numeric score or non-string genre left out of counts",
                        self.uri, odd)
        return sorted(
            (ConditionCount(score=s, genre=g, count=n) for (s, g), n in tally.items()),
            key=lambda c: (c.genre is not None, c.genre or "", c.score is not None, c.score or 0.0),
        )

    def count(self, *, score: Optional[float] = None, genre: Optional[str] = None) -> int:
        score = validate_score(score)
        with self._translate_errors():
            result = self._filtered(score, genre).count(alias="n").get(**self._call_options())
        return int(result[0][0].value)

    def migrate(self, *, model_version: str = "seed", progress: bool = False) -> MigrationResult:
        """Add the fields this project's schema has and a seed-written document lacks.

        Pages through the collection in id order; each document missing schema
        fields (`missing_record_fields`: `genre_key`, `model_version`, the
        sampler settings, ...; `selection_count` 0 only when absent altogether,
        so the document can be picked at all) gets only those, in BatchWrite requests of at most 500 writes, each with the precondition
        that the document is unchanged since it was read: a pick or another
        migration that wrote it meanwhile wins, and the document is read again.
        `text` and an existing `selection_count` are never written. Idempotent: a
        rerun finds every document current and writes nothing.
        """
        from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch
        from tqdm import tqdm

        result = MigrationResult()
        total = self.count()
        bar = tqdm(total=total, unit="doc", desc="migrate", disable=not progress, dynamic_ncols=True)
        last = None
        try:
            while True:
                query = self._collection.order_by("__name__").limit(_MIGRATE_PAGE)
                if last is not None:
                    query = query.start_after(last)
                page = self._stream(query, time.monotonic() + self.timeout)
                if not page:
                    break
                last = page[-1]
                todo = []
                for snapshot in page:
                    result.scanned += 1
                    fields = missing_record_fields(snapshot.to_dict(), model_version)
                    if fields is None:
                        log.warning("%s: document %s has no usable text; not migrated", self.uri, snapshot.id)
                        result.skipped += 1
                    elif fields:
                        todo.append((snapshot, fields))
                    else:
                        result.current += 1
                while todo:
                    batch = BulkWriteBatch(self._client)
                    for snapshot, fields in todo:
                        batch.update(snapshot.reference, fields,
                                     option=self._client.write_option(last_update_time=snapshot.update_time))
                    with self._translate_errors():
                        response = batch.commit(**self._call_options())
                    again = []
                    for (snapshot, fields), status in zip(todo, response.status):
                        if status.code == code_pb2.OK:
                            result.updated += 1
                        elif status.code == code_pb2.FAILED_PRECONDITION or status.code in _RETRIED_CODES:
                            again.append(snapshot.reference)  # changed since read, or transient
                        elif status.code == code_pb2.NOT_FOUND:  # deleted meanwhile
                            result.skipped += 1
                        else:
                            error = _PERMANENT_CODES.get(status.code, Unavailable)
                            raise error(f"{self.uri}: migrating {snapshot.id} failed "
                                        f"({code_pb2.Code.Name(status.code)}): {status.message}")
                    todo = []
                    if again:  # read those again and recompute what they lack
                        with self._translate_errors():
                            fresh = list(self._client.get_all(again, **self._call_options()))
                        for snapshot in fresh:
                            if not snapshot.exists:
                                result.skipped += 1
                                continue
                            fields = missing_record_fields(snapshot.to_dict(), model_version)
                            if fields:
                                todo.append((snapshot, fields))
                            else:
                                result.current += 1
                bar.update(len(page))
        finally:
            bar.close()
        return result

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()


@dataclasses.dataclass
class _PickState:
    """One filter's shared read: candidates at the least count, not yet handed to a pick."""

    query: Any = None  # the filtered query, built once
    pool: list = dataclasses.field(default_factory=list)
    read_at: float = 0.0
    reading: bool = False
    claiming: set = dataclasses.field(default_factory=set)  # ids this process's picks are claiming now
    gone: dict = dataclasses.field(default_factory=dict)  # id -> newest version of it claimed or lost here
    spread_until: float = 0.0
