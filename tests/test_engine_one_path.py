"""One decode path: `pitchkeras generate`, `Generator.generate` and the server's engine give the same text for the
same request, and a stop sequence ends it the same way in each."""

import json

import pytest

from pitchkeras.cli import main

tf = pytest.importorskip("tensorflow")

from pitchkeras.sampling import GenerationRequest, Generator, SamplerConfig  # noqa: E402
from pitchkeras.sampling.engine import DecodeEngine  # noqa: E402
from tests.test_generate_cli import model_dir  # noqa: E402,F401

ROCK = {"score": 8.0, "genre": "Rock"}
FLAGS = ["--score", "8", "--genre", "Rock", "--nsamples", "2", "--batch-size", "2", "--length", "16", "--seed", "4",
         "--quiet"]


def cli_records(model_dir, tmp_path, *extra) -> list[dict]:
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir / "run1" / "model"), *FLAGS, *extra, "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_stop_sequences_end_the_text_the_same_in_the_cli_the_generator_and_the_server_engine(model_dir, tmp_path):
    from pitchkeras.model import load_model

    plain = cli_records(model_dir, tmp_path)
    continuation = plain[0]["raw"][len(plain[0]["prompt"]):]
    assert len(continuation) > 8
    stop = continuation[5:8]
    cut = continuation.find(stop)
    stopped = cli_records(model_dir, tmp_path, "--stop", stop, "--stop", "zzzz")
    assert stopped[0]["raw"] == plain[0]["prompt"] + continuation[:cut]
    assert stopped[0]["sampler"]["stop_sequences"] == [stop, "zzzz"]
    other = plain[1]["raw"][len(plain[1]["prompt"]):]
    if stop not in other:  # the second sample never met the stop: unchanged
        assert stopped[1]["raw"] == plain[1]["raw"]

    generator = Generator(load_model(model_dir / "run1" / "model"), batch_size=2, max_new_tokens=16)
    config = SamplerConfig(stop_sequences=(stop, "zzzz"))
    requests = [GenerationRequest(ROCK, "", seed=4), GenerationRequest(ROCK, "", seed=5)]
    by_generator = generator.generate(requests, config=config)
    server_like = DecodeEngine(generator, slots=4)  # one token per step, as a server runs it
    by_engine = server_like.generate(requests, config, 16)
    assert [s.raw for s in by_generator] == [s.raw for s in by_engine] == [r["raw"] for r in stopped]
    assert by_generator[0].finish_reason == by_engine[0].finish_reason == "stop_sequence"
    assert by_generator[0].completion_ids == by_engine[0].completion_ids


def test_an_empty_stop_is_one_line_and_exit_2(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir / "run1" / "model"), *FLAGS, "--stop", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stop_sequences" in err[0]
