"""Server settings, with the default beside each and why."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pitchkeras.errors import UsageError


DEFAULT_HOST = "127.0.0.1"  # loopback: serving to the network is a decision (--host 0.0.0.0)
DEFAULT_PORT = 50051  # gRPC's customary port
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"


@dataclasses.dataclass
class ServerConfig:
    """Everything `create_server` can tune.

    Args:
        max_batch_size: int. Generate samples decoded together in one model call.
        default_max_length: int. New tokens per review when the request gives no max_length.
        max_length_cap: int. Largest max_length a request may ask for.
        num_samples_cap: int. Most reviews one Generate call may ask for.
        prompt_chars_cap: int. Longest free-text prompt, in characters.
        store_workers: int. Threads running blocking store calls.
        grace_s: float. On shutdown, how long in-flight calls get to finish.
        max_receive_bytes: int. Largest request message accepted.
        max_send_bytes: int. Largest response message sent.
        warmup: bool. Compile the model's shapes before reporting SERVING.
        rate_per_s: float. API key rate limit: sustained Generate calls per second per key.
        burst: int. API key rate limit: calls a key may make at once after being idle.
        quantize: str or None. "int8": load the model with int8 weights (`pitchkeras.quantize`).
        header_timeout_s: float. HTTP: seconds from a request head's first byte to its end.
        body_timeout_s: float. HTTP: seconds to receive a whole request body.
        keepalive_timeout_s: float. HTTP: seconds an idle connection is kept open.
        grpc_keepalive_s: float. gRPC: ping a client after this many seconds without traffic.
        grpc_keepalive_timeout_s: float. gRPC: drop a client whose ping ack takes longer than this.
        grpc_max_idle_s: float. gRPC: close a connection without calls for this long.
        max_waiting: int. Generate samples that may wait for a decode slot; past it Generate answers
            RESOURCE_EXHAUSTED (HTTP 429 with Retry-After) at once instead of queueing without end.
    """

    max_batch_size: int = 8  # one compiled decode loop serves up to 8 users at once
    default_max_length: int = 200  # gpt-2-simple's `length` for a review-sized sample
    max_length_cap: int = 512  # GPT-2's context is 1024; longer reviews wander off anyway
    num_samples_cap: int = 16
    prompt_chars_cap: int = 1000  # well under any model's context once tokenized
    store_workers: int = 16  # SQLite serializes writers; reads (GetById) run in parallel
    grace_s: float = 10.0
    max_receive_bytes: int = 1 << 20  # requests are a few fields: 1 MiB is generous
    max_send_bytes: int = 4 << 20  # 16 samples x 512 tokens stays far below this
    warmup: bool = True
    rate_per_s: float = 1.0
    burst: int = 5
    quantize: Optional[str] = None  # None = the weights as trained
    header_timeout_s: float = 10.0  # a request head is a few hundred bytes: seconds are plenty on any link
    body_timeout_s: float = 30.0  # bodies are at most max_receive_bytes: even a slow link sends one in time
    keepalive_timeout_s: float = 30.0  # browsers reuse a connection for a page's next calls; 1 h held sockets
    grpc_keepalive_s: float = 60.0  # finds dead peers in minutes, not gRPC's default 2 h
    grpc_keepalive_timeout_s: float = 20.0
    grpc_max_idle_s: float = 300.0  # idle channels are cheap to reopen; idle sockets are not free to keep
    max_waiting: int = 64  # 8 full batches of the default max_batch_size: past it a caller does better elsewhere

    def validate(self) -> "ServerConfig":
        """Return self, or raise UsageError naming the bad setting."""
        checks = (
            ("max_batch_size", self.max_batch_size >= 1, ">= 1"),
            ("default_max_length", 1 <= self.default_max_length <= self.max_length_cap, "in [1, max_length_cap]"),
            ("num_samples_cap", self.num_samples_cap >= 1, ">= 1"),
            ("prompt_chars_cap", self.prompt_chars_cap >= 0, ">= 0"),
            ("store_workers", self.store_workers >= 1, ">= 1"),
            ("grace_s", self.grace_s >= 0, ">= 0"),
            ("rate_per_s", self.rate_per_s > 0, "> 0"),
            ("burst", self.burst >= 1, ">= 1"),
            ("max_waiting", self.max_waiting >= 0, ">= 0"),
            ("quantize", self.quantize in (None, "int8"), 'None or "int8"'),
            *((name, getattr(self, name) > 0, "> 0") for name in (
                "header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "grpc_keepalive_s",
                "grpc_keepalive_timeout_s", "grpc_max_idle_s")),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise UsageError(f"server setting {name}={getattr(self, name)!r} is not allowed; must be {allowed}")
        return self
