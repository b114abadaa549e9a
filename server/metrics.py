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
# Per output token: a few ms on a small model, tens to hundreds of ms for GPT-2 124M on a loaded CPU.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
CANCEL_REASONS = ("cancelled", "deadline", "listener_error", "error", "queue_full")


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
        self.batch_size = Histogram("pitchkeras_generate_batch_size", "Rows decoded together in one engine step.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("pitchkeras_generate_batch_duration_seconds",
                                       "Wall time of one engine step (one compiled call).",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.decoded_tokens = Counter("pitchkeras_generate_tokens", "Tokens the decode engine generated.",
                                      registry=r)
        self.tokens_per_second = Gauge("pitchkeras_generate_tokens_per_second",
                                       "Tokens per second of the last engine step.", registry=r)
        self.queue_depth = Gauge("pitchkeras_generate_queue_depth",
                                 "Generate samples waiting for a decode slot.", registry=r)
        self.running_rows = Gauge("pitchkeras_generate_running_rows", "Decode slots busy now.", registry=r)
        self.time_to_first_token = Histogram(
            "pitchkeras_generate_time_to_first_token_seconds",
            "From a sample's submission to its first generated token (queue and prefill included).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pitchkeras_generate_time_per_output_token_seconds",
            "Mean time per generated token after the first, per finished sample.", buckets=_TOKEN_BUCKETS,
            registry=r)
        self.queue_seconds = Histogram("pitchkeras_generate_queue_duration_seconds",
                                       "Time a sample waited for a decode slot.", buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.cancellations = Counter("pitchkeras_generate_cancellations",
                                     "Samples that ended without a result, by reason (cancelled: the caller left; "
                                     "deadline; listener_error; error: its prefill failed; queue_full: refused).",
                                     ["reason"], registry=r)
        for reason in CANCEL_REASONS:
            self.cancellations.labels(reason)
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

    # -- the decode engine's observer (called from its thread) ---------------------------------
    def observe_step(self, rows: int, tokens: int, seconds: float) -> None:
        """One engine step: its rows, the tokens it generated and its wall time."""
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.decoded_tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def observe_queue(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_time_per_token(self, seconds: float) -> None:
        self.time_per_output_token.observe(seconds)

    def observe_cancel(self, reason: str) -> None:
        self.cancellations.labels(reason).inc()

    def watch_engine(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the samples waiting for a slot and the busy slots from these functions at each scrape."""
        self.queue_depth.set_function(waiting)
        self.running_rows.set_function(running)

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
