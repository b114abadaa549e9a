"""Data and helpers shared by the server, client and Node client tests.

The fixtures built on them (`pool_uri`, `hostile_uri`, `tiny_model_dir`,
`tiny_generator`) are in tests/conftest.py: ask for them as arguments.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from pitchkeras.conditioning import REVIEWS
from pitchkeras.errors import Unavailable
from pitchkeras.store import Review, review_id
from pitchkeras.server import BackgroundServer, ServerConfig
from pitchkeras.store.sqlite import SQLiteStore

GENRES = ("Rock", "Jazz", "Rap")
SCORES = (3.0, 8.0)
PER_PAIR = 2
# Small caps so tests can step over them; length 8 and batches of at most 4 so every Generate
# test in the session shares a few compiled shapes.
SERVER_CONFIG = ServerConfig(max_batch_size=4, default_max_length=8, max_length_cap=16, num_samples_cap=4,
                             prompt_chars_cap=40, grace_s=5.0, warmup=False)



@contextlib.contextmanager
def ready_server(directory, generator, config: ServerConfig = SERVER_CONFIG, **options):
    """A `BackgroundServer` running `generator` on a fresh SQLite store in `directory`, yielded once it reports
    ready (warm-up done); `options` go to `BackgroundServer` (http_port, api_keys, ...)."""
    with BackgroundServer(f"sqlite:///{directory}/reviews.db", generator=generator, config=config,
                          **options) as background:
        assert background.wait_until_ready(120) == "ready"
        yield background


def wait_for(predicate, limit_s: float = 60.0) -> bool:
    """Poll `predicate` until it is true; False past `limit_s` (a guard against hanging, never a timed assertion)."""
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True

def pool_reviews(per_pair: int = PER_PAIR) -> list[Review]:
    """Reviews for every (score, genre) pair, ids as populate makes them."""
    return [
        Review(id=review_id("pool-v1", {"score": s, "genre": g}, 0, i),
               text=f"A {g} record at {s}. Take {i}.", score=s, genre=g, model_version="pool-v1",
               temperature=0.7, top_k=0, top_p=0.95, seed=i, prompt=REVIEWS.prompt({"score": s, "genre": g}))
        for s in SCORES for g in GENRES for i in range(per_pair)
    ]


# Markup in every stored field a page shows: the pages must show it as text, never run or render it.
HOSTILE_GENRE = "<i>Rock</i>"
HOSTILE = Review(id=review_id("evil-v1", {"score": 5.0, "genre": HOSTILE_GENRE}, 0, 0),
                 text='<script>document.title="owned"</script><img src=x onerror="document.title=\'owned\'"> '
                      '<b>bold</b> & more', score=5.0, genre=HOSTILE_GENRE, model_version="evil-v1")


class FlakyStore(SQLiteStore):
    """An SQLite store whose next `fail_next` calls of one method raise Unavailable; counts calls."""

    def __init__(self, path, *, method: str, fail_next: int = 1, delay_s: float = 0.0):
        super().__init__(path)
        self.method, self.fail_next, self.delay_s = method, fail_next, delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def _maybe_fail(self):
        with self._lock:
            self.calls += 1
            fail = self.fail_next > 0
            self.fail_next -= 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if fail:
            raise Unavailable(f"{self.uri}: injected outage")

    def wait_for_calls(self, count: int, timeout: float = 20.0) -> int:
        """Poll until `count` calls have entered the store (or `timeout` s passed); the calls so far."""
        deadline = time.monotonic() + timeout
        while self.calls < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.calls

    def get_by_id(self, review_id):
        if self.method == "get_by_id":
            self._maybe_fail()
        return super().get_by_id(review_id)

    def get_review(self, **kwargs):
        if self.method == "get_review":
            self._maybe_fail()
        return super().get_review(**kwargs)


TRAIN_TEXTS = [
    REVIEWS.example({"score": s, "genre": g}, body)
    for s in SCORES for g in GENRES
    for body in ("The band plays loud. The singer is good.", "A quiet record. It is good music.")
] * 20


def self_signed_cert(directory, host: str = "localhost") -> tuple:
    """A fresh self-signed certificate for `host` (and 127.0.0.1): `(cert_path, key_path)` as PEM files."""
    pytest.importorskip("cryptography", reason="cryptography (a google-auth dependency) makes the test certificate")
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # fast to make, unlike a 2048-bit RSA key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
