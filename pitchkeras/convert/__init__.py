"""Bring your own GPT-2: gpt-2-simple runs, OpenAI and transformers checkpoints in; transformers out.

`import_model` recognises the directory (`layout.detect`), converts its
weights into a keras-hub `GPT2CausalLM` (`gpt2_simple` for TF1 checkpoints,
keras-hub's own converter for transformers, `huggingface`) and writes a
pitchkeras model directory whose `pitchkeras.json` carries the prompt format
the model was trained with (gpt-2-simple's text delimiters included).
`export_model` writes a model directory for transformers with keras-hub's own
exporter.

Modules: `importing` (`import_model`, `export_model` and their configs), `layout` (which format a directory
holds), `gpt2_simple` (TF1 checkpoints and gpt-2-simple's tokenizer files), `huggingface` (transformers
directories, both ways).
"""

from pitchkeras.convert.importing import EXPORT_FORMATS, ExportConfig, ImportConfig, export_model, import_model
from pitchkeras.convert.layout import LAYOUTS, Source, detect

__all__ = ["EXPORT_FORMATS", "ExportConfig", "ImportConfig", "LAYOUTS", "Source", "detect", "export_model",
           "import_model"]
