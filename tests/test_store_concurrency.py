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
import random
import threading

from pitchkeras.errors import Unavailable
from pitchkeras.store import Review, review_id
from pitchkeras.store.sqlite import SQLiteStore


def _pool(store, size: int) -> list[Review]:
    reviews = [
        Review(id=review_id("run-conc", {"score": 5.0, "genre": "Rock"}, 0, i), text=f"Review {i}.",
               score=5.0, genre="Rock")
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


def _sqlite_process_worker(path: str, threads: int, calls: int) -> list[tuple[str, int]]:
    store = SQLiteStore(path)
    try:
        picks, failures = _hammer(store, threads, calls)
        assert failures == 0
        return picks
    finally:
        store.close()


def test_sqlite_several_processes_share_one_file(tmp_path):
    path = str(tmp_path / "shared.db")
    with SQLiteStore(path) as store:
        reviews = _pool(store, 48)
    # spawn: a fresh interpreter per process, like independent servers on one file.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        results = list(pool.map(_sqlite_process_worker, [path] * 3, [4] * 3, [8] * 3))
    picks = [p for result in results for p in result]
    assert len(picks) == 3 * 4 * 8
    # 96 strictly least-shown picks over 48 equal reviews: each exactly twice.
    assert collections.Counter(rid for rid, _ in picks) == {r.id: 2 for r in reviews}
    with SQLiteStore(path) as store:
        _assert_no_duplicate_and_no_lost_update(store, reviews, picks)


def test_firestore_64_threads_hand_out_every_review_exactly_4_times(firestore_store):
    reviews = _pool(firestore_store, 64)
    picks, failures = _hammer(firestore_store, threads=64, calls=4)
    assert failures == 0
    # Every claim takes a review at the lowest count its pick saw, and counts only grow, so 256 picks
    # over 64 equal reviews take each exactly 4 times (spread 0).
    assert collections.Counter(rid for rid, _ in picks) == {r.id: 4 for r in reviews}
    _assert_no_duplicate_and_no_lost_update(firestore_store, reviews, picks)


def test_firestore_16_threads_over_a_pair_of_3_reviews(firestore_store):
    reviews = _pool(firestore_store, 3)
    picks, failures = _hammer(firestore_store, threads=16, calls=8)
    assert failures == 0 and len(picks) == 128
    handed_out = collections.Counter(rid for rid, _ in picks)
    assert sorted(handed_out.values()) == [42, 43, 43]  # spread 1: 128 picks do not divide by 3
    _assert_no_duplicate_and_no_lost_update(firestore_store, reviews, picks)
    assert firestore_store.pick_stats()["picks"] == 128


def _firestore_process_worker(address: str, collection: str, threads: int, calls: int) -> list[tuple[str, int]]:
    import os

    from pitchkeras.store.firestore import FirestoreStore

    os.environ["FIRESTORE_EMULATOR_HOST"] = address
    with FirestoreStore("pitchkeras-test", collection, timeout=30.0) as store:
        picks, failures = _hammer(store, threads, calls)
    assert failures == 0
    return picks


def test_firestore_several_processes_lose_no_update(firestore_store, firestore_emulator):
    reviews = _pool(firestore_store, 24)
    context = multiprocessing.get_context("spawn")
    args = ([firestore_emulator] * 3, [firestore_store.collection_name] * 3, [4] * 3, [4] * 3)
    with concurrent.futures.ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        results = list(pool.map(_firestore_process_worker, *args))
    picks = [p for result in results for p in result]
    assert len(picks) == 48
    assert collections.Counter(rid for rid, _ in picks) == {r.id: 2 for r in reviews}
    _assert_no_duplicate_and_no_lost_update(firestore_store, reviews, picks)


def _rival_claims_first(store, monkeypatch):
    """Make another store's pick claim, for real, between our read and our first claim; its picks."""
    from pitchkeras.store.firestore import FirestoreStore

    rival = FirestoreStore("pitchkeras-test", store.collection_name, timeout=20.0, candidates=1)
    rival_picks = []
    ours = store._claim

    def claim_after_rival(snapshot, deadline):
        if not rival_picks:
            rival_picks.append(rival.get_review())
        return ours(snapshot, deadline)

    monkeypatch.setattr(store, "_claim", claim_after_rival)
    return rival, rival_picks


def test_firestore_pick_that_loses_the_race_takes_another_unshown_review(firestore_store, monkeypatch):
    reviews = _pool(firestore_store, 2)
    firestore_store.candidates = 2
    firestore_store._random = random.Random(1)
    rival, rival_picks = _rival_claims_first(firestore_store, monkeypatch)
    with rival:
        # Whichever of the two we try first, the rival may have just claimed it: the server refuses
        # our claim (the version we read is gone) at most once, and we take the other unshown one.
        ours = firestore_store.get_review(genre="Rock")
    (theirs,) = rival_picks
    assert {ours.id, theirs.id} == {r.id for r in reviews}  # not the same review twice
    assert ours.selection_count == theirs.selection_count == 1
    assert [firestore_store.get_by_id(r.id).selection_count for r in reviews] == [1, 1]


def test_firestore_lost_race_reads_again_rather_than_take_a_shown_review(firestore_store, monkeypatch):
    """One candidate per read: the rival takes it, so ours must read again and take the other unshown one."""
    reviews = _pool(firestore_store, 2)
    firestore_store.candidates = 1
    rival, rival_picks = _rival_claims_first(firestore_store, monkeypatch)
    with rival:
        ours = firestore_store.get_review(score=5.0)
    (theirs,) = rival_picks
    assert {ours.id, theirs.id} == {r.id for r in reviews}
    assert ours.selection_count == theirs.selection_count == 1
    stats = firestore_store.pick_stats()
    assert stats["picks"] == 1 and stats["lost_races"] == 1  # the rival really won the first claim
