"""`DecodeEngine`: continuous batching over a fixed number of slots, one compiled step for every active row.

The closed-batch `Generator` runs a batch as long as its longest row, and a
call that arrives a moment late waits for the whole batch. The engine keeps
`slots` rows, each with its own key/value cache positions, and works in
steps:

1. At a step boundary, rows that were cancelled or passed their deadline
   leave, and waiting requests take the free slots: each is *prefilled* (its
   prompt, padded to a prompt bucket, runs through the model into its row of
   the cache).
2. One compiled *step* decodes one token for every active row, each at its
   own position, with its own sampler settings (per-row tensors: any mix of
   temperatures, top-k, top-p and repetition settings shares a step). The
   step runs only the first rows, a power-of-two *row bucket* holding the
   highest busy slot (new requests take the lowest free slot), so a lone
   request does not pay for every slot.
3. Each row's new text goes to its listener as whole UTF-8 characters; a row
   that draws `<|endoftext|>`, reaches a stop sequence or its length leaves
   at once, and its `Sample` is post-processed by the `Generator`.

Randomness is counter-based per (request seed, position), exactly as in the
closed batch, so a request's text does not depend on when it joined or on
its neighbours, nor on the slot or row bucket it ran in. Everything traced is
`keras.ops`: a `tf.function` (XLA) on TensorFlow and `jax.jit` on JAX, one
program per (row bucket, cache length) step and per (row bucket, prompt
bucket, cache length) prefill; both go through the persistent
compile cache (`pitchkeras.compile_cache`).

Example:

>>> engine = DecodeEngine(Generator(load_model("checkpoint/run1/model")), slots=8)
>>> engine.start()
>>> stream = engine.submit(GenerationRequest({"score": 8.0, "genre": "Rock"}, seed=1))
>>> for delta in stream.deltas(): print(delta, end="")
>>> stream.result().text
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from pitchkeras import errors
from pitchkeras.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from pitchkeras.sampling.config import MAX_TOP_LOGPROBS, GenerationRequest, Sample, SamplerConfig, TokenLogprob
from pitchkeras.sampling.counter_rng import row_keys
from pitchkeras.sampling.decode import forward, sample_next
from pitchkeras.sampling.generator import PreparedRequest, prompt_bucket

log = logging.getLogger(__name__)

END_TOKEN, LENGTH, STOP_SEQUENCE, CANCELLED, DEADLINE = "end_token", "length", "stop_sequence", "cancelled", "deadline"
CACHE_BUCKETS = (64, 128, 256, 512, 1024)  # cache lengths (positions) a step is compiled for
BULK_TOKENS_PER_STEP = 8  # tokens per compiled call when nobody streams (Generator.generate, populate)
BULK_CACHE_BUCKETS = tuple(range(64, 1025, 64))  # finer cache lengths for bulk work: fewer idle positions per step
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to: held back until complete


class Cancelled(errors.Cancelled):
    """A stream ended by `cancel()` or by its deadline before it finished."""


class DeadlinePassed(Cancelled, DeadlineExceeded):
    """A stream ended by its deadline (DEADLINE_EXCEEDED at the RPC edge)."""


def _ended(reason: str, when: str = "") -> Cancelled:
    return (DeadlinePassed if reason == DEADLINE else Cancelled)(f"request {reason}{when}")


@dataclasses.dataclass
class EngineCounters:
    """What the engine has done, for tests, logs and metrics.

    Args:
        steps: int. Compiled steps run.
        prefills: int. Requests prefilled into a slot.
        tokens: int. Tokens decoded (over all rows).
        row_steps: int. Active rows summed over steps (`row_steps / steps` is the mean batch).
        computed_rows: int. Rows computed summed over steps (the row bucket each step ran; >= row_steps).
        rows: int. Rows the last step computed (its row bucket).
        finished: int. Requests that ended with a Sample.
        cancelled: int. Requests ended by cancel or deadline.
        failed: int. Requests ended by an error of their own (a failed prefill).
        rejected: int. Requests refused because the waiting queue was full.
        active: int. Slots busy now.
        waiting: int. Requests queued for a slot now.
        traces: int. Programs traced (= compiled shapes).
    """

    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    row_steps: int = 0
    computed_rows: int = 0
    rows: int = 0
    finished: int = 0
    cancelled: int = 0
    active: int = 0
    waiting: int = 0
    traces: int = 0
    failed: int = 0
    rejected: int = 0


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


class DecodeEngine:
    """Continuously batched decoding over `slots` rows for a `Generator`'s model.

    Args:
        generator: sampling.Generator. Its model, tokenizer, prompt buckets,
            post-processing and memorization check are used.
        slots: int. Rows decoded together in one step, at most. A step runs
            the smallest row bucket (1, 2, 4, ... slots) holding the highest
            busy slot; on a CPU under XLA in float32 the smallest is 2, as in
            `Generator._batch_shape` (a lone row runs faster as 2).
        cache_buckets: sequence of int. Cache lengths a step is compiled for
            (each capped at the model's context); the engine grows the cache
            to the smallest that fits its rows and shrinks it back when idle.
        tokens_per_step: int. Tokens each compiled call decodes for every row
            (1: rows join, leave and stream at every token, what a server
            wants; more amortises the per-call cost for batch jobs such as
            populate, at the price of rows joining only every so many tokens).
            The text is the same either way.
        max_waiting: int or None. Most requests waiting for a slot; past it
            `submit` raises ResourceExhausted (None: no bound).
        observer: object or None. Told what the engine does, from its thread
            (the server's `ServerMetrics`): `observe_step(rows, tokens,
            seconds)`, `observe_queue(seconds)`, `observe_first_token(seconds)`,
            `observe_time_per_token(seconds)`, `observe_cancel(reason)`.
    """

    def __init__(self, generator, *, slots: int = 8, cache_buckets: Sequence[int] = CACHE_BUCKETS,
                 tokens_per_step: int = 1, max_waiting: Optional[int] = None, observer=None):
        if slots < 1 or tokens_per_step < 1:
            raise InvalidArgument(f"slots and tokens_per_step must be >= 1, got {slots} and {tokens_per_step}")
        self.generator = generator
        self.slots = int(slots)
        self._max_length = generator._max_length
        self.cache_buckets = tuple(sorted({min(int(b), self._max_length) for b in cache_buckets} | {self._max_length}))
        self.counters = EngineCounters()
        # The model's own stop texts (an imported gpt-2-simple run's `<|endoftext|>` as text) end every row.
        self._model_stops = tuple(generator.model.prompt_format.stop_sequences)
        self.tokens_per_step = int(tokens_per_step)
        if max_waiting is not None and max_waiting < 0:
            raise InvalidArgument(f"max_waiting must be >= 0 or None, got {max_waiting}")
        self.max_waiting = max_waiting
        self.observer = observer
        self.row_buckets = _row_buckets(min(generator._batch_shape(1), self.slots), self.slots)
        self._program = _program_for(generator, self.slots, self.tokens_per_step)
        self._rows: list[Optional[_Row]] = [None] * self.slots
        self._waiting: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._state = _DeviceState(self.slots, generator._pad_id)

    # -- submitting ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, config: Optional[SamplerConfig] = None,
               max_new_tokens: Optional[int] = None, *, include_prefix: bool = True,
               timeout: Optional[float] = None, listener=None, listener_tokens: bool = False,
               deltas: bool = True) -> Stream:
        """Queue one request; it joins at the next step boundary with a free slot.

        Args:
            request: GenerationRequest. Conditions, prefix and seed.
            config: SamplerConfig or None. Its sampler settings (default: SamplerConfig()).
            max_new_tokens: int or None. Its length cap (default: the generator's).
            include_prefix: bool. Keep the prefix at the start of the text.
            timeout: float or None. Seconds from now after which it is ended (DEADLINE).
            listener: callable or None. See `Stream`.
            listener_tokens: bool. The listener gets `(text, tokens)` pairs (see `Stream`).
            deltas: bool. False: nobody reads its deltas (bulk work); its text is made once, at the end.

        Raises InvalidArgument (bad conditions, settings or lengths) before anything is queued, and
        ResourceExhausted when `max_waiting` requests already wait.
        """
        return self.submit_prepared(self.generator.prepare(request), config, max_new_tokens,
                                    include_prefix=include_prefix, timeout=timeout, listener=listener,
                                    listener_tokens=listener_tokens, deltas=deltas)

    def submit_prepared(self, prepared: PreparedRequest, config: Optional[SamplerConfig] = None,
                        max_new_tokens: Optional[int] = None, *, stops: Sequence[str] = (),
                        include_prefix: bool = True, timeout: Optional[float] = None, listener=None,
                        listener_tokens: bool = False, deltas: bool = True) -> Stream:
        """`submit` for a request already prepared (`Generator.prepare`); `stops` are stop texts beyond the
        config's (`Generator.generate`'s `truncate`), not recorded in the Sample's config."""
        config = (config or SamplerConfig()).validate()
        new_tokens = self.generator.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {new_tokens}")
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = Stream(prepared, config, new_tokens, include_prefix=include_prefix,
                        deadline=deadline, listener=listener, listener_tokens=listener_tokens, quiet=not deltas)
        stream.stops = tuple(config.stop_sequences) + tuple(stops) + self._model_stops
        with self._condition:
            if self._stopping:
                raise Unavailable("the decode engine is stopping; retry on another server")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                self.counters.rejected += 1
                self._observe("observe_cancel", "queue_full")
                raise ResourceExhausted(f"{len(self._waiting)} requests are already waiting for a decode slot "
                                        f"(the bound is {self.max_waiting}); retry in a second")
            self._waiting.append(stream)
            self.counters.waiting = len(self._waiting)
            self._condition.notify()
        return stream

    def generate(self, requests: Sequence[GenerationRequest], config: Optional[SamplerConfig] = None,
                 max_new_tokens: Optional[int] = None, *, include_prefix: bool = True) -> list[Sample]:
        """Samples for `requests`, in order (the caller's thread steps the engine when none runs it)."""
        streams = [self.submit(r, config, max_new_tokens, include_prefix=include_prefix) for r in requests]
        if self._thread is None:
            self.run_until_idle()
        return [stream.result() for stream in streams]

    # -- running ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; requests still queued or running end with Unavailable."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(Unavailable("the decode engine stopped before this request finished"))

    def run_until_idle(self) -> None:
        """Step until no request is running or waiting (for callers that run no thread)."""
        while self.step():
            pass

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not any(self._rows):
                    self._condition.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug or a device failure: every caller hears of it, the thread lives on
                log.exception("decode engine step failed")
                self._fail_all(err)

    def step(self) -> bool:
        """One step boundary and one step: leave, join (prefill), decode a token per active row.

        Returns whether any request was running or waiting.
        """
        now = time.monotonic()
        for slot, row in enumerate(self._rows):
            reason = row.stream.expired(now) if row else None
            if reason:
                self._leave(slot, reason)
        joined = self._join(now)
        active = [slot for slot, row in enumerate(self._rows) if row is not None]
        self.counters.active = len(active)
        if not active:
            self._state.release()
            return joined
        self._fit_cache(self._state.length)  # rows above the highest busy slot may have left
        logprobs = any(self._rows[slot].stream.request.top_logprobs is not None for slot in active)
        started, tokens = time.monotonic(), self.counters.tokens
        chosen, scores = self._program.step(self._state, logprobs)
        seconds = time.monotonic() - started
        self.counters.traces = self._program.traces
        self.counters.rows = self._state.rows
        for column in range(self.tokens_per_step):
            active = [slot for slot in active if self._rows[slot] is not None]
            self.counters.steps += bool(active)
            self.counters.row_steps += len(active)
            self.counters.computed_rows += self._state.rows * bool(active)
            for slot in active:
                self._advance(slot, int(chosen[slot, column]), scores and (scores, slot, column))
        self.counters.active = sum(row is not None for row in self._rows)
        self._observe("observe_step", len(active), self.counters.tokens - tokens, seconds)
        return True

    def _observe(self, method: str, *args) -> None:
        """Tell the observer (metrics); its failure is logged, never the engine's."""
        if self.observer is not None:
            try:
                getattr(self.observer, method)(*args)
            except Exception:  # noqa: BLE001 - metrics must not stop decoding
                log.exception("engine observer %s failed", method)

    # -- joining and leaving ---------------------------------------------------------------
    def _join(self, now: float) -> bool:
        """Prefill waiting requests into free slots; whether any request was waiting."""
        had_waiting = bool(self._waiting)
        free = [slot for slot, row in enumerate(self._rows) if row is None]
        groups: dict = {}  # prompt bucket -> [(slot, stream)]: each group is prefilled in one call
        while free:
            with self._condition:
                if not self._waiting:
                    break
                stream = self._waiting.popleft()
                self.counters.waiting = len(self._waiting)
            reason = stream.expired(now)
            if reason:
                self.counters.cancelled += 1
                self._observe("observe_cancel", reason)
                stream._end(reason, error=_ended(reason, " before it started"))
                continue
            groups.setdefault(self._bucket(stream), []).append((free.pop(0), stream))
        for group in groups.values():
            try:
                self._prefill(group)
            except Exception:  # noqa: BLE001 - find which request failed: each alone, so only its own ends
                for slot, stream in group:
                    try:
                        self._prefill([(slot, stream)])
                    except Exception as err:  # this request's prefill failed (memory, a compile): it alone ends
                        log.exception("prefill failed; its request ends with the error")
                        self._rows[slot] = None
                        self._state.clear_row(slot)
                        self.counters.failed += 1
                        self._observe("observe_cancel", "error")
                        stream._end("error", error=err)
        return had_waiting

    def _bucket(self, stream: Stream) -> int:
        return min(prompt_bucket(len(stream.prepared.ids), self.generator.prompt_buckets), self._max_length)

    def _prefill(self, group: list) -> None:
        """Prefill `group` ((slot, stream) pairs of one prompt bucket) in one compiled call and insert their rows.

        The call runs a power of two of prompts (the first repeated to fill it), so few shapes compile.
        """
        bucket = self._bucket(group[0][1])
        limits = [min(len(stream.prepared.ids) + stream.max_new_tokens, self._max_length) for _, stream in group]
        self._fit_cache(max(limits + [bucket]), max(slot for slot, _ in group))
        size = 1 << (len(group) - 1).bit_length()
        prompts = np.full((size, bucket), self.generator._pad_id, np.int32)
        slots = np.full((size,), group[0][0], np.int32)
        for i, (slot, stream) in enumerate(group + [group[0]] * (size - len(group))):
            ids = stream.prepared.ids
            prompts[i, : len(ids)] = ids
            slots[i] = slot
        for slot, stream in group:
            self._state.reset_row(slot, stream.prepared.ids, stream.request.seed, stream.config)
        self._program.prefill(self._state, slots, prompts)
        for (slot, stream), limit in zip(group, limits):
            self.counters.prefills += 1
            self._observe("observe_queue", time.monotonic() - stream.submitted)
            self._rows[slot] = _Row(stream, position=len(stream.prepared.ids) - 1, limit=limit)
            self._state.positions[slot] = len(stream.prepared.ids) - 1

    def _fit_cache(self, needed: int, slot: int = 0) -> None:
        """Size the cache: the smallest row bucket holding every busy slot and `slot`, and the smallest
        cache bucket holding `needed` positions and every busy row's."""
        busy = [s for s, row in enumerate(self._rows) if row is not None]
        rows = next(b for b in self.row_buckets if b > max(busy + [slot]))
        needed = max([needed] + [self._rows[s].limit for s in busy])
        length = next(b for b in self.cache_buckets if b >= needed)
        if (rows, length) != (self._state.rows, self._state.length):
            self._state.resize(rows, length, self._program)

    def _advance(self, slot: int, token: int, scores=None) -> None:
        """Add one drawn token to a row: its text, its stop checks, its delta; the row leaves when done.

        `scores` is None or (the step's (chosen logprobs, top ids, top logprobs), slot, column).
        """
        row = self._rows[slot]
        if token == self.generator._end_id and self.generator.stop_at_end_token:
            return self._leave(slot, END_TOKEN)
        row.completion.append(token)
        if len(row.completion) == 1:
            row.stream.first_token_at = time.monotonic()
            self._observe("observe_first_token", row.stream.first_token_at - row.stream.submitted)
        wanted = row.stream.request.top_logprobs
        if wanted is not None:
            (chosen, top_ids, top_logprobs), slot, column = scores
            top = tuple(zip(top_ids[slot, column, :wanted].tolist(), top_logprobs[slot, column, :wanted].tolist()))
            row.logprobs.append(TokenLogprob(token, float(chosen[slot, column]), top))
        row.stream.tokens += 1
        row.position += 1
        self._state.token_ids[slot, row.position] = token
        self._state.positions[slot] = row.position
        self.counters.tokens += 1
        stops = row.stream.stops
        cut = -1
        if stops or not row.stream.quiet:  # else nobody reads the text before the end: it is made once, then
            checked = len(row.text)
            self._extend_text(row)
            if stops and len(row.text) > checked:
                # Only the tail can hold a stop text that was not there before.
                tail = max(0, checked - max(map(len, stops)) + 1)
                cut = min((i for i in (row.text.find(stop, tail) for stop in stops) if i >= 0), default=-1)
        if cut >= 0:
            # The tokens kept: those that started before the cut (the stop text's own are dropped, as it is).
            kept = sum(1 for start in [0] + row.ends[:-1] if start < cut)
            del row.completion[kept:], row.logprobs[kept:], row.ends[kept:]
            row.text = row.text[:cut]
            row.pending = []
            return self._leave(slot, STOP_SEQUENCE)
        if not row.stream.quiet:
            self._send(row, _safe_end(row.text, stops))
        if len(row.completion) >= row.stream.max_new_tokens or row.position + 1 >= row.limit:
            self._leave(slot, LENGTH)

    def _extend_text(self, row: _Row) -> None:
        """Add the row's newest token to its text once its bytes form whole characters."""
        row.pending.append(row.completion[-1])
        piece = self.generator.detokenize(row.pending)
        if not piece.endswith(_REPLACEMENT):
            row.text += piece
            row.ends += [len(row.text)] * len(row.pending)
            row.pending = []

    @staticmethod
    def _send(row: _Row, end: int, last: bool = False) -> None:
        """Hand out `row.text` up to `end` with the tokens completed in it (every token left when `last`)."""
        done = len(row.completion) if last else bisect.bisect_right(row.ends, end)
        row.stream._emit(row.text[row.sent:end], row.tokens(row.delivered, done))
        row.sent, row.delivered = max(row.sent, end), max(row.delivered, done)

    def _leave(self, slot: int, reason: str) -> None:
        """Free the slot now; the stream gets its Sample (or `Cancelled`)."""
        row = self._rows[slot]
        self._rows[slot] = None
        self._state.clear_row(slot)
        stream = row.stream
        if reason in (CANCELLED, DEADLINE):
            self.counters.cancelled += 1
            self._observe("observe_cancel", "listener_error" if stream.listener_error else reason)
            stream._end(reason, error=stream.listener_error or _ended(reason))
            return
        if stream.quiet and not stream.stops:
            row.text = self.generator.detokenize(row.completion)  # the one detokenize of a row nobody listens to
        else:
            row.text += self.generator.detokenize(row.pending) if row.pending else ""
        text = row.text
        if not stream.quiet:
            self._send(row, len(text), last=True)
        try:
            sample = self.generator.finish(stream.prepared, text, stream.config, include_prefix=stream.include_prefix)
        except Exception as err:  # post-processing failed for this request only
            stream._end(reason, error=err)
            return
        sample = dataclasses.replace(sample, finish_reason=reason, completion_ids=tuple(row.completion),
                                     logprobs=None if stream.request.top_logprobs is None else tuple(row.logprobs))
        self.counters.finished += 1
        if len(row.completion) > 1:
            self._observe("observe_time_per_token",
                          (time.monotonic() - stream.first_token_at) / (len(row.completion) - 1))
        stream._end(reason, sample=sample)

    def _fail_all(self, err: BaseException) -> None:
        with self._condition:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._rows[slot] = None
                row.stream._end("error", error=err)
        for stream in waiting:
            stream._end("error", error=err)
        self._state.release()

    # -- warm-up ---------------------------------------------------------------------------
    def warmup(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
        """Compile the prefills for these prompt lengths and the step their cache needs, before serving.

        For each length, warm-up requests join one per step until every slot
        is busy (so every row bucket's prefill and step compile), then they are
        cancelled: this costs compiles and `slots` steps, not generation.
        """
        for length in sorted(set(prompt_lengths)):
            ids = [self.generator._pad_id] * max(1, min(length, self._max_length - 1))
            streams = []
            for _ in range(self.slots):
                streams.append(Stream(PreparedRequest(GenerationRequest(), {}, "", ids), SamplerConfig(),
                                      max_new_tokens))
                with self._condition:
                    self._waiting.append(streams[-1])
                self.step()
            for stream in streams:
                stream.cancel()
            self.run_until_idle()
        self.counters.cancelled = 0


def _program_for(generator, slots: int, tokens: int) -> "_Program":
    """The compiled programs for `slots` rows of this generator's model, shared by every engine on it.

    They live on the generator (not in a module-level table), so dropping it frees the model.
    """
    xla = generator.uses_xla(slots)
    programs = generator.__dict__.setdefault("_engine_programs", {})
    if (slots, xla, tokens) not in programs:
        programs[slots, xla, tokens] = _Program(generator._backbone, xla=xla, tokens=tokens)
    return programs[slots, xla, tokens]


def _row_buckets(smallest: int, slots: int) -> tuple:
    """The rows a step may run: `smallest`, the powers of two above it below `slots`, and `slots`."""
    buckets, rows = [], smallest
    while rows < slots:
        buckets.append(rows)
        rows *= 2
    return tuple(buckets) + (slots,)


def _concrete_per_shape(function):
    """Call a `tf.function` through its concrete function for the arguments' shapes, found once per shape.

    A step is a few milliseconds on a small model; the `tf.function` call
    itself matched the argument structure against its traces every time
    (about 2 ms of Python per call, profiled on the demo model).
    """
    import tensorflow as tf

    concrete: dict = {}

    def call(caches, *args):
        tensors = [tf.constant(a) for a in args]
        key = (tuple(caches[0][0].shape),) + tuple(tuple(t.shape) for t in tensors)
        if key not in concrete:
            concrete[key] = function.get_concrete_function(caches, *tensors)
        return concrete[key](caches, *tensors)

    return call


def _in_place(body):
    """A TensorFlow step or prefill over cache variables: `body(cache values, *args)` returns (new caches,
    result); the new caches are assigned to the variables inside the same compiled function (XLA aliases
    them: no cache-sized copy per call), and the result is returned."""
    def run(variables, *args):
        caches, result = body([(k.value(), v.value()) for k, v in variables], *args)
        for (k, v), (new_k, new_v) in zip(variables, caches):
            k.assign(new_k)
            v.assign(new_v)
        return result

    return run


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent: all of it but a tail that could be the start of a stop sequence."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return len(text) - held


class _DeviceState:
    """The engine's arrays: the caches (device tensors, the first `rows` slots) and the per-row inputs of a
    step (numpy, every slot; a step gets the first `rows`)."""

    def __init__(self, slots: int, pad_id: int):
        self.slots, self.pad_id = slots, pad_id
        self.rows = 0  # slots the caches hold (the row bucket)
        self.length = 0  # cache positions; 0 = no cache allocated
        self.caches = None
        self.token_ids = np.zeros((slots, 0), np.int32)
        self.positions = np.zeros((slots,), np.int32)
        self.keys = np.zeros((slots, 2), np.uint32)
        self.temperature = np.ones((slots,), np.float32)
        self.top_k = np.zeros((slots,), np.int32)
        self.top_p = np.ones((slots,), np.float32)
        self.repetition_penalty = np.ones((slots,), np.float32)
        self.no_repeat_ngram_size = np.zeros((slots,), np.int32)

    def reset_row(self, slot: int, ids: list, seed: int, config: SamplerConfig) -> None:
        self.token_ids[slot] = self.pad_id
        self.token_ids[slot, : len(ids)] = ids
        self.keys[slot] = row_keys([seed])[0]
        self.temperature[slot] = config.temperature
        self.top_k[slot] = config.top_k
        self.top_p[slot] = config.top_p
        self.repetition_penalty[slot] = config.repetition_penalty
        self.no_repeat_ngram_size[slot] = config.no_repeat_ngram_size

    def clear_row(self, slot: int) -> None:
        """Neutral settings, so a free row never switches a processor on for the others."""
        self.positions[slot] = 0
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = 1.0, 0, 1.0
        self.repetition_penalty[slot], self.no_repeat_ngram_size[slot] = 1.0, 0

    def resize(self, rows: int, length: int, program: "_Program") -> None:
        """Pad or cut the caches to `rows` slots (those cut are free) and `length` positions."""
        old = self.length
        self.caches = program.resize_caches(self.caches, rows, length)
        if length != old:
            ids = np.full((self.slots, length), self.pad_id, np.int32)
            keep = min(old, length)
            ids[:, :keep] = self.token_ids[:, :keep]
            self.token_ids = ids
        self.rows, self.length = rows, length

    def release(self) -> None:
        """Drop the cache while idle: the next request allocates the rows and length it needs."""
        self.caches, self.rows, self.length = None, 0, 0
        self.token_ids = np.zeros((self.slots, 0), np.int32)

    def step_inputs(self) -> tuple:
        return tuple(a[: self.rows] for a in (self.token_ids, self.positions, self.keys, self.temperature,
                                              self.top_k, self.top_p, self.repetition_penalty,
                                              self.no_repeat_ngram_size))


class _Program:
    """The engine's compiled programs, one per shape: `step` and `prefill`, on TensorFlow or JAX."""

    def __init__(self, backbone, *, xla: bool, tokens: int = 1):
        import keras

        self.backbone = backbone
        self.xla = xla
        # TensorFlow: the caches are `tf.Variable`s read and assigned inside the compiled step, so XLA updates
        # them in place (aliased) instead of copying every cache in and out of each call. JAX donates them.
        self.resident = keras.config.backend() == "tensorflow"
        self.tokens = tokens  # decode steps per call
        self.traces = 0  # programs traced (= compiled shapes)
        self._steps = self._prefill = None  # {logprobs: step}, prefill

    # The traced bodies, in keras.ops. -------------------------------------------------------
    def _step_body(self, caches, token_ids, positions, keys, *settings, logprobs: bool = False):
        """`tokens` decode steps: the caches, and each row's next `tokens` tokens (slots, tokens).

        Each step feeds every row's last token at its own position and draws
        the next; within a call, a row's new token is written to its context
        for the next step (positions past the cache stay on its last slot: the
        host drops tokens of rows that have ended). With `logprobs`, also each
        chosen token's log-probability under the model's raw logits (slots,
        tokens) and the MAX_TOP_LOGPROBS most likely tokens' ids and
        log-probabilities (slots, tokens, MAX_TOP_LOGPROBS).
        """
        from keras import ops

        self.traces += 1  # Python side effect: once per trace
        token_ids, positions = ops.cast(token_ids, "int32"), ops.cast(positions, "int32")
        slots, length = token_ids.shape
        top = min(MAX_TOP_LOGPROBS, self.backbone.vocabulary_size)

        def one(i, carry):
            caches, token_ids, positions, outs = carry
            last = ops.take_along_axis(token_ids, positions[:, None], axis=1)
            hidden, caches = forward(self.backbone, last, caches, positions)
            logits = self.backbone.token_embedding(hidden[:, -1, :], reverse=True)
            chosen = ops.cast(sample_next(logits, token_ids, keys, positions + 1, *settings), "int32")
            positions = ops.minimum(positions + 1, length - 1)
            token_ids = ops.where(ops.arange(length)[None, :] == positions[:, None], chosen[:, None], token_ids)
            new = [chosen[:, None]]
            if logprobs:
                scores = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
                best, best_ids = ops.top_k(scores, top)
                new += [ops.take_along_axis(scores, chosen[:, None], axis=1), ops.cast(best_ids, "int32")[:, None],
                        best[:, None]]
            outs = [ops.slice_update(out, (0, i) + (0,) * (len(out.shape) - 2), item) for out, item in zip(outs, new)]
            return caches, token_ids, positions, outs

        outs = [ops.zeros((slots, self.tokens), "int32")]
        if logprobs:
            outs += [ops.zeros((slots, self.tokens), "float32"), ops.zeros((slots, self.tokens, top), "int32"),
                     ops.zeros((slots, self.tokens, top), "float32")]
        if self.tokens == 1:
            caches, _, _, outs = one(0, (caches, token_ids, positions, outs))
        else:
            caches, _, _, outs = ops.fori_loop(0, self.tokens, one, (caches, token_ids, positions, outs))
        return caches, outs

    def _prefill_body(self, caches, slots, prompt_ids):
        """Run prompts (n, bucket) through the model into rows `slots` (n,) of the caches (a slot repeated
        gets the same row written again)."""
        from keras import ops

        self.traces += 1
        backbone = self.backbone
        size = prompt_ids.shape[0]
        fresh = [tuple(ops.zeros((size,) + tuple(k.shape[1:]), k.dtype) for _ in "kv") for k, _ in caches]
        _, fresh = forward(backbone, prompt_ids, fresh, 0)
        out = []
        for (k, v), (fk, fv) in zip(caches, fresh):
            for i in range(size):
                start = (slots[i], 0, 0, 0)
                k = ops.slice_update(k, start, fk[i:i + 1])
                v = ops.slice_update(v, start, fv[i:i + 1])
            out.append((k, v))
        return out

    # Compiled, per backend. --------------------------------------------------------------------
    def step(self, state: _DeviceState, logprobs: bool = False) -> tuple:
        """Run a step: the chosen tokens (slots, tokens), and (chosen logprobs, top ids, top logprobs) or None."""
        self._compile()
        if self.resident:  # the caches are variables, updated in place inside the compiled step
            outs = self._steps[logprobs](state.caches, *state.step_inputs())
        else:
            state.caches, outs = self._steps[logprobs](state.caches, *state.step_inputs())
        outs = [np.asarray(out) for out in outs]
        return outs[0], (tuple(outs[1:]) if logprobs else None)

    def prefill(self, state: _DeviceState, slots: np.ndarray, prompts: np.ndarray) -> None:
        """Prefill `prompts` (n, bucket) into rows `slots` (n,) of the caches."""
        self._compile()
        if self.resident:
            self._prefill(state.caches, slots, prompts)
        else:
            state.caches = self._prefill(state.caches, slots, prompts)

    def resize_caches(self, caches, slots: int, length: int):
        """New zero caches of `slots` rows and `length` positions, or the old ones padded or cut to them."""
        from keras import ops

        backbone = self.backbone
        heads = backbone.num_heads
        shape = (slots, heads, length, backbone.hidden_dim // heads)
        if caches is None:
            caches = [tuple(ops.zeros(shape, backbone.compute_dtype) for _ in "kv") for _ in backbone.transformer_layers]
        else:
            old_slots, _, old, _ = caches[0][0].shape
            pad = [[0, max(slots - old_slots, 0)], [0, 0], [0, max(length - old, 0)], [0, 0]]
            caches = [tuple(ops.pad(ops.convert_to_tensor(c)[:slots, :, :length], pad) for c in kv) for kv in caches]
        if self.resident:
            import tensorflow as tf

            caches = [tuple(tf.Variable(c, trainable=False) for c in kv) for kv in caches]
        return caches

    def _step_with(self, logprobs: bool):
        """The step body with its `logprobs` flag fixed (positional arguments only, as the tracers want)."""
        def step(caches, *args):
            return self._step_body(caches, *args, logprobs=logprobs)

        return step

    def _compile(self) -> None:
        if self._steps is not None:
            return
        import keras

        backend = keras.config.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            self._steps = {flag: _concrete_per_shape(tf.function(_in_place(self._step_with(flag)),
                                                                 jit_compile=self.xla)) for flag in (False, True)}
            self._prefill = _concrete_per_shape(tf.function(
                _in_place(lambda caches, *args: (self._prefill_body(caches, *args), ())), jit_compile=self.xla))
        elif backend == "jax":
            self._steps, self._prefill = self._jax_functions()
        else:
            raise FailedPrecondition(
                f"DecodeEngine runs on the tensorflow and jax Keras backends, not {backend!r}; "
                "set KERAS_BACKEND=tensorflow or jax")

    def _jax_functions(self):
        """`jax.jit` over stateless calls with the weights as arguments; the caches are donated (updated in place)."""
        import jax
        import keras

        from pitchkeras import compile_cache

        compile_cache.apply_to_jax()
        variables = list(self.backbone.variables)

        def stateless(body):
            def run(values, caches, *args):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    return body(caches, *args)

            return jax.jit(run, donate_argnums=(1,))

        def bind(function):
            return lambda caches, *args: function([v.value for v in variables], caches, *args)

        steps = {flag: bind(stateless(self._step_with(flag))) for flag in (False, True)}
        return steps, bind(stateless(self._prefill_body))
