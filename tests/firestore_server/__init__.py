"""A small server speaking the real `google.firestore.v1` gRPC protocol, for tests.

The official Firestore emulator downloads itself at first use, which these
machines cannot do. This package serves the same protocol from memory, so
the unchanged google-cloud-firestore client runs against it through
FIRESTORE_EMULATOR_HOST. Run it as its own process:

    python -m tests.firestore_server --port 0    # prints 127.0.0.1:PORT

or in-process:

    server = FirestoreServer().start()
    os.environ["FIRESTORE_EMULATOR_HOST"] = server.address
"""

from tests.firestore_server.servicer import FirestoreServer, FirestoreServicer

__all__ = ["FirestoreServer", "FirestoreServicer"]
