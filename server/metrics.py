"""Prometheus metrics of one server process (`GET /metrics` on the HTTP port).

Each `ReviewServer` owns a `ServerMetrics` with its own registry, so several
servers in one process (tests, notebooks) never mix their counts; with
`--workers N` each process answers for itself, as Prometheus expects of
replicas (scrape each, or sum over `instance`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP handler)
from prometheus_client.core import CounterMetricFamily

MODEL_STATES = ("off", "loading", "ready", "failed")
# Stored reads answer in well under a millisecond; Generate takes seconds: cover both.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters, histograms and gauges for both protocols, the batcher, the model and the store.

    Args:
        registry: CollectorRegistry or None. Where the metrics live (a fresh one by default).

    Example:

    >>> metrics = ServerMetrics()
    >>> metrics.observe_call("http", "GetReview", "200", 0.002)
    >>> b"pitchkeras_requests_total" in metrics.render()
    True
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pitchkeras_requests", "Calls answered, by protocol (grpc, http), method and status "
                                "code (gRPC code name or HTTP status).", ["protocol", "method", "code"], registry=r)
        self.latency = Histogram("pitchkeras_request_duration_seconds", "Time from request to answer.",
                                 ["protocol", "method", "code"], buckets=_LATENCY_BUCKETS, registry=r)
        self.store_errors = Counter("pitchkeras_store_errors", "Store calls that failed on the store's side "
                                    "(unavailable or unexpected), by store method and error type.",
                                    ["operation", "error"], registry=r)
        self.batch_size = Histogram("pitchkeras_generate_batch_size", "Samples decoded together in one model call.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("pitchkeras_generate_batch_duration_seconds", "Wall time of one model call.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.decoded_tokens = Counter("pitchkeras_generate_tokens", "Token positions decoded by model calls "
                                      "(rows x max_new_tokens of each batch).", registry=r)
        self.tokens_per_second = Gauge("pitchkeras_generate_tokens_per_second",
                                       "Token positions per second of the last model call.", registry=r)
        self.queue_depth = Gauge("pitchkeras_generate_queue_depth",
                                 "Generate calls waiting for a batch to pick them up.", registry=r)
        self.model_state = Enum("pitchkeras_model_state", "The Generate model's state.", states=list(MODEL_STATES),
                                registry=r)
        self.model_state.state("off")
        # Which process answered (with --workers N each has its own numbers), and its CPU and memory.
        Info("pitchkeras_server", "The server process.", registry=r).info({"pid": str(os.getpid())})
        ProcessCollector(registry=r)
        self._store_counters = _StoreCounters()
        r.register(self._store_counters)

    def observe_call(self, protocol: str, method: str, code: str, seconds: float) -> None:
        """Count one answered call."""
        self.requests.labels(protocol, method, code).inc()
        self.latency.labels(protocol, method, code).observe(seconds)

    def observe_batch(self, rows: int, max_new_tokens: int, seconds: float) -> None:
        """Record one model call of the Generate batcher."""
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.decoded_tokens.inc(rows * max_new_tokens)
        if seconds > 0:
            self.tokens_per_second.set(rows * max_new_tokens / seconds)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the Generate queue depth from `depth()` at each scrape."""
        self.queue_depth.set_function(depth)

    def watch_store(self, store) -> None:
        """Export the store's own pick counters at each scrape (see `_StoreCounters`)."""
        self._store_counters.store = store

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StoreCounters:
    """The store's own pick counters (`ReviewStore.pick_stats()`), read at scrape time.

    Firestore counts the claims another process won first (`lost_races`) and
    the documents its picks read (`reads`); SQLite picks in one statement and
    keeps no such counters, so it reports 0.
    """

    store = None

    def collect(self):
        stats = self.store.pick_stats() if self.store is not None else {}
        for name, key, help_text in (
            ("pitchkeras_store_pick_lost_races", "lost_races",
             "Claims of a least-shown review that another process won first (the pick took another)."),
            ("pitchkeras_store_pick_documents_read", "reads", "Documents the store read to pick reviews."),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], float(stats.get(key, 0)))
            yield family
