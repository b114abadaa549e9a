"""`pitchkeras report` end to end on a tiny model: figures match the samples, JSON + PNG written, one-line errors."""

import csv
import json

import pytest

from pitchkeras.cli import main
from pitchkeras.conditioning import REVIEWS

BODY = "The band plays loud. Mr. Smith sings well for everyone. He is great and she is kind."
TEXTS = [REVIEWS.example({"score": score, "genre": genre}, BODY) for score in (3.0, 8.0) for genre in ("Rock", "Jazz")] * 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from pitchkeras.model import ModelInfo, TinyConfig, build_tiny_causal_lm, save_model_dir

    root = tmp_path_factory.mktemp("report")
    config = TinyConfig(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64)
    lm = build_tiny_causal_lm(TEXTS, config=config, sequence_length=64)
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, "report-v1", "tiny", 64)
    save_model_dir(lm, info, root / "model")
    (root / "dataset").mkdir()
    with open(root / "dataset" / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[t] for t in TEXTS])
    return root


@pytest.fixture(scope="module")
def relaxed_generator():
    """An untrained model writes fragments: accept them, so the figures are computed over real text."""
    from pitchkeras import sampling
    from pitchkeras.postprocess import PostprocessOptions

    relaxed = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False)
    original = sampling.Generator.__init__
    mp = pytest.MonkeyPatch()
    mp.setattr(sampling.Generator, "__init__",
               lambda self, *a, **k: original(self, *a, **{**k, "postprocess_options": relaxed}))
    yield
    mp.undo()


def _report(dirs, out, *extra):
    return main(["report", "--model", str(dirs / "model"), "--dataset", str(dirs / "dataset"), "--per-condition", "2",
                 "--scores", "3,8", "--length", "8", "--batch-size", "4", "--seed", "5", "--out-dir", str(out),
                 "--quiet", *extra])


@pytest.fixture(scope="module")
def fresh(dirs, relaxed_generator, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert _report(dirs, out) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return out, report, samples


def test_figures_are_computed_from_the_samples(fresh, dirs):
    from pitchkeras.quality import MemorizationIndex, distinct_n, pronoun_counts

    _, report, samples = fresh
    assert report["model_version"] == "report-v1"
    assert report["sampler"] == {"temperature": 0.7, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0,
                                 "no_repeat_ngram_size": 0}
    # 2 scores x 2 genres x 2 samples, seeds 5.. in grid order.
    assert len(samples) == 8 and [s["seed"] for s in samples] == list(range(5, 13))
    assert [r["condition"] for r in report["conditions"]] == ["3.0 Jazz", "8.0 Jazz", "3.0 Rock", "8.0 Rock"]
    index = MemorizationIndex.from_examples([BODY])
    for row in report["conditions"]:
        mine = [s for s in samples if s["conditions"] == row["conditions"]]
        texts = [s["text"] for s in mine if not s["rejected"]]
        assert row["generated"] == len(mine) == 2
        assert row["accepted"] == row["samples"] == len(texts)
        assert row["distinct_2"] == round(distinct_n(texts, 2), 4)
        assert row["distinct_3"] == round(distinct_n(texts, 3), 4)
        assert row["pronouns"] == pronoun_counts(texts)
        if texts:
            checks = [index.check(t) for t in texts]
            assert row["max_longest_copied_run"] == max(c["longest_copied_run"] for c in checks)
    accepted = [s["text"] for s in samples if not s["rejected"]]
    assert accepted, "relaxed post-processing should accept some fragments"
    assert report["overall"]["generated"] == 8 and report["overall"]["accepted"] == len(accepted)
    assert report["overall"]["distinct_2"] == round(distinct_n(accepted, 2), 4)
    assert 0.0 < report["overall"]["distinct_2"] <= 1.0
    # The training corpus is one body repeated 40 times: low diversity, all "he"/"she" from that body.
    training = report["training"]
    assert training["samples"] == 40
    assert training["distinct_2"] == round(distinct_n([BODY] * 40, 2), 4) < 0.5
    assert training["pronouns"] == {"he": 40, "she": 40, "they": 0}


def test_png_written_atomically(fresh):
    out, report, _ = fresh
    png = (out / "report.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_table_printed(dirs, relaxed_generator, tmp_path, capsys):
    assert _report(dirs, tmp_path, "--genres", "rock", "--scores", "8", "--prefix", BODY) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["condition", "ok/gen", "dist-2", "dist-3"]
    assert "8.0 Rock" in out and "training data" in out and "report.json" in out
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    # A prefix copied from the training body: the copy is measured (or rejected as memorized).
    row = report["conditions"][0]
    assert row["generated"] == 2
    if row["accepted"]:
        assert row["max_longest_copied_run"] >= len(BODY.split())
        assert row["mean_copied_ngram_fraction"] > 0
    assert row["accepted"] + row["rejected"].get("memorized", 0) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per-condition", "0"], "--per-condition must be >= 1"),
        (["--scores", "8,x"], "--scores must be comma-separated numbers"),
        (["--genres", "Polka"], "unknown genre 'Polka' for this model; known: Jazz, Rock"),
        (["--scores", "80"], "outside this model's range"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size must be >= 0 (0 = off) and an integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(dirs, tmp_path, capsys, argv, message):
    code = main(["report", "--model", str(dirs / "model"), "--dataset", str(dirs / "dataset"),
                 "--out-dir", str(tmp_path), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


def test_missing_inputs(dirs, tmp_path, capsys):
    assert main(["report", "--model", str(tmp_path / "nope"), "--dataset", str(dirs / "dataset")]) == 2
    assert "run `pitchkeras finetune` first or pass --model" in capsys.readouterr().err
    assert main(["report", "--model", str(dirs / "model"), "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.csv does not exist" in err and len(err.strip().splitlines()) == 1


def test_repetition_rejections_are_counted_per_condition_and_printed():
    import types

    from pitchkeras.commands.report import build_report, format_report
    from pitchkeras.postprocess import postprocess

    rock8 = {"score": 8.0, "genre": "Rock"}
    raws = ["8.0\nRock\n" + BODY, "8.0\nRock\nA resident resident resident resident at the club."]
    samples = [types.SimpleNamespace(text=p.text, rejected=p.rejected)
               for p in (postprocess(raw, REVIEWS, rock8) for raw in raws)]
    report = build_report({"8.0 Rock": (rock8, samples)}, None, [BODY])
    assert report["conditions"][0]["rejected"] == {"repetition": 1}
    assert (report["conditions"][0]["accepted"], report["overall"]["generated"]) == (1, 2)
    assert "repetition 1" in format_report(report).splitlines()[2]
