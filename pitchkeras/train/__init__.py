"""Fine-tuning a keras-hub GPT-2 on Keras's own `CausalLM.fit`.

- `config.py`: `TrainConfig` (every setting and its one default), the
  precision choice, the optimizer (AdamW, Adafactor or Lion) with warmup + cosine decay;
- `plan.py`: the compiler's memory plan of one training step (`pitchkeras plan`, `--batch-size auto`);
- `remat.py`: rematerialized transformer blocks (`--remat`);
- `checkpoints.py`: atomic step checkpoints restored by variable path;
- `callbacks.py`: Keras callbacks (also `pitchkeras.callbacks`) for any script;
- `distribution.py`: tf.distribute on TensorFlow, keras.distribution on JAX;
- `finetuning.py`: `finetune(TrainConfig(...))`, the run behind `pitchkeras finetune`.

Example:

>>> from pitchkeras.train import TrainConfig, finetune
>>> result = finetune(TrainConfig(dataset="data", preset="tiny", steps=40, batch_size=8,
...                               sequence_length=128, learning_rate=2e-3))
>>> result.model_dir
PosixPath('checkpoint/run1/model')
"""

from pitchkeras.train.config import PRECISIONS, STRATEGIES, DeviceFacts, TrainConfig, choose_policy  # noqa: F401


def __getattr__(name: str):
    # `finetune` imports Keras: loaded on first use, so `from pitchkeras.train import TrainConfig` stays cheap.
    if name in ("finetune", "TrainResult"):
        from pitchkeras.train import finetuning as module

        return getattr(module, name)
    raise AttributeError(f"module 'pitchkeras.train' has no attribute {name!r}")
