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
import random
from typing import Any, Optional

import grpc

from pitchkeras.client.convert import review_to_proto
from pitchkeras.conditioning import validate_conditions
from pitchkeras.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    UsageError,
    clip,
    echo,
)
from pitchkeras.sampling.config import GenerationRequest, SamplerConfig
from pitchkeras.server.auth import ApiKeys, AuthError
from pitchkeras.server.config import ServerConfig
from pitchkeras.server.logprobs import token_logprob_messages
from pitchkeras.store.base import Review, ReviewStore, review_id, validate_review_id, validate_score
from pitchkeras.tokens import TokenTexts
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_SEED = 2**62  # seeds in [0, 2**62): seed + i stays inside int64 for any num_samples
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; every row checks each one after every token
MAX_STOP_CHARS = 100  # a stop text is a marker (a newline, "</review>"), not a passage
#: The engine's finish reasons (`Sample.finish_reason`) as the proto's enum.
FINISH_REASONS = {"end_token": pb.FINISH_REASON_END_TOKEN, "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
                  "length": pb.FINISH_REASON_LENGTH}

_CODES = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
)


def _translated(method):
    """Map library errors to status codes; unexpected exceptions to INTERNAL (logged)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as err:
            status = status_of(err)
            if status is None:
                log.exception("%s failed unexpectedly", method.__name__)
                status = grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log"
            retry = getattr(err, "retry_after_s", None)  # ResourceExhausted, a key's rate limit: when to come back
            metadata = (("retry-after", str(max(1, round(retry)))),) if retry is not None else ()
            await context.abort(*status, trailing_metadata=metadata)

    return wrapper


def status_of(err: Exception) -> Optional[tuple[grpc.StatusCode, str]]:
    """The status code and message of a library or key error; None for anything else (a bug)."""
    if isinstance(err, AuthError):
        return getattr(grpc.StatusCode, err.code_name), clip(err)
    for error_type, code in _CODES:
        if isinstance(err, error_type):
            return code, clip(err)
    return None


@dataclasses.dataclass
class ModelSlot:
    """The server's model and its readiness: `off` (no --model), `loading`, `ready` or `failed`."""

    state: str = "off"
    generator: Any = None  # sampling.Generator once ready
    batcher: Any = None  # batcher.EngineBatcher once ready
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

    # -- Generate / StreamGenerate ------------------------------------------------------
    @_translated
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        call, batcher = self._generate_call(request, context)
        return pb.GenerateResponse(reviews=await self.generate_reviews(call, batcher, request.store,
                                                                      timeout=_time_left(context)))

    @_translated
    async def StreamGenerate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Text deltas as the engine decodes them, then the review; leaving early frees the slot."""
        call, batcher = self._generate_call(request, context)
        if len(call.requests) != 1:
            raise InvalidArgument(
                f"StreamGenerate writes one review; leave num_samples unset or 1 (got {len(call.requests)}), "
                "or call Generate for several")
        async for chunk in self.stream_review(call, batcher, 0, request.store, timeout=_time_left(context)):
            await context.write(chunk)

    async def generate_reviews(self, call: "GenerateCall", batcher, store: bool,
                               timeout: Optional[float] = None) -> list:
        """Run a checked call's samples on the batcher: their GeneratedReview messages, in seed order."""
        samples = await batcher.submit(call.requests, call.config, call.max_length, timeout=timeout)
        return await self._kept(call, samples, store)

    async def stream_review(self, call: "GenerateCall", batcher, index: int, store: bool,
                            timeout: Optional[float] = None):
        """Sample `index` of a checked call as it is decoded: GenerateChunks with its text deltas (and their
        tokens' logprobs when asked), then one with its GeneratedReview."""
        request = call.requests[index]
        asked = request.top_logprobs is not None
        stream = (batcher.stream(request, call.config, call.max_length, tokens=True, timeout=timeout) if asked
                  else batcher.stream(request, call.config, call.max_length, timeout=timeout))
        async for item in stream:
            if isinstance(item, str):
                yield pb.GenerateChunk(delta=item)
            elif isinstance(item, tuple):
                text, tokens = item
                if text or tokens:
                    yield pb.GenerateChunk(delta=text, logprobs=token_logprob_messages(tokens, call.token_texts))
            else:
                (review,) = await self._kept(call, [item], store, first=index)
                yield pb.GenerateChunk(review=review)

    def _generate_call(self, request: pb.GenerateRequest, context) -> tuple["GenerateCall", Any]:
        """Check the caller and the request; what to generate, and the batcher that runs it."""
        if self.api_keys is not None:
            self.api_keys.check(context.invocation_metadata())
        return self.checked_call(request)

    def checked_call(self, request: pb.GenerateRequest) -> tuple["GenerateCall", Any]:
        """Check a request (its caller already admitted); what to generate, and the batcher that runs it.

        Raises the library's errors (InvalidArgument, FailedPrecondition, Unavailable), not a status.
        """
        generator, batcher = self.model.require_ready()
        limits = self.config
        num_samples = _bounded_int(request, "num_samples", 1, 1, limits.num_samples_cap)
        max_length = _bounded_int(request, "max_length", limits.default_max_length, 1, limits.max_length_cap)
        if len(request.prompt) > limits.prompt_chars_cap:
            raise InvalidArgument(
                f"prompt is {len(request.prompt)} characters; at most {limits.prompt_chars_cap} allowed")
        _check_stop_sequences(request.stop_sequences)
        top_logprobs = request.top_logprobs if request.HasField("top_logprobs") else None
        config = SamplerConfig.from_proto(request)
        seed = _seed(request)
        # Checked here, not in the batch, so one bad call cannot fail its batch mates;
        # also respells the genre as the model knows it ("rap" -> "Rap").
        conditions = _conditions(request, generator.model.info)
        requests = [GenerationRequest(conditions=conditions or None, prefix=request.prompt, seed=seed + i,
                                      top_logprobs=top_logprobs) for i in range(num_samples)]
        prepared = generator.prepare(requests[0])  # the prompt as the model reads it; checks top_logprobs
        return GenerateCall(requests, config, max_length, conditions, seed, generator.model.info.model_version,
                            request.prompt, prepared.prompt, len(prepared.ids),
                            TokenTexts.of(generator.model.tokenizer)), batcher

    async def _kept(self, call: "GenerateCall", samples: list, store: bool, first: int = 0) -> list:
        """The GeneratedReview messages of `samples` (the call's samples `first`, `first` + 1, ...); with
        `store`, accepted ones are stored and get their ids."""
        reviews = [Review.from_sample(sample, call.conditions) for sample in samples]
        stored_ids: set[str] = set()
        if store:
            to_store = []
            for index, (review, sample) in enumerate(zip(reviews, samples)):
                if not sample.rejected:
                    review.id = review_id(call.model_version, call.id_key(), call.seed, first + index)
                    to_store.append(review)
            if to_store:
                reviews_by_id = await self._store(_store_and_read_back, self.store, to_store)
                stored_ids = set(reviews_by_id)
                reviews = [reviews_by_id.get(r.id, r) if r.id else r for r in reviews]
        return [
            pb.GeneratedReview(
                review=review_to_proto(review),
                status=pb.SAMPLE_STATUS_REJECTED if sample.rejected else pb.SAMPLE_STATUS_ACCEPTED,
                rejection_reason=sample.rejected or "",
                raw=sample.raw,
                stored=review.id in stored_ids,
                prompt_tokens=call.prompt_tokens,
                **_completion_fields(sample, call),
            )
            for review, sample in zip(reviews, samples)
        ]


