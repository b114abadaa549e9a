"""Flags shared by the commands that generate (generate, populate, report, serve), defined once."""

from __future__ import annotations


def add_repetition_flags(p) -> None:
    """`--repetition-penalty` and `--no-repeat-ngram-size`, named as transformers names them."""
    from pitchkeras.sampling import SamplerConfig

    p.add_argument("--repetition-penalty", type=float, default=SamplerConfig.repetition_penalty,
                   help="CTRL's penalty on tokens already in the text, as transformers applies it (> 0; 1 = off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=SamplerConfig.no_repeat_ngram_size,
                   help="never repeat an n-gram of this many tokens (0 = off)")


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
