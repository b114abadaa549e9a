"""`pitchkeras generate` end to end on a tiny model directory: JSONL, text output, one-line errors."""

import csv
import json

import pytest

from pitchkeras.cli import main
from pitchkeras.conditioning import REVIEWS

TEXTS = [
    REVIEWS.example({"score": score, "genre": genre}, "The band plays loud. Mr. Smith sings well for everyone.")
    for score in (3.0, 8.0)
    for genre in ("Rock", "Jazz")
] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pitchkeras.model import ModelInfo, build_tiny_causal_lm, save_model_dir

    root = tmp_path_factory.mktemp("ckpt")
    lm = build_tiny_causal_lm(TEXTS, sequence_length=64)
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, "cli-v1", "tiny", 64)
    save_model_dir(lm, info, root / "run1" / "model")
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[t] for t in TEXTS])
    return root


def test_jsonl_records(model_dir, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    code = main(["generate", "--checkpoint-dir", str(model_dir), "--run-name", "run1", "--score", "8", "--genre", "rock",
                 "--nsamples", "3", "--batch-size", "2", "--length", "10", "--seed", "7", "--top-k", "40",
                 "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3", "--dataset", str(model_dir / "train.csv"), "--out", str(out), "--quiet"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["seed"] for r in records] == [7, 8, 9]
    for record in records:
        assert record["conditions"] == {"score": 8.0, "genre": "Rock"}
        assert record["sampler"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.2,
                                     "no_repeat_ngram_size": 3}
        assert record["model_version"] == "cli-v1"
        assert record["raw"].startswith("8.0\nRock\n")
        assert (record["rejected"] is None) == bool(record["text"])
    err = capsys.readouterr().err
    assert "/3 accepted" in err and f"wrote {out}" in err
    rejected = [r["rejected"] for r in records if r["rejected"]]
    for reason in set(rejected):  # rejections are counted by reason on stderr
        assert f"{reason} {rejected.count(reason)}" in err


def test_same_seed_same_jsonl(model_dir, tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        assert main(["generate", "--model", str(model_dir / "run1" / "model"), "--score", "3", "--genre", "Jazz",
                     "--nsamples", "2", "--length", "8", "--out", str(tmp_path / name), "--quiet"]) == 0
        outs.append((tmp_path / name).read_text(encoding="utf-8"))
    assert outs[0] == outs[1]


def test_text_output_uses_the_gpt2_simple_delimiter(model_dir, monkeypatch, capsys):
    from pitchkeras import sampling
    from pitchkeras.postprocess import PostprocessOptions

    # An untrained model writes fragments; accept them here to see the printed form.
    relaxed = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False)
    original = sampling.Generator.__init__
    monkeypatch.setattr(sampling.Generator, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "postprocess_options": relaxed}))
    code = main(["generate", "--model", str(model_dir / "run1" / "model"), "--score", "8", "--genre", "Rock",
                 "--prefix", "The", "--nsamples", "2", "--length", "6", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    parts = out.rstrip("\n").split("\n" + "=" * 20 + "\n")
    assert len(parts) == 2 and all(p.startswith("The") for p in parts)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--score", "8", "--genre", "Polka"], "unknown genre 'Polka' for this model; known: Jazz, Rock"),
        (["--score", "8"], "needs --genre (genres: Jazz, Rock)"),
        (["--score", "80", "--genre", "Rock"], "outside this model's range"),
        (["--score", "8", "--genre", "Rock", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--score", "8", "--genre", "Rock", "--temperature", "0"], "temperature must be in (0, 2]"),
        (["--score", "8", "--genre", "Rock", "--nsamples", "0"], "--nsamples must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, capsys, argv, message):
    code = main(["generate", "--model", str(model_dir / "run1" / "model"), "--quiet"] + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_model_dir(tmp_path, capsys):
    assert main(["generate", "--checkpoint-dir", str(tmp_path), "--score", "8", "--genre", "Rock"]) == 2
    assert "run `pitchkeras finetune` first" in capsys.readouterr().err


def test_quantize_int8_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "int8.jsonl"
    assert main(["generate", "--model", str(model_dir / "run1" / "model"), "--score", "8", "--genre", "Rock",
                 "--nsamples", "2", "--length", "8", "--quantize", "int8", "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and all(r["raw"].startswith("8.0\nRock\n") for r in records)
    assert "/2 accepted" in capsys.readouterr().err


def test_unknown_quantize_mode_is_one_line_and_exit_2(model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(model_dir / "run1" / "model"), "--quantize", "int4"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--quantize: invalid choice: 'int4'" in err and len(err.strip().splitlines()) == 1


def test_logprobs_go_into_the_jsonl_records(model_dir, tmp_path, capsys):
    out = tmp_path / "logprobs.jsonl"
    argv = ["generate", "--checkpoint-dir", str(model_dir), "--run-name", "run1", "--score", "8", "--genre", "Rock",
            "--nsamples", "2", "--length", "6", "--seed", "3", "--top-k", "1", "--out", str(out), "--quiet"]
    assert main(argv + ["--logprobs", "2"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for record in records:
        tokens = record["logprobs"]
        assert 1 <= len(tokens) <= 6 and all(t["logprob"] <= 0 for t in tokens)
        for token in tokens:  # greedy (--top-k 1): the chosen token is the most likely of the two shown
            assert [set(t) for t in token["top_logprobs"]] == [{"token_id", "token", "logprob"}] * 2
            assert token["top_logprobs"][0]["token_id"] == token["token_id"]
        assert record["raw"].endswith("".join(t["token"] for t in tokens))
    plain = tmp_path / "plain.jsonl"
    assert main([a if a != str(out) else str(plain) for a in argv]) == 0  # the same texts without --logprobs
    assert [json.loads(line)["raw"] for line in plain.read_text(encoding="utf-8").splitlines()] == [
        r["raw"] for r in records]
    assert "logprobs" not in json.loads(plain.read_text(encoding="utf-8").splitlines()[0])
    assert main(argv[:-3] + ["--logprobs", "2"]) == 2  # without --out
    assert main(argv + ["--logprobs", "6"]) == 2
    err = capsys.readouterr().err
    assert "--logprobs needs --out" in err and "--logprobs must be in [0, 5], got 6" in err
