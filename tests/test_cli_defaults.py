"""Every CLI flag's default is its config field's default: one place for each default.

The parsers are the real ones (`cli.build_parser()`), walked down to nested
subcommands (`store migrate`, `client generate`, ...). A flag whose dest is a
field of the command's config dataclass must default to that field's default;
`--no-X` flags must default to the opposite of field `X`. COMMAND_CONFIGS says
which dataclasses each command's flags come from; a new command must be added
to it (the last test fails until it is), so a second literal cannot slip back.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pitchkeras import cli
from pitchkeras.commands.generate import GenerateOptions
from pitchkeras.commands.options import field_default, parse_list, parse_scores
from pitchkeras.commands.report import ReportOptions
from pitchkeras.convert.importing import ExportConfig, ImportConfig
from pitchkeras.data.options import PrepareOptions
from pitchkeras.demo import DemoConfig
from pitchkeras.populate import SEED_GENRES, PopulateConfig, score_grid
from pitchkeras.sampling import SamplerConfig
from pitchkeras.server.config import ServerConfig
from pitchkeras.store import ReviewStore
from pitchkeras.train.config import TrainConfig

# command -> the dataclasses its flags take their defaults from (in lookup order).
COMMAND_CONFIGS = {
    "prepare": (PrepareOptions,),
    "import": (ImportConfig,),
    "export": (ExportConfig,),
    "plan": (TrainConfig,),
    "finetune": (TrainConfig,),
    "generate": (GenerateOptions, SamplerConfig),
    "report": (ReportOptions, SamplerConfig),
    "populate": (PopulateConfig,),
    "store": (),  # its defaults are ReviewStore parameters and DEFAULT_STORE_URI: PARAMETER_DEFAULTS below
    "serve": (ServerConfig,),
    "client": (),  # every flag unset means "the server decides"
    "demo": (DemoConfig,),
}
# Flags whose setting is a function parameter, not a dataclass field: (parser, dest) -> (function, parameter).
PARAMETER_DEFAULTS = {
    ("store migrate", "model_version"): (ReviewStore.migrate, "model_version"),
}
INVERSE = {"no_progress": "progress", "quiet": "progress", "no_packing": "packing"}  # --no-X switches field X off
# A flag spelled as text for a field that holds a list: the command's own parser turns the default into the value.
CONVERTERS = {("report", "scores"): parse_scores, ("demo", "scores"): parse_scores,
              ("populate", "genres"): parse_list, ("demo", "genres"): parse_list}
# Fields whose None stands for a named default the flag spells out.
NONE_MEANS = {("populate", "genres"): list(SEED_GENRES), ("demo", "genres"): list(SEED_GENRES)}


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _parsers():
    """(command, label, parser) for every leaf parser: `prepare`, ..., `store migrate`, `client generate`."""
    for name, parser in _subparsers(cli.build_parser()).items():
        nested = _subparsers(parser)
        if not nested:
            yield name, name, parser
        for action, sub in nested.items():
            yield name, f"{name} {action}", sub


def _field(configs, dest: str):
    """(config, field name, inverted) for `dest`, or None (also for a field without a default: it is required)."""
    name, inverted = (INVERSE[dest], True) if dest in INVERSE else (dest, False)
    for config in configs:
        field = {f.name: f for f in dataclasses.fields(config)}.get(name)
        if field is not None:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            return (config, name, inverted) if has_default else None
    return None


def _cases():
    cases = []
    for command, label, parser in _parsers():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help" or action.required:
                continue
            match = _field(COMMAND_CONFIGS.get(command, ()), action.dest)
            if match is None:
                continue
            cases.append(pytest.param(label, action, *match, id=f"{label}:{action.option_strings[0]}"))
    return cases


@pytest.mark.parametrize("label, action, config, name, inverted", _cases())
def test_flag_default_is_the_config_field_default(label, action, config, name, inverted):
    expected = field_default(config, name)
    default = action.default
    if (label, action.dest) in CONVERTERS:
        default = CONVERTERS[label, action.dest](default)
        expected = NONE_MEANS[label, action.dest] if expected is None else list(expected)
    if inverted:
        assert default is (not expected), f"{label} {action.option_strings[0]}: {config.__name__}.{name}"
    else:
        assert default == expected and type(default) is type(expected), \
            f"{label} {action.option_strings[0]} defaults to {default!r}, {config.__name__}.{name} to {expected!r}"


@pytest.mark.parametrize("key", sorted(PARAMETER_DEFAULTS), ids=" ".join)
def test_flag_default_is_the_parameter_default(key):
    import inspect

    label, dest = key
    parser = dict((lbl, p) for _, lbl, p in _parsers())[label]
    action = next(a for a in parser._actions if a.dest == dest)
    function, parameter = PARAMETER_DEFAULTS[key]
    expected = inspect.signature(function).parameters[parameter].default
    assert action.default == expected


def test_populate_score_range_is_score_grids_default():
    parser = dict((lbl, p) for _, lbl, p in _parsers())["populate"]
    action = next(a for a in parser._actions if a.dest == "score_range")
    start, stop, step = (float(x) for x in action.default.split(":"))
    assert score_grid(start, stop, step) == score_grid()


def test_shared_flags_are_spelled_once():
    """Model directory and progress flags: the same spelling and default in every command that has them."""
    parsers = {label: p for _, label, p in _parsers()}
    for label in ("generate", "populate", "report"):
        flags = {a.dest: a for a in parsers[label]._actions}
        assert flags["run_name"].default == TrainConfig.default("run_name")
        assert flags["checkpoint_dir"].default == TrainConfig.default("checkpoint_dir")
        assert flags["model"].default is None
    for label, parser in parsers.items():
        spellings = {s for a in parser._actions for s in a.option_strings}
        if "--quiet" in spellings or "--no-progress" in spellings:
            assert "--no-progress" in spellings or label == "finetune", label  # finetune's flags: issue 23


def test_every_command_has_a_config_mapping():
    """A new command must say where its defaults come from (and each mapping must match some flag)."""
    assert set(cli.COMMANDS) == set(COMMAND_CONFIGS)
    matched = {label.split()[0] for label, *_ in (c.values for c in _cases())}
    assert matched == {command for command, configs in COMMAND_CONFIGS.items() if configs}
