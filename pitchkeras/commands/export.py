"""`pitchkeras export`: a pitchkeras model directory -> a transformers GPT-2 directory (keras-hub's exporter)."""

from __future__ import annotations

import sys

from pitchkeras.cli import add_command
from pitchkeras.convert.importing import EXPORT_FORMATS, ExportConfig, export_model


def add_parser(subparsers):
    p = add_command(subparsers, "export",
                    "Export a model directory for other tools: --format transformers writes a directory "
                    "transformers.GPT2LMHeadModel and AutoTokenizer load (and CTranslate2 converts).", __name__)
    p.add_argument("model", metavar="MODEL_DIR", help="a pitchkeras model directory")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=ExportConfig.format, help="the target format")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the directory to create (required; must not exist)%(default).0s")
    return p


def run(args) -> int:
    out = export_model(args.model, args.out, ExportConfig(format=args.format))
    print(f"exported {args.model} as {args.format} into {out}", file=sys.stderr)
    return 0
