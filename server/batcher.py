"""Runs Generate calls on the model through the decode engine.

`EngineBatcher` hands each sample to a `DecodeEngine`: it joins the running
batch at the next step and leaves when it ends, so nobody waits for a batch
to drain, and it can stream its text as it is decoded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, AsyncIterator, Optional, Union

log = logging.getLogger(__name__)


class EngineBatcher:
    """Generate calls through a `DecodeEngine` running on its own thread.

    Args:
        generator: sampling.Generator. The model; the engine uses its post-processing.
        slots: int. Rows decoded together (the engine's batch).
        metrics: ServerMetrics or None. The engine's observer: steps (rows, tokens, time), queue time, time
            to first token, time per output token, cancellations; and the waiting and running gauges.
        max_waiting: int or None. The engine's bound on waiting samples (ResourceExhausted past it).
    """

    def __init__(self, generator, *, slots: int = 8, metrics=None, max_waiting: Optional[int] = None):
        from pitchkeras.sampling.engine import DecodeEngine

        self.generator = generator
        self.engine = DecodeEngine(generator, slots=slots, max_waiting=max_waiting, observer=metrics)
        self.metrics = metrics

    def start(self) -> None:
        self.engine.start()
        if self.metrics is not None:
            self.metrics.watch_engine(lambda: self.engine.counters.waiting, lambda: self.engine.counters.active)

    def warmup(self, max_new_tokens: int) -> None:
        """Compile the step and the prefill for a typical prompt at this length (before `start`); every other
        shape compiles off the engine thread when a request first needs it, while the running rows keep stepping."""
        self.engine.warmup([len(self.generator._tokenize(self.generator.example_prompt()))], max_new_tokens)

    async def submit(self, requests: list, config, max_new_tokens: int, *, timeout: Optional[float] = None) -> list:
        """The Samples of `requests` (one call's samples), in order; cancelling the caller cancels them.

        `timeout` (seconds, the caller's deadline) ends them with DeadlinePassed at the next step after it.
        """
        loop = asyncio.get_running_loop()
        futures, streams = [], []
        try:
            for request in requests:
                future = loop.create_future()
                streams.append(self.engine.submit(request, config, max_new_tokens, timeout=timeout,
                                                  listener=_on_end(loop, future)))
                futures.append(future)
            for future in futures:
                await future
            return [stream.result() for stream in streams]
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


def make_batcher(generator, executor: concurrent.futures.Executor, config, metrics=None) -> EngineBatcher:
    """The server's batcher: an `EngineBatcher` with `config.max_batch_size` slots and `config.max_waiting`.

    `executor` is unused (the engine runs on its own thread); kept so callers need not change.
    """
    del executor
    return EngineBatcher(generator, slots=config.max_batch_size, metrics=metrics, max_waiting=config.max_waiting)
