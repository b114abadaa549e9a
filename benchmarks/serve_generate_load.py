"""Open-loop load on generation: `pitchkeras serve` with the decode engine, the closed batches it replaced,
and a transformers server doing the same job with its own batched `generate`, on one machine in one run.

Arrivals are Poisson at each rate of `--rates` (requests/s) for `--seconds`
each; every request draws a length from `--lengths` and sampler settings
from `MIXES`, with its own seed. Requests are never retried or paced by
answers (open loop); what has not finished `--drain` seconds after the last
arrival counts as not completed, so each rate is bounded in time.

- engine: `pitchkeras serve --model M`, called with StreamGenerate (gRPC):
  the time to first token is the first delta.
- closed: the closed-batch loop the engine replaced (`closed_loop.py`) on the
  same model behind a small HTTP server (batches of up to `--slots` calls
  collected for 10 ms, grouped by settings and length, each run to its
  longest row); its first token is its answer.
- transformers: a `GPT2LMHeadModel` of the same shape (random weights) behind
  a small HTTP server with the same closed batching, calling
  `model.generate(do_sample=True, ...)` per group; no streaming, so its first
  token is its answer. Only with the GPT-2 124M shape (the default model),
  where both sides have random weights and run every requested token.

Each server is warmed first (every length alone and in batches), so no
compile time is timed. Printed: the CPU's SIMD level and load, one prefill + two engine steps
measured in this process, then per side and rate: time to first token
p50/p99, time per output token (after the first) p50, end-to-end p50/p99,
completed requests/s; LAST `ratio_p99=` (closed end-to-end p99 over the
engine's, at the highest rate both sustain: >= 90% of arrivals completed) and
`ratio_throughput=`: the engine's capacity over transformers', each side's
most completed requests/s over the rates. The default rates end above the
engine's capacity on a 2-core CPU (4 requests/s), so the ratio compares what
each side can finish, not the load offered (at 2 requests/s the engine
finishes all of it and the ratio could not pass 2 / transformers' rate).
Past its capacity a closed batcher finishes fewer requests than at a lower
rate (callers give up on queued requests it still runs), so the ratio takes
each side's best rate, never a collapsed one.

Example:

    python benchmarks/serve_generate_load.py                          # GPT-2 124M shape, random weights
    python benchmarks/serve_generate_load.py --model pitchkeras-demo/checkpoint/demo/model --rates 2,4,8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Sampler settings of the load: several kinds in flight at once (closed batches cannot share a batch across them).
MIXES = ({}, {"temperature": 1.0, "top_k": 40}, {"top_p": 0.8}, {"repetition_penalty": 1.2, "temperature": 0.9})
PROMPT = "The band plays"


# -- the transformers server (a subprocess: `--transformers-server`) ---------------------------------------


def transformers_server(port_file: str, slots: int, max_wait_s: float) -> None:
    """Serve POST /generate {"length", "seed", settings...} with closed batches of transformers' generate."""
    import torch
    import transformers

    from generate_vs_transformers import HIDDEN_DIM, INTERMEDIATE_DIM, MAX_SEQUENCE_LENGTH, NUM_HEADS, NUM_LAYERS, \
        VOCABULARY_SIZE

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCABULARY_SIZE, n_positions=MAX_SEQUENCE_LENGTH, n_embd=HIDDEN_DIM, n_layer=NUM_LAYERS,
        n_head=NUM_HEADS, n_inner=INTERMEDIATE_DIM)).eval()
    prompt = torch.tensor([[ord(c) for c in PROMPT]])  # one token per byte, as the random pitchkeras tokenizer

    def run_group(body: dict, group: list) -> None:
        settings = {"temperature": body.get("temperature", 0.7), "top_k": body.get("top_k", 0),
                    "top_p": body.get("top_p", 0.95), "repetition_penalty": body.get("repetition_penalty", 1.0)}
        ids = prompt.expand(len(group), -1).contiguous()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           max_new_tokens=body["length"], min_new_tokens=body["length"],
                           pad_token_id=VOCABULARY_SIZE - 1, **settings)

    closed_batch_server(port_file, slots, max_wait_s, run_group)


