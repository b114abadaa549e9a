"""`pitchkeras generate`: sample reviews from a fine-tuned model (flags named like gpt-2-simple's)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from typing import Optional

from pitchkeras.cli import add_command
from pitchkeras.commands.options import (
    add_compile_cache_flags, add_model_flags, add_progress_flag, add_quantize_flag, add_sampler_flags, field_default,
    model_directory, sampler_config)
from pitchkeras.conditioning import validate_conditions
from pitchkeras.errors import UsageError
from pitchkeras.io import atomic_write_text
from pitchkeras.model import load_model
from pitchkeras.populate import PopulateConfig
from pitchkeras.quality import MemorizationIndex
from pitchkeras.quantize import quantize_model
from pitchkeras.sampling import Generator
from pitchkeras.sampling.config import MAX_TOP_LOGPROBS, GenerationRequest
from pitchkeras.sampling.engine import DecodeEngine
from pitchkeras.tokens import TokenTexts, logprob_records

DELIMITER = "=" * 20  # gpt-2-simple prints this between samples


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """What `pitchkeras generate` does around the sampler: the defaults of its flags.

    Args:
        prefix: str. Text every sample starts with, after the header.
        nsamples: int. Number of samples (gpt-2-simple's default: 1).
        batch_size: int. Samples generated together (gpt-2-simple's default: 1).
        truncate: str or None. Cut each sample where this text first appears.
        include_prefix: bool. Keep `prefix` at the start of each sample.
        dataset: str or None. A prepared dataset (or train.csv) to reject copies of.
        max_copied_fraction: float. With `dataset`: reject a sample when this
            share of its 8-grams is in the training data (as populate does).
        out: str or None. A JSONL file for the samples, else stdout.
        logprobs: int or None. With `out`: also write each token's log-probability and the N most likely
            tokens at each position (0 to 5; None: none).
    """

    prefix: str = GenerationRequest.prefix
    nsamples: int = 1
    batch_size: int = 1
    truncate: Optional[str] = None
    include_prefix: bool = True
    dataset: Optional[str] = None
    max_copied_fraction: float = field_default(PopulateConfig, "max_copied_fraction")
    out: Optional[str] = None
    logprobs: Optional[int] = GenerationRequest.top_logprobs


def add_parser(subparsers):
    def default(name):
        return field_default(GenerateOptions, name)

    p = add_command(subparsers, "generate", "Generate samples from a model, post-processed and checked.", __name__)
    add_model_flags(p)
    p.add_argument("--score", type=float, help="review score condition (e.g. 8.0)")
    p.add_argument("--genre", help="genre condition (one the model was trained on)")
    p.add_argument("--prefix", default=default("prefix"),
                   help="text the samples start with (after the header), e.g. an artist name")
    p.add_argument("--nsamples", type=int, default=default("nsamples"), help="number of samples")
    p.add_argument("--batch-size", type=int, default=default("batch_size"), help="samples generated together")
    add_sampler_flags(p)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop sequence (repeatable): a sample ends where it first appears, the stop text dropped; "
                        "the same as a server request's stop_sequences (recorded in the sample's sampler settings)")
    p.add_argument("--truncate", default=default("truncate"),
                   help="stop string: cut each sample where it first appears")
    p.add_argument("--include-prefix", action=argparse.BooleanOptionalAction, default=default("include_prefix"),
                   help="keep --prefix at the start of each sample")
    p.add_argument("--dataset", default=default("dataset"),
                   help="prepared dataset dir or train.csv: measure copying and reject copies")
    p.add_argument("--max-copied-fraction", type=float, default=default("max_copied_fraction"),
                   help="with --dataset: reject a sample when this share of its 8-grams is in the training data")
    p.add_argument("--out", default=default("out"),
                   help="write JSONL here (text, conditions, sampler settings, seed, model_version, quality)")
    p.add_argument("--logprobs", type=int, default=default("logprobs"), metavar="N",
                   help="with --out: write each token's log-probability and the N (0-5) most likely tokens")
    add_progress_flag(p, quiet_alias=True)
    add_compile_cache_flags(p)
    add_quantize_flag(p)
    return p


def _check_args(args) -> None:
    if args.nsamples < 1:
        raise UsageError(f"--nsamples must be >= 1, got {args.nsamples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.length < 1:
        raise UsageError(f"--length must be >= 1, got {args.length}")
    if args.truncate == "":
        raise UsageError("--truncate must be a non-empty string")
    if args.logprobs is not None:
        if not 0 <= args.logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"--logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {args.logprobs}")
        if not args.out:
            raise UsageError("--logprobs needs --out: the log-probabilities go into its JSONL records")


def _conditions(args, info) -> dict | None:
    """The requested conditions from --score/--genre, checked against the model."""
    names = info.prompt_format.conditions
    given = {"score": args.score, "genre": args.genre}
    if not names:
        extra = [f"--{k}" for k, v in given.items() if v is not None]
        if extra:
            raise UsageError(f"this model has no conditions; drop {' '.join(extra)} (use --prefix)")
        return None
    unsupported = [n for n in names if n not in given]
    if unsupported:
        raise UsageError(f"this model's conditions {', '.join(unsupported)} have no flag here; use the Python API")
    missing = [f"--{n}" for n in names if given[n] is None]
    if missing:
        known = info.condition_values.get("genre")
        hint = f" (genres: {', '.join(map(str, known))})" if known and "--genre" in missing else ""
        raise UsageError(f"this model needs {' and '.join(missing)}{hint}")
    return validate_conditions(info, {n: given[n] for n in names})


def run(args) -> int:
    _check_args(args)
    config = dataclasses.replace(sampler_config(args), stop_sequences=tuple(args.stop or ())).validate()
    model = quantize_model(load_model(model_directory(args)), args.quantize)
    conditions = _conditions(args, model.info)

    memorization = None
    if args.dataset:
        memorization = MemorizationIndex.from_examples(args.dataset, prompt_format=model.prompt_format,
                                                       progress=not args.no_progress)
    generator = Generator(model, batch_size=args.batch_size, max_new_tokens=args.length,
                          memorization=memorization, max_copied_fraction=args.max_copied_fraction)
    requests = [GenerationRequest(conditions=conditions, prefix=args.prefix, seed=args.seed + i,
                                  top_logprobs=args.logprobs) for i in range(args.nsamples)]
    if args.logprobs is None:
        samples = generator.generate(requests, config=config, progress=not args.no_progress, truncate=args.truncate,
                                     include_prefix=args.include_prefix)
    else:  # log-probabilities come from the decode engine's step; --truncate is its stop text, cut alike
        stops = config.stop_sequences + ((args.truncate,) if args.truncate else ())
        samples = DecodeEngine(generator, slots=args.batch_size).generate(
            requests, dataclasses.replace(config, stop_sequences=stops), args.length,
            include_prefix=args.include_prefix)

    if args.out:
        records = [_record(s, model) for s in samples]
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        accepted = [s.text for s in samples if not s.rejected]
        if accepted:
            print(f"\n{DELIMITER}\n".join(accepted))
    rejected = collections.Counter(s.rejected for s in samples if s.rejected)
    accepted_count = len(samples) - sum(rejected.values())
    summary = f"{accepted_count}/{len(samples)} accepted"
    if rejected:
        summary += "; rejected: " + ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items()))
    if args.out:
        summary += f"; wrote {args.out}"
    print(summary, file=sys.stderr)
    return 0


def _record(sample, model) -> dict:
    """A sample's JSONL record; with log-probabilities, `logprobs` as the gRPC TokenLogprob's fields."""
    record = sample.to_json()
    if sample.logprobs is not None:
        record["logprobs"] = logprob_records(sample.logprobs, TokenTexts.of(model.tokenizer))
    return record
