"""Log-probabilities as `pitchkeras.v1.TokenLogprob` messages (the engine's `TokenLogprob`s, with token texts)."""

from __future__ import annotations

from typing import Iterable

from pitchkeras.tokens import TokenTexts, logprob_records
from pitchkeras.v1 import review_service_pb2 as pb


def token_logprob_messages(logprobs: Iterable, texts: TokenTexts) -> list:
    """`pb.TokenLogprob` messages for the engine's `TokenLogprob`s (token_id, logprob, top)."""
    return [pb.TokenLogprob(**dict(record, top_logprobs=[pb.TopLogprob(**top) for top in record["top_logprobs"]]))
            for record in logprob_records(logprobs, texts)]
