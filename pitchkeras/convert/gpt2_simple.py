"""gpt-2-simple runs and OpenAI GPT-2 checkpoints -> a keras-hub `GPT2CausalLM`.

Both hold TF1 variables under the names OpenAI's `model.py` gave them:
`model/wte`, `model/wpe`, `model/h{i}/ln_1/{g,b}`, `model/h{i}/attn/c_attn/{w,b}`
(`w` shaped `[1, nx, 3nx]`), `attn/c_proj`, `ln_2`, `mlp/c_fc`, `mlp/c_proj`,
`model/ln_f/{g,b}`; the logits are tied to `wte`. These are the tensors of
transformers' GPT-2 under other names (transformers' `Conv1D` keeps OpenAI's
`[nx, nf]` layout), so keras-hub's own transformers converter
(`keras_hub.src.utils.transformers.convert_gpt2.convert_weights`) places them:
`CheckpointLoader` answers its requests for `h.0.attn.c_attn.weight` with
`model/h0/attn/c_attn/w`.

Tensors are read with `tf.train.load_checkpoint` one at a time (no TF1 graph)
and assigned into the freshly built backbone, so memory holds the model once
plus the tensor in flight, never two copies of every weight.

The tokenizer is GPT-2's byte-level BPE from `encoder.json` and `vocab.bpe`,
with no unsplittable tokens: gpt-2-simple's `Encoder` splits `<|endoftext|>`
into plain BPE pieces, and so must the imported model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pitchkeras.errors import UsageError

HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
END_TOKEN = "<|endoftext|>"


def read_hparams(path: Path) -> dict[str, int]:
    """`hparams.json`, checked: the five positive integers gpt-2-simple's `HParams` holds."""
    hparams_path = path / "hparams.json"
    try:
        data = json.loads(hparams_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{hparams_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{hparams_path}: expected a JSON object with {', '.join(HPARAMS)}")
    bad = [k for k in HPARAMS if not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < 1]
    if bad:
        raise UsageError(f"{hparams_path}: {', '.join(bad)} must be positive integers, got "
                         f"{', '.join(repr(data.get(k)) for k in bad)}")
    if data["n_embd"] % data["n_head"]:
        raise UsageError(f"{hparams_path}: n_embd {data['n_embd']} is not a multiple of n_head {data['n_head']}")
    return {k: int(data[k]) for k in HPARAMS}


def expected_shapes(hp: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every variable a GPT-2 checkpoint with hyperparameters `hp` holds, with its shape."""
    d = hp["n_embd"]
    shapes = {"model/wte": (hp["n_vocab"], d), "model/wpe": (hp["n_ctx"], d),
              "model/ln_f/g": (d,), "model/ln_f/b": (d,)}
    for i in range(hp["n_layer"]):
        for norm in ("ln_1", "ln_2"):
            shapes[f"model/h{i}/{norm}/g"] = shapes[f"model/h{i}/{norm}/b"] = (d,)
        for name, nx, nf in (("attn/c_attn", d, 3 * d), ("attn/c_proj", d, d), ("mlp/c_fc", d, 4 * d),
                             ("mlp/c_proj", 4 * d, d)):
            shapes[f"model/h{i}/{name}/w"] = (1, nx, nf)
            shapes[f"model/h{i}/{name}/b"] = (nf,)
    return shapes


def open_checkpoint(prefix: Path, hp: dict[str, int]):
    """A `CheckpointReader` on `prefix`, after checking its variables against `hparams.json`.

    Raises:
        UsageError: unreadable index, a missing variable, or a shape that is
            not the one `hparams.json` implies.
    """
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as err:
        raise UsageError(f"{prefix}.index: unreadable checkpoint ({_first_line(err)})") from None
    found = reader.get_variable_to_shape_map()
    hparams_path = prefix.parent / "hparams.json"
    for name, shape in expected_shapes(hp).items():
        if name not in found:
            raise UsageError(f"{prefix}.index: variable {name} is missing; not a GPT-2 checkpoint "
                             f"with the {hp['n_layer']} layers {hparams_path} declares")
        if tuple(found[name]) != shape:
            raise UsageError(f"{prefix}.index: {name} has shape {list(found[name])}, but {hparams_path} implies "
                             f"{list(shape)} ({', '.join(f'{k}={v}' for k, v in hp.items())})")
    return reader


def _first_line(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def tf1_name(hf_key: str) -> str:
    """The TF1 variable name of a transformers GPT-2 weight name (`h.0.attn.c_attn.weight` -> `model/h0/...`)."""
    parts = hf_key.split(".")
    if parts[0] in ("wte", "wpe"):
        return f"model/{parts[0]}"
    leaf = {"weight": "w", "bias": "b"}[parts[-1]]
    if parts[0] == "ln_f":
        return f"model/ln_f/{'g' if leaf == 'w' else 'b'}"
    scope = "/".join(parts[2:-1])
    if scope in ("ln_1", "ln_2"):
        leaf = "g" if leaf == "w" else "b"
    return f"model/h{parts[1]}/{scope}/{leaf}"


class CheckpointLoader:
    """keras-hub's converter loader interface (`port_weight`) over a TF1 GPT-2 checkpoint.

    keras-hub's GPT-2 converter asks for `c_attn` three times (query, key,
    value); the last tensor read is kept so it is read from disk once.

    Args:
        reader: tf.train.CheckpointReader. The open checkpoint.
        prefix: Path. Its prefix, for error messages.
    """

    def __init__(self, reader, prefix: Path):
        self.reader = reader
        self.prefix = prefix
        self._last: tuple[str, Any] = ("", None)

    def get_tensor(self, hf_key: str) -> np.ndarray:
        import tensorflow as tf

        name = tf1_name(hf_key)
        if self._last[0] != name:
            self._last = ("", None)  # drop the previous tensor before reading the next
            try:
                tensor = self.reader.get_tensor(name)
            except (tf.errors.OpError, IndexError, RuntimeError, ValueError) as err:  # truncated: IndexError
                raise UsageError(f"{self.prefix}.data-*: cannot read {name}; the file is truncated or corrupt "
                                 f"({_first_line(err)})") from None
            if tensor.ndim == 3:  # conv1d weights: [1, nx, nf] -> transformers' [nx, nf]
                tensor = tensor[0]
            self._last = (name, tensor)
        return self._last[1]

    def port_weight(self, keras_variable, hf_weight_key: str, hook_fn=None) -> None:
        tensor = self.get_tensor(hf_weight_key)
        if hook_fn is not None:
            tensor = hook_fn(tensor, list(keras_variable.shape))
        keras_variable.assign(np.asarray(tensor, dtype=keras_variable.dtype))


def load_tokenizer(path: Path):
    """GPT-2's tokenizer from `encoder.json` + `vocab.bpe`, `<|endoftext|>` splittable as gpt-2-simple's `Encoder`."""
    import keras_hub

    encoder_path, merges_path = path / "encoder.json", path / "vocab.bpe"
    try:
        vocabulary = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{encoder_path}: not valid JSON ({err})") from None
    if not isinstance(vocabulary, dict) or END_TOKEN not in vocabulary:
        raise UsageError(f"{encoder_path}: not a GPT-2 vocabulary (no {END_TOKEN} entry)")
    # gpt-2-simple reads `bpe_data.split('\n')[1:-1]`: a version line first, an empty line last.
    merges = merges_path.read_text(encoding="utf-8").split("\n")[1:]
    merges = [line for line in merges if line.strip()]
    try:
        return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges, unsplittable_tokens=[])
    except ValueError as err:
        raise UsageError(f"{merges_path}: does not match {encoder_path} ({_first_line(err)})") from None


def load_causal_lm(source, *, dtype: Optional[str] = "float32"):
    """A keras-hub `GPT2CausalLM` holding the checkpoint of a gpt-2-simple run or OpenAI directory.

    Args:
        source: layout.Source. A `gpt2-simple` or `openai` source.
        dtype: str or None. The dtype to build the model in.
    """
    import keras_hub
    from keras_hub.src.utils.transformers.convert_gpt2 import convert_weights

    hp = read_hparams(source.path)
    tokenizer = load_tokenizer(source.path)
    if tokenizer.vocabulary_size() != hp["n_vocab"]:
        raise UsageError(f"{source.path / 'encoder.json'}: {tokenizer.vocabulary_size()} tokens, but "
                         f"{source.path / 'hparams.json'} says n_vocab {hp['n_vocab']}")
    reader = open_checkpoint(source.checkpoint, hp)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=hp["n_vocab"], num_layers=hp["n_layer"], num_heads=hp["n_head"], hidden_dim=hp["n_embd"],
        intermediate_dim=4 * hp["n_embd"], dropout=0.0,  # OpenAI's model.py has no dropout
        max_sequence_length=hp["n_ctx"], dtype=dtype)
    convert_weights(backbone, CheckpointLoader(reader, source.checkpoint), {"n_embd": hp["n_embd"]})
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=hp["n_ctx"])
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