@dataclasses.dataclass
class GenerateCall:
    """A checked Generate request: the samples to write and what names them."""

    requests: list  # sampling.GenerationRequest, one per sample, seeds seed, seed + 1, ...
    config: SamplerConfig
    max_length: int
    conditions: dict
    seed: int
    model_version: str
    prompt: str
    prompt_text: str = ""  # the text the model continues: the condition header and the prompt
    prompt_tokens: int = 0  # its tokens, the start token included
    token_texts: Any = None  # tokens.TokenTexts of the model's tokenizer

    def id_key(self) -> dict:
        """What fixes the text, for `review_id`: equal ids mean equal reviews.

        Every sampler setting is in it when set (not its default), so the ids of reviews stored before a
        setting existed stay the same; those of the first schema always, and the repetition pair together.
        """
        config, defaults = self.config, type(self.config)()
        changed = {option.name for option in config.options()
                   if getattr(config, option.name) != getattr(defaults, option.name)}
        if changed & set(_IN_ID_TOGETHER):
            changed.update(_IN_ID_TOGETHER)
        key = dict(self.conditions, prompt=self.prompt, max_length=str(self.max_length))
        key.update({option.name: repr(getattr(config, option.name)) for option in config.options()
                    if option.name in changed or option.name in _ALWAYS_IN_ID})
        return key


# How ids were made before the rule above (the ids of stored reviews must not change): the first schema's
# settings are always in the key, and repetition_penalty and no_repeat_ngram_size both when either is set.
_ALWAYS_IN_ID = ("temperature", "top_k", "top_p")
_IN_ID_TOGETHER = ("repetition_penalty", "no_repeat_ngram_size")


def _completion_fields(sample, call: GenerateCall) -> dict:
    """The GeneratedReview fields that describe the completion's tokens: why it ended, how many, logprobs."""
    return dict(finish_reason=FINISH_REASONS.get(sample.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                completion_tokens=len(sample.completion_ids),
                logprobs=token_logprob_messages(sample.logprobs or (), call.token_texts))


def _check_stop_sequences(stops) -> None:
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"stop_sequences: at most {MAX_STOP_SEQUENCES} allowed, got {len(stops)}")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters, "
                                  f"got {len(stop)}: {echo(stop)}")


def _time_left(context) -> Optional[float]:
    """Seconds until the call's deadline (gRPC), or None when it has none (HTTP calls end when the client leaves)."""
    time_remaining = getattr(context, "time_remaining", None)
    return time_remaining() if time_remaining is not None else None


def _seed(request) -> int:
    """The request's seed, or a random one when it gives none."""
    if not request.HasField("seed"):
        return random.randrange(2**31)
    if not 0 <= request.seed < MAX_SEED:
        raise InvalidArgument(f"seed must be in [0, 2**62), got {request.seed}")
    return int(request.seed)


def _conditions(request, info) -> dict:
    """The request's score and genre, validated against the model (genre respelled as it knows it)."""
    conditions: dict = {}
    if request.HasField("score"):
        conditions["score"] = validate_score(request.score)
    if request.HasField("genre"):
        conditions["genre"] = _genre(request)
    return validate_conditions(info, conditions) if info.prompt_format.conditions else _no_conditions(conditions)


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


def _store_and_read_back(store: ReviewStore, reviews: list[Review]) -> dict[str, Review]:
    """Add reviews (idempotent), then read them back for `added` and `selection_count`."""
    store.add_reviews(reviews)
    return {r.id: store.get_by_id(r.id) for r in reviews}
