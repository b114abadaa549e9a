"""Load test: `pitchkeras serve` (gRPC and HTTP/JSON) against the seed's design (HTTP/JSON, read-then-increment).

Both servers run in their own process on a copy of one SQLite store holding
`--reviews` reviews over a (score, genre) grid. `--clients` threads in this
process call each server as fast as they can for `--seconds` (after
`--warmup-seconds` not counted): first GetById (a permalink read), then
GetReview (the least-shown review of a random pair, incremented). Ours is
measured over gRPC and over its seed-compatible HTTP routes (`/review/<id>`,
`/review?score=&genre=`, the same client as the peer's), each with one
process and with `--workers 2` (SO_REUSEPORT).

The peer is the seed's serving design rebuilt on the standard library, so no
Flask is needed: a threaded HTTP/1.1 JSON server (keep-alive) whose pick
reads the least-shown row and then, in a second statement, writes back the
count it read plus one. Besides speed, the table shows what that costs:
`dup` counts picks that handed out a (review, count) some other call had
already received, i.e. two readers got the same review for one increment.
Ours picks in one statement inside a write transaction, so its `dup` must
be 0.

    python benchmarks/serve_load.py                       # 3000 reviews, 16 clients, 5 s per method
    python benchmarks/serve_load.py --clients 64 --seconds 10
    python benchmarks/serve_load.py --store firestore     # both designs on Google's Firestore emulator
    python benchmarks/serve_load.py --store firestore --reviews 20 --pairs 1   # 16 clients on one pair

With `--store firestore` the benchmark starts Google's Cloud Firestore emulator
itself (Debian package google-cloud-cli-firestore-emulator) and writes the
reviews twice: once as pitchkeras writes them, once as the seed's script did
(its six fields only). `pitchkeras serve --store firestore://...` then runs
against the seed's own Firestore design over the same emulator: a query for
the least-shown document, then a separate `Increment(1)` update, without a
transaction, so two readers of one version both get it (`dup`).

Prints one row per (method, server) with calls/s, p50 and p99 latency in ms
and CPU time per call (server processes, and this client process), then the
ratios (pitchkeras / seed) last.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GENRES = ("Rock", "Electronic", "Rap", "Pop/R&B", "Experimental", "Folk/Country", "Metal", "Jazz")  # the seed's
SCORES = tuple(i / 2 for i in range(21))  # 0.0 .. 10.0 in steps of 0.5, populate's default grid


# -- the store both servers read -----------------------------------------------------------------


def make_reviews(count: int, num_pairs: int = 0) -> list:
    """`count` reviews spread over the first `num_pairs` pairs of the grid (0 = all of it)."""
    from pitchkeras.conditioning import REVIEWS
    from pitchkeras.store import Review, review_id

    pairs = [(s, g) for s in SCORES for g in GENRES]
    pairs = pairs[-num_pairs:] if num_pairs else pairs  # from the top scores down: 10.0 Jazz first
    reviews = []
    for i in range(count):
        score, genre = pairs[i % len(pairs)]
        conditions = {"score": score, "genre": genre}
        body = f"Review {i} of a {genre} record. It earns {score:.1f} for reasons given at length. " * 6
        reviews.append(Review(id=review_id("bench-v1", conditions, 0, i), text=body.strip(), score=score,
                              genre=genre, model_version="bench-v1", temperature=0.7, top_k=0, top_p=0.95, seed=i,
                              prompt=REVIEWS.prompt(conditions)))
    return reviews


def make_store(path: Path, count: int, num_pairs: int = 0) -> list[tuple[float, str, str]]:
    """Write `count` reviews spread over the grid; return (score, genre, id) of each."""
    from pitchkeras.store import open_store

    reviews = make_reviews(count, num_pairs)
    with open_store(f"sqlite:///{path}") as store:
        store.add_reviews(reviews)
    with sqlite3.connect(path) as conn:  # fold the WAL into the file so a plain copy is complete
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return [(r.score, r.genre, r.id) for r in reviews]


# -- the peer: the seed's design ------------------------------------------------------------------

_SEED_PICK = ("SELECT * FROM reviews WHERE genre = ? COLLATE NOCASE AND score = ? "
              "ORDER BY selection_count, added, id LIMIT 1")


class SeedHandler(http.server.BaseHTTPRequestHandler):
    """GET /review?score=S&genre=G (pick) and GET /review/ID (permalink), answered as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive, as any production HTTP server
    # Headers and body go out in two writes; with Nagle on, each response would wait ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    local = threading.local()
    path_db = ""

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path_db, timeout=30, isolation_level=None)  # autocommit per statement
            conn.row_factory = sqlite3.Row
            self.local.conn = conn
        return conn

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        conn = self._conn()
        if url.path.startswith("/review/"):
            row = conn.execute("SELECT * FROM reviews WHERE id = ?", (url.path[len("/review/"):],)).fetchone()
        else:
            query = urllib.parse.parse_qs(url.query)
            row = conn.execute(_SEED_PICK, (query["genre"][0], float(query["score"][0]))).fetchone()
            if row is not None:
                # The seed's read-then-increment: a second, separate write of the count it read plus one.
                conn.execute("UPDATE reviews SET selection_count = ? WHERE id = ?",
                             (row["selection_count"] + 1, row["id"]))
                row = dict(row, selection_count=row["selection_count"] + 1)
        self.answer(dict(row) if row is not None else None)

    def answer(self, row) -> None:
        """The row as JSON (200), or a JSON 404 when there is none."""
        body = json.dumps(row if row is not None else {"error": "not found"}).encode()
        self.send_response(200 if row is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet, like `pitchkeras serve --log-level WARNING` below
        pass


class SeedFirestoreHandler(SeedHandler):
    """The seed's Firestore design: query the least-shown document, then `Increment(1)` it, no transaction."""

    collection = None  # a google.cloud.firestore CollectionReference, set by run_seed_server

    def do_GET(self):  # noqa: N802 - http.server's name
        from google.cloud import firestore
        from google.cloud.firestore_v1 import FieldFilter

        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/review/"):
            snapshot = self.collection.document(url.path[len("/review/"):]).get()
            row = dict(snapshot.to_dict(), id=snapshot.id) if snapshot.exists else None
        else:
            query = urllib.parse.parse_qs(url.query)
            found = (self.collection.where(filter=FieldFilter("genre", "==", query["genre"][0]))
                     .where(filter=FieldFilter("score", "==", float(query["score"][0])))
                     .order_by("selection_count").limit(1).get())
            row = None
            if found:
                snapshot = found[0]
                snapshot.reference.update({"selection_count": firestore.Increment(1)})
                row = dict(snapshot.to_dict(), id=snapshot.id, selection_count=snapshot.get("selection_count") + 1)
        if row is not None:
            row["added"] = str(row.get("added"))
        self.answer(row)


def warm_up_emulator(seconds: float) -> int:
    """Exercise a fresh emulator (a cold JVM runs its first queries several times slower) on a scratch
    collection, so neither server measured later pays for its warm-up; the number of calls made."""
    from pitchkeras.store import open_store

    reviews = make_reviews(64, 1)
    calls = [0]
    with open_store("firestore://serve-load/warm-up") as store:
        store.add_reviews(reviews)
        stop_at = time.monotonic() + seconds

        def work():
            while time.monotonic() < stop_at:
                store.get_review(score=reviews[0].score, genre=reviews[0].genre)
                store.get_by_id(reviews[calls[0] % len(reviews)].id)
                calls[0] += 2

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return calls[0]


def write_seed_collection(project: str, collection: str, reviews) -> None:
    """The reviews as the seed's script wrote them: its six fields only (ids kept, so permalinks match)."""
    from google.cloud import firestore

    client = firestore.Client(project=project)
    for start in range(0, len(reviews), 500):
        batch = client.batch()
        for r in reviews[start:start + 500]:
            batch.set(client.collection(collection).document(r.id), {
                "text": r.text, "score": r.score, "genre": r.genre, "length": len(r.text),
                "added": firestore.SERVER_TIMESTAMP, "selection_count": 0})
        batch.commit()
    client.close()


def run_seed_server(db: str) -> None:
    handler = SeedHandler
    if db.startswith("firestore://"):
        from google.cloud import firestore

        project, collection = db[len("firestore://"):].split("/", 1)
        handler = SeedFirestoreHandler
        handler.collection = firestore.Client(project=project).collection(collection)
    else:
        SeedHandler.path_db = db
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    print(f"serving on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# -- clients --------------------------------------------------------------------------------------


class GrpcCaller:
    """One client of `pitchkeras serve`: its own channel, like a separate application."""

    def __init__(self, target: str):
        import grpc

        from pitchkeras.v1 import review_service_pb2 as pb
        from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

        # A local subchannel pool: channels in one process would otherwise share one TCP connection
        # (gRPC's global pool), and every call would land on one of the `--workers`.
        self.pb, self.channel = pb, grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.ReviewServiceStub(self.channel)

    def get_by_id(self, review_id: str):
        return self.stub.GetById(self.pb.GetByIdRequest(id=review_id), timeout=30).review.id, None

    def get_review(self, score: float, genre: str):
        review = self.stub.GetReview(self.pb.GetReviewRequest(score=score, genre=genre), timeout=30).review
        return review.id, review.selection_count

    def close(self):
        self.channel.close()


class HttpCaller:
    """One client of the seed server: a keep-alive HTTP/1.1 connection."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def _get(self, path: str) -> dict:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data}")
        return data

    def get_by_id(self, review_id: str):
        return self._get(f"/review/{review_id}")["id"], None

    def get_review(self, score: float, genre: str):
        data = self._get("/review?" + urllib.parse.urlencode({"score": score, "genre": genre}))
        return data["id"], data["selection_count"]

    def close(self):
        self.conn.close()


def load(caller_type, target: str, method: str, keys: list, *, clients: int, seconds: float, warmup: float,
         seed: int) -> dict:
    """`clients` threads call `method` back to back; latencies of calls that start after the warm-up."""
    start_barrier = threading.Barrier(clients + 1)
    results = [None] * clients

    def worker(index: int):
        rng = random.Random(seed * 1000 + index)  # same call sequence for both servers
        caller = caller_type(target)
        latencies, picks, errors, done = [], [], 0, 0
        start_barrier.wait()
        measure_from = time.perf_counter() + warmup
        stop_at = measure_from + seconds
        try:
            while True:
                score, genre, review_id = rng.choice(keys)
                began = time.perf_counter()
                if began >= stop_at:
                    break
                try:
                    got = caller.get_by_id(review_id) if method == "GetById" else caller.get_review(score, genre)
                except Exception:  # noqa: BLE001 - counted and shown, not fatal to a load test
                    errors += 1
                    continue
                done += 1
                if began >= measure_from:
                    latencies.append(time.perf_counter() - began)
                if method == "GetReview":
                    picks.append(got)
        finally:
            caller.close()
        results[index] = (latencies, picks, errors, done)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    for t in threads:
        t.join(warmup + seconds + 60)
    latencies = sorted(x for r in results for x in r[0])
    picks = [p for r in results for p in r[1]]
    duplicates = len(picks) - len(set(picks))
    return {
        "calls": len(latencies),
        "qps": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else float("nan"),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3 if latencies else float("nan"),
        "errors": sum(r[2] for r in results),
        "dup": duplicates if method == "GetReview" else None,
        "all_calls": sum(r[3] for r in results),  # warm-up included, for CPU per call
    }


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# -- processes ------------------------------------------------------------------------------------


def start(argv: list[str], protocol: str) -> tuple[subprocess.Popen, str]:
    """Start a server process; wait for its `serving on HOST:PORT` (and `http on URL`) lines; the target."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = process.stdout.readline()
    if not line.startswith("serving on "):
        process.kill()
        raise SystemExit(f"server did not start: {' '.join(argv)} printed {line!r}")
    if protocol == "http" and "--http-port" in argv:
        line = process.stdout.readline()  # `http on http://HOST:PORT/`
        return process, urllib.parse.urlsplit(line.split()[-1]).netloc
    return process, line.split()[-1]


def server_cpu_s(process: subprocess.Popen) -> float:
    """CPU seconds of a server process and its children (the --workers)."""
    pids = [process.pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    except OSError:
        pass
    return sum(process_cpu_s(pid) for pid in pids)


def simd_level() -> str:
    """The widest x86 vector extension the CPU reports (Linux /proc/cpuinfo)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    return next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))
                 if flag in flags), "none")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=3000, help="reviews in the store")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per method and server")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--workers", type=int, default=2, help="also measure `serve --workers N` (1: skip)")
    parser.add_argument("--no-peer", action="store_true", help="only pitchkeras serve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' call sequences")
    parser.add_argument("--store", choices=("sqlite", "firestore"), default="sqlite",
                        help="backend of both servers; firestore starts Google's emulator")
    parser.add_argument("--emulator-warmup-seconds", type=float, default=10.0,
                        help="with --store firestore: seconds of scratch calls that warm the emulator's JVM first")
    parser.add_argument("--pairs", type=int, default=0,
                        help="spread the reviews over this many (score, genre) pairs only (0 = the whole grid); "
                             "1 puts every client on one pair, the most contended pick")
    parser.add_argument("--seed-server", metavar="DB", help=argparse.SUPPRESS)  # internal: run the peer
    args = parser.parse_args(argv)
    if args.seed_server:
        run_seed_server(args.seed_server)
        return 0
    if args.reviews < 1 or args.clients < 1 or args.workers < 1 or args.seconds <= 0 or args.warmup_seconds < 0:
        parser.error("--reviews, --clients and --workers must be >= 1, --seconds > 0, --warmup-seconds >= 0")
    if not 0 <= args.pairs <= len(SCORES) * len(GENRES):
        parser.error(f"--pairs must be in [0, {len(SCORES) * len(GENRES)}]")

    workdir = Path(tempfile.mkdtemp(prefix="serve_load-"))
    emulator = None
    try:
        if args.store == "firestore":
            from pitchkeras.store import open_store
            from tests.emulator import FirestoreEmulator

            emulator = FirestoreEmulator().start()
            os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host  # both servers inherit it
            warm_calls = warm_up_emulator(args.emulator_warmup_seconds)
            print(f"emulator warm-up: {warm_calls} calls in {args.emulator_warmup_seconds:g} s", flush=True)
            reviews = make_reviews(args.reviews, args.pairs)
            keys = [(r.score, r.genre, r.id) for r in reviews]
            ours_store, seed_store = "firestore://serve-load/ours", "firestore://serve-load/seed"
            with open_store(ours_store) as store:
                store.add_reviews(reviews)
            write_seed_collection("serve-load", "seed", reviews)
        else:
            keys = make_store(workdir / "ours.db", args.reviews, args.pairs)
            shutil.copy(workdir / "ours.db", workdir / "seed.db")
            ours_store, seed_store = f"sqlite:///{workdir / 'ours.db'}", str(workdir / "seed.db")
        ours = [sys.executable, "-m", "pitchkeras.cli", "serve", "--store", ours_store,
                "--port", "0", "--http-port", "0", "--log-level", "WARNING", "--grace", "1"]
        servers = [("pitchkeras gRPC", GrpcCaller, "grpc", ours), ("pitchkeras HTTP", HttpCaller, "http", ours)]
        if args.workers > 1:
            many = [*ours, "--workers", str(args.workers)]
            servers += [(f"pitchkeras gRPC x{args.workers}", GrpcCaller, "grpc", many),
                        (f"pitchkeras HTTP x{args.workers}", HttpCaller, "http", many)]
        if not args.no_peer:
            servers.append(("seed HTTP/JSON", HttpCaller, "http", [
                sys.executable, str(Path(__file__).resolve()), "--seed-server", seed_store]))
        pairs = args.pairs or len(SCORES) * len(GENRES)
        print(f"settings: {args.store} store{' (Google emulator ' + emulator.host + ')' if emulator else ''}, "
              f"{args.reviews} reviews over {pairs} (score, genre) pair(s), "
              f"{args.clients} client threads, {args.seconds:g} s measured after {args.warmup_seconds:g} s warm-up, "
              f"{os.cpu_count()} CPUs ({simd_level()}); servers and clients on this machine", flush=True)
        rows = collections.OrderedDict()
        for method in ("GetById", "GetReview"):
            for name, caller_type, protocol, command in servers:
                process, target = start(command, protocol)
                try:
                    server_cpu, client_cpu = server_cpu_s(process), time.process_time()
                    row = load(caller_type, target, method, keys, clients=args.clients, seconds=args.seconds,
                               warmup=args.warmup_seconds, seed=args.seed)
                    # CPU per call says what each design costs even when other jobs share the machine.
                    row["server_cpu_us"] = (server_cpu_s(process) - server_cpu) / row["all_calls"] * 1e6
                    row["client_cpu_us"] = (time.process_time() - client_cpu) / row["all_calls"] * 1e6
                    rows[method, name] = row
                finally:
                    stop(process)
                dup = "" if row["dup"] is None else row["dup"]
                print(f"{method:<10} {name:<19} {row['qps']:>7.0f} calls/s  p50 {row['p50_ms']:6.2f} ms  "
                      f"p99 {row['p99_ms']:7.2f} ms  CPU/call server {row['server_cpu_us']:5.0f} us "
                      f"client {row['client_cpu_us']:5.0f} us  errors {row['errors']}  dup {dup}", flush=True)
        if not args.no_peer:
            for method in ("GetById", "GetReview"):
                peer = rows[method, "seed HTTP/JSON"]
                for name, *_ in servers[:-1]:
                    ours = rows[method, name]
                    print(f"ratio {method} {name}: calls/s x{ours['qps'] / peer['qps']:.2f}, "
                          f"p50 x{ours['p50_ms'] / peer['p50_ms']:.2f}, p99 x{ours['p99_ms'] / peer['p99_ms']:.2f}, "
                          f"server CPU/call x{ours['server_cpu_us'] / peer['server_cpu_us']:.2f} "
                          f"(pitchkeras / seed; calls/s higher is better, the others lower)")
    finally:
        if emulator is not None:
            emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
