"""Load and faults on Google's Firestore emulator: two `pitchkeras serve` processes on one collection under
steady GetReview load while the emulator is frozen for a few seconds, then resumed; and while it is killed and
started again on the same port.

The emulator keeps its data in memory only: a restarted emulator is empty
(its `--export-on-exit` did not write an export when its process group was
stopped with SIGTERM here), so stopping and restarting it would lose the
counts this test checks. The outage is therefore a freeze of the emulator's
whole process group (SIGSTOP, then SIGCONT): its port stays open and calls
hang rather than being refused, the harder case for deadlines, and its data
survives, so the counts can be checked exactly.

Invariants of the freeze: during the outage every call ends by its deadline, as OK or
UNAVAILABLE (the servers' store timeout is shorter than the client's
deadline); both servers answer OK again by themselves soon after; and every
review's `selection_count` is at least the picks of it answered OK (none
lost), the excess over all reviews being at most the calls that did not end
OK (an increment applied while its answer was lost: the documented
transport-retry case in BUILD_NOTES.md).

The restart test kills the emulator's process group, starts a new emulator
on the same port after a few seconds and re-seeds it with the same reviews
(count 0), so its counts are checked from the re-seed on: every review's
count is at least the OK picks started after the re-seed, and the excess is
at most the calls that overlap the re-seed's write (they may pick in the new
data) plus the later calls that did not end OK. Calls while it is down answer
UNAVAILABLE within the store timeout; between the restart and the re-seed an
empty collection may answer NOT_FOUND.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from pitchkeras.store.firestore import FirestoreStore
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import pool_reviews

PROJECT = "pitchkeras-outage"
STORE_TIMEOUT_S = 1.0  # the servers' Firestore deadline (every store call, retries included)
DEADLINE_S = 3.0  # the clients' deadline
CLIENTS = 6
BEFORE_S, OUTAGE_S, AFTER_S = 1.0, 3.0, 4.0
RECOVERY_S = STORE_TIMEOUT_S + 2.0  # from this long after the resume each server answers OK again (_assert_recovered)
FREEZE_SETTLE_S = 0.1  # after the SIGSTOP has taken effect: answers already written are read meanwhile

pytestmark = pytest.mark.slow


@pytest.fixture
def emulator(firestore_emulator_process):
    """The session's emulator (tests/conftest.py): frozen or restarted here, which no other test notices, as
    every test uses a collection of its own and none runs meanwhile."""
    return firestore_emulator_process


def _serve_two(store_uri: str, env: dict, tmp_path) -> list[tuple[subprocess.Popen, int]]:
    """Two `pitchkeras serve` processes on `store_uri`, started side by side: [(process, port)]."""
    started = []
    for i in range(2):
        with open(tmp_path / f"serve{i}.log", "w") as log:
            started.append((subprocess.Popen(
                [sys.executable, "-m", "pitchkeras.cli", "serve", "--store", store_uri, "--port", "0", "--grace", "1",
                 "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=log, text=True, env=env), log.name))
    servers = []
    for process, log_path in started:
        line = process.stdout.readline().strip()
        if not line.startswith("serving on "):
            for other, _ in started:
                other.kill()
            raise AssertionError(f"serve did not start: {line!r}; see {log_path}")
        servers.append((process, int(line.rsplit(":", 1)[1])))
    return servers


class Load:
    """`CLIENTS` threads calling GetReview in turn on each server until stopped; every call recorded."""

    def __init__(self, ports: list[int]):
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        self.calls: list[tuple[int, float, float, grpc.StatusCode, str]] = []  # server, start, end, code, id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, index: int) -> None:
        stubs = [pb_grpc.ReviewServiceStub(c) for c in self.channels]
        turn = index
        while not self._stop.is_set():
            server = turn % len(stubs)
            turn += 1
            started = time.monotonic()
            try:
                review_id = stubs[server].GetReview(pb.GetReviewRequest(), timeout=DEADLINE_S).review.id
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                review_id, code = "", err.code()
            with self._lock:
                self.calls.append((server, started, time.monotonic(), code, review_id))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_S + 5)
        for channel in self.channels:
            channel.close()


def test_two_servers_ride_out_an_emulator_outage_without_losing_a_pick(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)  # the servers and the seeder use this one
    collection = f"outage-{uuid.uuid4().hex[:8]}"
    reviews = pool_reviews()
    processes = []
    with FirestoreStore(PROJECT, collection, timeout=20.0, seed=0) as seeder:
        seeder.add_reviews(reviews)
        uri = f"firestore://{PROJECT}/{collection}?timeout={STORE_TIMEOUT_S:g}"
        try:
            servers = _serve_two(uri, dict(os.environ), tmp_path)
            processes = [process for process, _ in servers]
            with Load([port for _, port in servers]) as load:
                time.sleep(BEFORE_S)
                # The outage counts from the moment every process of the group is stopped, plus the settle time
                # for an answer the emulator had already written (a call started a few ms before the stop took
                # effect can still end OK: seen once under load, a 17 ms OK).
                emulator.freeze()
                frozen_at = time.monotonic() + FREEZE_SETTLE_S
                try:
                    time.sleep(OUTAGE_S)
                finally:  # the session's emulator: never left frozen
                    emulator.resume()
                resumed_at = time.monotonic()
                time.sleep(AFTER_S)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(30)
                process.stdout.close()
        counts = {r.id: seeder.get_by_id(r.id).selection_count for r in reviews}
    _check(load.calls, counts, frozen_at, resumed_at)


def _assert_recovered(calls, since: float) -> None:
    """Each server, on the calls started from `since` on, answers OK again: its last call OK and most of them.

    Not every one: on a loaded machine a single store call can still outlast the servers' 1 s store deadline and
    answer UNAVAILABLE as documented (seen once: 1 of 18 such calls, after a re-seed that itself took 2.6 s). A
    server that did not recover fails most of its calls, or its last.
    """
    for server in (0, 1):
        codes = [code for s, start, _, code, _ in sorted(calls, key=lambda c: c[1]) if s == server and start >= since]
        ok = codes.count(grpc.StatusCode.OK)
        assert codes and codes[-1] == grpc.StatusCode.OK and 2 * ok > len(codes), (server, collections.Counter(codes))


def _check(calls, counts: dict, frozen_at: float, resumed_at: float) -> None:
    codes = collections.Counter(code.name for *_, code, _ in calls)
    durations = [end - start for _, start, end, _, _ in calls]
    # No call hangs past its deadline, and every answer is OK or UNAVAILABLE (the store's, not the client's timeout).
    assert max(durations) <= DEADLINE_S + 0.5, max(durations)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    during = [(end - start, code) for _, start, end, code, _ in calls
              if frozen_at <= start < resumed_at - STORE_TIMEOUT_S]
    assert during and all(code == grpc.StatusCode.UNAVAILABLE for _, code in during), during
    assert max(seconds for seconds, _ in during) <= STORE_TIMEOUT_S + 1.5
    # Both servers recover by themselves.
    recovered = {}
    for server, start, _, code, _ in sorted(calls, key=lambda c: c[1]):
        if start >= resumed_at and code == grpc.StatusCode.OK:
            recovered.setdefault(server, start - resumed_at)
    assert set(recovered) == {0, 1}, (recovered, collections.Counter(
        (server, code.name) for server, start, _, code, _ in calls if start >= resumed_at))
    _assert_recovered(calls, resumed_at + RECOVERY_S)
    # No pick lost; excess only from calls that did not end OK.
    ok_picks = collections.Counter(review_id for *_, code, review_id in calls if code == grpc.StatusCode.OK)
    for review_id, count in counts.items():
        assert count >= ok_picks[review_id], (review_id, count, ok_picks[review_id])
    excess = sum(counts.values()) - sum(ok_picks.values())
    failed = sum(1 for *_, code, _ in calls if code != grpc.StatusCode.OK)
    assert 0 <= excess <= failed, (excess, failed)
    print(f"\n{len(calls)} calls ({dict(codes)}); during the outage {len(during)} calls, slowest "
          f"{max(s for s, _ in during):.2f} s; recovered after {max(recovered.values()):.2f} s "
          f"(per server {[round(recovered[s], 2) for s in sorted(recovered)]}); over-count {excess} of {failed} "
          f"failed calls; slowest call overall {max(durations):.2f} s")


def test_two_servers_reconnect_to_a_restarted_emulator(emulator, tmp_path, monkeypatch):
    """A restart loses the emulator's data, so the test re-seeds it; the counts are checked from the re-seed on."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)
    collection = f"restart-{uuid.uuid4().hex[:8]}"
    reviews = pool_reviews()
    with FirestoreStore(PROJECT, collection, timeout=20.0, seed=0) as seeder:
        seeder.add_reviews(reviews)
    uri = f"firestore://{PROJECT}/{collection}?timeout={STORE_TIMEOUT_S:g}"
    processes = []
    try:
        servers = _serve_two(uri, dict(os.environ), tmp_path)
        processes = [process for process, _ in servers]
        with Load([port for _, port in servers]) as load:
            time.sleep(BEFORE_S)
            stopped_at = time.monotonic()
            emulator.stop()
            time.sleep(OUTAGE_S)
            emulator.start()  # a new emulator process on the same port: empty
            with FirestoreStore(PROJECT, collection, timeout=20.0, seed=0) as seeder:
                seeding = (time.monotonic(), None)
                seeder.add_reviews(reviews)
                seeding = (seeding[0], time.monotonic())
            time.sleep(AFTER_S)
        with FirestoreStore(PROJECT, collection, timeout=20.0, seed=0) as reader:
            counts = {r.id: reader.get_by_id(r.id).selection_count for r in reviews}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
            process.stdout.close()
        if emulator._proc is None:
            emulator.start()  # the session's emulator runs again for the tests after this one
    _check_restart(load.calls, counts, stopped_at, seeding)


