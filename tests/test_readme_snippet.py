"""The README's "From your own Keras script" block, run exactly as written, twice: the second run resumes.

The data is a gpt-2-simple `.txt` corpus prepared by `pitchkeras prepare`; the preset is a local `tiny` preset
directory (no download). Only PRESET and STEPS, the names the README leaves to the reader, are given.
"""

import csv
import json
import re
from pathlib import Path

import pytest

from pitchkeras.data.prepare import PrepareOptions, prepare

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = "synth beat drum machine bass loop club pulse guitar riff stage chorus horn piano swing trio".split()


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- own-script:start -->\s*```python\n(.*?)```\s*<!-- own-script:end -->", text, re.S)
    assert block, "README.md lost its own-script block"
    return block.group(1)


@pytest.mark.slow
def test_readme_own_script_snippet_trains_and_resumes(tmp_path, monkeypatch, capsys):
    from pitchkeras.model import TinyConfig, build_tiny_causal_lm

    docs = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(20)) + "." for i in range(40)]
    corpus = tmp_path / "bios.txt"
    corpus.write_text("".join(f"<|startoftext|>{d}<|endoftext|>\n" for d in docs), encoding="utf-8")
    prepare(corpus, tmp_path / "data", options=PrepareOptions(progress=False))
    texts = [row[0] for row in csv.reader(open(tmp_path / "data" / "train.csv", newline="", encoding="utf-8"))]
    preset = tmp_path / "preset"
    build_tiny_causal_lm(texts, config=TinyConfig(vocabulary_size=300, num_layers=1, num_heads=2, hidden_dim=32,
                                                  intermediate_dim=64), sequence_length=64).save_to_preset(str(preset))
    monkeypatch.chdir(tmp_path)
    code = compile(readme_snippet(), "README.md", "exec")

    exec(code, {"PRESET": str(preset), "STEPS": 3})
    first = capsys.readouterr().out
    assert first.startswith("The")
    assert (Path("run/checkpoints/latest").read_text().strip()) == "ckpt-00000003"

    exec(code, {"PRESET": str(preset), "STEPS": 6})  # a rerun continues at step 3
    with open("run/metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert sorted(p.name for p in Path("run/checkpoints").glob("ckpt-*")) == [  # keep=3 by default
        "ckpt-00000003", "ckpt-00000004", "ckpt-00000006"]
    state = json.loads(Path("run/checkpoints/ckpt-00000006/state.json").read_text())
    assert state["step"] == 6 and state["data_position"] == 6
