"""Conversions between the store's `Review` record and the `pitchkeras.v1.Review` message.

Shared by the server (record -> message) and the client (message -> record).
Imports only protobuf and `pitchkeras.store.base`, never TensorFlow.
"""

from __future__ import annotations

import datetime
from typing import Optional

from pitchkeras.store.base import Review
from pitchkeras.v1 import review_service_pb2 as pb


def review_to_proto(review: Review) -> pb.Review:
    """The message for a stored (or freshly generated) review; None fields stay absent."""
    message = pb.Review(
        id=review.id or "",
        text=review.text,
        extra_conditions={str(k): str(v) for k, v in (review.extra_conditions or {}).items()},
        length=int(review.length),
        selection_count=int(review.selection_count),
        model_version=review.model_version or "",
        prompt=review.prompt or "",
    )
    # proto3 `optional`: only set what is known, so absent is not zero.
    if review.score is not None:
        message.score = float(review.score)
    if review.genre is not None:
        message.genre = review.genre
    if review.temperature is not None:
        message.temperature = float(review.temperature)
    if review.top_k is not None:
        message.top_k = int(review.top_k)
    if review.top_p is not None:
        message.top_p = float(review.top_p)
    if review.seed is not None:
        message.seed = int(review.seed)
    if review.repetition_penalty is not None:
        message.repetition_penalty = float(review.repetition_penalty)
    if review.no_repeat_ngram_size is not None:
        message.no_repeat_ngram_size = int(review.no_repeat_ngram_size)
    if review.added is not None:
        added = review.added if review.added.tzinfo else review.added.replace(tzinfo=datetime.timezone.utc)
        message.added.FromDatetime(added)
    return message


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def review_from_proto(message: pb.Review) -> Review:
    """The `pitchkeras.store.Review` record for a message (absent fields become None)."""
    added: Optional[datetime.datetime] = None
    if message.HasField("added"):
        added = message.added.ToDatetime(tzinfo=datetime.timezone.utc)
    return Review(
        id=message.id,
        text=message.text,
        score=_optional(message, "score"),
        genre=_optional(message, "genre"),
        extra_conditions=dict(message.extra_conditions),
        length=message.length,
        added=added,
        selection_count=message.selection_count,
        model_version=message.model_version,
        temperature=_optional(message, "temperature"),
        top_k=_optional(message, "top_k"),
        top_p=_optional(message, "top_p"),
        seed=_optional(message, "seed"),
        prompt=message.prompt,
        repetition_penalty=_optional(message, "repetition_penalty"),
        no_repeat_ngram_size=_optional(message, "no_repeat_ngram_size"),
    )
