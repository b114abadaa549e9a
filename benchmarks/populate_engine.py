"""populate's generation: closed batches (before) vs the decode engine (after), reviews per second.

Both sides generate the same requests with the same seeds, so they draw the
same tokens and accept the same reviews; only the batching differs:

- closed: the closed-batch loop populate ran before the engine (its copy in
  `benchmarks/closed_loop.py`) on `--batch` requests at a time: a batch runs
  until its longest row ends.
- engine: every request submitted to a `DecodeEngine` with `--batch` slots and
  populate's `TOKENS_PER_STEP`, as populate does now: a row that ends is
  refilled at the next call.

Two models:

- `--demo-model DIR` (the `tiny` preset that `pitchkeras demo` trains): real
  end-of-text stops, real post-processing; prints its stop lengths.
- `--gpt2-124m`: the GPT-2 124M shape with random weights (no download). A
  random model never stops on its own, so each request gets a length cap
  drawn from the demo model's measured stop lengths (or `--lengths`): the
  closed batch runs to the longest of its rows, the engine frees each row at
  its own length, which is what the trained model's end tokens do.

Printed: the CPU's SIMD level, then per model and side: seconds, samples/s,
accepted reviews/s, steps (engine) and the speed-up. Each side runs twice and
the second run is timed, so no compile time is counted. Last,
`ratio_populate=`: the lower of the models' speed-ups (engine over closed).

Example:

    python benchmarks/populate_engine.py --demo-model pitchkeras-demo/checkpoint/demo/model --gpt2-124m
    python benchmarks/populate_engine.py --backend jax --demo-model pitchkeras-demo/checkpoint/demo/model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--backend" in sys.argv[1:-1]:  # before Keras is imported: it reads KERAS_BACKEND once
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generate_vs_transformers import random_gpt2_model, simd_level  # noqa: E402

GENRES = ("Rock", "Electronic", "Rap", "Pop/R&B", "Experimental", "Folk/Country", "Metal", "Jazz")


def demo_requests(model, count: int) -> list:
    """populate's requests: the grid of scores 2, 5, 8 x the eight genres, attempt seeds as populate draws them."""
    from pitchkeras.populate import attempt_seed
    from pitchkeras.sampling import GenerationRequest

    known = {g.casefold(): g for g in model.info.condition_values.get("genre", GENRES)}
    grid = [{"score": s, "genre": known.get(g.casefold(), g)} for s in (2.0, 5.0, 8.0) for g in GENRES]
    return [GenerationRequest(dict(grid[i % len(grid)]), seed=attempt_seed(0, i // len(grid))) for i in range(count)]


def closed(generator, requests, lengths, batch: int) -> tuple[float, list]:
    """populate before the engine: closed batches in request order, each as long as its longest row."""
    from closed_loop import closed_generate

    started, samples = time.perf_counter(), []
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        samples += closed_generate(generator, chunk, max_new_tokens=max(lengths[start:start + batch]))
    return time.perf_counter() - started, samples


def engine_run(generator, requests, lengths, batch: int) -> tuple[float, list, object]:
    """populate now: everything submitted to the engine, rows refilled as they end."""
    from pitchkeras.populate import TOKENS_PER_STEP
    from pitchkeras.sampling.engine import BULK_CACHE_BUCKETS, DecodeEngine

    engine = DecodeEngine(generator, slots=batch, tokens_per_step=TOKENS_PER_STEP, cache_buckets=BULK_CACHE_BUCKETS,
                          prefill_together=True)
    started = time.perf_counter()
    streams = [engine.submit(r, None, n, deltas=False) for r, n in zip(requests, lengths)]
    engine.run_until_idle()
    return time.perf_counter() - started, [s.result() for s in streams], (engine, streams)


def compare(name: str, generator, requests, lengths, batch: int) -> tuple[list[int], float]:
    """Run both sides once to compile every shape they meet, then time them; print the figures; the engine's
    stop lengths and its speed-up."""
    closed(generator, requests, lengths, batch)
    engine_run(generator, requests, lengths, batch)
    closed_s, closed_samples = closed(generator, requests, lengths, batch)
    engine_s, engine_samples, (engine, streams) = engine_run(generator, requests, lengths, batch)
    same = sum(a.raw == b.raw for a, b in zip(closed_samples, engine_samples))
    accepted = sum(not s.rejected for s in engine_samples)
    stops = [s.tokens for s in streams]
    print(f"{name}: {len(requests)} samples, batch {batch}, {same}/{len(requests)} texts identical on both sides, "
          f"{accepted} accepted; stop lengths (tokens) median {statistics.median(stops):.0f}, "
          f"min {min(stops)}, max {max(stops)}")
    for side, seconds in (("closed batches", closed_s), ("decode engine", engine_s)):
        print(f"  {side:15s} {seconds:7.1f} s  {len(requests) / seconds:6.2f} samples/s  "
              f"{accepted / seconds:6.2f} reviews/s")
    counters = engine.counters
    print(f"  engine steps {counters.steps}, mean rows per step {counters.row_steps / max(counters.steps, 1):.2f}; "
          f"speed-up {closed_s / engine_s:.2f}x")
    return stops, closed_s / engine_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-model", help="model directory trained by `pitchkeras demo`")
    parser.add_argument("--gpt2-124m", action="store_true", help="also the GPT-2 124M shape with random weights")
    parser.add_argument("--requests", type=int, default=48, help="samples per side (demo model)")
    parser.add_argument("--requests-124m", type=int, default=16, help="samples per side (GPT-2 124M)")
    parser.add_argument("--batch", type=int, default=8, help="rows decoded together (populate's --batch-size)")
    parser.add_argument("--length", type=int, default=120, help="max new tokens (the demo's populate length)")
    parser.add_argument("--lengths", help="comma-separated stop lengths for the 124M run (default: the demo's)")
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=os.environ["KERAS_BACKEND"],
                        help="Keras backend both sides run on (default: $KERAS_BACKEND, else tensorflow)")
    args = parser.parse_args(argv)
    from pitchkeras.sampling import Generator

    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; "
          f"backend {args.backend}")
    stops = [int(n) for n in args.lengths.split(",")] if args.lengths else []
    ratios: list[float] = []
    if args.demo_model:
        from pitchkeras.model import load_model

        model = load_model(args.demo_model)
        requests = demo_requests(model, args.requests)
        stops, ratio = compare("demo model", Generator(model, batch_size=args.batch, max_new_tokens=args.length),
                        requests, [args.length] * len(requests), args.batch)
        ratios.append(ratio)
    if args.gpt2_124m:
        from pitchkeras.postprocess import PostprocessOptions
        from pitchkeras.sampling import GenerationRequest

        if not stops:
            parser.error("--gpt2-124m needs the stop lengths: give --demo-model or --lengths")
        relaxed = PostprocessOptions(strip_to_last_start=False, check_conditions=False, reject_second_document=False,
                                     require_sentence=False, trim_to_sentence=False)
        generator = Generator(random_gpt2_model("float32"), batch_size=args.batch, max_new_tokens=max(stops),
                              postprocess_options=relaxed, stop_at_end_token=False)
        requests = [GenerationRequest(prefix="The band plays", seed=i) for i in range(args.requests_124m)]
        lengths = [max(1, stops[i % len(stops)]) for i in range(args.requests_124m)]
        ratios.append(compare("GPT-2 124M shape, random weights, demo stop lengths", generator, requests, lengths,
                              args.batch)[1])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if ratios:
        print(f"ratio_populate={min(ratios):.2f} (engine / closed loop, the lower of {len(ratios)} model(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
