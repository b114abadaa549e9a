"""API keys for Generate, with a per-key token-bucket rate limit.

Keys come from a file, one per line (blank lines and `#` comments ignored).
Clients send theirs as `x-api-key` metadata (or `authorization: Bearer KEY`).
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from pitchkeras.errors import UsageError

API_KEY_HEADER = "x-api-key"


class AuthError(Exception):
    """Raised by `ApiKeys.check`; `code_name` is the gRPC status to answer with."""

    def __init__(self, code_name: str, message: str):
        super().__init__(message)
        self.code_name = code_name


@dataclasses.dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per call."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float) -> float:
        """Take a token; return 0.0 on success, else the seconds until one is available."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
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
        self._buckets = {k: TokenBucket(rate=float(rate), burst=float(burst)) for k in keys}
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

    def _match(self, presented: str) -> Optional[str]:
        candidate = presented.encode("utf-8")
        found = None
        for key in self._keys:  # compare against every key: timing says nothing about which matched
            if hmac.compare_digest(key, candidate):
                found = key.decode("utf-8")
        return found

    def check(self, metadata) -> str:
        """The caller's key if it may call now.

        Raises:
            AuthError: UNAUTHENTICATED (no key), PERMISSION_DENIED (unknown key)
                or RESOURCE_EXHAUSTED (over the key's rate limit).
        """
        presented = None
        for name, value in metadata or ():
            if name == API_KEY_HEADER:
                presented = value
            elif name == "authorization" and str(value).lower().startswith("bearer "):
                presented = value[len("bearer "):]
        if not presented:
            raise AuthError("UNAUTHENTICATED", f"Generate needs an API key: send it as `{API_KEY_HEADER}` metadata")
        key = self._match(str(presented).strip())
        if key is None:
            raise AuthError("PERMISSION_DENIED", "this API key is not accepted by the server")
        wait = self._buckets[key].take(self._clock())
        if wait > 0:
            raise AuthError("RESOURCE_EXHAUSTED", f"rate limit for this API key exceeded; retry in {wait:.1f} s")
        return key
