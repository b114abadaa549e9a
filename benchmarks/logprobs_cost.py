"""What log-probabilities cost the decode engine: asked for, and not asked for.

Two trees run the same job side by side, alternating, each in a fresh process (so each imports its own
`pitchkeras`): `--baseline DIR`, a tree from before the engine computed log-probabilities (e.g.
`git archive bceccc1 | tar -x -C /tmp/before`), and this tree (or `--tree DIR`). The job: `--requests` requests of `--length`
tokens with their own seeds, through a `DecodeEngine` with `--slots` slots on `--model` (a model directory,
e.g. the one `pitchkeras demo` trains), the caller's thread stepping it; each process runs it once to compile
and then `--repeats` times timed (the median is kept).

- before, none asked: the baseline tree (its step has no log-probability code).
- after, none asked: this tree, `top_logprobs=None` on every request.
- after, top 5 asked: this tree, `top_logprobs=5` on every request.

Printed: the CPU's SIMD level and load, then seconds per side and round, and LAST
`ratio_not_asked=` (after, none asked / before: 1.0 = free) and `ratio_asked=` (top 5 / none asked, this tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.generate_vs_transformers import simd_level  # noqa: E402

CHILD = r"""
import json, sys, time
from pitchkeras.model import load_model
from pitchkeras.sampling import GenerationRequest, Generator
from pitchkeras.sampling.engine import DecodeEngine

model_dir, requests, length, slots, repeats, top = sys.argv[1:7]
requests, length, slots, repeats = int(requests), int(length), int(slots), int(repeats)
top = None if top == "none" else int(top)
generator = Generator(load_model(model_dir), batch_size=slots, max_new_tokens=length, stop_at_end_token=False)
engine = DecodeEngine(generator, slots=slots)
conditions = {"score": 8.0, "genre": "Rock"}
kwargs = {} if top is None else {"top_logprobs": top}
batch = [GenerationRequest(conditions, seed=seed, **kwargs) for seed in range(requests)]
engine.generate(batch)  # compiles every shape this job uses
times = []
for _ in range(repeats):
    start = time.perf_counter()
    engine.generate(batch)
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps(times))
"""


def run(tree: Path, args, top: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="3")
    child = subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(args.requests), str(args.length),
                            str(args.slots), str(args.repeats), top], env=env, capture_output=True, text=True,
                           cwd=tree)
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        raise SystemExit(f"{tree} ({top}) failed with exit {child.returncode}:\n{child.stderr[-3000:]}")
    return statistics.median(json.loads(lines[-1][len("RESULT "):]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a model directory")
    parser.add_argument("--baseline", required=True, type=Path, help="a tree from before log-probabilities")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the tree with log-probabilities (default: this one; the commit that added them "
                             "alone isolates their cost from later engine changes)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.requests} requests x {args.length} tokens, {args.slots} slots, model {args.model}")
    sides = {"before, none asked": [], "after, none asked": [], "after, top 5 asked": []}
    for round_ in range(args.rounds):
        sides["before, none asked"].append(run(args.baseline, args, "none"))
        sides["after, none asked"].append(run(args.tree, args, "none"))
        sides["after, top 5 asked"].append(run(args.tree, args, "5"))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {times[-1]:.3f} s" for name, times in sides.items()))
    before, none, asked = (statistics.median(times) for times in sides.values())
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"ratio_not_asked={none / before:.3f} ratio_asked={asked / none:.3f}")


if __name__ == "__main__":
    main()
