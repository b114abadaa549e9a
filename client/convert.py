"""Conversions between the store's `Review` record and the `pitchkeras.v1.Review` message.

Shared by the server (record -> message) and the client (message -> record).
Imports only protobuf and `pitchkeras.store.base`, never TensorFlow.
"""

from __future__ import annotations

import datetime
from typing import Optional

from pitchkeras.store.base import SAMPLER_OPTIONS, Review
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
    if review.seed is not None:
        message.seed = int(review.seed)
    for option in SAMPLER_OPTIONS:  # the sampler settings it was drawn with, each a field of the same name
        if getattr(review, option.name) is not None:
            setattr(message, option.name, option.kind(getattr(review, option.name)))
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
        seed=_optional(message, "seed"),
        prompt=message.prompt,
        **{option.name: _optional(message, option.name) for option in SAMPLER_OPTIONS},
    )