def closed_server(port_file: str, model_dir: str, slots: int, max_wait_s: float) -> None:
    """Serve POST /generate {"length", "seed", settings...} with the closed-batch loop the engine replaced
    (`closed_loop.py`), batches formed as `serve --batching closed` formed them before it was removed."""
    from closed_loop import closed_generate

    from pitchkeras.model import load_model
    from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig

    model = load_model(model_dir)
    generator = Generator(model, batch_size=slots)
    conditions = _conditions(model.info)

    def run_group(body: dict, group: list) -> None:
        settings = {k: body[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty") if k in body}
        requests = [GenerationRequest(conditions or None, PROMPT, seed=item[0]["seed"]) for item in group]
        closed_generate(generator, requests, config=SamplerConfig(**settings), max_new_tokens=body["length"])

    closed_batch_server(port_file, slots, max_wait_s, run_group)


def closed_batch_server(port_file: str, slots: int, max_wait_s: float, run_group) -> None:
    """An HTTP server gathering POST /generate calls into closed batches of up to `slots` (waiting `max_wait_s`
    for company), one `run_group(body, items)` per group of equal settings and length."""
    import http.server

    pending: queue.Queue = queue.Queue()

    def run_batches() -> None:
        while True:
            batch = [pending.get()]
            deadline = time.monotonic() + max_wait_s
            while len(batch) < slots and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(pending.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict = {}
            for item in batch:
                groups.setdefault(json.dumps({k: v for k, v in item[0].items() if k != "seed"}, sort_keys=True),
                                  []).append(item)
            for group in groups.values():
                run_group(group[0][0], group)
                for _, done in group:
                    done.set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            done = threading.Event()
            pending.put((body, done))
            done.wait()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    threading.Thread(target=run_batches, daemon=True).start()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


# -- servers ----------------------------------------------------------------------------------------------


def start_pitchkeras(model_dir: str, slots: int, lengths, store: str) -> tuple:
    """`pitchkeras serve` in a subprocess; returns (process, gRPC target) once /readyz says ready."""
    argv = [sys.executable, "-m", "pitchkeras.cli", "serve", "--model", model_dir, "--store", store, "--port", "0",
            "--http-port", "0", "--max-batch-size", str(slots), "--length",
            str(max(lengths)), "--max-length-cap", str(max(lengths)), "--log-level", "WARNING"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    target = process.stdout.readline().split()[-1]
    http = process.stdout.readline().split()[-1].rstrip("/")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{http}/readyz", timeout=5) as answer:
                if json.load(answer)["status"] == "ready":
                    return process, target
        except OSError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit("the pitchkeras server did not get ready")


def start_transformers(slots: int, model_dir: str = "") -> tuple:
    """The transformers server, or with `model_dir` the closed-loop server, in a subprocess: (process, host:port)."""
    port_file = tempfile.mktemp()
    flags = ["--closed-server", port_file, "--model", model_dir] if model_dir else ["--transformers-server", port_file]
    process = subprocess.Popen([sys.executable, __file__, *flags, "--slots", str(slots)],
                               cwd=ROOT, stderr=subprocess.DEVNULL)
    while not os.path.exists(port_file) or not Path(port_file).read_text():
        if process.poll() is not None:
            raise SystemExit("the closed-batch server did not start (transformers: pip install torch==2.13.0 "
                             "transformers)")
        time.sleep(0.5)
    return process, f"127.0.0.1:{Path(port_file).read_text()}"


# -- callers: each returns (time to first token, end to end, deltas) -----------------------------------------


def grpc_caller(target: str, conditions: dict):
    import grpc

    from pitchkeras.v1 import review_service_pb2 as pb
    from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc

    stub = pb_grpc.ReviewServiceStub(grpc.insecure_channel(target))

    def call(length: int, seed: int, settings: dict, timeout: float):
        started, first, deltas = time.perf_counter(), None, 0
        request = pb.GenerateRequest(prompt=PROMPT, max_length=length, seed=seed, **conditions, **settings)
        for chunk in stub.StreamGenerate(request, timeout=timeout):
            if chunk.WhichOneof("chunk") == "delta":
                first = first or time.perf_counter() - started
                deltas += 1
        end = time.perf_counter() - started
        return first or end, end, deltas

    return call


def http_caller(target: str, conditions: dict):
    def call(length: int, seed: int, settings: dict, timeout: float):
        started = time.perf_counter()
        body = json.dumps(dict(settings, length=length, seed=seed)).encode()
        request = urllib.request.Request(f"http://{target}/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
        end = time.perf_counter() - started
        return end, end, 1

    return call


def run_rate(call, rate: float, seconds: float, drain: float, lengths, seed: int) -> dict:
    """Poisson arrivals at `rate` for `seconds`; the latencies of what completed within `drain` after the last."""
    rng = random.Random(seed)
    results, errors = [], []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=256)
    started = time.perf_counter()
    end_of_arrivals = started + seconds
    futures = []
    next_arrival = started
    while (next_arrival := next_arrival + rng.expovariate(rate)) < end_of_arrivals:
        time.sleep(max(0.0, next_arrival - time.perf_counter()))
        length, settings = rng.choice(lengths), rng.choice(MIXES)
        timeout = end_of_arrivals + drain - time.perf_counter()
        futures.append(pool.submit(call, length, rng.randrange(2**31), settings, timeout))
    for future in futures:
        try:
            first, end, deltas = future.result(timeout=max(0.1, end_of_arrivals + drain - time.perf_counter()))
            results.append((first, end, deltas))
        except Exception as err:  # noqa: BLE001 - deadline passed or the server refused: not completed
            errors.append(type(err).__name__)
    pool.shutdown(wait=False, cancel_futures=True)
    window = time.perf_counter() - started
    return {"arrived": len(futures), "completed": len(results), "rate_done": len(results) / window,
            "ttft": [r[0] for r in results], "e2e": [r[1] for r in results],
            "tpot": [(r[1] - r[0]) / (r[2] - 1) for r in results if r[2] > 1]}


def warm(call, lengths, slots: int) -> None:
    """Compile what the load will meet before it is timed: each length alone and in batches of 2, 4 and `slots`
    (the closed batcher compiles a program per batch shape and length; the engine per row bucket and cache
    length)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=slots) as pool:
        for length in lengths:
            for batch in sorted({1, 2, 4, slots}):
                list(pool.map(lambda i: call(length, i, {}, 600.0), range(batch)))


def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def engine_step_times(model_dir: str, slots: int, length: int) -> tuple[float, float]:
    """(one prefill, one step) in ms of this model's engine in this process, warm."""
    from pitchkeras.model import load_model
    from pitchkeras.sampling import GenerationRequest, Generator
    from pitchkeras.sampling.engine import DecodeEngine

    model = load_model(model_dir)
    engine = DecodeEngine(Generator(model, batch_size=slots, max_new_tokens=length), slots=slots)
    conditions = _conditions(model.info)
    request = GenerationRequest(conditions or None, PROMPT if not conditions else "", seed=1)
    for _ in range(2):  # the first round compiles
        stream = engine.submit(request, None, length)
        started = time.perf_counter()
        engine.step()  # joins (prefill) and decodes one token
        joined = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(4):
            engine.step()
        step = (time.perf_counter() - started) / 4
        stream.cancel()
        engine.run_until_idle()
    return (joined - step) * 1e3, step * 1e3


def _conditions(info) -> dict:
    """A valid score and genre for a model trained with conditions (empty for a plain one)."""
    names = info.prompt_format.conditions
    out = {}
    if "score" in names:
        out["score"] = 8.0
    if "genre" in names:
        out["genre"] = (info.condition_values.get("genre") or ["Rock"])[0]
    return out


def random_124m_dir(directory: str) -> str:
    from generate_vs_transformers import random_gpt2_model

    from pitchkeras.model import save_model_dir

    model = random_gpt2_model("float32")
    return str(save_model_dir(model.causal_lm, model.info, Path(directory) / "model"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pitchkeras model directory (default: GPT-2 124M shape, random weights)")
    parser.add_argument("--rates", default="0.5,1,2,4", help="arrival rates, requests/s (the last above capacity)")
    parser.add_argument("--seconds", type=float, default=20.0, help="arrivals per rate, seconds")
    parser.add_argument("--drain", type=float, default=20.0, help="wait after the last arrival, seconds")
    parser.add_argument("--lengths", default="8,32,64", help="new tokens per request, drawn uniformly")
    parser.add_argument("--slots", type=int, default=8, help="engine slots = closed batch size")
    parser.add_argument("--sides", default="engine,closed,transformers", help="which servers to load")
    parser.add_argument("--transformers-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--closed-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.transformers_server:
        transformers_server(args.transformers_server, args.slots, 0.01)
        return 0
    if args.closed_server:
        closed_server(args.closed_server, args.model, args.slots, 0.01)
        return 0
    from generate_vs_transformers import simd_level

    rates = [float(r) for r in args.rates.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    sides = args.sides.split(",")
    workdir = tempfile.mkdtemp(prefix="serve-generate-load-")
    model_dir = args.model or random_124m_dir(workdir)
    if args.model and "transformers" in sides:
        sides.remove("transformers")  # only the random GPT-2 124M shape has a like-for-like transformers model
    from pitchkeras.model import ModelInfo

    conditions = _conditions(ModelInfo.read(model_dir))
    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; "
          f"model {args.model or 'GPT-2 124M shape, random weights'}; lengths {lengths}; {len(MIXES)} sampler mixes; "
          f"{args.slots} slots; {args.seconds:g} s of arrivals per rate, {args.drain:g} s drain", flush=True)
    prefill_ms, step_ms = engine_step_times(model_dir, args.slots, max(lengths))
    print(f"engine in this process: prefill {prefill_ms:.1f} ms, step {step_ms:.1f} ms; "
          f"one prefill + two steps = {prefill_ms + 2 * step_ms:.1f} ms", flush=True)
    table: dict = {}
    for side in sides:
        if side in ("transformers", "closed"):
            process, target = start_transformers(args.slots, model_dir if side == "closed" else "")
            call = http_caller(target, conditions)
        else:
            process, target = start_pitchkeras(model_dir, args.slots, lengths, f"sqlite:///{workdir}/{side}.db")
            call = grpc_caller(target, conditions)
        try:
            warm(call, lengths, args.slots)
            for rate in rates:
                result = run_rate(call, rate, args.seconds, args.drain, lengths, seed=int(rate * 1000))
                table[side, rate] = result
                print(f"{side:12s} rate {rate:5.2f}/s: {result['completed']:3d}/{result['arrived']:3d} completed, "
                      f"TTFT p50 {percentile(result['ttft'], 50) * 1e3:7.0f} ms p99 "
                      f"{percentile(result['ttft'], 99) * 1e3:7.0f} ms, TPOT p50 "
                      f"{percentile(result['tpot'], 50) * 1e3:6.1f} ms, e2e p50 {percentile(result['e2e'], 50):6.2f} s "
                      f"p99 {percentile(result['e2e'], 99):6.2f} s, {result['rate_done']:5.2f} req/s done "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            process.kill()
            process.wait()
    sustained = [r for r in rates if all(table[s, r]["completed"] >= 0.9 * table[s, r]["arrived"]
                                         for s in ("engine", "closed") if (s, r) in table)]
    if ("engine", rates[0]) in table and ("closed", rates[0]) in table and sustained:
        top = max(sustained)
        ratio_p99 = percentile(table["closed", top]["e2e"], 99) / percentile(table["engine", top]["e2e"], 99)
        print(f"ratio_p99={ratio_p99:.2f} (closed e2e p99 / engine e2e p99 at {top:g} req/s)")
    def best_rate(side: str) -> float:
        """The offered rate at which `side` completed the most requests/s: its capacity, never a collapsed rate."""
        return max((r for r in rates if (side, r) in table), key=lambda r: table[side, r]["rate_done"])

    if ("engine", rates[0]) in table and ("transformers", rates[0]) in table:
        engine_rate, theirs_rate = best_rate("engine"), best_rate("transformers")
        engine, theirs = table["engine", engine_rate]["rate_done"], table["transformers", theirs_rate]["rate_done"]
        if theirs:
            print(f"ratio_throughput={engine / theirs:.2f} (capacity: the engine {engine:.2f} completed req/s at "
                  f"{engine_rate:g} offered / transformers {theirs:.2f} at {theirs_rate:g} offered)")
        else:  # a ratio over nothing would print a meaningless huge number
            print(f"ratio_throughput=inf (transformers completed no request at any rate; the engine {engine:.2f} "
                  f"req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
