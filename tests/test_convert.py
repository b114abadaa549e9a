"""`pitchkeras import` / `export` against the peers' own code: gpt-2-simple, OpenAI's layout, transformers.

The gpt-2-simple run is written by gpt-2-simple's own graph code and TF's
Saver (tests/peers.py, in a child process), every weight random; its logits,
greedy samples and token ids come from gpt-2-simple's own forward pass,
`sample_sequence` and `Encoder`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pitchkeras.cli import main
from pitchkeras.conditioning import END_OF_TEXT, START_OF_TEXT, PromptFormat
from pitchkeras.postprocess import postprocess

# Not importorskip: importing gpt_2_simple turns eager execution off for the whole process (tests/peers.py).
if importlib.util.find_spec("gpt_2_simple") is None:
    pytest.skip("gpt-2-simple is not installed (pip install -e '.[peers]')", allow_module_level=True)

TOLERANCE = 1e-4  # max abs difference of float32 logits
PROMPTS = [
    f"{START_OF_TEXT}8.2\nElectronic\n",  # how gpt-2-simple users prompt: --prefix '<|startoftext|>8.2\nElectronic\n'
    f"{START_OF_TEXT}6.5\nRock\nGuitars, loud",
]
TEXTS = [
    PROMPTS[0] + "The synths shimmer." + END_OF_TEXT,  # the delimiters are plain text pieces, never one token
    "A café at 3 a.m., “naïve” joy — 🎧 ünïcödé.\n\n  Two blank lines\tand a tab.",
    "end.<|endoftext|><|startoftext|>next",  # punctuation glued to the delimiter: one BPE pre-token with it
    "DJ Koze grew up in Flensburg's clubs",
]
LENGTH = 12


def _logits(model, ids: list[int]) -> np.ndarray:
    ids = np.asarray([ids], dtype=np.int32)
    return np.asarray(model.causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}))[0]


def _import(capsys, *argv) -> tuple[int, str]:
    code = main(["import", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def gs(tmp_path_factory):
    """A gpt-2-simple run (gpt-2-simple's code), its reference outputs, and its import with conditions."""
    from tests.peers import gpt2_simple_reference

    root = tmp_path_factory.mktemp("gpt2simple")
    run_dir = root / "checkpoint" / "run1"
    reference = gpt2_simple_reference(run_dir, texts=TEXTS, prompts=PROMPTS, length=LENGTH)
    assert main(["import", str(run_dir), "--out", str(root / "model"), "--conditions", "score,genre"]) == 0
    return {"root": root, "run": run_dir, "model_dir": root / "model", **reference}


# -- the prompt format carries gpt-2-simple's text delimiters (no TensorFlow) ---------------

def test_prompt_format_with_text_delimiters():
    fmt = PromptFormat(("score", "genre"), ("score",), start_text=START_OF_TEXT, end_text=END_OF_TEXT,
                       start_token=False)
    assert fmt.prompt({"score": 8.2, "genre": "Electronic"}) == PROMPTS[0]
    assert fmt.prompt({"score": 8.2, "genre": "Electronic"}, prefix=START_OF_TEXT + "The") == PROMPTS[0] + "The"
    assert fmt.example({"score": 8.2, "genre": "Electronic"}, "Hi.") == PROMPTS[0] + "Hi." + END_OF_TEXT
    assert fmt.split(PROMPTS[0] + "Body") == ({"score": 8.2, "genre": "Electronic"}, "Body")
    assert fmt.stop_sequences == (END_OF_TEXT,) and PromptFormat().stop_sequences == ()
    assert PromptFormat.from_json(json.loads(json.dumps(fmt.to_json()))) == fmt
    assert PromptFormat().to_json() == {"conditions": ["score", "genre"], "numeric": ["score"]}  # unchanged JSON


def test_postprocess_cuts_at_the_stop_text():
    fmt = PromptFormat(("score", "genre"), ("score",), start_text=START_OF_TEXT, end_text=END_OF_TEXT)
    raw = PROMPTS[0] + "Warm pads. Deep bass." + END_OF_TEXT + START_OF_TEXT + "3.0\nRock\nAnother review."
    result = postprocess(raw, fmt, {"score": 8.2, "genre": "Electronic"})
    assert (result.text, result.rejected) == ("Warm pads. Deep bass.", None)


# -- gpt-2-simple runs ----------------------------------------------------------------------------

def test_gpt2_simple_run_logits_equal_gpt2_simple_forward_pass(gs):
    from pitchkeras.model import load_model

    model = load_model(gs["model_dir"])
    info = model.info
    assert info.source_layout == "gpt2-simple" and info.model_version == "import-run1-7"
    assert info.prompt_format.stop_sequences == (END_OF_TEXT,) and not info.prompt_format.start_token
    for ids, reference in zip(gs["prompt_ids"], gs["logits"]):
        ours = _logits(model, ids)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < TOLERANCE


def test_tokenizer_ids_equal_gpt2_simple_encoder(gs):
    from pitchkeras.model import load_model

    tokenizer = load_model(gs["model_dir"]).tokenizer
    for text, expected in zip(TEXTS, gs["encodings"]):
        assert np.asarray(tokenizer.tokenize(text)).tolist() == expected, text
    end_id = tokenizer.token_to_id(END_OF_TEXT)
    assert end_id not in gs["encodings"][0]  # gpt-2-simple never feeds the delimiter as token 50256


def test_greedy_generation_equals_sample_sequence(gs):
    from pitchkeras.model import load_model
    from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig

    generator = Generator(load_model(gs["model_dir"]), batch_size=2, max_new_tokens=LENGTH)
    requests = [GenerationRequest({"score": 8.2, "genre": "Electronic"}),
                GenerationRequest({"score": 6.5, "genre": "Rock"}, prefix="Guitars, loud")]
    greedy = SamplerConfig(temperature=1.0, top_k=1, top_p=1.0)
    samples = generator.generate(requests, config=greedy)
    for sample, prompt, expected in zip(samples, PROMPTS, gs["greedy_text"]):
        assert sample.prompt == prompt  # the text gpt-2-simple was fed, fed as the same ids (tested above)
        cut = expected.find(END_OF_TEXT)
        assert sample.raw == prompt + (expected if cut < 0 else expected[:cut])


def test_generate_cli_stops_at_the_stop_text_as_gpt2_simple_truncate(gs, tmp_path, capsys):
    """A plain import prompted as gpt-2-simple users do (--prefix with the delimiter), stopping at a stop text."""
    continuation = gs["greedy_text"][0]
    stop = continuation[3:6]  # a stop text the greedy continuation really reaches
    assert stop and END_OF_TEXT not in continuation[: continuation.find(stop) + len(stop)]
    code, err = _import(capsys, gs["run"], "--out", tmp_path / "plain", "--end-text", stop)
    assert code == 0 and f"stop sequences: {stop!r}" in err
    out = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(tmp_path / "plain"), "--prefix", PROMPTS[0], "--length", str(LENGTH),
                 "--temperature", "1", "--top-k", "1", "--top-p", "1", "--out", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["prompt"] == PROMPTS[0]
    assert record["raw"] == PROMPTS[0] + continuation[: continuation.find(stop)]


def test_openai_layout_imports_with_the_same_weights(gs, tmp_path, capsys):
    """OpenAI's base model directory (model.ckpt.*, as gpt-2-simple downloads models/124M): same variable names."""
    from pitchkeras.model import load_model

    base = tmp_path / "models" / "124M"
    base.mkdir(parents=True)
    for path in gs["run"].iterdir():
        if path.name.startswith("model-7."):
            shutil.copyfile(path, base / path.name.replace("model-7", "model.ckpt"))
        elif path.name in ("hparams.json", "encoder.json", "vocab.bpe"):
            shutil.copyfile(path, base / path.name)
    (base / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    code, err = _import(capsys, base, "--out", tmp_path / "base")
    assert code == 0 and "imported openai" in err
    model = load_model(tmp_path / "base")
    fmt = model.prompt_format
    assert (fmt.start_text, fmt.end_text, fmt.start_token, fmt.conditions) == ("", "", False, ())
    assert np.abs(_logits(model, gs["prompt_ids"][1]) - gs["logits"][1]).max() < TOLERANCE


# -- errors: one line naming the file, exit 2, nothing at --out ----------------------------

def _break_missing_encoder(run: Path) -> str:
    (run / "encoder.json").unlink()
    return "encoder.json: missing"


def _break_truncated_data(run: Path) -> str:
    data = next(run.glob("model-7.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return "model-7.data-*: cannot read"


def _break_hparams(run: Path) -> str:
    hparams = json.loads((run / "hparams.json").read_text())
    (run / "hparams.json").write_text(json.dumps(dict(hparams, n_embd=48)))
    return "model-7.index: model/wte has shape [400, 32], but"


def _break_layout(run: Path) -> str:
    for path in list(run.iterdir()):
        if path.name not in ("encoder.json", "vocab.bpe"):
            path.unlink()
    return "not a gpt-2-simple run, an OpenAI GPT-2 directory or a transformers GPT-2 directory"


def _break_step(run: Path) -> str:
    return "no checkpoint at step 99 (saved steps: 7)"


@pytest.mark.parametrize("breaker", [_break_missing_encoder, _break_truncated_data, _break_hparams, _break_layout,
                                     _break_step], ids=["missing-file", "truncated-data", "hparams-mismatch",
                                                        "unknown-layout", "no-such-step"])
def test_import_errors_are_one_line_and_leave_nothing(gs, tmp_path, capsys, breaker):
    run = tmp_path / "run1"
    shutil.copytree(gs["run"], run)
    expected = breaker(run)
    out = tmp_path / "out" / "model"
    extra = ["--step", "99"] if breaker is _break_step else []
    code, err = _import(capsys, run, "--out", out, *extra)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("pitchkeras import: error: ") and expected in err
    assert str(run) in err  # names the file
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_a_transformers_model_that_is_not_gpt2_is_refused(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = _import(capsys, tmp_path / "llama", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'llama' / 'config.json'}: model_type is 'llama'" in err and not (tmp_path / "out").exists()


def test_step_picks_a_saved_checkpoint(gs, tmp_path, capsys):
    run = tmp_path / "run1"
    shutil.copytree(gs["run"], run)
    (run / "checkpoint").unlink()  # --step needs no index file
    code, err = _import(capsys, run, "--out", tmp_path / "m", "--step", "7")
    assert code == 0 and f"{run / 'model-7'}" in err


def test_import_never_overwrites(gs, capsys):
    code, err = _import(capsys, gs["run"], "--out", gs["model_dir"])
    assert code == 2 and "already exists" in err
    assert (gs["model_dir"] / "pitchkeras.json").is_file()


def test_dataset_gives_the_known_condition_values(gs, tmp_path, capsys):
    from pitchkeras.model import ModelInfo
    from tests.peers import CORPUS

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")  # gpt-2-simple's training file
    code, _ = _import(capsys, gs["run"], "--out", tmp_path / "m", "--conditions", "score,genre",
                      "--dataset", corpus)
    assert code == 0
    values = ModelInfo.read(tmp_path / "m").condition_values
    assert values == {"score": [6.5, 8.2, 9.0], "genre": ["Electronic", "Jazz", "Rock"]}


# -- transformers, both ways ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(gs):
    """A random-weight transformers GPT-2 (norms included) saved by `save_pretrained`, with gs's vocabulary."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocabulary = json.loads((gs["run"] / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (gs["run"] / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
              if line]
    end = vocabulary[END_OF_TEXT]
    config = transformers.GPT2Config(vocab_size=len(vocabulary), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=end, eos_token_id=end)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            norm = ".ln_" in name
            parameter.copy_(torch.randn_like(parameter) * (0.5 if norm else 0.2) + float(norm and "weight" in name))
    path = gs["root"] / "hf"
    model.save_pretrained(path)
    transformers.GPT2Tokenizer(vocab=vocabulary, merges=merges).save_pretrained(path)
    return path


def _hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_transformers_import_export_round_trip(gs, hf_dir, tmp_path, capsys):
    import transformers

    from pitchkeras.model import load_model

    code, err = _import(capsys, hf_dir, "--out", tmp_path / "model")
    assert code == 0 and "imported transformers" in err
    model = load_model(tmp_path / "model")
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert np.asarray(model.tokenizer.tokenize(text)).tolist() == source_tokenizer(text)["input_ids"], text
    ids = source_tokenizer(TEXTS[1])["input_ids"]
    ours = _logits(model, ids)
    assert np.abs(ours - _hf_logits(hf_dir, ids)).max() < TOLERANCE

    assert main(["export", str(tmp_path / "model"), "--format", "transformers", "--out", str(tmp_path / "hf")]) == 0
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert exported_tokenizer(text)["input_ids"] == np.asarray(model.tokenizer.tokenize(text)).tolist(), text
    assert np.abs(_hf_logits(tmp_path / "hf", ids) - ours).max() < TOLERANCE


def test_export_of_a_gpt2_simple_run_carries_its_stop_text(gs, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(gs["model_dir"]), "--out", str(tmp_path / "hf")]) == 0
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.stop_strings == [END_OF_TEXT]
    ids = gs["prompt_ids"][0]
    assert np.abs(_hf_logits(tmp_path / "hf", ids) - gs["logits"][0]).max() < TOLERANCE
    assert main(["export", str(gs["model_dir"]), "--out", str(tmp_path / "hf")]) == 2  # never overwrites


@pytest.mark.slow
def test_ctranslate2_converts_the_export(gs, tmp_path):
    """The README's next step after `export`: CTranslate2's own converter, then its logits equal gpt-2-simple's."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ctranslate2 = pytest.importorskip("ctranslate2")
    converter = shutil.which("ct2-transformers-converter")
    if converter is None:
        pytest.skip("ct2-transformers-converter is not on PATH")
    assert main(["export", str(gs["model_dir"]), "--out", str(tmp_path / "hf")]) == 0
    subprocess.run([converter, "--model", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "ct2")], check=True,
                   capture_output=True, timeout=300)
    generator = ctranslate2.Generator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    logits = np.array(generator.forward_batch([gs["prompt_ids"][1]]))[0]
    assert np.abs(logits - gs["logits"][1]).max() < TOLERANCE


def test_an_exported_run_imports_back_unchanged(gs, tmp_path, capsys):
    """gpt-2-simple -> pitchkeras -> transformers -> pitchkeras: format, values, token ids and logits survive."""
    pytest.importorskip("torch")
    from pitchkeras.model import ModelInfo, load_model

    assert main(["export", str(gs["model_dir"]), "--out", str(tmp_path / "hf")]) == 0
    code, err = _import(capsys, tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0 and "conditions: score, genre" in err
    model = load_model(tmp_path / "back")
    original = ModelInfo.read(gs["model_dir"])
    assert model.prompt_format == original.prompt_format
    assert model.info.condition_values == original.condition_values
    for text, expected in zip(TEXTS, gs["encodings"]):
        assert np.asarray(model.tokenizer.tokenize(text)).tolist() == expected, text
    assert np.abs(_logits(model, gs["prompt_ids"][0]) - gs["logits"][0]).max() < TOLERANCE


# -- an imported run is a model directory like any other ----------------------------------

@pytest.mark.slow
def test_finetune_continues_an_imported_run(gs, tmp_path, capsys):
    from pitchkeras.model import load_model

    corpus = tmp_path / "reviews.txt"  # gpt-2-simple's training file for the run
    corpus.write_text("\n".join(f"{START_OF_TEXT}{5 + i % 5}.0\nRock\nRecord number {i} is loud, then quiet, "
                                f"then loud again.{END_OF_TEXT}" for i in range(60)), encoding="utf-8")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    code = main(["finetune", "--dataset", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ck"),
                 "--preset", str(gs["model_dir"]), "--steps", "2", "--batch-size", "2", "--sequence-length", "32",
                 "--learning-rate", "1e-3", "--val-every", "0", "--jit-compile", "false", "--quiet"])
    assert code == 0, capsys.readouterr().err
    before, after = load_model(gs["model_dir"]), load_model(tmp_path / "ck" / "run1" / "model")
    wte = "token_embedding"
    start = before.causal_lm.backbone.get_layer(wte).embeddings.numpy()
    trained = after.causal_lm.backbone.get_layer(wte).embeddings.numpy()
    assert start.shape == trained.shape and 0 < np.abs(start - trained).max() < 0.1  # continued, not restarted
    assert after.tokenizer.unsplittable_tokens == []  # still gpt-2-simple's tokenizer


@pytest.mark.slow
def test_serve_generates_from_an_imported_run(gs, tmp_path):
    from pitchkeras.client import ReviewClient
    from pitchkeras.server.app import BackgroundServer

    with BackgroundServer(f"sqlite:///{tmp_path}/reviews.db", model_dir=str(gs["model_dir"])) as background:
        assert background.wait_until_ready(180) == "ready"
        with ReviewClient(f"127.0.0.1:{background.port}") as client:
            [result] = client.generate(score=8.2, genre="Electronic", max_length=8, seed=3)
    assert result.raw.startswith(PROMPTS[0])  # gpt-2-simple's prompt, delimiter included
    assert END_OF_TEXT not in result.raw[len(PROMPTS[0]):]  # cut at the stop text
    assert result.review.model_version == "import-run1-7"
