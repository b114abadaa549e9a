"""What kind of GPT-2 directory a path is, and the checkpoint inside it (no TensorFlow import).

Three layouts are recognised:

- `gpt2-simple`: a gpt-2-simple run directory (`checkpoint/run1/`): a TF
  `checkpoint` index naming the latest `model-N`, `model-N.index`,
  `model-N.data-*`, `hparams.json`, `encoder.json`, `vocab.bpe`, `counter`.
- `openai`: the OpenAI base model directory gpt-2-simple downloads
  (`models/355M/`): the same files, the checkpoint is `model.ckpt`.
- `transformers`: a Hugging Face transformers directory with a `config.json`
  whose `model_type` is `gpt2` (`model.safetensors`, `vocab.json`, `merges.txt`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

from pitchkeras.errors import UsageError

GPT2_SIMPLE = "gpt2-simple"
OPENAI = "openai"
TRANSFORMERS = "transformers"
LAYOUTS = (GPT2_SIMPLE, OPENAI, TRANSFORMERS)

CHECKPOINT_INDEX = "checkpoint"  # TF's text file naming the latest checkpoint
TF1_FILES = ("hparams.json", "encoder.json", "vocab.bpe")  # beside every gpt-2-simple / OpenAI checkpoint
_STEP = re.compile(r"^model-(\d+)\.index$")


@dataclasses.dataclass(frozen=True)
class Source:
    """A recognised model directory.

    Args:
        layout: str. One of `LAYOUTS`.
        path: Path. The directory.
        checkpoint: Path or None. The TF checkpoint prefix (`.../model-500`) for
            the TF1 layouts; None for transformers.
        step: int or None. The training step of a gpt-2-simple checkpoint.
    """

    layout: str
    path: Path
    checkpoint: Optional[Path] = None
    step: Optional[int] = None


def saved_steps(path: Path) -> list[int]:
    """The steps of every `model-N` checkpoint in a gpt-2-simple run directory, ascending."""
    return sorted(int(m.group(1)) for m in (_STEP.match(p.name) for p in path.iterdir()) if m)


def _latest_prefix(path: Path) -> str:
    """The checkpoint name the `checkpoint` index file points at (`model-500`)."""
    index = path / CHECKPOINT_INDEX
    text = index.read_text(encoding="utf-8", errors="replace")
    match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise UsageError(f"{index}: no model_checkpoint_path line; is it a TensorFlow checkpoint index?")
    return Path(match.group(1)).name  # gpt-2-simple may have written an absolute path from another machine


def _tf1_source(path: Path, step: Optional[int]) -> Source:
    """A gpt-2-simple run or an OpenAI model directory, with the checkpoint `step` picks."""
    if step is not None:
        prefix = f"model-{step}"
        if not (path / f"{prefix}.index").is_file():
            steps = ", ".join(map(str, saved_steps(path))) or "none"
            raise UsageError(f"{path / (prefix + '.index')}: no checkpoint at step {step} (saved steps: {steps})")
    elif (path / CHECKPOINT_INDEX).is_file():
        prefix = _latest_prefix(path)
    elif (path / "model.ckpt.index").is_file():
        prefix = "model.ckpt"
    else:
        raise UsageError(f"{path / CHECKPOINT_INDEX}: missing (it names the checkpoint to import; or pass --step N)")
    if not (path / f"{prefix}.index").is_file():
        raise UsageError(f"{path / (prefix + '.index')}: missing (named by {path / CHECKPOINT_INDEX})")
    for name in TF1_FILES:
        if not (path / name).is_file():
            raise UsageError(f"{path / name}: missing (a gpt-2-simple run or OpenAI GPT-2 directory needs "
                             f"{', '.join(TF1_FILES)} beside the checkpoint)")
    match = re.fullmatch(r"model-(\d+)", prefix)
    layout = GPT2_SIMPLE if match else OPENAI
    return Source(layout, path, path / prefix, int(match.group(1)) if match else None)


def _transformers_source(path: Path) -> Source:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{config_path}: not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gpt2":
        raise UsageError(f"{config_path}: model_type is {model_type!r}; pitchkeras imports GPT-2 (model_type 'gpt2')")
    return Source(TRANSFORMERS, path)


def detect(path: str | Path, *, step: Optional[int] = None) -> Source:
    """Recognise the layout of `path`.

    Args:
        path: str or Path. The directory to import.
        step: int or None. A gpt-2-simple checkpoint step (default: the latest).

    Raises:
        UsageError: the directory is missing, incomplete, or of no known layout.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory")
    has_tf1 = (path / CHECKPOINT_INDEX).is_file() or any(path.glob("*.index"))
    if has_tf1 or step is not None:
        return _tf1_source(path, step)
    if (path / "config.json").is_file():
        return _transformers_source(path)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise UsageError(f"{path}: not a gpt-2-simple run, an OpenAI GPT-2 directory or a transformers GPT-2 directory "
                     f"(no checkpoint, *.index or config.json; found {found})")
