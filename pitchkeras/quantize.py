"""int8 weights for generation, through Keras's own `Model.quantize("int8")`.

Keras replaces the kernels of the backbone's `Dense`/`EinsumDense` layers and
the token embedding (`ReversibleEmbedding`, also used in reverse for the
logits) with int8 values and per-channel float scales, and quantizes each
layer's inputs on the fly, so the matmuls run in int8 with int32 accumulation.
The layers keep their objects, so `Generator`'s cached decode loop, which
calls those same layers, runs on the quantized ones without any change.
Layer norms, position embeddings and biases stay in float.

At batch 1 a CPU spends its time streaming every weight from memory for each
token; int8 weights are a quarter of float32's bytes (figures in BUILD_NOTES.md).

Example:

>>> from pitchkeras.model import load_model
>>> model = quantize_model(load_model("checkpoint/run1/model"), "int8")
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Optional

from pitchkeras.errors import InvalidArgument

QUANTIZE_MODES = ("int8",)


def quantize_model(model, mode: Optional[str]):
    """Quantize a `PitchModel`'s backbone in place and return the model.

    Args:
        model: PitchModel. A loaded model (`pitchkeras.model.load_model`).
        mode: str or None. "int8", or None to leave the model as it is.

    Raises:
        InvalidArgument: an unknown mode, or a model already quantized.
    """
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise InvalidArgument(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    backbone = model.causal_lm.backbone
    if is_quantized(model):
        raise InvalidArgument(f"this model is already quantized ({backbone.token_embedding.dtype_policy.name})")
    with warnings.catch_warnings(), _one_collection():
        # Keras warns once per layer type without weights to quantize (norms, dropout, adds).
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method implemented")
        backbone.quantize(mode)
    return model


@contextlib.contextmanager
def _one_collection():
    """Keras's full garbage collections during `quantize`, made once at the end instead of once per layer.

    Keras's `Layer.__delattr__` runs `gc.collect()` each time a layer drops its float kernel, so quantizing a model
    ran one full collection per quantized layer (73 on GPT-2 124M), each walking every object of the process: that
    was nearly all of `quantize`'s time (BUILD_NOTES.md). The kernels are freed as their last reference goes; the
    one collection at the end frees any left in reference cycles.
    """
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


def is_quantized(model) -> bool:
    """Whether the model's token embedding (quantized with the rest) holds quantized weights."""
    return getattr(model.causal_lm.backbone.token_embedding.dtype_policy, "quantization_mode", None) is not None
