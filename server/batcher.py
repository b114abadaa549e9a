"""Runs Generate calls on the model: continuously batched through the decode engine, or in closed batches.

`EngineBatcher` (the default, `ServerConfig.batching = "continuous"`) hands
each sample to a `DecodeEngine`: it joins the running batch at the next step
and leaves when it ends, so nobody waits for a batch to drain, and it can
stream its text as it is decoded.

`GenerateBatcher` (`batching = "closed"`, kept for comparison) batches
concurrent calls into one `Generator.generate` call. One collector task
takes the first waiting call, then gathers more for up to `max_wait_s` or
until `max_batch_size` rows, and runs them as one batch in a worker thread. While a batch runs, new calls queue up and form the next
batch, so a busy server fills its batches without waiting at all. Calls with
different sampler settings or lengths cannot share a compiled batch
(`generate` takes one config), so they run as separate groups.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from typing import Any, AsyncIterator, Optional, Union

from pitchkeras.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    requests: list  # of sampling.GenerationRequest
    config: Any  # sampling.SamplerConfig (frozen, hashable)
    max_new_tokens: int
    future: asyncio.Future

    @property
    def key(self):
        return (self.config, self.max_new_tokens)


class GenerateBatcher:
    """Collects Generate calls and runs them in batches off the event loop.

    Args:
        generator: sampling.Generator. Thread-safe; called from `executor`.
        executor: concurrent.futures.Executor. Where model work runs (never the event loop).
        max_batch_size: int. Rows (samples) per `generate` call at most.
        max_wait_s: float. How long the first call of a batch waits for company.
        metrics: ServerMetrics or None. Receives batch sizes, durations and the queue depth.
    """

    def __init__(self, generator, executor: concurrent.futures.Executor, *, max_batch_size: int = 8,
                 max_wait_s: float = 0.01, metrics=None):
        if max_batch_size < 1 or max_wait_s < 0:
            raise InvalidArgument(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.generator = generator
        self.executor = executor
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.batch_sizes: list[int] = []  # rows per generate call, for logs and tests
        self.metrics = metrics
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start the collector on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="generate-batcher")
        if self.metrics is not None:
            self.metrics.watch_queue(self._queue.qsize)

    async def submit(self, requests: list, config, max_new_tokens: int) -> list:
        """Generate `requests` (one call's samples) in some batch; their Samples in order."""
        if self._task is None or self._task.done():
            raise RuntimeError("GenerateBatcher is not running; call start() first")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(requests), config, int(max_new_tokens), future))
        return await future

    async def stream(self, request, config, max_new_tokens: int) -> AsyncIterator[Union[str, Any]]:
        """One sample as a stream: a closed batch has no text before it ends, so one delta, then the Sample."""
        (sample,) = await self.submit([request], config, max_new_tokens)
        if len(sample.raw) > len(sample.prompt):
            yield sample.raw[len(sample.prompt):]
        yield sample

    def warmup(self, max_new_tokens: int) -> None:
        """Compile every batch shape the collector can form (powers of two up to the max) at this length."""
        sizes, size = [], 1
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        sizes.append(self.max_batch_size)
        self.generator.warmup(batch_sizes=sizes, max_new_tokens=max_new_tokens)

    async def close(self) -> None:
        """Stop collecting; calls still queued fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.cancel()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            rows = len(batch[0].requests)
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch_size:
                remaining = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                        self._queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(item)
                rows += len(item.requests)
            groups: dict = {}
            for item in batch:
                if not item.future.done():  # the caller may have given up (deadline, cancel)
                    groups.setdefault(item.key, []).append(item)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        requests = [r for item in group for r in item.requests]
        config, max_new_tokens = group[0].key
        try:
            self.batch_sizes.append(len(requests))
            started = loop.time()
            samples = await loop.run_in_executor(
                self.executor, lambda: self.generator.generate(requests, config=config, max_new_tokens=max_new_tokens)
            )
            if self.metrics is not None:
                self.metrics.observe_batch(len(requests), max_new_tokens, loop.time() - started)
        except InvalidArgument as err:
            if len(group) > 1:
                # One call's input (e.g. a prompt too long in tokens) must not fail its batch mates.
                for item in group:
                    await self._run([item])
                return
            _fail(group, err)
            return
        except Exception as err:  # handed to the callers, who map it to a status code
            _fail(group, err)
            return
        start = 0
        for item in group:
            end = start + len(item.requests)
            if not item.future.done():
                item.future.set_result(samples[start:end])
            start = end


def _fail(group: list[_Pending], err: BaseException) -> None:
    for item in group:
        if not item.future.done():
            item.future.set_exception(err)


class EngineBatcher:
    """Generate calls through a `DecodeEngine` running on its own thread.

    Args:
        generator: sampling.Generator. The model; the engine uses its post-processing.
        slots: int. Rows decoded together (the engine's batch).
        metrics: ServerMetrics or None. Receives the queue depth (requests waiting for a slot) and,
            per Generate call, its rows and duration.
    """

    def __init__(self, generator, *, slots: int = 8, metrics=None, max_waiting: Optional[int] = None):
        from pitchkeras.sampling.engine import DecodeEngine

        self.generator = generator
        self.engine = DecodeEngine(generator, slots=slots, max_waiting=max_waiting)
        self.metrics = metrics

    def start(self) -> None:
        self.engine.start()
        if self.metrics is not None:
            self.metrics.watch_queue(lambda: self.engine.counters.waiting)

    def warmup(self, max_new_tokens: int) -> None:
        """Compile the step and the prefill for a typical prompt at this length (before `start`)."""
        self.engine.warmup([len(self.generator._tokenize(self.generator.example_prompt()))], max_new_tokens)

    async def submit(self, requests: list, config, max_new_tokens: int, *, timeout: Optional[float] = None) -> list:
        """The Samples of `requests` (one call's samples), in order; cancelling the caller cancels them.

        `timeout` (seconds, the caller's deadline) ends them with DeadlinePassed at the next step after it.
        """
        loop = asyncio.get_running_loop()
        futures, streams = [], []
        started = loop.time()
        try:
            for request in requests:
                future = loop.create_future()
                streams.append(self.engine.submit(request, config, max_new_tokens, timeout=timeout,
                                                  listener=_on_end(loop, future)))
                futures.append(future)
            for future in futures:
                await future
            samples = [stream.result() for stream in streams]
            if self.metrics is not None:
                # The engine's batch changes every step; a call's rows and time are what a caller sees.
                self.metrics.observe_batch(len(requests), max_new_tokens, loop.time() - started)
            return samples
        finally:
            for stream in streams:
                stream.cancel()  # a no-op for finished ones; frees the slots of a caller that went away

    async def stream(self, request, config, max_new_tokens: int, *, tokens: bool = False,
                     timeout: Optional[float] = None) -> AsyncIterator[Union[str, tuple, Any]]:
        """One sample: its text deltas as they are decoded, then its Sample. Leaving early frees its slot.

        With `tokens`, each delta comes as a `(text, TokenLogprob tuple)` pair (`Stream.token_deltas`).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = self.engine.submit(request, config, max_new_tokens, listener_tokens=tokens, timeout=timeout,
                                    listener=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            yield stream.result()
        finally:
            stream.cancel()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


def _on_end(loop, future: asyncio.Future):
    """A stream listener that resolves `future` (on the event loop) when the stream ends."""
    def listener(item) -> None:
        if item is None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

    return listener


def make_batcher(generator, executor: concurrent.futures.Executor, config, metrics=None):
    """The server's batcher for `config.batching`: `EngineBatcher` ("continuous") or `GenerateBatcher` ("closed")."""
    if config.batching == "closed":
        return GenerateBatcher(generator, executor, max_batch_size=config.max_batch_size,
                               max_wait_s=config.max_wait_ms / 1000.0, metrics=metrics)
    return EngineBatcher(generator, slots=config.max_batch_size, metrics=metrics, max_waiting=config.max_waiting)
