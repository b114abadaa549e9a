"""Models: load a preset (name, local dir, or `tiny`), and the model directory contract.

A pitchkeras model directory is a keras-hub preset directory (so
`keras_hub.models.CausalLM.from_preset(path)` loads it) plus `pitchkeras.json`:

    {"format_version": 1,
     "prompt_format": {"conditions": ["score", "genre"], "numeric": ["score"]},
     "condition_values": {"genre": ["Electronic", "Rock"], "score": [0.0, 0.5, ...]},
     "model_version": "run1-20261121T101500-3f2a",
     "base_preset": "gpt2_medium_en",
     "sequence_length": 256}

`tiny` is a small GPT2Backbone with a byte-level BPE tokenizer trained on the
dataset itself with the `tokenizers` library: no download, so tests and the
demo run offline on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from pitchkeras.conditioning import END_OF_TEXT, PromptFormat
from pitchkeras.errors import InvalidArgument, UsageError
from pitchkeras.io import atomic_directory, atomic_write_json

MODEL_INFO_FILE = "pitchkeras.json"
FORMAT_VERSION = 1

# keras-hub GPT-2 presets this tool knows by name (any other name is tried too).
GPT2_PRESETS = ("gpt2_base_en", "gpt2_medium_en", "gpt2_large_en", "gpt2_extra_large_en")
TINY = "tiny"


@dataclasses.dataclass
class TinyConfig:
    """Shape of the `tiny` preset: small enough to train in minutes on 2 CPU cores."""

    vocabulary_size: int = 2048  # BPE merges learnt from the dataset itself
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    max_sequence_length: int = 512
    dropout: float = 0.0  # tiny data, few steps: dropout only slows the demo down


@dataclasses.dataclass
class ModelInfo:
    """The contents of `pitchkeras.json`.

    Args:
        prompt_format: PromptFormat. How conditions and text were joined in training.
        condition_values: dict. Condition name -> sorted values seen in training.
        model_version: str. The training run id; stored with every generated review.
        base_preset: str. The preset the run started from (`tiny`, `gpt2_medium_en`, a path).
        sequence_length: int. The training sequence length.
        source_layout: str. Where an imported model came from (`gpt2-simple`,
            `openai`, `transformers`; see `pitchkeras.convert`); `""` for a
            model trained here.
    """

    prompt_format: PromptFormat
    condition_values: dict = dataclasses.field(default_factory=dict)
    model_version: str = "untrained"
    base_preset: str = ""
    sequence_length: int = 0
    source_layout: str = ""

    def to_json(self) -> dict[str, Any]:
        data = {
            "format_version": FORMAT_VERSION,
            "prompt_format": self.prompt_format.to_json(),
            "condition_values": self.condition_values,
            "model_version": self.model_version,
            "base_preset": self.base_preset,
            "sequence_length": self.sequence_length,
        }
        if self.source_layout:
            data["source_layout"] = self.source_layout
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelInfo":
        return cls(
            prompt_format=PromptFormat.from_json(data.get("prompt_format", {})),
            condition_values=dict(data.get("condition_values", {})),
            model_version=str(data.get("model_version", "untrained")),
            base_preset=str(data.get("base_preset", "")),
            sequence_length=int(data.get("sequence_length", 0)),
            source_layout=str(data.get("source_layout", "")),
        )

    def write(self, model_dir: str | os.PathLike) -> Path:
        """Write `pitchkeras.json` into `model_dir` atomically."""
        return atomic_write_json(Path(model_dir) / MODEL_INFO_FILE, self.to_json())

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> "ModelInfo":
        path = Path(model_dir) / MODEL_INFO_FILE
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InvalidArgument(
                f"{model_dir} is not a pitchkeras model directory: {MODEL_INFO_FILE} is missing"
            ) from None
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise InvalidArgument(f"{path}: unreadable model info ({err})") from None


@dataclasses.dataclass
class PitchModel:
    """A loaded model: the keras-hub CausalLM plus what pitchkeras needs to prompt it."""

    causal_lm: Any  # keras_hub.models.CausalLM
    info: ModelInfo
    path: Optional[Path] = None

    @property
    def tokenizer(self):
        return self.causal_lm.preprocessor.tokenizer

    @property
    def prompt_format(self) -> PromptFormat:
        return self.info.prompt_format


def train_bpe_tokenizer(texts: Iterable[str], vocabulary_size: int = 2048):
    """A GPT-2 style byte-level BPE tokenizer learnt from `texts`.

    Returns:
        A `keras_hub.models.GPT2Tokenizer` whose only special token is `<|endoftext|>`.
    """
    import keras_hub
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        texts, vocab_size=vocabulary_size, min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text(encoding="utf-8"))
        merges = [
            line
            for line in Path(tmp, "merges.txt").read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#version")
        ]
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=merges)


def build_tiny_causal_lm(
    texts: Sequence[str],
    *,
    config: Optional[TinyConfig] = None,
    sequence_length: int = 256,
    seed: int = 0,
):
    """A freshly initialised tiny GPT2CausalLM with a tokenizer learnt from `texts`."""
    import keras
    import keras_hub

    config = config or TinyConfig()
    keras.utils.set_random_seed(seed)
    tokenizer = train_bpe_tokenizer(texts, config.vocabulary_size)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.intermediate_dim,
        dropout=config.dropout,
        max_sequence_length=max(config.max_sequence_length, sequence_length),
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def save_model_dir(causal_lm, info: ModelInfo, model_dir: str | os.PathLike) -> Path:
    """Export `causal_lm` as a keras-hub preset directory plus `pitchkeras.json`.

    Written into a sibling temp directory and renamed into place, so a crash
    never leaves a half-written model directory.
    """
    with atomic_directory(model_dir, replace=True) as tmp:
        causal_lm.save_to_preset(str(tmp))
        info.write(tmp)
    return Path(model_dir)


def load_model(model_dir: str | os.PathLike) -> PitchModel:
    """Load a pitchkeras model directory (a keras-hub preset dir + pitchkeras.json).

    Raises:
        InvalidArgument: not a model directory.
    """
    import keras_hub

    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidArgument(f"model directory {model_dir} does not exist")
    info = ModelInfo.read(path)
    causal_lm = keras_hub.models.CausalLM.from_preset(str(path))
    return PitchModel(causal_lm=causal_lm, info=info, path=path)


def load_causal_lm(preset: str, *, texts: Sequence[str] = (), tiny: Optional[TinyConfig] = None,
                   sequence_length: int = 256, seed: int = 0, dtype: Optional[str] = None):
    """The starting model of a fine-tuning run: `tiny`, a local preset directory, or a keras-hub preset name.

    Args:
        preset: str. `tiny`, a keras-hub preset directory, or a preset name (downloaded by keras-hub).
        texts: list of str. The training texts `tiny` learns its tokenizer from.
        tiny: TinyConfig or None. The shape of `tiny`.
        sequence_length: int. The preprocessor's sequence length for `tiny`.
        seed: int. Initialisation seed of `tiny`.
        dtype: str or None. The dtype policy to load a preset with (None: the global policy).

    Raises:
        UsageError: a preset that does not exist or cannot be downloaded (offline).
    """
    import keras_hub

    if preset == TINY:
        return build_tiny_causal_lm(list(texts), config=tiny, sequence_length=sequence_length, seed=seed)
    if Path(preset).is_dir():
        try:
            return keras_hub.models.CausalLM.from_preset(preset, dtype=dtype)
        except Exception as err:  # keras-hub raises many kinds for a bad directory
            raise UsageError(f"{preset} is not a keras-hub preset directory ({type(err).__name__}: {err})") from None
    if os.sep in preset or preset.startswith("."):
        raise UsageError(f"preset directory {preset} does not exist")
    try:
        return keras_hub.models.CausalLM.from_preset(preset, dtype=dtype)
    except Exception as err:  # offline: requests/kagglehub/OSError; unknown name: ValueError
        known = ", ".join(GPT2_PRESETS)
        if isinstance(err, ValueError) and "preset" in str(err).lower() and preset not in GPT2_PRESETS:
            raise UsageError(f"unknown preset {preset!r}: use {known}, tiny or a local preset directory") from None
        raise UsageError(f"cannot download {preset}: no network; use --preset tiny or a local preset directory") from None


@contextlib.contextmanager
def tokenized_inputs(causal_lm):
    """Within this block `causal_lm.fit/evaluate` take token batches (`pitchkeras.data.make_dataset`).

    keras-hub tasks run their preprocessor over `fit`'s inputs (strings);
    pre-tokenized, packed batches skip it, as keras-hub documents, by setting
    `causal_lm.preprocessor = None`. It is put back on leaving, so `generate`
    and `save_to_preset` keep working.
    """
    preprocessor = causal_lm.preprocessor
    causal_lm.preprocessor = None
    try:
        yield preprocessor
    finally:
        causal_lm.preprocessor = preprocessor


@contextlib.contextmanager
def attached_preprocessor(causal_lm, preprocessor):
    """Within this block `causal_lm` has `preprocessor` (for `generate` inside `tokenized_inputs`)."""
    if preprocessor is None or causal_lm.preprocessor is not None:
        yield
        return
    causal_lm.preprocessor = preprocessor
    try:
        yield
    finally:
        causal_lm.preprocessor = None
