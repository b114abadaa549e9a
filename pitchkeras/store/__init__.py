"""Review stores: `open_store(uri)` picks the backend by URI scheme.

    sqlite:///path/reviews.db          embedded default (relative path)
    sqlite:////abs/path/reviews.db     absolute path
    firestore://PROJECT[/COLLECTION]   Cloud Firestore (collection default `reviews`);
                                       FIRESTORE_EMULATOR_HOST is honoured when set

Modules: `base` (the `ReviewStore` contract, `Review`, ids), `sqlite` (`SQLiteStore`), `firestore`
(`FirestoreStore`). Backends import lazily (start-up time: Firestore's client libraries), so
`pitchkeras.store` is cheap to import.
"""

from __future__ import annotations

from typing import Optional

from pitchkeras.errors import InvalidArgument
from pitchkeras.store.base import (
    ConditionCount,
    Review,
    ReviewStore,
    review_id,
    validate_review_id,
    validate_score,
)

DEFAULT_STORE_URI = "sqlite:///pitchkeras.db"
SCHEMES = ("sqlite", "firestore")

__all__ = [
    "ConditionCount",
    "DEFAULT_STORE_URI",
    "Review",
    "ReviewStore",
    "open_store",
    "review_id",
    "validate_review_id",
    "validate_score",
]


def open_store(uri: Optional[str] = None) -> ReviewStore:
    """Open the store named by `uri` (default `sqlite:///pitchkeras.db`).

    Raises:
        InvalidArgument: the URI is malformed or its scheme is not one of `SCHEMES`.
    """
    uri = uri or DEFAULT_STORE_URI
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidArgument(
            f"store URI {uri!r} has no scheme; use sqlite:///path.db or firestore://PROJECT/COLLECTION"
        )
    if scheme == "sqlite":
        from pitchkeras.store.sqlite import SQLiteStore

        return SQLiteStore.from_uri(uri)
    if scheme == "firestore":
        from pitchkeras.store.firestore import FirestoreStore

        return FirestoreStore.from_uri(uri)
    raise InvalidArgument(
        f"unknown store scheme {scheme!r} in {uri!r}; allowed: {', '.join(s + '://' for s in SCHEMES)}"
    )
