"""Store helpers shared by test modules (the store fixtures themselves are in tests/conftest.py).

`firestore_emulator` (conftest) is the `host:port` of Google's Cloud Firestore
emulator for the whole session: FIRESTORE_EMULATOR_HOST when already set,
else one started on a free port in its own process group and stopped at the
end. Without the emulator installed, Firestore tests skip naming the Debian
package; under CI=true that is a failure. Each test uses its own collection
(`PROJECT`). `store` runs a test once per backend.
"""

from __future__ import annotations

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = "pitchkeras-test"
SEED_FIELDS = {"text", "score", "genre", "length", "added", "selection_count"}


def write_like_the_seed(store, rows) -> list[str]:
    """Write (score, genre, text) rows exactly as the seed's script did: auto ids, its six fields, one batch."""
    from google.cloud import firestore

    collection = store._client.collection(store.collection_name)
    batch = store._client.batch()
    ids = []
    for score, genre, text in rows:
        ref = collection.document()  # a Firestore auto id: 20 characters
        batch.set(ref, {"text": text, "score": score, "genre": genre, "length": len(text),
                        "added": firestore.SERVER_TIMESTAMP, "selection_count": 0})
        ids.append(ref.id)
    batch.commit()
    return ids
