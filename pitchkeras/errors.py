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
