"""The library's own errors.

Every layer raises these, never a driver's or a framework's exception, so the
CLI can print one line and exit 2 and the gRPC server can map each to its
canonical status code (see `pitchkeras.server`).
"""


class PitchkerasError(Exception):
    """Base class for every error pitchkeras raises on purpose."""


class InvalidArgument(PitchkerasError, ValueError):
    """The caller passed a value that is not allowed (gRPC INVALID_ARGUMENT)."""


class NotFound(PitchkerasError, LookupError):
    """Nothing matches what was asked for (gRPC NOT_FOUND)."""


class Unavailable(PitchkerasError):
    """A backend (store, model) cannot be reached right now (gRPC UNAVAILABLE)."""


class FailedPrecondition(PitchkerasError):
    """The system is not in a state to do this (gRPC FAILED_PRECONDITION)."""


class UsageError(PitchkerasError):
    """Bad command-line input: printed as one line, exit code 2."""


#: Longest echo of a caller's value in a message (`echo`).
ECHO_CHARS = 80
#: Longest message an answer carries: far below gRPC's 8 KiB metadata limit, whatever it quotes.
MESSAGE_CHARS = 1000


def clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    """`text` cut to at most `limit` characters, ending in `...` when cut: the one truncation rule of messages.

    Args:
        text: str. The text to cut.
        limit: int. Most characters of the result (at least 3).
    """
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def echo(value, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` clipped to `limit` characters: how every message quotes what the caller sent.

    Args:
        value: any. The value to quote.
        limit: int. Most characters of the result.
    """
    return clip(repr(value), limit)


class ResourceExhausted(PitchkerasError):
    """Too much work is queued right now; retry after `retry_after_s` (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)


class DeadlineExceeded(PitchkerasError):
    """The caller's deadline passed before the work finished (gRPC DEADLINE_EXCEEDED)."""


class Cancelled(PitchkerasError):
    """The work was cancelled before it finished (gRPC CANCELLED)."""
