"""`import_model` and `export_model`: other tools' GPT-2 directories <-> pitchkeras model directories.

Example:

>>> from pitchkeras.convert import ImportConfig, import_model, export_model
>>> import_model("checkpoint/run1", "models/run1", ImportConfig(conditions=("score", "genre")))
>>> export_model("models/run1", "hf/run1")  # transformers.GPT2LMHeadModel.from_pretrained("hf/run1")
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from pitchkeras.conditioning import END_OF_TEXT, NUMERIC_CONDITIONS, START_OF_TEXT, PromptFormat
from pitchkeras.convert import gpt2_simple, huggingface
from pitchkeras.convert import layout as layouts
from pitchkeras.data.pipeline import read_examples
from pitchkeras.errors import UsageError
from pitchkeras.io import atomic_directory
from pitchkeras.model import MODEL_INFO_FILE, ModelInfo, PitchModel, load_model, save_model_dir

EXPORT_FORMATS = ("transformers",)


@dataclasses.dataclass
class ImportConfig:
    """How `pitchkeras import` reads a model and the prompt format it gives it.

    Args:
        conditions: tuple of str or None. Condition names, one header line each,
            as the model was trained (`("score", "genre")` for the seed's
            reviews); `()` for a plain corpus such as DJ biographies; None: those
            in the directory's `pitchkeras.json` (a model `export` wrote), else none.
        start_text: str or None. Plain text that opened every training document;
            None: gpt-2-simple's `<|startoftext|>` for a gpt-2-simple run, none
            for an OpenAI base model or a transformers directory.
        end_text: str or None. Plain text that closed every training document, where
            generation stops; None: `<|endoftext|>` for a gpt-2-simple run, none otherwise.
        step: int or None. The gpt-2-simple checkpoint step (default: the latest).
        dataset: str or None. Training data (a `prepare` output directory, a CSV
            or gpt-2-simple's delimited text file) to learn the conditions' known values from.
        model_version: str or None. Stored with everything the model generates
            (default: `import-<directory name>[-<step>]`).
    """

    conditions: Optional[tuple[str, ...]] = None  # from an exported pitchkeras.json, else a plain corpus
    start_text: Optional[str] = None  # by layout
    end_text: Optional[str] = None  # by layout
    step: Optional[int] = None  # the latest
    dataset: Optional[str] = None
    model_version: Optional[str] = None


@dataclasses.dataclass
class ExportConfig:
    """How `pitchkeras export` writes a model.

    Args:
        format: str. The target format; `transformers` (a directory
            `transformers.GPT2LMHeadModel.from_pretrained` loads).
    """

    format: str = "transformers"


def saved_info(source):
    """The `pitchkeras.json` `pitchkeras export` left in a transformers directory, or None."""
    if source.layout != layouts.TRANSFORMERS or not (source.path / MODEL_INFO_FILE).is_file():
        return None
    return ModelInfo.read(source.path)


def prompt_format_for(source, config: ImportConfig, saved=None) -> PromptFormat:
    """The prompt format an imported model is prompted with: gpt-2-simple's habits for its runs.

    Args:
        source: layout.Source. The directory imported.
        config: ImportConfig. Explicit choices (None fields: the defaults below).
        saved: ModelInfo or None. An exported model's own `pitchkeras.json`: its
            format is the default, so a model goes out and back unchanged.
    """
    if saved is not None:
        fmt = saved.prompt_format
        default_conditions, default_start, default_end, start_token = fmt.conditions, fmt.start_text, fmt.end_text, \
            fmt.start_token
    else:
        delimited = source.layout == layouts.GPT2_SIMPLE
        default_conditions = ()
        default_start, default_end = (START_OF_TEXT, END_OF_TEXT) if delimited else ("", "")
        start_token = source.layout == layouts.TRANSFORMERS  # gpt-2-simple feeds a prefix without it
    conditions = tuple(default_conditions if config.conditions is None else config.conditions)
    return PromptFormat(conditions, tuple(n for n in conditions if n in NUMERIC_CONDITIONS),
                        start_text=default_start if config.start_text is None else config.start_text,
                        end_text=default_end if config.end_text is None else config.end_text,
                        start_token=start_token)


def _dataset_documents(dataset: str) -> list[str]:
    """The training documents of `dataset`: a `prepare` directory, a CSV, or gpt-2-simple's delimited text."""
    path = Path(dataset)
    if path.is_dir():
        return read_examples(path / "train.csv")
    if path.suffix.lower() == ".csv":
        return read_examples(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such dataset (a `prepare` directory, a CSV or a gpt-2-simple text file)")
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = re.split(re.escape(START_OF_TEXT) + "|" + re.escape(END_OF_TEXT), text)
    return [part.strip("\n") for part in parts if part.strip()]


def learn_condition_values(dataset: str, fmt: PromptFormat) -> dict:
    """Each condition's values seen in `dataset` (as `prepare` records them in stats.json)."""
    values: dict[str, set] = {name: set() for name in fmt.conditions}
    parsed = 0
    for document in _dataset_documents(dataset):
        try:
            found, _ = fmt.split(document)
        except ValueError:
            continue
        parsed += 1
        for name, value in found.items():
            values[name].add(value)
    if not parsed:
        raise UsageError(f"{dataset}: no document starts with the {', '.join(fmt.conditions)} header lines "
                         f"--conditions names")
    return {name: sorted(seen) for name, seen in values.items()}


def _load(source, fmt: PromptFormat):
    if source.layout == layouts.TRANSFORMERS:
        # A model that came from gpt-2-simple (and went out through `export`) keeps its delimiters as plain text.
        return huggingface.load_causal_lm(source, special_end_token=fmt.start_token)
    return gpt2_simple.load_causal_lm(source)


def _fresh_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        raise UsageError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
    return out


def import_model(path: str | os.PathLike, out: str | os.PathLike, config: Optional[ImportConfig] = None):
    """Turn a gpt-2-simple run, an OpenAI GPT-2 directory or a transformers GPT-2 directory into a model directory.

    The model directory is written beside `out` under a temporary name and
    renamed into place, so a failure leaves nothing at `out`.

    Args:
        path: str. The directory to import.
        out: str. The pitchkeras model directory to create (must not exist).
        config: ImportConfig or None. Conditions, text delimiters, step, dataset.

    Returns:
        The loaded `PitchModel` (its `path` is `out`) and the `layout.Source` it came from.

    Raises:
        UsageError: an unknown layout, a missing or corrupt file, or a shape
            that disagrees with the hyperparameters; one line naming the file.
    """
    config = config or ImportConfig()
    out = _fresh_out(out)
    source = layouts.detect(path, step=config.step)
    saved = saved_info(source)
    fmt = prompt_format_for(source, config, saved)
    condition_values = {}
    if config.dataset and fmt.conditions:
        condition_values = learn_condition_values(config.dataset, fmt)
    elif saved is not None and fmt.conditions == saved.prompt_format.conditions:
        condition_values = saved.condition_values
    causal_lm = _load(source, fmt)
    suffix = f"-{source.step}" if source.step is not None else ""
    info = ModelInfo(prompt_format=fmt, condition_values=condition_values,
                     model_version=config.model_version or f"import-{source.path.resolve().name}{suffix}",
                     base_preset=str(source.path), sequence_length=int(causal_lm.preprocessor.sequence_length),
                     source_layout=source.layout)
    save_model_dir(causal_lm, info, out)
    return PitchModel(causal_lm=causal_lm, info=info, path=out), source


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike,
                 config: Optional[ExportConfig] = None) -> Path:
    """Write a pitchkeras model directory in another tool's format (transformers), via a temporary directory.

    Args:
        model_dir: str. A pitchkeras model directory.
        out: str. The directory to create (must not exist).
        config: ExportConfig or None. The format.
    """
    config = config or ExportConfig()
    if config.format not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {config.format!r}; use {', '.join(EXPORT_FORMATS)}")
    out = _fresh_out(out)
    model = load_model(model_dir)
    with atomic_directory(out) as tmp:
        huggingface.write_transformers_dir(model, tmp)
        shutil.copyfile(Path(model_dir) / MODEL_INFO_FILE, tmp / MODEL_INFO_FILE)  # the prompt format travels too
    return out
