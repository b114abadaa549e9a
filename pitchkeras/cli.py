"""`pitchkeras` command line: one subcommand per stage, thin over the library.

Each subcommand lives in `pitchkeras/commands/<name>.py` with two functions:
`add_parser(subparsers)` (cheap: no TensorFlow import) and `run(args) -> int`
(imports what it needs). Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
from typing import Optional, Sequence

from pitchkeras import __version__
from pitchkeras import compile_cache
from pitchkeras.errors import PitchkerasError

# Order shown in --help: the data flow.
COMMANDS = ("prepare", "import", "finetune", "plan", "generate", "report", "populate", "store", "serve", "client",
            "export", "demo")
# Subcommands whose module has another name (`import` is a Python keyword).
MODULE_NAMES = {"import": "import_model"}


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
        importlib.import_module(f"pitchkeras.commands.{MODULE_NAMES.get(name, name)}").add_parser(subparsers)
    return parser


def add_command(subparsers, name: str, help: str, module: str) -> argparse.ArgumentParser:
    """A subparser whose --help shows every default; `run` is `module.run`."""
    sub = subparsers.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub.set_defaults(_run_module=module)
    return sub


# Commands that load TensorFlow (serve only with --model: without it, it starts in a second).
TENSORFLOW_COMMANDS = ("import", "finetune", "generate", "report", "populate", "export", "demo")


def _uses_tensorflow(args) -> bool:
    # `serve --workers N` forks first: TensorFlow then loads in each worker, never before the fork.
    serve_here = args.command == "serve" and getattr(args, "model", None) and getattr(args, "workers", 1) == 1
    return args.command in TENSORFLOW_COMMANDS or bool(serve_here)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up lines held back from stderr.

    TensorFlow 2.21 writes `oneDNN custom operations are on`, `Could not find
    cuda drivers` and similar lines to file descriptor 2 before absl logging is
    initialised, so `TF_CPP_MIN_LOG_LEVEL` cannot hide them, and they bury a
    command's one-line error. They are captured while TensorFlow imports and
    lists its devices, and shown only if that fails. `TF_CPP_MIN_LOG_LEVEL=0`
    keeps them.
    """
    import tempfile

    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery prints its own lines
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", errors="replace"))


@contextlib.contextmanager
def imports_out_of_gc():
    """Run a process's first heavy imports with the cyclic collector off, then freeze what they made.

    Importing TensorFlow, Keras and keras-hub makes about 840,000 objects that
    live as long as the process. Python 3.11's collector traverses every one of
    them in each full collection: during the import itself (a quarter of its
    time) and then during tracing and training. `gc.freeze()` moves them into
    the permanent generation, out of every later collection; nothing they make
    afterwards is frozen (measured: BUILD_NOTES.md, "Seventh pass").

    Only for the process's first heavy import: where TensorFlow is imported
    already (a notebook, the test suite calling `main`) or the collector is off,
    it does nothing, so no object of the caller's is ever frozen.
    """
    if "tensorflow" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "compile_cache", None) and not getattr(args, "no_compile_cache", False):
            # Before TensorFlow is imported: XLA reads its flags then. XLA's CPU loader logs a
            # spurious ERROR on every cache hit (see compile_cache), so C++ logs default to level 3.
            if compile_cache.enable(args.compile_cache):
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of CLI output
        with imports_out_of_gc():
            if _uses_tensorflow(args):
                import_tensorflow_quietly()
                import keras_hub  # noqa: F401 - every TensorFlow command loads a model through it
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
