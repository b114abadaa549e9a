"""The ReviewService servicer: validate, call the library off the event loop, translate errors.

Every blocking call (the store, the model) runs in an executor, so the event
loop only parses, validates and answers. Library errors map to canonical
codes; anything unexpected becomes INTERNAL with its traceback logged, never
UNKNOWN.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import math
import random
from typing import Any, Optional

import grpc

from pitchkeras.client.convert import review_to_proto
from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, UsageError, clip, echo
from pitchkeras.server.auth import ApiKeys, AuthError
from pitchkeras.server.config import ServerConfig
from pitchkeras.store.base import Review, ReviewStore, review_id, validate_review_id, validate_score
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_SEED = 2**62  # seeds in [0, 2**62): seed + i stays inside int64 for any num_samples

_CODES = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def _translated(method):
    """Map library errors to status codes; unexpected exceptions to INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except AuthError as err:
            await context.abort(getattr(grpc.StatusCode, err.code_name), clip(err))
        except Exception as err:
            for error_type, code in _CODES:
                if isinstance(err, error_type):
                    await context.abort(code, clip(err))
            log.exception("%s failed unexpectedly", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log")

    return wrapper


@dataclasses.dataclass
class ModelSlot:
    """The server's model and its readiness: `off` (no --model), `loading`, `ready` or `failed`."""

    state: str = "off"
    generator: Any = None  # sampling.Generator once ready
    batcher: Any = None  # batcher.GenerateBatcher once ready
    error: str = ""

    def require_ready(self):
        if self.state == "off":
            raise FailedPrecondition(
                "this server has no model, so Generate is off; start it with `pitchkeras serve --model DIR`"
            )
        if self.state == "loading":
            raise Unavailable("the model is still loading and warming up; retry when health reports SERVING")
        if self.state == "failed":
            raise FailedPrecondition(f"the model failed to load: {self.error}")
        return self.generator, self.batcher


class ReviewServicer(pb_grpc.ReviewServiceServicer):
    """pitchkeras.v1.ReviewService over a `ReviewStore` and (optionally) a `Generator`.

    Args:
        store: ReviewStore. Where reviews live.
        config: ServerConfig. Limits and defaults.
        store_executor: concurrent.futures.Executor. Threads for blocking store calls.
        model: ModelSlot. The model, filled in once it has loaded.
        api_keys: ApiKeys or None. When set, Generate needs a key.
        metrics: ServerMetrics or None. Counts store failures.
    """

    def __init__(self, store: ReviewStore, *, config: ServerConfig, store_executor: concurrent.futures.Executor,
                 model: ModelSlot, api_keys: Optional[ApiKeys] = None, metrics=None):
        self.store = store
        self.config = config
        self.model = model
        self.api_keys = api_keys
        self.metrics = metrics
        self._store_executor = store_executor

    async def _store(self, fn, *args, **kwargs):
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._store_executor, functools.partial(fn, *args, **kwargs))
        except (NotFound, InvalidArgument):
            raise  # the caller's miss or mistake, not a store failure
        except Exception as err:
            if self.metrics is not None:
                self.metrics.store_errors.labels(fn.__name__, type(err).__name__).inc()
            raise

    # -- GetReview / GetById -------------------------------------------------------------
    @_translated
    async def GetReview(self, request: pb.GetReviewRequest, context: grpc.aio.ServicerContext) -> pb.GetReviewResponse:
        score = validate_score(request.score) if request.HasField("score") else None
        genre = _genre(request) if request.HasField("genre") else None
        try:
            review = await self._store(self.store.get_review, score=score, genre=genre)
        except NotFound:
            # Only now pay for the genre list: an unknown genre is the caller's mistake, not an empty pool.
            if genre is not None:
                await self._check_genre(genre)
            raise
        return pb.GetReviewResponse(review=review_to_proto(review))

    async def _check_genre(self, genre: str) -> None:
        known = await self._store(self.store.genres)
        # An empty store knows no genre at all: that is NOT_FOUND (populate it), not the caller's mistake.
        if known and genre.casefold() not in {g.casefold() for g in known}:
            raise InvalidArgument(f"unknown genre {echo(genre)}; known (case-insensitive): {', '.join(known)}")

    @_translated
    async def GetById(self, request: pb.GetByIdRequest, context: grpc.aio.ServicerContext) -> pb.GetByIdResponse:
        validate_review_id(request.id)
        review = await self._store(self.store.get_by_id, request.id)
        return pb.GetByIdResponse(review=review_to_proto(review))

    @_translated
    async def ListConditions(self, request: pb.ListConditionsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListConditionsResponse:
        counts = await self._store(self.store.counts)
        conditions = []
        for c in counts:
            message = pb.ConditionCount(count=c.count)
            if c.score is not None:
                message.score = c.score
            if c.genre is not None:
                message.genre = c.genre
            conditions.append(message)
        return pb.ListConditionsResponse(
            conditions=conditions,
            genres=sorted({c.genre for c in counts if c.genre is not None}),
            scores=sorted({c.score for c in counts if c.score is not None}),
            total=sum(c.count for c in counts),
        )

    # -- Generate ------------------------------------------------------------------------
    @_translated
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        if self.api_keys is not None:
            self.api_keys.check(context.invocation_metadata())
        generator, batcher = self.model.require_ready()
        from pitchkeras.conditioning import validate_conditions
        from pitchkeras.sampling import GenerationRequest, SamplerConfig

        limits = self.config
        num_samples = _bounded_int(request, "num_samples", 1, 1, limits.num_samples_cap)
        max_length = _bounded_int(request, "max_length", limits.default_max_length, 1, limits.max_length_cap)
        if len(request.prompt) > limits.prompt_chars_cap:
            raise InvalidArgument(
                f"prompt is {len(request.prompt)} characters; at most {limits.prompt_chars_cap} allowed")
        defaults = SamplerConfig()
        temperature = request.temperature if request.HasField("temperature") else defaults.temperature
        if not (math.isfinite(temperature) and 0 < temperature <= 2):
            raise InvalidArgument(f"temperature must be in (0, 2], got {temperature!r}")
        top_p = request.top_p if request.HasField("top_p") else defaults.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p!r}")
        top_k = request.top_k if request.HasField("top_k") else defaults.top_k
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {top_k}")
        penalty = request.repetition_penalty if request.HasField("repetition_penalty") else defaults.repetition_penalty
        if not (math.isfinite(penalty) and 0 < penalty <= 10):
            raise InvalidArgument(f"repetition_penalty must be in (0, 10] (1 = off), got {penalty!r}")
        ngram_size = (request.no_repeat_ngram_size if request.HasField("no_repeat_ngram_size")
                      else defaults.no_repeat_ngram_size)
        if ngram_size < 0:
            raise InvalidArgument(f"no_repeat_ngram_size must be >= 0 (0 = off), got {ngram_size}")
        config = SamplerConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                               repetition_penalty=float(penalty), no_repeat_ngram_size=int(ngram_size)).validate()
        if request.HasField("seed"):
            if not 0 <= request.seed < MAX_SEED:
                raise InvalidArgument(f"seed must be in [0, 2**62), got {request.seed}")
            seed = request.seed
        else:
            seed = random.randrange(2**31)

        conditions: dict = {}
        if request.HasField("score"):
            conditions["score"] = validate_score(request.score)
        if request.HasField("genre"):
            conditions["genre"] = _genre(request)
        info = generator.model.info
        # Checked here, not in the batch, so one bad call cannot fail its batch mates;
        # also respells the genre as the model knows it ("rap" -> "Rap").
        conditions = validate_conditions(info, conditions) if info.prompt_format.conditions else (
            _no_conditions(conditions))
        requests = [GenerationRequest(conditions=conditions or None, prefix=request.prompt, seed=seed + i)
                    for i in range(num_samples)]
        samples = await batcher.submit(requests, config, max_length)

        # The id covers everything that fixes the text, so equal ids mean equal reviews.
        id_key = dict(conditions, prompt=request.prompt, temperature=repr(config.temperature),
                      top_k=str(config.top_k), top_p=repr(config.top_p), max_length=str(max_length))
        if (config.repetition_penalty, config.no_repeat_ngram_size) != (defaults.repetition_penalty,
                                                                        defaults.no_repeat_ngram_size):
            # Only when set, so ids of reviews stored before these options existed stay the same.
            id_key.update(repetition_penalty=repr(config.repetition_penalty),
                          no_repeat_ngram_size=str(config.no_repeat_ngram_size))
        reviews = [_review(sample, conditions) for sample in samples]
        stored_ids: set[str] = set()
        if request.store:
            for index, (review, sample) in enumerate(zip(reviews, samples)):
                if not sample.rejected:
                    review.id = review_id(info.model_version, id_key, seed, index)
            to_store = [r for r, s in zip(reviews, samples) if not s.rejected]
            if to_store:
                reviews_by_id = await self._store(_store_and_read_back, self.store, to_store)
                stored_ids = set(reviews_by_id)
                reviews = [reviews_by_id.get(r.id, r) if r.id else r for r in reviews]
        return pb.GenerateResponse(reviews=[
            pb.GeneratedReview(
                review=review_to_proto(review),
                status=pb.SAMPLE_STATUS_REJECTED if sample.rejected else pb.SAMPLE_STATUS_ACCEPTED,
                rejection_reason=sample.rejected or "",
                raw=sample.raw,
                stored=review.id in stored_ids,
            )
            for review, sample in zip(reviews, samples)
        ])


