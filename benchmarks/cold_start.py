"""Cold start with and without the persistent compilation cache: a first and a second process, same program.

Each child process builds the GPT-2 124M architecture with random weights
(as `generate_vs_transformers.py` does; nothing is downloaded), turns the
cache on in a fresh temporary directory (or off), and times its first
`Generator.generate` call at batch 1 (tracing + compiling + the decode) and a
second, warm one. The first child fills the cache; the second, a new process,
should load the compiled loop instead of compiling it again.

Printed: per child, model build time, first call, warm call; then
`saved=<first child's first call - second child's first call> s` last.

Example:

    python benchmarks/cold_start.py                      # TensorFlow (XLA loop)
    KERAS_BACKEND=jax python benchmarks/cold_start.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
start = time.perf_counter()
from pitchkeras import compile_cache
used = compile_cache.enable(sys.argv[1] if sys.argv[1] != "off" else None)
sys.path.insert(0, "benchmarks")
from generate_vs_transformers import random_gpt2_model
from pitchkeras.postprocess import PostprocessOptions
from pitchkeras.sampling import GenerationRequest, Generator
model = random_gpt2_model(sys.argv[2])
built = time.perf_counter()
keep_all = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False)
generator = Generator(model, batch_size=1, max_new_tokens=int(sys.argv[3]), postprocess_options=keep_all,
                      stop_at_end_token=False)
times = []
for seed in (1, 2):
    t = time.perf_counter()
    generator.generate([GenerationRequest(None, "The band plays", seed=seed)])
    times.append(time.perf_counter() - t)
print(json.dumps({"cache": used, "build_s": built - start, "first_s": times[0], "warm_s": times[1]}))
"""


def run_child(cache: str, dtype: str, new_tokens: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", CHILD, cache, dtype, str(new_tokens)], capture_output=True,
                            text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per call")
    parser.add_argument("--no-cache-baseline", action="store_true", help="also time a child with the cache off")
    args = parser.parse_args(argv)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    print(f"GPT-2 124M random weights, {args.dtype}, KERAS_BACKEND={backend}, batch 1, {args.new_tokens} new tokens; "
          f"os.cpu_count()={os.cpu_count()}")
    with tempfile.TemporaryDirectory() as cache:
        rows = []
        if args.no_cache_baseline:
            rows.append(("cache off", run_child("off", args.dtype, args.new_tokens)))
        rows.append(("1st process (fills cache)", run_child(cache, args.dtype, args.new_tokens)))
        rows.append(("2nd process (cache warm)", run_child(cache, args.dtype, args.new_tokens)))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache) for f in files)
    for name, row in rows:
        print(f"{name:>26}: model build {row['build_s']:.2f} s, first call {row['first_s']:.2f} s, "
              f"warm call {row['warm_s']:.2f} s")
    print(f"cache size {size / 1e6:.1f} MB")
    print(f"saved={rows[-2][1]['first_s'] - rows[-1][1]['first_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
