"""`ReviewClient`: a blocking Python client for pitchkeras.v1.ReviewService.

Methods return plain records, not protobuf messages: `pitchkeras.store.Review`
(the same dataclass the store uses) and `GeneratedReview`. Failed calls raise
the library's own errors (`NotFound`, `InvalidArgument`, `Unavailable`,
`FailedPrecondition`) or `ServiceError` for any other status, each carrying
the gRPC `code` and the server's message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional, Sequence, Union

import grpc
from google.protobuf import json_format

from pitchkeras.client.convert import review_from_proto
from pitchkeras.errors import FailedPrecondition, InvalidArgument, NotFound, PitchkerasError, Unavailable
from pitchkeras.store.base import Review
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = os.environ.get("PITCHKERAS_TARGET", "127.0.0.1:50051")
SERVICE = "pitchkeras.v1.ReviewService"
API_KEY_HEADER = "x-api-key"  # metadata key the server reads for Generate (pitchkeras.server.auth imports it)

# Retries through gRPC's own retry machinery, for GetById only: it is
# idempotent (a permalink read). GetReview increments a counter and Generate
# may store, so neither is ever retried blindly.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE, "method": "GetById"}],
            "retryPolicy": {
                "maxAttempts": 4,  # the first try plus 3 retries
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class ServiceError(PitchkerasError):
    """A call failed with a status the library has no error class for (PERMISSION_DENIED, INTERNAL, ...).

    Args:
        code: grpc.StatusCode. The status.
        details: str. The server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _translate(err: grpc.RpcError) -> PitchkerasError:
    code, details = err.code(), err.details() or ""
    cls = _ERRORS.get(code)
    if cls is None:
        return ServiceError(code, details)
    error = cls(f"{code.name}: {details}")
    error.code, error.details = code, details
    return error


@dataclasses.dataclass
class GeneratedReview:
    """One review written by `ReviewClient.generate`.

    Args:
        review: Review. The review; `id` is empty unless it was stored.
        accepted: bool. Whether it passed post-processing.
        rejection_reason: str. Why it was rejected; "" when accepted.
        raw: str. The prompt plus the completion as generated.
        stored: bool. Whether this call saved it in the server's store.
        finish_reason: str. Why decoding ended: "end_token", "stop_sequence" or "length".
        prompt_tokens: int. Tokens of the prompt the model read (start token and condition header included).
        completion_tokens: int. Tokens of the completion.
        logprobs: list of dict or None. With `top_logprobs`: per completion token its `token_id`, `token`,
            `logprob` and `top_logprobs` (each `token_id`, `token`, `logprob`).
    """

    review: Review
    accepted: bool
    rejection_reason: str = ""
    raw: str = ""
    stored: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[list] = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["review"] = self.review.to_dict()
        return data


def generated_from_proto(item: pb.GeneratedReview) -> GeneratedReview:
    """The client's `GeneratedReview` of a `pitchkeras.v1.GeneratedReview` message."""
    reason = pb.FinishReason.Name(item.finish_reason).removeprefix("FINISH_REASON_").lower()
    return GeneratedReview(review=review_from_proto(item.review), accepted=item.status == pb.SAMPLE_STATUS_ACCEPTED,
                           rejection_reason=item.rejection_reason, raw=item.raw, stored=item.stored,
                           finish_reason="" if reason == "unspecified" else reason,
                           prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                           logprobs=logprobs_from_proto(item.logprobs) if item.logprobs else None)


def logprobs_from_proto(entries) -> list[dict]:
    """`pitchkeras.v1.TokenLogprob` messages as dicts with the same field names."""
    return [json_format.MessageToDict(e, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True) for e in entries]


def _generate_request(*, prompt: str = "", store: bool = False, **fields) -> pb.GenerateRequest:
    """A GenerateRequest with every field that is not None (unset ones take the server's defaults).

    Raises:
        TypeError: a keyword is not a field of `pitchkeras.v1.GenerateRequest`.
    """
    request = pb.GenerateRequest(prompt=prompt or "", store=bool(store))
    known = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    for name, value in fields.items():
        if name not in known:
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
        if known[name].is_repeated:  # stop_sequences: one text or several
            getattr(request, name).extend([value] if isinstance(value, str) else value or ())
        elif value is not None:
            setattr(request, name, value)
    return request


