"""Concurrent picks: no review handed out twice for one increment, no lost update.

For every review, the selection counts returned to callers must be exactly
1, 2, ..., final count (a repeat means two callers got the same pick; a gap
means an increment was lost or never returned), and the stored count must
equal the number of successful picks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import threading

from pitchkeras.errors import Unavailable
from pitchkeras.store import Review, review_id
from pitchkeras.store.sqlite import SQLiteStore
from tests.store_fixtures import firestore_emulator, firestore_store, sqlite_store  # noqa: F401


def _pool(store, size: int) -> list[Review]:
    reviews = [
        Review(id=review_id("run-conc", {"score": 5.0, "genre": "Rock"}, 0, i), text=f"Review {i}.", score=5.0, genre="Rock")
        for i in range(size)
    ]
    assert store.add_reviews(reviews) == size
    return reviews


def _hammer(store, threads: int, calls: int) -> tuple[list[tuple[str, int]], int]:
    """`threads` threads x `calls` get_review each, started together; (picks, failures)."""
    picks: list[tuple[str, int]] = []
    failures = []
    barrier = threading.Barrier(threads)
    lock = threading.Lock()

    def work():
        barrier.wait()
        for _ in range(calls):
            try:
                review = store.get_review(genre="rock", score=5.0)
            except Unavailable as exc:  # contention beyond the retry budget
                with lock:
                    failures.append(exc)
                continue
            with lock:
                picks.append((review.id, review.selection_count))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return picks, len(failures)


def _assert_no_duplicate_and_no_lost_update(store, reviews, picks):
    returned = collections.defaultdict(list)
    for rid, count in picks:
        returned[rid].append(count)
    for review in reviews:
        final = store.get_by_id(review.id).selection_count
        assert sorted(returned[review.id]) == list(range(1, final + 1)), review.id
    assert sum(store.get_by_id(r.id).selection_count for r in reviews) == len(picks)


def test_sqlite_64_threads_hand_out_every_review_exactly_4_times(sqlite_store):
    reviews = _pool(sqlite_store, 64)
    picks, failures = _hammer(sqlite_store, threads=64, calls=4)
    assert failures == 0
    assert collections.Counter(rid for rid, _ in picks) == {r.id: 4 for r in reviews}
    _assert_no_duplicate_and_no_lost_update(sqlite_store, reviews, picks)


def _process_worker(path: str, threads: int, calls: int) -> list[tuple[str, int]]:
    store = SQLiteStore(path)
    try:
        picks, failures = _hammer(store, threads, calls)
        assert failures == 0
        return picks
    finally:
        store.close()


def test_sqlite_two_processes_share_one_file(tmp_path):
    path = str(tmp_path / "shared.db")
    with SQLiteStore(path) as store:
        reviews = _pool(store, 32)
    # spawn: a fresh interpreter per process, like two independent servers.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = list(pool.map(_process_worker, [path, path], [4, 4], [8, 8]))
    picks = [p for result in results for p in result]
    assert len(picks) == 2 * 4 * 8
    # 64 strictly least-shown picks over 32 equal reviews: each exactly twice.
    assert collections.Counter(rid for rid, _ in picks) == {r.id: 2 for r in reviews}
    with SQLiteStore(path) as store:
        _assert_no_duplicate_and_no_lost_update(store, reviews, picks)


def test_firestore_concurrent_picks_lose_no_update(firestore_store):
    reviews = _pool(firestore_store, 16)
    picks, failures = _hammer(firestore_store, threads=16, calls=4)
    assert len(picks) + failures == 64
    assert len(picks) >= 32, f"only {len(picks)} of 64 picks succeeded"
    _assert_no_duplicate_and_no_lost_update(firestore_store, reviews, picks)
    # Every successful pick took a least-shown review, so counts never drift apart by more than one.
    counts = [firestore_store.get_by_id(r.id).selection_count for r in reviews]
    assert max(counts) - min(counts) <= 1
