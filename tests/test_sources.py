"""`pitchkeras.data.sources`: the CSV reader's fallback to the python parser, and inputs with no rows."""

import pandas as pd
import pytest

from pitchkeras.data import sources
from pitchkeras.data.sources import MALFORMED, UNDECODABLE, open_source


def _rows(path, columns):
    return [row for frame in open_source(path).frames(columns) for row in frame.to_dict("records")]


@pytest.mark.parametrize("chunk_rows", [1, 2, 1000])
def test_a_bad_csv_line_after_good_chunks_is_read_once_as_malformed(tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setattr(sources, "CHUNK_ROWS", chunk_rows)
    path = tmp_path / "d.csv"
    path.write_bytes(b'score,text\n1,"first, quoted\nover two lines"\n2,second\n3,an unquoted, comma\n4,caf\xe9\n5,fifth\n')
    source = open_source(path)
    rows = [row for frame in source.frames(["text", "score"]) for row in frame.to_dict("records")]
    assert [None if pd.isna(r["score"]) else r["score"] for r in rows] == ["1", "2", None, "4", "5"]  # once, in order
    assert [r[MALFORMED] for r in rows] == [False, False, True, False, False]
    assert [r[UNDECODABLE] for r in rows] == [False, False, False, True, False]
    assert rows[0]["text"] == "first, quoted\nover two lines" and pd.isna(rows[3]["text"])  # no bytes in a cell
    assert source.fallbacks == 1


def test_a_header_only_csv_reads_no_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("score,genre,text\n", encoding="utf-8")
    assert _rows(path, ["text"]) == []