class ReviewClient:
    """A blocking client with a deadline on every call.

    Args:
        target: str. `host:port` of the server.
        timeout: float. Deadline in seconds for GetReview and GetById.
        generate_timeout: float. Deadline in seconds for Generate (a model
            call takes longer than a store read).
        credentials: grpc.ChannelCredentials or None. TLS credentials
            (`grpc.ssl_channel_credentials(root_cert)`); None for plaintext.
        api_key: str or None. Sent as `x-api-key` metadata on Generate when
            the server requires keys.
        options: sequence of (str, value). Extra channel options.

    Example:

    >>> with ReviewClient("127.0.0.1:50051", timeout=5.0) as client:
    ...     review = client.get_review(genre="Rock")
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 10.0,
        generate_timeout: float = 120.0,
        credentials: Optional[grpc.ChannelCredentials] = None,
        api_key: Optional[str] = None,
        options: Sequence[tuple] = (),
    ):
        if timeout <= 0 or generate_timeout <= 0:
            raise InvalidArgument(f"timeouts must be > 0 seconds, got {timeout} and {generate_timeout}")
        self.target = target
        self.timeout = float(timeout)
        self.generate_timeout = float(generate_timeout)
        self.api_key = api_key
        channel_options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.ReviewServiceStub(self._channel)

    def get_review(self, score: Optional[float] = None, genre: Optional[str] = None, *,
                   timeout: Optional[float] = None) -> Review:
        """The least-shown review matching the filters; the server counts it as shown.

        Args:
            score: float or None. Only this score, in [0, 10].
            genre: str or None. Only this genre (case-insensitive).
            timeout: float or None. Deadline in seconds (default: the client's).

        Raises:
            NotFound: nothing matches. InvalidArgument: bad score or unknown genre.
            Unavailable: the server or its store cannot be reached (not retried).
        """
        request = pb.GetReviewRequest()
        if score is not None:
            request.score = float(score)
        if genre is not None:
            request.genre = genre
        response = self._call(self._stub.GetReview, request, timeout or self.timeout)
        return review_from_proto(response.review)

    def get_by_id(self, review_id: str, *, timeout: Optional[float] = None) -> Review:
        """The review with this id, not counted as shown; retried on UNAVAILABLE.

        Raises:
            InvalidArgument: malformed id. NotFound: no such review.
        """
        response = self._call(self._stub.GetById, pb.GetByIdRequest(id=review_id), timeout or self.timeout)
        return review_from_proto(response.review)

    def generate(
        self,
        *,
        score: Optional[float] = None,
        genre: Optional[str] = None,
        prompt: str = "",
        max_length: Optional[int] = None,
        seed: Optional[int] = None,
        num_samples: Optional[int] = None,
        store: bool = False,
        timeout: Optional[float] = None,
        stop_sequences: Optional[Sequence[str]] = None,
        top_logprobs: Optional[int] = None,
        **sampler,
    ) -> list[GeneratedReview]:
        """Freshly generated reviews, in seed order (review i used seed + i).

        Arguments left as None are not sent, so the server's defaults apply.

        Args:
            score: float or None. Score condition.
            genre: str or None. Genre condition.
            prompt: str. Free text after the header for the model to continue.
            max_length: int or None. Max new tokens per review.
            seed: int or None. None lets the server pick one (reported per review).
            num_samples: int or None. How many reviews.
            store: bool. Save accepted reviews and return their ids.
            timeout: float or None. Deadline in seconds (default: generate_timeout).
            stop_sequences: sequence of str or None. Up to 4 texts that end a review (the stop text is dropped).
            top_logprobs: int or None. In [0, 5]: return each token's log-probability (`GeneratedReview.logprobs`)
                and this many most likely tokens at each position.
            **sampler: the sampler settings, each a field of `SamplerConfig` and of `GenerateRequest` of the
                same name: `temperature` (in (0, 2]), `top_k` (0 = off), `top_p` (in (0, 1]),
                `repetition_penalty` (in (0, 10]; 1 = off), `no_repeat_ngram_size` (0 = off), ...

        Raises:
            TypeError: a keyword that is no field of the request.
            FailedPrecondition: the server has no model. InvalidArgument: a bad value.
            Unavailable: the model is still warming up. ServiceError: UNAUTHENTICATED,
                PERMISSION_DENIED or RESOURCE_EXHAUSTED with API keys.
        """
        request = _generate_request(score=score, genre=genre, prompt=prompt, max_length=max_length, seed=seed,
                                    num_samples=num_samples, store=store, stop_sequences=stop_sequences,
                                    top_logprobs=top_logprobs, **sampler)
        response = self._call(self._stub.Generate, request, timeout or self.generate_timeout, self._key_metadata())
        return [generated_from_proto(item) for item in response.reviews]

    def stream_generate(self, *, timeout: Optional[float] = None, **fields) -> Iterator[Union[str, GeneratedReview]]:
        """One review as it is written: its text deltas (str), then the `GeneratedReview`.

        Takes `generate`'s keyword arguments but `num_samples`. Closing the
        iterator early cancels the call, which frees the server's decode slot.
        With `top_logprobs`, the deltas stay text; the log-probabilities of
        every token are in the final `GeneratedReview.logprobs`.

        Args:
            timeout: float or None. Deadline in seconds for the whole stream (default: generate_timeout).
            **fields: what `generate` takes (score, genre, prompt, max_length, temperature, ...).
        """
        request = _generate_request(**fields)
        call = self._stub.StreamGenerate(request, timeout=timeout or self.generate_timeout,
                                         metadata=self._key_metadata())
        try:
            for chunk in call:
                if chunk.WhichOneof("chunk") == "review":
                    yield generated_from_proto(chunk.review)
                elif chunk.delta:  # with top_logprobs, a chunk may carry tokens whose text is still held back
                    yield chunk.delta
        except grpc.RpcError as err:
            raise _translate(err) from None
        finally:
            call.cancel()

    def _key_metadata(self):
        return ((API_KEY_HEADER, self.api_key),) if self.api_key else None

    def _call(self, method, request, timeout: float, metadata=None):
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise _translate(err) from None

    def close(self) -> None:
        """Close the channel. Idempotent."""
        self._channel.close()

    def __enter__(self) -> "ReviewClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
