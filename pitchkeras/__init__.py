"""pitchkeras: fine-tune GPT-2 (keras-hub) on conditioned writing, generate, store and serve it.

Public names are re-exported lazily, so `import pitchkeras` (and the gRPC
client, `pitchkeras.client`) never pays for importing TensorFlow.

Modules, in the order data flows (ARCHITECTURE.md draws it):

- `conditioning`: THE prompt format; `errors`: the library's errors; `io`: atomic file and directory writes;
  `tokens`: token texts and text offsets as OpenAI writes them;
- `data/`: prepare (sources, cleaning, stats) and the tf.data pipeline;
- `model`: presets, `tiny`, the model directory; `convert/`: import and export of other formats;
  `quantize`: int8 weights for generation;
- `train/`: fine-tuning on `CausalLM.fit` (`callbacks` re-exports its public callbacks);
- `sampling/`: sampler settings and the generation engine; `compile_cache`: its persistent compile cache;
  `postprocess`: raw text -> review or reject reason; `quality`: memorization, diversity, pronouns;
- `populate`: the grid job into a store; `store/`: the ReviewStore contract and its backends;
- `server` (`server/`), `client` (`client/`), `v1/`: the gRPC/HTTP service, its client and the generated code;
- `cli` and `commands/`: the `pitchkeras` command, one module per subcommand; `demo`: `pitchkeras demo`;
  `sample_data/`: the bundled sample dump.
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
