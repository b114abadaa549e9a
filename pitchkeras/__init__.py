"""pitchkeras: fine-tune GPT-2 (keras-hub) on conditioned writing, generate, store and serve it.

Public names are re-exported lazily, so `import pitchkeras` (and the gRPC
client, `pitchkeras.client`) never pays for importing TensorFlow.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PromptFormat": "pitchkeras.conditioning",
    "REVIEWS": "pitchkeras.conditioning",
    "PLAIN": "pitchkeras.conditioning",
    "InvalidArgument": "pitchkeras.errors",
    "NotFound": "pitchkeras.errors",
    "Unavailable": "pitchkeras.errors",
    "FailedPrecondition": "pitchkeras.errors",
    "PitchkerasError": "pitchkeras.errors",
    "open_store": "pitchkeras.store",
    "Review": "pitchkeras.store",
    "ReviewStore": "pitchkeras.store",
    "ModelInfo": "pitchkeras.model",
    "PitchModel": "pitchkeras.model",
    "load_model": "pitchkeras.model",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pitchkeras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
