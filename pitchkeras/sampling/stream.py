"""The engine's requests as callers see them: `Stream` (text deltas, token deltas, then the Sample), the row a
stream holds while it decodes (its text assembly), how a request ends, and its errors."""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Callable, Optional, Sequence

from pitchkeras import errors
from pitchkeras.errors import DeadlineExceeded
from pitchkeras.sampling.config import GenerationRequest, Sample, SamplerConfig, TokenLogprob

log = logging.getLogger(__name__)

END_TOKEN, LENGTH, STOP_SEQUENCE, CANCELLED, DEADLINE = "end_token", "length", "stop_sequence", "cancelled", "deadline"
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to: held back until complete


class Cancelled(errors.Cancelled):
    """A stream ended by `cancel()` or by its deadline before it finished."""


class DeadlinePassed(Cancelled, DeadlineExceeded):
    """A stream ended by its deadline (DEADLINE_EXCEEDED at the RPC edge)."""


def _ended(reason: str, when: str = "") -> Cancelled:
    return (DeadlinePassed if reason == DEADLINE else Cancelled)(f"request {reason}{when}")


class Stream:
    """One request in the engine: its text deltas as they are decoded, then its `Sample`.

    Made by `DecodeEngine.submit`. Without a listener, `deltas()` (or
    `token_deltas()`) iterates the text as it comes and `result()` waits for
    the Sample; with one, the engine thread calls `listener(delta)` for every
    delta (`listener((delta, tokens))` when `listener_tokens`) and
    `listener(None)` at the end.

    Args:
        prepared: PreparedRequest. The checked, tokenized request.
        config: SamplerConfig. Its sampler settings.
        max_new_tokens: int. Its length cap.
        include_prefix: bool. Keep the prefix at the start of the post-processed text.
        deadline: float or None. `time.monotonic()` after which it is ended.
        listener: callable or None. Called from the engine thread.
        listener_tokens: bool. Give the listener `(text, tokens)` pairs, as `token_deltas()` yields them.
        quiet: bool. Nobody reads the deltas (bulk work): none are made, and the text is detokenized
            once, at the end (token by token only while a stop sequence must be looked for).
    """

    def __init__(self, prepared, config: SamplerConfig, max_new_tokens: int, *, include_prefix: bool = True,
                 deadline: Optional[float] = None, listener: Optional[Callable[[object], None]] = None,
                 listener_tokens: bool = False, quiet: bool = False):
        self.prepared = prepared
        self.config = config
        self.max_new_tokens = int(max_new_tokens)
        self.include_prefix = include_prefix
        self.deadline = deadline
        self.sample: Optional[Sample] = None
        self.error: Optional[BaseException] = None
        self.finish_reason: Optional[str] = None
        self.text = ""  # the deltas so far, concatenated
        self.tokens = 0  # tokens decoded so far
        self._listener = listener
        self._listener_tokens = listener_tokens
        self.quiet = quiet
        self.submitted = time.monotonic()  # for the queue time and the time to first token
        self.first_token_at: Optional[float] = None
        self._events: Optional[queue.SimpleQueue] = queue.SimpleQueue() if listener is None else None
        self._cancelled = False
        self._done = threading.Event()
        self.stops: tuple = config.stop_sequences  # every text that ends it (the engine adds the model's)
        self.listener_error: Optional[BaseException] = None  # what the listener raised: it ended this stream

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """End the request at the next step boundary; its slot is free for the step after."""
        self._cancelled = True

    def expired(self, now: float) -> Optional[str]:
        """CANCELLED or DEADLINE when the request must leave now, else None."""
        if self._cancelled:
            return CANCELLED
        if self.deadline is not None and now >= self.deadline:
            return DEADLINE
        return None

    def result(self, timeout: Optional[float] = None) -> Sample:
        """Wait for the Sample; raises `Cancelled` or the engine's error."""
        if not self._done.wait(timeout):
            raise TimeoutError("the stream did not finish in time")
        if self.error is not None:
            raise self.error
        return self.sample

    def deltas(self, timeout: Optional[float] = None):
        """Iterate the text deltas until the request ends (only for a stream without a listener)."""
        for text, _ in self.token_deltas(timeout):
            if text:
                yield text

    def token_deltas(self, timeout: Optional[float] = None):
        """Iterate `(text, tokens)` pairs until the request ends (only for a stream without a listener).

        `text` is what `deltas()` gives; `tokens` the `TokenLogprob`s of the
        tokens first completed in it (logprob NaN and no alternatives when the
        request asked for none). All the tokens, in order, are the Sample's
        `completion_ids` (and `logprobs`).
        """
        while True:
            item = self._events.get(timeout=timeout)
            if item is None:
                return
            yield item

    def _emit(self, delta: str, tokens: tuple = ()) -> None:
        if delta or tokens:
            self.text += delta
            self._deliver((delta, tokens))

    def _end(self, reason: str, sample: Optional[Sample] = None, error: Optional[BaseException] = None) -> None:
        self.finish_reason, self.sample, self.error = reason, sample, error
        self._done.set()
        self._deliver(None)

    def _deliver(self, item: Optional[tuple]) -> None:
        if self._listener is None:
            self._events.put(item)
        elif self.listener_error is None:
            try:
                if item is None or self._listener_tokens:
                    self._listener(item)
                elif item[0]:
                    self._listener(item[0])
            except Exception as err:  # this stream's caller broke: end it alone, at the next step boundary
                log.exception("a stream listener raised; its request is cancelled")
                self.listener_error = err
                self._cancelled = True


@dataclasses.dataclass
class _Row:
    """A busy slot: its stream and where its text stands."""

    stream: Stream
    position: int  # the position of the row's last token (fed at the next step)
    limit: int  # positions this row may fill: prompt + new tokens, at most the model's context
    completion: list = dataclasses.field(default_factory=list)  # new token ids
    pending: list = dataclasses.field(default_factory=list)  # ids whose text is not yet whole characters
    text: str = ""  # the completion's text, whole characters only
    sent: int = 0  # characters of `text` already handed out
    ends: list = dataclasses.field(default_factory=list)  # per whole token: the length of `text` it completed
    logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob per token, when the request asks
    delivered: int = 0  # tokens already handed out with a delta

    def tokens(self, start: int, stop: int) -> tuple:
        """The TokenLogprobs of completion tokens [start, stop) (NaN ones when the request asked for none)."""
        if self.logprobs:
            return tuple(self.logprobs[start:stop])
        return tuple(TokenLogprob(token, math.nan) for token in self.completion[start:stop])


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent: all of it but a tail that could be the start of a stop sequence."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return len(text) - held
