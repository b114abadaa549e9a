"""`pitchkeras.data.outputs`: CSV rows exactly as `csv.writer` writes them, and the split repair on tiny datasets."""

import csv
import os
import stat
import io
import random

import numpy as np

from pitchkeras.data.outputs import Outputs, SplitEdges, csv_rows
from pitchkeras.data.pipeline import read_examples


def test_csv_rows_are_what_csv_writer_writes():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", ",", '"', "\n", "é", "東", "<|endoftext|>", "'", ";", "\t", "\u2028"]
    examples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows([e] for e in examples)
    assert b"".join(csv_rows(examples)).decode("utf-8") == expected.getvalue()
    assert not len(csv_rows([]))


def test_split_repair_moves_the_nearest_review_and_keeps_the_files_readable(tmp_path):
    outputs = Outputs(tmp_path)
    examples = np.array(["one,\nfirst", 'two "second"', "three"], dtype=object)
    coins = np.array([0.5, 0.2, 0.9])
    outputs.write("train.csv", csv_rows(examples))
    edges = SplitEdges()
    edges.track(coins, examples)

    class Counts:
        kept, train, val = 3, 3, 0

    edges.ensure_both_splits(outputs, Counts, val_fraction=0.05)
    outputs.commit()
    assert read_examples(tmp_path / "val.csv") == ['two "second"']  # the lowest hash moved to val
    assert read_examples(tmp_path / "train.csv") == ["one,\nfirst", "three"]
    assert (Counts.train, Counts.val) == (2, 1)


def test_prepared_files_get_the_modes_the_umask_gives(tmp_path):
    from pitchkeras.data.prepare import PrepareOptions, prepare
    from tests import dumps

    path = dumps.write_csv(tmp_path / "d.csv")
    old = os.umask(0o027)
    try:
        result = prepare(path, tmp_path / "out", options=PrepareOptions(progress=False))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in result.out_dir.iterdir()}
    assert modes == {name: 0o640 for name in ("examples.csv", "train.csv", "val.csv", "stats.json", "stats.png")}
    assert stat.S_IMODE(result.out_dir.stat().st_mode) == 0o750
