"""`pitchkeras prepare` on a generated 100 MB CSV: wall time and peak memory, this tree against a baseline tree.

The CSV has the Kaggle dump's columns, one review per row (random words from
tests/dumps.py, paragraphs separated by blank lines, so most text fields are
quoted and span lines), a one-decimal score and one or two comma-separated
genres. Each round runs `pitchkeras prepare CSV --out DIR --no-progress` in a
fresh process under `/usr/bin/time -v` for every tree (interleaved, so a
change in the machine's load falls on both alike) and checks that both trees
wrote the same bytes. The last line is `speedup=<baseline wall / this wall>`.

    git archive <commit> | tar -x -C /tmp/base   # the tree to compare against
    python benchmarks/prepare_csv.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.dumps import GENRES, WORDS  # noqa: E402

DEFAULT_CSV = Path(tempfile.gettempdir()) / "pitchkeras-prepare-100mb.csv"


def write_csv(path: str | os.PathLike, megabytes: int = 100, mean_chars: int = 5_000, seed: int = 0) -> Path:
    """A CSV of random-word reviews with the Kaggle dump's columns, about `megabytes` MB."""
    rng = random.Random(seed)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reviewid", "title", "artist", "url", "score", "genre", "pub_date", "content"])
        i = 0
        while f.tell() < megabytes * 1_000_000:
            i += 1
            words = rng.choices(WORDS, k=rng.randint(mean_chars // 2, mean_chars * 3 // 2) // 6)
            paragraphs = [" ".join(words[j:j + 120]).capitalize() + "." for j in range(0, len(words), 120)]
            writer.writerow([i, f"album {i}", f"artist {i}", f"https://example.com/{i}", round(rng.uniform(0, 10), 1),
                             ",".join(rng.sample(GENRES, rng.choice((1, 1, 1, 2)))), "2017-01-05",
                             "\n\n".join(paragraphs)])
    os.replace(tmp, path)
    return path


def run_prepare(tree: Path, csv_path: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS KiB) of one `pitchkeras prepare` in a fresh process importing `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "pitchkeras.cli", "prepare", str(csv_path), "--out", str(out),
         "--no-progress"], capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode:
        raise SystemExit(f"prepare failed in {tree}:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return seconds, cpu, int(rss.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="the CSV (written if missing)")
    parser.add_argument("--baseline", type=Path, help="a source tree to compare against (e.g. a git archive)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.csv.exists():
        write_csv(args.csv)
    print(f"input: {args.csv} ({args.csv.stat().st_size / 1e6:.0f} MB); load: {os.getloadavg()[0]:.1f}")
    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                seconds, cpu, rss = run_prepare(tree, args.csv, Path(tmp) / name)
                results[name].append(seconds)
                print(f"round {round_ + 1} {name:8s}: {seconds:6.2f} s wall, {cpu:6.2f} s CPU, {rss / 1024:6.0f} MiB peak RSS "
                      f"(load {os.getloadavg()[0]:.1f})")
        if args.baseline:
            for file in ("examples.csv", "train.csv", "val.csv"):
                same = (Path(tmp) / "this" / file).read_bytes() == (Path(tmp) / "baseline" / file).read_bytes()
                print(f"{file}: {'identical' if same else 'DIFFERENT'}")
    medians = {name: statistics.median(values) for name, values in results.items()}
    if args.baseline:
        print(f"speedup={medians['baseline'] / medians['this']:.2f}")


if __name__ == "__main__":
    main()
