"""`pitchkeras import`: a gpt-2-simple run, an OpenAI GPT-2 directory or a transformers GPT-2 directory -> a model dir.

The subcommand is `import`; the module is `import_model` because `import` is a Python keyword.
"""

from __future__ import annotations

import sys

from pitchkeras.cli import add_command
from pitchkeras.convert.importing import ImportConfig, import_model
from pitchkeras.errors import UsageError


def _stated(text: str) -> str:
    """Help whose own words state the default (`%(default).0s` prints nothing but stops `(default: None)`)."""
    return text + "%(default).0s"


def add_parser(subparsers):
    p = add_command(subparsers, "import",
                    "Import a GPT-2 you already have (a gpt-2-simple run such as checkpoint/run1, an OpenAI model "
                    "directory such as models/355M, or a transformers GPT-2 directory) as a pitchkeras model "
                    "directory.", __name__)
    p.add_argument("path", metavar="PATH", help="the directory to import; its layout is detected")
    p.add_argument("--out", required=True, metavar="MODEL_DIR",
                   help=_stated("the pitchkeras model directory to create (required; must not exist)"))
    p.add_argument("--conditions", default=ImportConfig.conditions, metavar="NAMES",
                   help=_stated("header lines the model was trained with, in order, comma-separated (e.g. "
                                "score,genre; \"\" for a plain corpus; default: those in the pitchkeras.json of a "
                                "directory `pitchkeras export` wrote, else none)"))
    p.add_argument("--dataset", default=ImportConfig.dataset,
                   help=_stated("the training data (a `prepare` directory, a CSV, or the gpt-2-simple .txt file) "
                                "to learn the conditions' known values from (default: none, any value is taken)"))
    p.add_argument("--start-text", default=ImportConfig.start_text,
                   help=_stated("plain text that opened each training document (default: <|startoftext|> for a "
                                "gpt-2-simple run, none otherwise; \"\" for none)"))
    p.add_argument("--end-text", default=ImportConfig.end_text,
                   help=_stated("plain text that closed each training document; generation stops there (default: "
                                "<|endoftext|> for a gpt-2-simple run, none otherwise; \"\" for none)"))
    p.add_argument("--step", type=int, default=ImportConfig.step,
                   help=_stated("the gpt-2-simple checkpoint step to import (model-STEP; default: the latest, as "
                                "its checkpoint file names)"))
    p.add_argument("--model-version", default=ImportConfig.model_version,
                   help=_stated("model_version stored with everything it generates "
                                "(default: import-<directory name>[-<step>])"))
    return p


def run(args) -> int:
    conditions = None
    if args.conditions is not None:
        conditions = tuple(name.strip() for name in args.conditions.split(",") if name.strip())
        if len(set(conditions)) != len(conditions):
            raise UsageError(f"--conditions {args.conditions!r} names a condition twice")
    if args.step is not None and args.step < 0:
        raise UsageError(f"--step must be >= 0, got {args.step}")
    config = ImportConfig(conditions=conditions, start_text=args.start_text, end_text=args.end_text,
                          step=args.step, dataset=args.dataset, model_version=args.model_version)
    model, source = import_model(args.path, args.out, config)
    fmt = model.prompt_format
    backbone = model.causal_lm.backbone
    print(f"imported {source.layout} {source.checkpoint or source.path} ({backbone.num_layers} layers, "
          f"{backbone.hidden_dim} wide, {backbone.vocabulary_size} tokens) into {args.out}; "
          f"conditions: {', '.join(fmt.conditions) or 'none'}; stop sequences: "
          f"{', '.join(map(repr, fmt.stop_sequences)) or 'none'}", file=sys.stderr)
    return 0