def _genre(request) -> str:
    genre = " ".join(request.genre.split())
    if not genre:
        raise InvalidArgument("genre must not be empty; leave it unset to match every genre")
    return genre


def _bounded_int(request, name: str, default: int, low: int, high: int) -> int:
    value = getattr(request, name) if request.HasField(name) else default
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _no_conditions(conditions: dict) -> dict:
    if conditions:
        raise InvalidArgument(
            f"this model was trained without conditions; drop {', '.join(sorted(conditions))} and send a prompt")
    return {}


def _review(sample, conditions: dict) -> Review:
    """The store record for a sample (id empty until it is stored).

    Conditions are the requested ones (validated): an accepted sample's header
    matches them, and a rejected one's header may be garbage.
    """
    return Review(
        id="",
        text=sample.text,
        score=conditions.get("score"),
        genre=conditions.get("genre"),
        extra_conditions={k: str(v) for k, v in conditions.items() if k not in ("score", "genre")},
        model_version=sample.model_version,
        temperature=sample.config.temperature,
        top_k=sample.config.top_k,
        top_p=sample.config.top_p,
        seed=sample.seed,
        prompt=sample.prompt,
        repetition_penalty=sample.config.repetition_penalty,
        no_repeat_ngram_size=sample.config.no_repeat_ngram_size,
    )


def _store_and_read_back(store: ReviewStore, reviews: list[Review]) -> dict[str, Review]:
    """Add reviews (idempotent), then read them back for `added` and `selection_count`."""
    store.add_reviews(reviews)
    return {r.id: store.get_by_id(r.id) for r in reviews}
