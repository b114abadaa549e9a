"""The populate job end to end on a tiny model: grid, table, metadata, resume, shards, errors.

The tiny model is a real GPT-2 CausalLM saved and loaded through the model
directory contract, with weights set so its next-token distribution is fixed
and known (see `unigram_model_dir`): about two thirds of its samples hold a
sentence and pass post-processing, the rest are rejected as `no_sentence`.
An untrained model would be rejected almost always, so nothing would be stored.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pitchkeras.cli import main
from pitchkeras.conditioning import REVIEWS, PromptFormat
from pitchkeras.populate import PopulateConfig, attempt_seed, format_table, populate
from pitchkeras.sampling import SamplerConfig
from pitchkeras.store import ConditionCount, review_id
from pitchkeras.store.sqlite import SQLiteStore
from tests.store_fixtures import REPO_ROOT

pytest.importorskip("tensorflow")

MODEL_VERSION = "unigram-v1"
SCORES = [3.0, 8.0]
GENRES = ["Rock", "Jazz"]
LENGTH = 12  # new tokens per sample; one value everywhere, so the generator compiles few shapes
TOKENIZER_TEXTS = [
    REVIEWS.example({"score": s, "genre": g}, body)
    for s in SCORES for g in GENRES
    for body in ("The band plays loud. The singer is good.", "A quiet record. It is good music.")
] * 4


@pytest.fixture(scope="module")
def unigram_model_dir(tmp_path_factory):
    """A tiny GPT-2 whose every next token is drawn from one fixed distribution.

    The final layer norm gets gamma = 0 and beta = e0, so the last hidden state
    is e0 whatever the input, and the logits (tied embeddings) are column 0 of
    the token embedding: " good" and " lo" likely, "." less so, `<|endoftext|>`
    rare, everything else never. A sample is accepted when it has a "." before
    its end, which makes both outcomes common.
    """
    import numpy as np

    from pitchkeras.model import ModelInfo, TinyConfig, build_tiny_causal_lm, save_model_dir

    config = TinyConfig(vocabulary_size=300, num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64,
                        max_sequence_length=64)
    lm = build_tiny_causal_lm(TOKENIZER_TEXTS, config=config, sequence_length=32)
    tokenizer = lm.preprocessor.tokenizer
    backbone = lm.backbone
    norm = backbone.get_layer("layer_norm")
    norm.gamma.assign(np.zeros(norm.gamma.shape, "float32"))
    beta = np.zeros(norm.beta.shape, "float32")
    beta[0] = 1.0
    norm.beta.assign(beta)
    embeddings = np.array(backbone.token_embedding.embeddings.numpy())
    embeddings[:, 0] = -30.0
    for text, logit in ((" good", 2.0), (" loud", 1.9), (".", 1.0)):
        embeddings[int(np.asarray(tokenizer(text))[0]), 0] = logit
    embeddings[tokenizer.end_token_id, 0] = 0.0
    backbone.token_embedding.embeddings.assign(embeddings)

    root = tmp_path_factory.mktemp("models")
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, MODEL_VERSION, "tiny", 32)
    return save_model_dir(lm, info, root / "model")


@pytest.fixture(scope="module")
def generator(unigram_model_dir):
    from pitchkeras.model import load_model
    from pitchkeras.sampling import Generator

    return Generator(load_model(unigram_model_dir), batch_size=4, max_new_tokens=LENGTH)


class CountingGenerator:
    """Wraps a Generator, recording every request the decode engine is handed (it prepares each once)."""

    def __init__(self, generator):
        self.generator = generator
        self.requests: list = []

    def prepare(self, request):
        self.requests.append(request)
        return self.generator.prepare(request)

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def attempts(self) -> collections.Counter:
        """Requests per pair, keyed by (score, genre)."""
        return collections.Counter(_key(r.conditions or {}) for r in self.requests)


def _key(conditions: dict) -> tuple:
    return (conditions.get("score"), conditions.get("genre"))


def _config(tmp_path, name="reviews.db", **overrides) -> PopulateConfig:
    settings = dict(model="unused: a generator is passed", store=f"sqlite:///{tmp_path / name}", per_pair=2,
                    scores=SCORES, genres=["rock", "Jazz"], length=LENGTH, batch_size=4, seed=1, max_attempts=4)
    sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    settings.update({k: v for k, v in overrides.items() if k not in sampler_fields})
    settings["sampler"] = SamplerConfig(**{k: v for k, v in overrides.items() if k in sampler_fields})
    return PopulateConfig(**settings)


def _run(config, generator, **kwargs):
    counting = CountingGenerator(generator)
    result = populate(config, generator=counting, progress=False, log=lambda msg: None, **kwargs)
    return result, counting


def _stored(config) -> dict:
    with SQLiteStore(config.store[len("sqlite:///"):]) as store:
        counts = store.counts()
        ids = store.existing_ids([
            review_id(MODEL_VERSION, {"score": s, "genre": g}, config.seed, a)
            for s in SCORES for g in GENRES for a in range(config.per_pair * config.max_attempts)
        ])
        return {"counts": counts, "ids": ids, "reviews": [store.get_by_id(i) for i in sorted(ids)]}


def test_fills_grid_with_metadata_and_a_table(tmp_path, generator):
    config = _config(tmp_path)
    result, counting = _run(config, generator)

    assert [p.conditions for p in result.pairs] == [
        {"score": 3.0, "genre": "Jazz"}, {"score": 3.0, "genre": "Rock"},
        {"score": 8.0, "genre": "Jazz"}, {"score": 8.0, "genre": "Rock"},
    ]  # "rock" spelt as the model was trained
    for pair in result.pairs:
        assert (pair.requested, pair.existing, pair.stored, pair.missing) == (2, 0, 2, 0)
        # Every attempt was stored or rejected for a reason, and none beyond the budget.
        assert pair.stored + sum(pair.rejected.values()) == counting.attempts()[_key(pair.conditions)] <= 8
    # The unigram model writes fragments and loops (" good good good good."): both reasons are counted.
    assert set(result.rejected) == {"no_sentence", "repetition"}
    assert result.rejected["no_sentence"] > 0 and result.rejected["repetition"] > 0
    # The engine's slots mix pairs: the first four requests are the first two attempts of two pairs.
    assert len({_key(r.conditions) for r in counting.requests[:4]}) == 2

    stored = _stored(config)
    assert stored["counts"] == [ConditionCount(s, g, 2) for g in sorted(GENRES) for s in SCORES]
    for review in stored["reviews"]:
        attempt = next(a for a in range(8) if attempt_seed(config.seed, a) == review.seed)
        assert review.id == review_id(MODEL_VERSION, review.conditions, config.seed, attempt)
        assert review.model_version == MODEL_VERSION
        assert (review.temperature, review.top_k, review.top_p) == (0.7, 0, 0.95)
        assert (review.repetition_penalty, review.no_repeat_ngram_size) == (1.0, 0)
        assert review.prompt == f"{review.score:.1f}\n{review.genre}\n"
        assert review.text.endswith(".") and review.length == len(review.text.split()) > 0

    table = format_table(result).splitlines()
    assert table[0].split() == ["score", "genre", "requested", "existing", "stored", "missing", "rej:no_sentence",
                                "rej:repetition"]
    rows = [line.split() for line in table[2:]]
    assert [r[:6] for r in rows[:4]] == [[f"{s:.1f}", g, "2", "0", "2", "0"] for s in SCORES for g in sorted(GENRES)]
    assert rows[4][:5] == ["total", "8", "0", "8", "0"]
    assert rows[4][5:] == [str(result.rejected["no_sentence"]), str(result.rejected["repetition"])]


def test_repetition_settings_reach_the_sampler_and_the_store(tmp_path, generator):
    config = _config(tmp_path, scores=[8.0], repetition_penalty=1.3, no_repeat_ngram_size=2)
    result, counting = _run(config, generator)
    assert result.stored == 4
    with SQLiteStore(config.store[len("sqlite:///"):]) as store:
        ids = store.existing_ids([review_id(MODEL_VERSION, p.conditions, config.seed, a)
                                  for p in result.pairs for a in range(8)])
        reviews = [store.get_by_id(i) for i in ids]
    assert len(reviews) == 4
    assert {(r.repetition_penalty, r.no_repeat_ngram_size) for r in reviews} == {(1.3, 2)}


def test_rerun_adds_nothing_and_generates_nothing_for_full_pairs(tmp_path, generator):
    config = _config(tmp_path)
    first, _ = _run(config, generator)
    assert first.stored == 8
    again, counting = _run(config, generator)
    assert again.stored == 0 and counting.requests == []
    assert [(p.existing, p.missing) for p in again.pairs] == [(2, 0)] * 4
    assert len(_stored(config)["ids"]) == 8


def test_attempts_are_bounded_and_a_short_pair_is_reported(tmp_path, generator):
    """With top_k=1 the model always writes " good good ...": never a sentence."""
    config = _config(tmp_path, top_k=1, max_attempts=3)
    result, counting = _run(config, generator)
    assert result.stored == 0
    for pair in result.pairs:
        assert (pair.stored, pair.missing) == (0, 2)
        assert pair.rejected == {"no_sentence": 2 * 3}
    assert counting.attempts() == {_key(p.conditions): 6 for p in result.pairs}
    rows = [line.split() for line in format_table(result).splitlines()[2:]]
    assert [r[2:] for r in rows[:4]] == [["2", "0", "0", "2", "6"]] * 4  # requested, existing, stored, missing, rejected
    # Generation is deterministic per (seed, attempt): a rerun redoes the same attempts and stays short.
    again, counting = _run(config, generator)
    assert again.stored == 0 and sum(counting.attempts().values()) == 4 * 6


def test_interrupted_run_resumes_and_fills_only_what_is_missing(tmp_path, generator):
    reference = _config(tmp_path, name="reference.db")
    _run(reference, generator)
    expected = _stored(reference)["ids"]

    config = _config(tmp_path, name="interrupted.db")
    store = SQLiteStore(str(tmp_path / "interrupted.db"))
    writes = []
    original_add = store.add_reviews

    def add_then_crash(reviews):
        if writes:
            raise RuntimeError("killed")  # the second write never happens
        writes.append(original_add(reviews))
        return writes[-1]

    store.add_reviews = add_then_crash
    with pytest.raises(RuntimeError, match="killed"):
        _run(config, generator, store=store)
    store.close()
    before = _stored(config)["ids"]
    assert 0 < len(before) == writes[0] < len(expected)

    resumed, counting = _run(config, generator)
    assert resumed.stored == len(expected) - len(before)
    assert sum(p.existing for p in resumed.pairs) == len(before)
    assert _stored(config)["ids"] == expected  # the same reviews as a run never interrupted
    stored_before = {(r.score, r.genre, r.seed) for r in _stored(config)["reviews"] if r.id in before}
    regenerated = {(*_key(r.conditions), r.seed) for r in counting.requests}
    assert not stored_before & regenerated  # nothing already stored was generated again


@pytest.mark.slow  # a fresh interpreter imports TensorFlow and compiles: ~20 s on 2 loaded cores
@pytest.mark.parametrize("backend", ["sqlite", "firestore"])
def test_cli_killed_mid_way_resumes(tmp_path, unigram_model_dir, generator, backend, request, monkeypatch):
    """SIGKILL the real CLI once its first reviews are stored; the rerun completes the grid, no duplicate."""
    from pitchkeras.store import open_store

    if backend == "firestore":
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", request.getfixturevalue("firestore_emulator"))
        uri = f"firestore://pitchkeras-test/killed-{uuid.uuid4().hex[:12]}"
    else:
        uri = f"sqlite:///{tmp_path / 'killed.db'}"
    scores = [s / 2 for s in range(21)]  # 21 x 2 pairs: long enough to kill mid-way
    argv = [sys.executable, "-m", "pitchkeras.cli", "populate", "--model", str(unigram_model_dir),
            "--store", uri, "--per-pair", "2", "--scores", ",".join(map(str, scores)),
            "--genres", "Rock,Jazz", "--length", str(LENGTH), "--batch-size", "1", "--seed", "3", "--quiet"]
    log = tmp_path / "populate.log"  # a file, not a pipe nobody drains while we poll
    with open_store(uri) as watcher, open(log, "wb") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while watcher.count() == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        partial = watcher.count()
    assert 0 < partial < 2 * len(scores) * 2

    config = PopulateConfig(model=str(unigram_model_dir), store=uri, per_pair=2, scores=scores,
                            genres=["Rock", "Jazz"], length=LENGTH, batch_size=4, seed=3)
    resumed, _ = _run(config, generator)
    assert sum(p.existing for p in resumed.pairs) == partial
    assert resumed.stored + partial == 2 * len(resumed.pairs)
    again, counting = _run(config, generator)
    assert (again.stored, counting.requests) == (0, [])  # a second rerun finds the grid full
    with open_store(uri) as store:
        assert {c.count for c in store.counts()} == {2} and len(store.counts()) == 42
        assert store.count() == 84  # ids are deterministic: a rerun cannot write a second copy


def test_shards_split_the_grid_disjointly_and_cover_it(tmp_path, generator):
    whole = _config(tmp_path, name="whole.db")
    _run(whole, generator)
    seen = []
    for index in range(3):
        result, counting = _run(_config(tmp_path, name="sharded.db", shard_index=index, num_shards=3), generator)
        seen.append([_key(p.conditions) for p in result.pairs])
        assert set(counting.attempts()) <= set(seen[-1])  # a shard generates for its own pairs only
    assert [len(s) for s in seen] == [2, 1, 1]
    assert sorted(sum(seen, [])) == sorted((s, g) for s in SCORES for g in GENRES)  # disjoint and complete
    assert _stored(_config(tmp_path, name="sharded.db"))["ids"] == _stored(whole)["ids"]


def test_corpus_without_conditions(tmp_path, generator):
    from pitchkeras.model import ModelInfo, PitchModel
    from pitchkeras.sampling import Generator

    plain = PitchModel(generator.model.causal_lm, ModelInfo(PromptFormat(conditions=()), {}, "plain-v1", "tiny", 32))
    config = _config(tmp_path, per_pair=3)
    # A graph, not XLA: this generator serves one small run, so compiling costs more than it saves.
    result, counting = _run(config, Generator(plain, batch_size=4, max_new_tokens=LENGTH, jit_compile=False))
    assert [p.conditions for p in result.pairs] == [{}]
    assert all(r.conditions is None for r in counting.requests)
    assert result.pairs[0].stored == 3
    assert format_table(result).splitlines()[2].split()[:6] == ["-", "-", "3", "0", "3", "0"]
    with SQLiteStore(str(tmp_path / "reviews.db")) as store:
        assert store.counts() == [ConditionCount(None, None, 3)]
        review = store.get_review()
        assert (review.score, review.genre, review.prompt, review.model_version) == (None, None, "", "plain-v1")


def test_populate_into_firestore(firestore_emulator, monkeypatch, generator):
    from pitchkeras.store import open_store

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    uri = f"firestore://pitchkeras-test/populate-{uuid.uuid4().hex[:12]}"
    config = PopulateConfig(model="unused", store=uri, per_pair=2, scores=[8.0], genres=["Rock", "Jazz"],
                            length=LENGTH, batch_size=4, seed=5)
    first, _ = _run(config, generator)
    again, counting = _run(config, generator)
    assert (first.stored, again.stored, counting.requests) == (4, 0, [])
    with open_store(uri) as store:
        assert store.counts() == [ConditionCount(8.0, "Jazz", 2), ConditionCount(8.0, "Rock", 2)]
        review = store.get_review(score=8.0, genre="rock")
        assert review.model_version == MODEL_VERSION and review.prompt == "8.0\nRock\n"


def test_progress_bar_and_log(tmp_path, generator, capsys):
    log = []
    populate(_config(tmp_path, scores=[8.0]), generator=generator, progress=True, log=log.append)
    assert log == ["populate: 2 pair(s), 0 review(s) already stored, 4 to generate (at most 4 attempts each)"]
    err = capsys.readouterr().err
    assert "populate: 100%" in err and "4/4" in err and "review/s" in err


def test_help_lists_every_flag_with_its_default(capsys, monkeypatch):
    from pitchkeras.cli import build_parser

    monkeypatch.setenv("COLUMNS", "250")  # wide enough that no default is wrapped mid-word
    with pytest.raises(SystemExit) as info:
        main(["populate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    actions = [a for a in subparsers.choices["populate"]._actions if a.option_strings != ["-h", "--help"]]
    assert {a.dest for a in actions} >= {"model", "store", "per_pair", "scores", "genres", "shard_index",
                                         "num_shards", "max_attempts", "batch_size", "temperature", "top_k", "top_p"}
    # One block per flag: its line and the help lines under it.
    blocks, flag = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = line
        elif flag:
            blocks[flag] += " " + line.strip()
    for action in actions:
        block = blocks[action.option_strings[-1]]
        assert f"(default: {action.default})" in block, block


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--genres", "Rock,Polka"], "genre 'Polka' was not in this model's training data; known: Jazz, Rock (set --genres)"),
        (["--store", "mysql://db/reviews"], "allowed: sqlite://, firestore://"),
        (["--store", "sqlite:///:memory:"], "file path"),
        (["--shard-index", "3", "--num-shards", "3"], "shard_index must be in [0, num_shards); got 3 of 3"),
        (["--scores", "8,11"], "score 11 is outside this model's range 0..10"),
        (["--scores", "8,loud"], "--scores must be comma-separated numbers"),
        (["--score-range", "10:0:1"], "below its start"),
        (["--per-pair", "0"], "per_pair must be >= 1"),
        (["--max-attempts", "0"], "max_attempts must be >= 1"),
        (["--top-p", "0"], "top_p"),
        (["--repetition-penalty", "0"], "repetition_penalty must be in (0, 10]"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(tmp_path, unigram_model_dir, capsys, extra, message):
    store = tmp_path / "never.db"
    argv = ["populate", "--model", str(unigram_model_dir), "--store", f"sqlite:///{store}", "--genres", "Rock,Jazz",
            "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pitchkeras populate: error: ") and message in err, err
    assert not store.exists()  # checked before anything was written


def test_default_genres_the_model_lacks_are_named(tmp_path, unigram_model_dir, capsys):
    """The default grid is the seed's eight genres; this model knows two, so the error says which to pass."""
    assert main(["populate", "--model", str(unigram_model_dir), "--store", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "genre 'Electronic' was not in this model's training data; known: Jazz, Rock (set --genres)" in (
        capsys.readouterr().err)


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    assert main(["populate", "--model", str(tmp_path / "nope"), "--store", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
