"""`pitchkeras` command line: one subcommand per stage, thin over the library.

Each subcommand lives in `pitchkeras/commands/<name>.py` with two functions:
`add_parser(subparsers)` (cheap: no TensorFlow import) and `run(args) -> int`
(imports what it needs). Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from pitchkeras import __version__
from pitchkeras.errors import PitchkerasError

# Order shown in --help: the data flow.
COMMANDS = ("prepare", "finetune", "generate", "report", "populate", "serve", "client", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pitchkeras",
        description="Fine-tune GPT-2 on conditioned writing, generate, store and serve it over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pitchkeras {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pitchkeras.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pitchkeras.commands.{name}":
                continue  # stage not built yet
            raise
        module.add_parser(subparsers)
    return parser


def add_command(subparsers, name: str, help: str, module: str) -> argparse.ArgumentParser:
    """A subparser whose --help shows every default; `run` is `module.run`."""
    sub = subparsers.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub.set_defaults(_run_module=module)
    return sub


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of CLI output
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        module = importlib.import_module(args._run_module)
        return int(module.run(args) or 0)
    except PitchkerasError as err:
        print(f"pitchkeras {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"pitchkeras {args.command}: error: {err.filename}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pitchkeras {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
