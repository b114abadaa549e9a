"""Flags shared by several commands, defined once; every default comes from a config dataclass field."""

from __future__ import annotations

import argparse
import dataclasses
import os

from pitchkeras.compile_cache import ENV_VAR, default_directory
from pitchkeras.errors import UsageError
from pitchkeras.populate import SEED_GENRES
from pitchkeras.quantize import QUANTIZE_MODES
from pitchkeras.sampling.config import DEFAULT_LENGTH, SamplerConfig
from pitchkeras.train.config import TrainConfig


def add_sampler_flags(p, *, server_defaults: bool = False) -> None:
    """A flag per setting of every token's draw (`SamplerConfig.token_options()`), plus `--length` and `--seed`.

    Each flag's name, type, help and default come from its `SamplerConfig` field.

    Args:
        p: argparse parser.
        server_defaults: bool. For a client: every flag defaults to unset
            (None), so the server applies its own defaults.
    """
    for option in SamplerConfig.token_options():
        p.add_argument(option.flag, dest=option.name, type=option.kind,
                       default=None if server_defaults else option.default, help=option.help)
    p.add_argument("--length", type=int, default=None if server_defaults else DEFAULT_LENGTH,
                   help="max new tokens per sample" + (" (server default when unset)" if server_defaults else ""))
    p.add_argument("--seed", type=int, default=None if server_defaults else 0,
                   help="seed of the first sample; sample i uses seed + i" + (
                       " (random when unset)" if server_defaults else ""))


def sampler_config(args):
    """The `SamplerConfig` of parsed sampler flags (validated): the one conversion at the CLI edge."""
    return SamplerConfig(**sampler_fields(args)).validate()


def sampler_fields(args) -> dict:
    """The sampler flags set, by field name (a client's unset ones are left to the server)."""
    return {option.name: getattr(args, option.name) for option in SamplerConfig.token_options()
            if getattr(args, option.name) is not None}


def add_compile_cache_flags(p) -> None:
    """`--compile-cache DIR` and `--no-compile-cache`: the persistent compilation cache (`pitchkeras.compile_cache`).

    `cli.main` reads them before TensorFlow is imported (XLA reads its flags then).
    """
    p.add_argument("--compile-cache", metavar="DIR", default=default_directory(),
                   help=f"keep compiled decode loops here for the next process (${ENV_VAR}=off: none by default)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile in this process only, cache nothing")


def add_quantize_flag(p) -> None:
    """`--quantize int8`: generate with int8 weights (`pitchkeras.quantize`)."""
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="quantize the model's weights for generation (Keras's model.quantize); default: off")


# -- shared non-sampler flags ------------------------------------------------------------------------------------
def field_default(config, name: str):
    """The default of field `name` of dataclass `config`: where every flag's default comes from.

    Args:
        config: type. A dataclass (`PrepareOptions`, `ServerConfig`, ...).
        name: str. One of its fields.
    """
    field = config.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def parameter_default(function, name: str):
    """The default of keyword `name` of `function`, for a flag whose setting is a parameter, not a field."""
    import inspect

    return inspect.signature(function).parameters[name].default


def add_model_flags(p) -> None:
    """`--model DIR`, else `--checkpoint-dir`/`--run-name`: where `pitchkeras finetune` put its model."""
    p.add_argument("--model", help="model directory (default: CHECKPOINT_DIR/RUN_NAME/model)")
    p.add_argument("--run-name", default=TrainConfig.default("run_name"),
                   help="run whose model/ to use when --model is not given")
    p.add_argument("--checkpoint-dir", default=TrainConfig.default("checkpoint_dir"), help="where runs live")


def model_directory(args) -> str:
    """The model directory `add_model_flags` named.

    Raises:
        UsageError: it does not exist.
    """
    model_dir = args.model or os.path.join(args.checkpoint_dir, args.run_name, "model")
    if not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir} does not exist; run `pitchkeras finetune` first or pass --model")
    return model_dir


def add_progress_flag(p, help: str = "no progress bar", quiet_alias: bool = False) -> None:
    """`--no-progress` (dest `no_progress`): every command spells it the same.

    Args:
        p: argparse.ArgumentParser. The command's parser.
        help: str. What the flag switches off.
        quiet_alias: bool. Also accept `--quiet`, the spelling generate,
            populate and report had before (tests and scripts use it). It
            stays listed in `--help`: populate's help test lists every action.
    """
    p.add_argument("--no-progress", action="store_true", help=help)
    if quiet_alias:
        p.add_argument("--quiet", dest="no_progress", action="store_true", help="former spelling of --no-progress")


def add_genres_flag(p, help: str) -> None:
    """`--genres a,b,...`, by default the seed project's eight (`pitchkeras.populate.SEED_GENRES`)."""
    p.add_argument("--genres", default=",".join(SEED_GENRES), help=help)


def parse_list(text: str) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_scores(text: str) -> list[float]:
    """`"2,8.5"` -> `[2.0, 8.5]`.

    Raises:
        UsageError: a part is not a number.
    """
    try:
        return [float(part) for part in parse_list(text)]
    except ValueError:
        raise UsageError(f"--scores must be comma-separated numbers, got {text!r}") from None


def format_scores(scores) -> str:
    """`(2.0, 5.0, 8.0)` -> `"2,5,8"`: a config's score list as the flag spells it."""
    return ",".join(f"{score:g}" for score in scores)
