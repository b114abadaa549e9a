"""Flags shared by the commands that generate (generate, populate, report, serve), defined once."""

from __future__ import annotations


#: Each sampler flag: (flag, SamplerConfig field, type, help). Defaults come from the field; a new sampler
#: option is one line here (and its field in SamplerConfig, and in the .proto for the servers).
SAMPLER_FLAGS = (
    ("--temperature", "temperature", float, "sampling temperature in (0, 2]"),
    ("--top-k", "top_k", int, "top-k cut-off (0 = off)"),
    ("--top-p", "top_p", float, "nucleus (top-p) mass in (0, 1] (1 = off)"),
    ("--repetition-penalty", "repetition_penalty", float,
     "CTRL's penalty on tokens already in the text, as transformers applies it, in (0, 10] (1 = off)"),
    ("--no-repeat-ngram-size", "no_repeat_ngram_size", int, "never repeat an n-gram of this many tokens (0 = off)"),
)


def add_sampler_flags(p, *, server_defaults: bool = False) -> None:
    """The sampler flags of `SAMPLER_FLAGS`, plus `--length` and `--seed`.

    Args:
        p: argparse parser.
        server_defaults: bool. For a client: every flag defaults to unset
            (None), so the server applies its own defaults.
    """
    from pitchkeras.sampling import SamplerConfig
    from pitchkeras.sampling.config import DEFAULT_LENGTH

    defaults = SamplerConfig()
    for flag, field, kind, help_text in SAMPLER_FLAGS:
        p.add_argument(flag, type=kind, default=None if server_defaults else getattr(defaults, field), help=help_text)
    p.add_argument("--length", type=int, default=None if server_defaults else DEFAULT_LENGTH,
                   help="max new tokens per sample" + (" (server default when unset)" if server_defaults else ""))
    p.add_argument("--seed", type=int, default=None if server_defaults else 0,
                   help="seed of the first sample; sample i uses seed + i" + (
                       " (random when unset)" if server_defaults else ""))


def sampler_config(args):
    """The `SamplerConfig` of parsed sampler flags (validated): the one conversion at the CLI edge."""
    from pitchkeras.sampling import SamplerConfig

    return SamplerConfig(**{field: getattr(args, field) for _, field, _, _ in SAMPLER_FLAGS}).validate()


def sampler_fields(args) -> dict:
    """The sampler flags a client set, by field name (unset ones left to the server)."""
    return {field: getattr(args, field) for _, field, _, _ in SAMPLER_FLAGS if getattr(args, field) is not None}


def add_compile_cache_flags(p) -> None:
    """`--compile-cache DIR` and `--no-compile-cache`: the persistent compilation cache (`pitchkeras.compile_cache`).

    `cli.main` reads them before TensorFlow is imported (XLA reads its flags then).
    """
    from pitchkeras.compile_cache import ENV_VAR, default_directory

    p.add_argument("--compile-cache", metavar="DIR", default=default_directory(),
                   help=f"keep compiled decode loops here for the next process (${ENV_VAR}=off: none by default)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile in this process only, cache nothing")


def add_quantize_flag(p) -> None:
    """`--quantize int8`: generate with int8 weights (`pitchkeras.quantize`)."""
    from pitchkeras.quantize import QUANTIZE_MODES

    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="quantize the model's weights for generation (Keras's model.quantize); default: off")
