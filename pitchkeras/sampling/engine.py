"""`DecodeEngine`: continuous batching over a fixed number of slots, one compiled step for every active row.

The one decode path: the servers, `Generator.generate` (so `pitchkeras
generate` and `report`) and populate all run on it. A closed batch would run
as long as its longest row, and a call that arrives a moment late would wait
for the whole batch. The engine keeps `slots` rows, each with its own
key/value cache positions, and works in steps:

1. At a step boundary, rows that were cancelled or passed their deadline
   leave, and waiting requests take the free slots: those joining together
   are *prefilled* in one call per prompt bucket (their prompts, padded to
   the bucket, run through the model and are inserted into their rows of the
   cache).
2. One compiled *step* decodes up to `tokens_per_step` tokens for every
   active row in a device-side loop (ending early once rows have finished
   for waiting requests), each row at its own position, with its own
   sampler settings (per-row tensors: any mix of temperatures, top-k, top-p
   and repetition settings shares a step). The
   step runs only the first rows, a power-of-two *row bucket* holding the
   highest busy slot (new requests take the lowest free slot), so a lone
   request does not pay for every slot.
3. Each row's new text goes to its listener as whole UTF-8 characters; a row
   that draws `<|endoftext|>`, reaches a stop sequence or its length leaves
   at once, and its `Sample` is post-processed by the `Generator`. A quiet
   row (`deltas=False`: bulk work) is detokenized once, at the end.

The decode state stays on the device between calls: the caches, the token
buffer, positions, limits, random keys and per-row settings (a request's
written once, when it is inserted); on TensorFlow they are `tf.Variable`s
assigned inside the compiled programs (XLA aliases them, no copy), on JAX
they are donated. Randomness is counter-based per (request seed,
position), so a request's tokens do not depend on when it joined, on its
neighbours, its slot, row bucket or cache length (tested; the logits agree
to the last bits, not bitwise, across shapes on XLA's CPU backend).
Everything traced is `keras.ops`: a `tf.function` (XLA) on TensorFlow and
`jax.jit` on JAX, one program per (tokens per call, row bucket, cache length)
step and per (prompts, prompt bucket, row bucket, cache length) prefill,
shared by every engine and `Generator` on the same model (the end token is
an argument of the step); both go through the persistent compile cache
(`pitchkeras.compile_cache`). A step with a row that asks for
log-probabilities runs a second variant of the step program.

Once the engine runs on its thread (`start`: a server, which reports SERVING
after `warmup`), no shape compiles on that thread: a request whose prefill or
step shape has not run yet waits in the queue while a compile thread compiles
it on a throwaway state, the running rows keep stepping and the requests
behind it that fit join past it (`EngineCounters.compiles`; a shape that does
compile on the engine thread is counted in `inline_compiles`). A compile that
fails ends only the requests that need it (RESOURCE_EXHAUSTED when memory ran
out). An engine stepped by its caller (`Generator.generate`, populate)
compiles where it runs, as a batch job wants.

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
import queue
import threading
import time
from typing import Optional, Sequence

import numpy as np

from pitchkeras.errors import InvalidArgument, PitchkerasError, ResourceExhausted, Unavailable
from pitchkeras.sampling.config import (
    GenerationRequest, PreparedRequest, Sample, SamplerConfig, TokenLogprob, prompt_bucket)
from pitchkeras.sampling.program import _DeviceState, _in_place, _Program, _program_for, _row_buckets  # noqa: F401
from pitchkeras.sampling.stream import (  # noqa: F401  (re-exported: the engine's public names live here too)
    _REPLACEMENT,
    CANCELLED,
    DEADLINE,
    END_TOKEN,
    LENGTH,
    STOP_SEQUENCE,
    Cancelled,
    DeadlinePassed,
    Stream,
    _ended,
    _Row,
    _safe_end,
)

log = logging.getLogger(__name__)

CACHE_BUCKETS = (64, 128, 256, 512, 1024)  # cache lengths (positions) a step is compiled for
# Most tokens per compiled call when nobody streams (Generator.generate, populate): the call's device-side loop
# ends early once rows have finished for waiting requests (JOIN_FRACTION), so rows still join soon, and the
# per-call cost is paid once per many tokens (measured: BUILD_NOTES.md).
BULK_TOKENS_PER_STEP = 32
BULK_CACHE_BUCKETS = tuple(range(32, 1025, 32))  # finer cache lengths for bulk work: fewer idle positions per step
JOIN_FRACTION = 4  # a bulk step call ends early once a quarter of its rows (or every waiting request) can join
# How often an engine thread with nothing to run but requests waiting for their compiles looks at their cancels
# and deadlines (a finished compile or a new request wakes it at once).
WAITING_POLL_S = 0.05


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
        compiles: int. Shapes compiled off the engine thread while it kept stepping (once started).
        inline_compiles: int. Shapes first run on the engine thread once started: each froze every
            running row for its compile (the server's goal is 0 after SERVING).
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
    compiles: int = 0
    inline_compiles: int = 0


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
        tokens_per_step: int. Most tokens each compiled call decodes for every
            row (1: rows join, leave and stream at every token, what a server
            wants; more amortises the per-call cost for batch jobs such as
            populate; the call ends early once rows have finished while
            requests wait, so they still join soon). The text is the same
            either way.
        max_waiting: int or None. Most requests waiting for a slot; past it
            `submit` raises ResourceExhausted (None: no bound).
        prefill_together: bool. Prefill the requests joining at a step boundary
            in one call per prompt bucket (bulk work: fewer calls), instead of
            one call each (a server: only the one-request prefill shapes that
            `warmup` compiles ever run, so a burst compiles nothing new).
        observer: object or None. Told what the engine does, from its thread
            (the server's `ServerMetrics`): `observe_step(rows, tokens,
            seconds)`, `observe_queue(seconds)`, `observe_first_token(seconds)`,
            `observe_time_per_token(seconds)`, `observe_cancel(reason)`.
    """

    def __init__(self, generator, *, slots: int = 8, cache_buckets: Sequence[int] = CACHE_BUCKETS,
                 tokens_per_step: int = 1, max_waiting: Optional[int] = None, observer=None,
                 prefill_together: bool = False):
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
        self.prefill_together = bool(prefill_together)
        self.join_fraction = JOIN_FRACTION
        self.row_buckets = _row_buckets(min(generator._batch_shape(1), self.slots), self.slots)
        self._program = _program_for(generator, self.slots)
        self._end_id = generator._end_id if generator.stop_at_end_token else -1  # a row that draws it is done
        self._rows: list[Optional[_Row]] = [None] * self.slots
        self._waiting: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._state = _DeviceState(self.slots, generator._pad_id)
        # Shapes and their compiles. A shape is ("step", rows, length, logprobs) or ("prefill", prompts, prompt
        # bucket, rows, length); once the engine runs on its thread, it runs only shapes in `_ready` (compiled),
        # and the compile thread compiles the others on a state of its own while the running rows keep stepping.
        self._ready: set = set()
        self._compiling: set = set()
        self._compile_failures: dict = {}  # shape -> the error its compile raised: ends the requests that need it
        self._compile_jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._compiler: Optional[threading.Thread] = None
        self._news = False  # a request arrived or a compile ended since the engine thread last looked

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
            self._news = True
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
        self._compile_jobs.put(None)  # the compile thread ends after the compile it is in, if any
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
            with self._condition:
                if not any(self._rows) and self._waiting and not self._news:
                    self._condition.wait(WAITING_POLL_S)  # all wait for compiles; look again at their cancels
                self._news = False

    @property
    def _started(self) -> bool:
        """Whether the engine runs on its thread (serving): then no shape compiles on that thread."""
        return self._thread is not None

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
        self._settle_cache()  # rows above the highest busy slot may have left
        asked = any(self._rows[slot].stream.request.top_logprobs is not None for slot in active)
        logprobs = self._variant(self._state.rows, self._state.length, asked)
        logprobs = asked if logprobs is None else logprobs
        shape = ("step", self._state.rows, self._state.length, logprobs)
        self._check_compiled(shape)
        started, tokens = time.monotonic(), self.counters.tokens
        chosen, scores = self._program.step(self._state, logprobs, waiting=self._joiners(),
                                            tokens=self.tokens_per_step, end_id=self._end_id)
        seconds = time.monotonic() - started
        self._ready.add(shape)
        self.counters.traces = self._program.traces
        self.counters.rows = self._state.rows
        for column in range(chosen.shape[1]):  # fewer than tokens_per_step when a row ended for a waiting request
            active = [slot for slot in active if self._rows[slot] is not None]
            self.counters.steps += bool(active)
            self.counters.row_steps += len(active)
            self.counters.computed_rows += self._state.rows * bool(active)
            for slot in active:
                self._advance(slot, int(chosen[slot, column]), scores and (scores, slot, column))
        self.counters.active = sum(row is not None for row in self._rows)
        self._observe("observe_step", len(active), self.counters.tokens - tokens, seconds)
        return True

    def _joiners(self) -> int:
        """After how many rows finish a step call ends early for waiting requests (0: never): one for an engine
        that prefills one request at a time; a bulk engine waits for a group (fewer calls and prefills)."""
        waiting = len(self._waiting)
        if not waiting or self.tokens_per_step == 1:
            return 0
        if not self.prefill_together:
            return 1
        return min(waiting, max(1, self._state.rows // self.join_fraction))

    def _observe(self, method: str, *args) -> None:
        """Tell the observer (metrics); its failure is logged, never the engine's."""
        if self.observer is not None:
            try:
                getattr(self.observer, method)(*args)
            except Exception:  # noqa: BLE001 - metrics must not stop decoding
                log.exception("engine observer %s failed", method)

    # -- joining and leaving ---------------------------------------------------------------
    def _join(self, now: float) -> bool:
        """Prefill waiting requests into free slots; whether any request was waiting.

        Once the engine runs on its thread, a request joins only when every
        program it makes the engine run (its prefill, then the step at the
        shape it leaves) is compiled; until then it keeps its place in the
        queue, its shapes compile on the compile thread while the running rows
        keep stepping, and the requests behind it that fit join past it.
        """
        with self._condition:
            waiting = list(self._waiting)
            failures = dict(self._compile_failures)
        free = [slot for slot, row in enumerate(self._rows) if row is None]
        joining: list = []  # (slot, stream) in the order they join
        for stream in waiting:
            reason = stream.expired(now)
            if reason:
                self._unqueue(stream)
                self.counters.cancelled += 1
                self._observe("observe_cancel", reason)
                stream._end(reason, error=_ended(reason, " before it started"))
                continue
            if not free:
                continue  # no slot, but the requests behind may still have been cancelled
            missing = self._missing(joining + [(free[0], stream)]) if self._started else []
            error = next((failures[shape] for job in missing for shape in _job_shapes(job) if shape in failures),
                         None)
            if error is not None:  # its shape failed to compile: it alone ends, with that error
                self._unqueue(stream)
                self.counters.failed += 1
                self._observe("observe_cancel", "error")
                stream._end("error", error=error)
            elif missing:
                self._compile_later(missing)
            else:
                self._unqueue(stream)
                joining.append((free.pop(0), stream))
        with self._condition:  # the next request that needs a shape that failed tries its compile again
            for shape in failures:
                self._compile_failures.pop(shape, None)
        for group in self._groups(joining):
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
        return bool(waiting)

    def _unqueue(self, stream: Stream) -> None:
        with self._condition:
            self._waiting.remove(stream)
            self.counters.waiting = len(self._waiting)

    def _groups(self, joining: list) -> list:
        """`joining` ((slot, stream) pairs) as the groups prefilled in one call each, in the order they run."""
        groups: dict = {}
        for slot, stream in joining:
            key = self._bucket(stream) if self.prefill_together else len(groups)
            groups.setdefault(key, []).append((slot, stream))
        return list(groups.values())

    # -- shapes and their compiles ---------------------------------------------------------
    def _cache_shape(self, slots: Sequence[int], needed: int) -> tuple:
        """(row bucket, cache length): the smallest holding rows `slots` and `needed` positions."""
        rows = next(b for b in self.row_buckets if b > max(slots, default=0))
        return rows, next(b for b in self.cache_buckets if b >= needed)

    def _limit(self, stream: Stream) -> int:
        """Positions a request may fill: its prompt and new tokens, at most the model's context."""
        return min(len(stream.prepared.ids) + stream.max_new_tokens, self._max_length)

    def _variant(self, rows: int, length: int, asked: bool) -> Optional[bool]:
        """The step variant to run at this shape (True: with logprobs), or None when neither is compiled.

        Once started, a step where no row asks may run the logprobs variant when only it is compiled: it
        draws the same tokens and adds the scores nobody reads. Before, the variant asked (compiled if new).
        """
        if not self._started:
            return asked
        return next((v for v in (asked, True) if ("step", rows, length, v) in self._ready), None)

    def _missing(self, joining: list) -> list:
        """Compile jobs (rows, length, (prompts, prompt bucket) or None, step variant or None) for the shapes
        that admitting `joining` ((slot, stream) pairs) would run and that are not compiled; [] when none.

        It follows `_prefill` and `step` exactly: each group's prefill into the cache `_fit_cache` makes for
        it, then the step of the last cache.
        """
        busy = {slot: row.limit for slot, row in enumerate(self._rows) if row is not None}
        asked = any(row.stream.request.top_logprobs is not None for row in self._rows if row is not None)
        jobs, shape = [], (self._state.rows, self._state.length)
        for group in self._groups(joining):
            bucket, limits = self._bucket(group[0][1]), [self._limit(stream) for _, stream in group]
            shape = self._cache_shape(list(busy) + [max(slot for slot, _ in group)],
                                      max(limits + [bucket] + list(busy.values())))
            size = 1 << (len(group) - 1).bit_length()
            if ("prefill", size, bucket) + shape not in self._ready:
                jobs.append(shape + ((size, bucket), None))
            busy.update((slot, limit) for (slot, _), limit in zip(group, limits))
            asked = asked or any(stream.request.top_logprobs is not None for _, stream in group)
        if self._variant(*shape, asked) is None:
            if jobs and jobs[-1][:2] == shape:
                jobs[-1] = jobs[-1][:3] + (asked,)
            else:
                jobs.append(shape + (None, asked))
        return jobs

    def _compile_later(self, jobs: list) -> None:
        """Queue `jobs` (see `_missing`) on the compile thread, each shape once."""
        with self._condition:
            for job in jobs:
                shapes = set(_job_shapes(job))
                if shapes <= self._ready | self._compiling:
                    continue
                self._compiling |= shapes
                self._compile_jobs.put(job)
            if self._compiler is None:
                self._compiler = threading.Thread(target=self._compile_loop, name="decode-engine-compile",
                                                  daemon=True)
                self._compiler.start()

    def _compile_loop(self) -> None:
        """The compile thread: one job at a time; a failure is kept for the requests that need its shapes."""
        while (job := self._compile_jobs.get()) is not None:
            shapes = set(_job_shapes(job))
            error = None
            try:
                self._compile_shape(*job)
            except Exception as err:  # noqa: BLE001 - memory, a compiler error: the requests needing it end
                log.exception("compiling the decode programs for %s failed", shapes)
                error = _compile_error(err, job)
            with self._condition:
                self._compiling -= shapes
                if error is None:
                    self._ready |= shapes
                    self.counters.compiles += 1
                else:
                    self._compile_failures.update(dict.fromkeys(shapes, error))
                self._news = True
                self._condition.notify()

    def _compile_shape(self, rows: int, length: int, prefill: Optional[tuple], logprobs: Optional[bool]) -> None:
        """Compile the programs of one shape on a throwaway state, leaving the running rows' state alone.

        Args:
            rows: int. The row bucket.
            length: int. The cache length.
            prefill: (prompts, prompt bucket) or None. A prefill of that many prompts into this cache.
            logprobs: bool or None. The step variant at this cache (None: no step).
        """
        size, bucket = prefill if prefill is not None else (0, 0)
        self._program.compile(self._state, rows, length, bucket, group_sizes=(size,) if size else (),
                              logprobs=() if logprobs is None else (logprobs,), tokens=self.tokens_per_step)

    def _check_compiled(self, shape: tuple) -> None:
        """Count (and log) a shape about to run on the engine thread uncompiled once it is started."""
        if self._started and shape not in self._ready:
            self.counters.inline_compiles += 1
            log.warning("decode engine: %s compiles on the engine thread; its running rows wait", shape)

    def _bucket(self, stream: Stream) -> int:
        return min(prompt_bucket(len(stream.prepared.ids), self.generator.prompt_buckets), self._max_length)

    def _prefill(self, group: list) -> None:
        """Prefill `group` ((slot, stream) pairs of one prompt bucket) in one compiled call and insert their rows.

        The call runs a power of two of prompts (the first repeated to fill it), so few shapes compile.
        """
        bucket = self._bucket(group[0][1])
        limits = [self._limit(stream) for _, stream in group]
        self._fit_cache(max(limits + [bucket]), max(slot for slot, _ in group))
        size = 1 << (len(group) - 1).bit_length()
        prompts = np.full((size, bucket), self.generator._pad_id, np.int32)
        slots = np.full((size,), group[0][0], np.int32)
        for i, (slot, stream) in enumerate(group + [group[0]] * (size - len(group))):
            ids = stream.prepared.ids
            prompts[i, : len(ids)] = ids
            slots[i] = slot
        for (slot, stream), limit in zip(group, limits):
            self._state.reset_row(slot, stream.prepared.ids, stream.request.seed, stream.config, limit)
        shape = ("prefill", size, bucket, self._state.rows, self._state.length)
        self._check_compiled(shape)
        self._program.prefill(self._state, slots, prompts)
        self._ready.add(shape)
        for (slot, stream), limit in zip(group, limits):
            self.counters.prefills += 1
            self._observe("observe_queue", time.monotonic() - stream.submitted)
            self._rows[slot] = _Row(stream, position=len(stream.prepared.ids) - 1, limit=limit)

    def _fit_cache(self, needed: int, slot: int = 0) -> None:
        """Size the cache: the smallest row bucket holding every busy slot and `slot`, and the smallest
        cache bucket holding `needed` positions and every busy row's."""
        busy = [s for s, row in enumerate(self._rows) if row is not None]
        rows, length = self._cache_shape(busy + [slot], max([needed] + [self._rows[s].limit for s in busy]))
        if (rows, length) != (self._state.rows, self._state.length):
            self._state.resize(rows, length, self._program)

    def _settle_cache(self) -> None:
        """At a step: `_fit_cache` for the rows still busy (fewer rows), but once started only to a shape
        whose step is compiled (else the rows stay as they are: idle rows cost time, never a compile)."""
        rows = [row for row in self._rows if row is not None]
        shape = self._cache_shape([s for s, row in enumerate(self._rows) if row is not None],
                                  max([self._state.length] + [row.limit for row in rows]))
        asked = any(row.stream.request.top_logprobs is not None for row in rows)
        if self._variant(*shape, asked) is not None or shape == (self._state.rows, self._state.length):
            self._fit_cache(self._state.length)

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
        """Compile the prefills for these prompt lengths and the step their cache needs, before serving
        (shapes it leaves out compile off the engine thread once it is started).

        For each length, warm-up requests join one per step until every slot
        is busy (so every row bucket's prefill and step compile), then they are
        cancelled: this costs compiles and `slots` steps, not generation. With
        `prefill_together`, groups of 1, 2, 4, ... `slots` requests joining at
        once are warmed too.
        """
        def join(count: int, one_per_step: bool) -> None:
            streams = []
            for _ in range(count):
                streams.append(Stream(PreparedRequest(GenerationRequest(), {}, "", ids), SamplerConfig(),
                                      max_new_tokens))
                with self._condition:
                    self._waiting.append(streams[-1])
                if one_per_step:
                    self.step()
            if not one_per_step:
                self.step()
            for stream in streams:
                stream.cancel()
            self.run_until_idle()

        for length in sorted(set(prompt_lengths)):
            ids = [self.generator._pad_id] * max(1, min(length, self._max_length - 1))
            join(self.slots, one_per_step=True)
            size = 2
            while self.prefill_together and size // 2 < self.slots:
                join(min(size, self.slots), one_per_step=False)
                size *= 2
        self.counters.cancelled = 0


def _job_shapes(job: tuple) -> list:
    """The shapes a compile job (rows, length, prefill, logprobs) compiles."""
    rows, length, prefill, logprobs = job
    return ([("prefill",) + tuple(prefill) + (rows, length)] if prefill is not None else []) + \
        ([("step", rows, length, logprobs)] if logprobs is not None else [])


def _out_of_memory(err: BaseException) -> bool:
    """Whether a backend's error says memory ran out (TensorFlow's ResourceExhaustedError, XLA's
    RESOURCE_EXHAUSTED status, Python's MemoryError)."""
    return isinstance(err, MemoryError) or type(err).__name__ == "ResourceExhaustedError" or \
        any(mark in str(err) for mark in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def _compile_error(err: BaseException, job: tuple) -> PitchkerasError:
    """The error a request gets when its shape failed to compile: RESOURCE_EXHAUSTED for memory, else
    UNAVAILABLE (the request was fine; this server could not run it). The backend's message stays in the log."""
    rows, length = job[:2]
    what = f"the decode programs for {rows} rows x {length} cache positions"
    if _out_of_memory(err):
        return ResourceExhausted(f"not enough memory to compile {what}; retry later or ask for fewer tokens "
                                 "(a shorter max_length)", retry_after_s=10.0)
    return Unavailable(f"this server could not compile {what} ({type(err).__name__}); retry on another server")
