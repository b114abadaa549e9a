"""Hugging Face transformers GPT-2 directories in and out, through keras-hub's own converters.

In: keras-hub 0.32 converts a transformers GPT-2 directory itself
(`GPT2Backbone.from_preset(dir)` reads `config.json` and `model.safetensors`
through `keras_hub.src.utils.transformers.convert_gpt2`, one tensor at a
time). Its tokenizer converter reads `vocab.json` and `merges.txt` only;
transformers 5 saves a `tokenizer.json` alone, so the vocabulary and merges
are taken from whichever the directory has.

Out: keras-hub 0.32's `CausalLM.export_to_transformers` covers GPT-2 (config,
`model.safetensors` with the LoRA-merged kernels, `vocab.json`, `merges.txt`).
Its `tokenizer_config.json` names no tokenizer class and its `merges.txt`
has no version line (transformers skips the first line of `merges.txt`), so
those two are rewritten; `generation_config.json` carries the model's stop
sequences as transformers' `stop_strings`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pitchkeras.errors import UsageError
from pitchkeras.io import give_open_mode

END_TOKEN = "<|endoftext|>"
MERGES_VERSION_LINE = "#version: 0.2"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None


def vocabulary_and_merges(path: Path) -> tuple[dict, list[str]]:
    """The BPE vocabulary and merges of a transformers GPT-2 directory.

    From `vocab.json` + `merges.txt` when present (keras-hub's converter reads
    only these), else from `tokenizer.json` (all transformers 5 writes).
    """
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocabulary = _read_json(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [line for line in lines if line.strip() and not line.startswith("#version")]
        return vocabulary, merges
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UsageError(f"{path / 'vocab.json'}: missing (a transformers GPT-2 directory needs vocab.json and "
                         "merges.txt, or tokenizer.json)")
    model = _read_json(tokenizer_path).get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(f"{tokenizer_path}: not a byte-level BPE tokenizer (model type {model.get('type')!r})")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocabulary = dict(model["vocab"])
    for added in _read_json(tokenizer_path).get("added_tokens", []):
        vocabulary.setdefault(added["content"], added["id"])
    return vocabulary, merges


def load_causal_lm(source, *, special_end_token: bool = True, dtype: str = "float32", sequence_length: int = 1024):
    """A keras-hub `GPT2CausalLM` from a transformers GPT-2 directory (keras-hub's converter for the weights).

    Args:
        source: layout.Source. A `transformers` source.
        special_end_token: bool. `<|endoftext|>` in text is the one special
            token, as transformers has it (True), or plain BPE pieces, as
            gpt-2-simple's `Encoder` has it (False).
        dtype: str. The dtype to build the model in.
        sequence_length: int. The preprocessor's sequence length (capped at `n_positions`).
    """
    import keras_hub

    vocabulary, merges = vocabulary_and_merges(source.path)
    if END_TOKEN not in vocabulary:
        raise UsageError(f"{source.path}: the vocabulary has no {END_TOKEN}; not a GPT-2 tokenizer")
    try:
        tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges,
                                                   **({} if special_end_token else {"unsplittable_tokens": []}))
    except ValueError as err:
        raise UsageError(f"{source.path / 'merges.txt'}: does not match the vocabulary ({err})") from None
    try:
        backbone = keras_hub.models.GPT2Backbone.from_preset(str(source.path), dtype=dtype)
    except Exception as err:  # safetensors, OSError, KeyError: keras-hub raises many kinds for a bad directory
        raise UsageError(f"{source.path}: keras-hub cannot convert it ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    if tokenizer.vocabulary_size() != backbone.vocabulary_size:
        raise UsageError(f"{source.path / 'config.json'}: vocab_size {backbone.vocabulary_size}, but the tokenizer "
                         f"has {tokenizer.vocabulary_size()} tokens")
    length = min(sequence_length, backbone.max_sequence_length)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=length)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def write_transformers_dir(model, out: Path) -> None:
    """Write `model` (a PitchModel) as a transformers GPT-2 directory into `out` (which must not exist yet)."""
    causal_lm = model.causal_lm
    causal_lm.export_to_transformers(str(out))  # keras-hub's exporter: config, safetensors, vocab, merges
    give_open_mode(out / "model.safetensors")  # safetensors creates its file 0600 whatever the umask
    tokenizer = causal_lm.preprocessor.tokenizer
    merges_path = out / "merges.txt"
    lines = [line for line in merges_path.read_text(encoding="utf-8").split("\n") if line]
    merges_path.write_text("\n".join([MERGES_VERSION_LINE, *lines]) + "\n", encoding="utf-8")
    end = tokenizer.end_token
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace",
        "bos_token": end, "eos_token": end, "unk_token": end, "pad_token": None,
        "model_max_length": int(causal_lm.backbone.max_sequence_length),
    }, indent=2), encoding="utf-8")
    generation = {"bos_token_id": tokenizer.end_token_id, "eos_token_id": tokenizer.end_token_id}
    if model.prompt_format.stop_sequences:
        generation["stop_strings"] = list(model.prompt_format.stop_sequences)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
