"""What `prepare` writes: the three CSVs, and the repair that keeps both splits non-empty on tiny datasets.

`Outputs` holds `examples.csv`, `train.csv` and `val.csv` open as temporary files (`pitchkeras.io.AtomicFile`) and
renames them into place together on `commit()`; `discard()` leaves the directory as it was. Rows are written the way
`csv.writer` writes one field (quoted when it holds a comma, quote or line end; `\\n` line ends; no header), so
multi-line examples survive.

`SplitEdges` remembers the examples at the lowest and highest split hash, so that when the hash leaves a split empty
(a dataset of a few examples) the nearest review's examples can move over (`ensure_both_splits`).
"""

from __future__ import annotations

import numpy as np

from pitchkeras.data.pipeline import read_examples
from pitchkeras.io import AtomicFile


def csv_rows(examples) -> np.ndarray:
    """Each example (str) as its CSV row in UTF-8: quoted (quotes doubled) where `csv.writer` would quote it,
    newline-ended."""
    return np.array([('"' + e.replace('"', '""') + '"\n' if "\n" in e or "," in e or '"' in e or "\r" in e
                      else e + "\n").encode("utf-8") for e in examples], dtype=object)


class Outputs:
    """The three CSVs, written to temporary files in `out_dir` and renamed into place by `commit`."""

    NAMES = ("examples.csv", "train.csv", "val.csv")

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.files: dict[str, AtomicFile] = {}
        try:
            for name in self.NAMES:
                self.files[name] = AtomicFile(out_dir / name, "wb")
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, rows: np.ndarray) -> None:
        """Append rows made by `csv_rows`."""
        self.files[name].file.writelines(rows)  # row by row: no chunk-sized string to allocate and fault in

    def commit(self) -> None:
        for atomic in self.files.values():
            atomic.commit()

    def discard(self) -> None:
        for atomic in self.files.values():
            atomic.discard()


class SplitEdges:
    """The examples at the lowest and the highest split hash seen so far, each edge as `[coin, examples]`."""

    def __init__(self):
        self.lowest, self.highest = [2.0, []], [-1.0, []]

    def track(self, coins: np.ndarray, examples: np.ndarray) -> None:
        for edge, coin in ((self.lowest, float(coins.min())), (self.highest, float(coins.max()))):
            at_coin = examples[coins == coin].tolist()
            if coin == edge[0]:
                edge[1].extend(at_coin)
            elif (coin < edge[0]) == (edge is self.lowest):  # beyond the edge so far
                edge[:] = [coin, at_coin]

    def ensure_both_splits(self, outputs: Outputs, counts, val_fraction: float) -> None:
        """On tiny datasets the hash may leave a split empty: move the nearest review's examples over.

        Training reads `val.csv` for evaluation, so an empty one would fail later and less clearly. `counts` has
        `kept`, `train` and `val`.
        """
        if counts.kept < 2 or val_fraction == 0:
            return
        if counts.val == 0:
            self._move(outputs, counts, self.lowest[1], "train", "val")
        elif counts.train == 0:
            self._move(outputs, counts, self.highest[1], "val", "train")

    @staticmethod
    def _move(outputs: Outputs, counts, examples: list, source: str, target: str) -> None:
        """Move `examples` from split `source` to `target` (rows appended in order), unless that empties `source`."""
        moved = dict.fromkeys(examples)
        if len(moved) >= counts.kept:
            return
        for atomic in outputs.files.values():
            atomic.file.close()
        source_tmp, target_tmp = outputs.files[f"{source}.csv"].tmp, outputs.files[f"{target}.csv"].tmp
        rows = csv_rows([e for e in read_examples(source_tmp) if e not in moved])
        with open(source_tmp, "wb") as f:
            f.writelines(rows)
        with open(target_tmp, "ab") as f:
            f.writelines(csv_rows(moved))
        setattr(counts, source, getattr(counts, source) - len(moved))
        setattr(counts, target, getattr(counts, target) + len(moved))