def _check_restart(calls, counts: dict, stopped_at: float, seeding: tuple[float, float]) -> None:
    seed_started, seeded_at = seeding
    codes = collections.Counter(code.name for *_, code, _ in calls)
    assert max(end - start for _, start, end, _, _ in calls) <= DEADLINE_S + 0.5
    # While it is down: UNAVAILABLE; once it is back but empty (not yet re-seeded): NOT_FOUND.
    assert set(codes) <= {"OK", "UNAVAILABLE", "NOT_FOUND"}, codes
    assert all(stopped_at - DEADLINE_S <= start <= seeded_at for _, start, _, code, _ in calls
               if code == grpc.StatusCode.NOT_FOUND)
    down = [end - start for _, start, end, code, _ in calls if code == grpc.StatusCode.UNAVAILABLE]
    assert down and max(down) <= STORE_TIMEOUT_S + 1.5, max(down, default=0)
    recovered = {}
    for server, start, _, code, _ in sorted(calls, key=lambda c: c[1]):
        if start >= seeded_at and code == grpc.StatusCode.OK:
            recovered.setdefault(server, start - seeded_at)
    assert set(recovered) == {0, 1}, recovered
    _assert_recovered(calls, seeded_at + RECOVERY_S)
    # From the re-seed on: no pick lost; excess only from calls that overlapped the re-seed or did not end OK.
    after = collections.Counter(review_id for _, start, _, code, review_id in calls
                                if start >= seeded_at and code == grpc.StatusCode.OK)
    for review_id, count in counts.items():
        assert count >= after[review_id], (review_id, count, after[review_id])
    overlapping = sum(1 for _, start, end, _, _ in calls if start < seeded_at and end > seed_started)
    failed_after = sum(1 for _, start, _, code, _ in calls if start >= seeded_at and code != grpc.StatusCode.OK)
    excess = sum(counts.values()) - sum(after.values())
    assert 0 <= excess <= overlapping + failed_after, (excess, overlapping, failed_after)
    back = min(start for _, start, _, code, _ in calls if start > stopped_at and code == grpc.StatusCode.OK)
    print(f"\n{len(calls)} calls ({dict(codes)}); UNAVAILABLE answered in at most {max(down):.2f} s; first OK "
          f"{back - stopped_at:.1f} s after the stop, {back - seeded_at:+.2f} s from the re-seed; "
          f"recovered {max(recovered.values()):.2f} s after the re-seed (per server "
          f"{[round(recovered[s], 2) for s in sorted(recovered)]}); {excess} increments beyond the OK picks "
          f"started after the re-seed (bound: {overlapping} calls overlapping the re-seed + {failed_after} failed)")
