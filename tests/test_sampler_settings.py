"""One sampler-settings object: CLI flags and proto requests convert to SamplerConfig once, with its defaults and
its bounds, and it is what the store keeps."""

import dataclasses

import pytest

from pitchkeras.errors import InvalidArgument
from pitchkeras.sampling import SamplerConfig
from pitchkeras.v1 import review_service_pb2 as pb


def _parser_actions(command: str) -> dict:
    from pitchkeras.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in subparsers.choices[command]._actions}


@pytest.mark.parametrize("command", ["generate", "populate", "report"])
def test_sampler_flag_defaults_are_the_config_fields(command):
    from pitchkeras.commands.options import SAMPLER_FLAGS

    actions = _parser_actions(command)
    defaults = SamplerConfig()
    for flag, field, _, _ in SAMPLER_FLAGS:
        assert actions[field].default == getattr(defaults, field), (command, flag)
        assert flag in actions[field].option_strings


def test_client_flags_leave_unset_settings_to_the_server():
    from pitchkeras.cli import build_parser
    from pitchkeras.commands.options import sampler_fields

    args = build_parser().parse_args(["client", "generate", "--top-k", "5", "--temperature", "0.9"])
    assert sampler_fields(args) == {"top_k": 5, "temperature": 0.9}


def test_from_proto_takes_set_fields_and_defaults_the_rest():
    assert SamplerConfig.from_proto(pb.GenerateRequest()) == SamplerConfig()
    config = SamplerConfig.from_proto(pb.GenerateRequest(top_k=3, repetition_penalty=1.5, prompt="x"))
    assert config == dataclasses.replace(SamplerConfig(), top_k=3, repetition_penalty=1.5)
    with pytest.raises(InvalidArgument, match=r"temperature must be in \(0, 2\]"):
        SamplerConfig.from_proto(pb.GenerateRequest(temperature=2.5))


def test_every_proto_sampler_field_is_a_config_field():
    """A sampler option lives in SamplerConfig; the proto only carries it (same name)."""
    request_fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    config_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    not_sampler = {"score", "genre", "prompt", "max_length", "seed", "num_samples", "store",
                   "top_logprobs"}  # what to report, per request (GenerationRequest.top_logprobs), not how to draw
    assert request_fields - not_sampler <= config_fields


def test_the_review_keeps_the_settings_it_was_drawn_with():
    from pitchkeras.sampling import Sample
    from pitchkeras.store import Review
    from pitchkeras.store.base import SAMPLER_FIELDS

    config = SamplerConfig(temperature=0.9, top_k=4, top_p=0.5, repetition_penalty=1.2, no_repeat_ngram_size=3)
    sample = Sample(text="Loud.", raw="8.0\nRock\nLoud.", conditions={}, prompt="8.0\nRock\n", seed=7, config=config,
                    model_version="m1")
    review = Review.from_sample(sample, {"score": 8.0, "genre": "Rock", "era": "90s"}, "abc")
    assert {name: getattr(review, name) for name in SAMPLER_FIELDS} == {
        name: getattr(config, name) for name in SAMPLER_FIELDS}
    assert (review.id, review.score, review.genre, review.extra_conditions, review.seed) == (
        "abc", 8.0, "Rock", {"era": "90s"}, 7)
