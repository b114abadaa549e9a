"""API keys for Generate, with a per-key token-bucket rate limit, and a per-peer one on failed keys.

Keys come from a file, one per line (blank lines and `#` comments ignored).
Clients send theirs as `x-api-key` metadata (or `authorization: Bearer KEY`).
A peer that keeps presenting wrong keys is limited like a caller (same rate
and burst), so keys cannot be guessed at line rate; a missing key is not a
guess and is answered UNAUTHENTICATED each time.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import math
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Optional, Sequence

from pitchkeras.client.review_client import API_KEY_HEADER
from pitchkeras.errors import UsageError

#: Peers whose failed-key buckets are remembered; the least recently failing are forgotten first.
MAX_FAILING_PEERS = 10_000
#: The RPCs that need a key when the server has keys; both edges check it before reading the request.
KEYED_METHODS = frozenset({"Generate", "StreamGenerate"})


class AuthError(Exception):
    """Raised by `ApiKeys.check`; `code_name` is the gRPC status to answer with.

    `retry_after_s` (RESOURCE_EXHAUSTED only) is when a call may succeed: HTTP's `Retry-After`.
    """

    def __init__(self, code_name: str, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.code_name = code_name
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """Whole seconds to wait, as the `Retry-After` header wants them (at least 1)."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclasses.dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per call."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float, *, spend: bool = True) -> float:
        """Take a token (only look with `spend=False`); 0.0 on success, else the seconds until one is available."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0 if spend else 0.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class ApiKeys:
    """The accepted keys and each key's rate limit.

    Args:
        keys: sequence of str. Accepted keys.
        rate: float. Calls per second each key may sustain.
        burst: int. Calls a key may make at once after being idle.
        clock: callable. Monotonic seconds (tests pass a fake).
    """

    def __init__(self, keys: Sequence[str], *, rate: float = 1.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic):
        keys = [k for k in keys if k]
        if not keys:
            raise UsageError("the API key list is empty; put one key per line")
        if rate <= 0 or burst < 1:
            raise UsageError(f"rate limit must be > 0 calls/s with burst >= 1, got rate={rate} burst={burst}")
        self._keys = [k.encode("utf-8") for k in keys]
        self._rate, self._burst = float(rate), float(burst)
        self._buckets = {k: TokenBucket(rate=self._rate, burst=self._burst) for k in keys}
        self._failures: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._clock = clock

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "ApiKeys":
        """Read one key per line; `#` starts a comment."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise UsageError(f"cannot read --api-key-file {path}: {err.strerror or err}") from None
        keys = [line.split("#", 1)[0].strip() for line in lines]
        if not any(keys):
            raise UsageError(f"--api-key-file {path} holds no keys; put one key per line")
        return cls(keys, **kwargs)

    def _match(self, candidate: bytes) -> Optional[str]:
        found = None
        for key in self._keys:  # compare against every key: timing says nothing about which matched
            if hmac.compare_digest(key, candidate):
                found = key.decode("utf-8")
        return found

    def check(self, metadata, *, peer: str = "", spend: bool = True) -> str:
        """The caller's key if it may call now.

        Args:
            metadata: iterable of (name, value). The call's metadata (HTTP: its headers, lower-cased).
            peer: str. The caller's address without port: failed keys are limited per peer.
            spend: bool. False only looks whether the key may call (the HTTP edge, before reading the
                body); the call itself then spends the token.

        Raises:
            AuthError: UNAUTHENTICATED (no key, or one that is not text), PERMISSION_DENIED (unknown key)
                or RESOURCE_EXHAUSTED (over the key's rate limit, or too many wrong keys from this peer).
        """
        candidate = _presented_key(metadata)
        if candidate is None:
            raise AuthError("UNAUTHENTICATED", f"Generate needs an API key: send it as `{API_KEY_HEADER}` metadata "
                            "or `Authorization: Bearer KEY` (OpenAI clients: their api_key)")
        key = self._match(candidate)
        if key is None:
            self._count_failure(peer)
            raise AuthError("PERMISSION_DENIED", "this API key is not accepted by the server")
        wait = self._buckets[key].take(self._clock(), spend=spend)
        if wait > 0:
            raise AuthError("RESOURCE_EXHAUSTED", f"rate limit for this API key exceeded; retry in {wait:.1f} s",
                            retry_after_s=wait)
        return key

    def _count_failure(self, peer: str) -> None:
        """Spend a token of `peer`'s failure bucket; once it is empty, the answer is RESOURCE_EXHAUSTED."""
        bucket = self._failures.pop(peer, None) or TokenBucket(rate=self._rate, burst=self._burst)
        self._failures[peer] = bucket  # most recent last
        while len(self._failures) > MAX_FAILING_PEERS:
            self._failures.popitem(last=False)
        wait = bucket.take(self._clock())
        if wait > 0:
            raise AuthError("RESOURCE_EXHAUSTED", f"too many calls with a wrong API key; retry in {wait:.1f} s",
                            retry_after_s=wait)


def _presented_key(metadata) -> Optional[bytes]:
    """The key the caller sent (`x-api-key`, else `authorization: Bearer`), as UTF-8 bytes; None if absent.

    Raises:
        AuthError: UNAUTHENTICATED when the header holds bytes that are not text.
    """
    presented = None
    for name, value in metadata or ():
        if name == API_KEY_HEADER:
            presented = value
        elif name == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            presented = value[len("bearer "):]
    if isinstance(presented, bytes):  # `-bin` style binary metadata is never a key
        presented = None
    if not presented or not presented.strip():
        return None
    try:
        return presented.strip().encode("utf-8")
    except UnicodeEncodeError:  # HTTP headers decode undecodable bytes as surrogates
        raise AuthError("UNAUTHENTICATED", f"the API key is not valid text; send it as `{API_KEY_HEADER}: KEY` "
                        "with the key as the server's key file has it") from None


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer (`ipv4:1.2.3.4:5678` -> `1.2.3.4`, `ipv6:[::1]:5678` -> `::1`).

    HTTP's `request.remote` is already a bare host, so both protocols share one failed-key bucket per host.
    """
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(address).rsplit(":", 1)[0]
    return host.strip("[]")
