"""Statistics of a prepared dataset: counts, score histograms, text lengths, and a plot.

`DatasetStats` is fed kept examples a chunk at a time (`add`) and holds only counters and one
integer per example (its length), so it stays small on large dumps. `summary()` gives the dict that becomes
`stats.json`; `plot(path)` draws `stats.png` with matplotlib's Agg backend (no display).

Example:

>>> stats = DatasetStats(PromptFormat())
>>> stats.add({"score": [8.4], "genre": ["rock"]}, [15])
>>> stats.summary()["genres"]
{'rock': 1}
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from array import array
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pitchkeras.conditioning import PromptFormat
from pitchkeras.io import atomic_path

HISTOGRAM_STEP = 0.5  # score bin width: Pitchfork scores have one decimal on 0.0-10.0
PERCENTILES = (0, 5, 25, 50, 75, 95, 99, 100)
MAX_PLOTTED_GROUPS = 12  # small multiples beyond this are unreadable; the rest go into "other"


def histogram_edges(values, step: float = HISTOGRAM_STEP) -> list[float]:
    """Bin edges of width `step` covering `values` (0-10 for Pitchfork scores)."""
    low = min(0.0, math.floor(min(values) / step) * step)
    high = max(10.0, math.ceil(max(values) / step) * step)
    count = max(1, round((high - low) / step))
    return [round(low + i * step, 6) for i in range(count + 1)]


def histogram(counter: Mapping[float, int], edges: list[float]) -> list[int]:
    """Counts per bin; the last bin includes its right edge (a 10.0 lands in 9.5-10.0)."""
    counts = [0] * (len(edges) - 1)
    for value, n in counter.items():
        i = int((value - edges[0]) // (edges[1] - edges[0]))
        counts[min(max(i, 0), len(counts) - 1)] += n
    return counts


class DatasetStats:
    """Accumulates what `stats.json` reports about the kept examples.

    Args:
        fmt: PromptFormat. The conditions: numeric ones get histograms, the others value counts.
        group_by: str or None. The categorical condition the score histograms are split by (default `genre` when it
            is a condition).
    """

    def __init__(self, fmt: PromptFormat, group_by: str | None = None):
        self.fmt = fmt
        categorical = [c for c in fmt.conditions if c not in fmt.numeric]
        self.group_by = group_by or ("genre" if "genre" in categorical else (categorical[0] if categorical else None))
        self.counts = {c: collections.Counter() for c in categorical}
        # numeric condition -> group -> Counter(value rounded to 0.1 -> n): compact, exact for one-decimal scores
        self.numeric = {c: collections.defaultdict(collections.Counter) for c in fmt.numeric if c in fmt.conditions}
        self.lengths = array("q")

    def add(self, values: Mapping[str, list], lengths) -> None:
        """Count a chunk of kept examples: each condition's values (one per example), and their text lengths.

        Values are counted in order of first appearance, so ties in `stats.json` keep the order the dump met them
        in.
        """
        for name, counter in self.counts.items():
            counter.update(values[name])
        groups = values[self.group_by] if self.group_by else itertools.repeat("all")
        for name, per_group in self.numeric.items():
            for group, value in zip(groups, values[name]):
                per_group[group][round(float(value), 1)] += 1  # Python's rounding, not numpy's
        self.lengths.extend(lengths)

    def condition_values(self) -> dict[str, list]:
        """Every condition's sorted distinct values (pitchkeras.json's known values)."""
        out = {name: sorted(counter) for name, counter in self.counts.items()}
        for name, groups in self.numeric.items():
            out[name] = sorted({v for counter in groups.values() for v in counter})
        return {name: out[name] for name in self.fmt.conditions}

    def _histograms(self) -> dict[str, dict]:
        out = {}
        for name, groups in self.numeric.items():
            total = sum(groups.values(), collections.Counter())
            if not total:
                continue
            edges = histogram_edges(list(total))
            out[name] = {
                "edges": edges,
                "counts": histogram(total, edges),
                "by_" + (self.group_by or "all"): {g: histogram(c, edges) for g, c in sorted(groups.items())},
            }
        return out

    def summary(self) -> dict[str, Any]:
        """The statistics part of `stats.json`."""
        lengths = np.frombuffer(self.lengths, dtype=np.int64) if len(self.lengths) else np.zeros(1, np.int64)
        out: dict[str, Any] = {}
        if "genre" in self.counts:
            out["genres"] = dict(self.counts["genre"].most_common())
        out["condition_counts"] = {name: dict(c.most_common()) for name, c in self.counts.items()}
        histograms = self._histograms()
        if "score" in histograms:
            out["score_histogram"] = histograms["score"]
        out["histograms"] = histograms
        out["text_length"] = {
            "unit": "characters",
            "mean": round(float(lengths.mean()), 1),
            "percentiles": {f"p{p}": int(np.percentile(lengths, p, method="nearest")) for p in PERCENTILES},
        }
        out["prompt_format"] = self.fmt.to_json()
        out["condition_values"] = self.condition_values()
        return out

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw `stats.png`: score histogram per group, else counts or text lengths.

        Written to a temp file and renamed, so readers never see half a PNG.
        """
        from matplotlib.figure import Figure  # lazy: start-up time; no pyplot, no display: savefig renders with Agg

        path = Path(path)
        histograms = self._histograms()
        name = "score" if "score" in histograms else next(iter(histograms), None)
        if name is not None:
            fig = self._plot_histograms(Figure, name, histograms[name])
        elif self.counts:
            cond, counter = next(iter(self.counts.items()))
            top = counter.most_common(30)
            fig = Figure(figsize=(8, 0.3 * len(top) + 1.5))
            ax = fig.subplots()
            ax.barh([str(k) for k, _ in reversed(top)], [n for _, n in reversed(top)])
            ax.set(xlabel="examples", title=f"examples per {cond}")
        else:
            fig = Figure(figsize=(8, 4))
            ax = fig.subplots()
            ax.hist(list(self.lengths), bins=40)
            ax.set(xlabel="text length (characters)", ylabel="examples",
                   title=f"text length of {len(self.lengths)} examples")
        if name is None:
            fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
        return path

    def _plot_histograms(self, Figure, name, hist):
        edges = hist["edges"]
        groups = dict(sorted(hist["by_" + (self.group_by or "all")].items(), key=lambda kv: -sum(kv[1])))
        if len(groups) > MAX_PLOTTED_GROUPS:
            keep = list(groups)[:MAX_PLOTTED_GROUPS - 1]
            other = [sum(c) for c in zip(*(v for k, v in groups.items() if k not in keep))]
            groups = {**{k: groups[k] for k in keep}, "other": other}
        cols = min(4, len(groups))
        rows = math.ceil(len(groups) / cols)
        width_in, height_in = 3.2 * cols, 2.4 * rows + 0.4
        fig = Figure(figsize=(width_in, height_in))
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
        # Fixed margins in inches instead of tight_layout, which measures every label (a third of the cost).
        fig.subplots_adjust(left=0.5 / width_in, right=1 - 0.15 / width_in, bottom=0.5 / height_in,
                            top=1 - 0.65 / height_in, wspace=0.3, hspace=0.55)
        for ax, (group, counts) in zip(axes.flat, groups.items()):
            ax.stairs(counts, edges, fill=True)  # one artist per histogram, not one rectangle per bin
            ax.set_title(f"{group} ({sum(counts)})", fontsize=9, y=1.0)  # a fixed place: no layout pass
            ax.tick_params(labelsize=7)
        for ax in axes[-1]:
            ax.set_xlabel(name, fontsize=8)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.suptitle(f"{name} histogram per {self.group_by or 'dataset'}", fontsize=10)
        return fig
