"""Fine-tuning a keras-hub GPT-2 on Keras's own `CausalLM.fit`.

Modules, each importing only those above it:

- `config.py`: `TrainConfig` (every setting and its one default) and `parse_memory`;
- `devices.py`: the accelerators this process sees and the precision chosen for them;
- `accumulation.py`: gradient accumulation that updates once per step on JAX;
- `remat.py`: rematerialized transformer blocks (`--remat`) and the gradient gates;
- `optimizer.py`: the optimizer (AdamW, Adafactor or Lion) with warmup + cosine decay, the loss, `compile`;
- `plan.py`: the compiler's memory plan of one training step (`pitchkeras plan`);
- `auto_batch.py`: the micro-batch chooser behind `--batch-size auto`, from the plan;
- `checkpoints.py`: atomic step checkpoints restored by variable path;
- `plots.py`: `loss.png` and `val_by_condition.png`;
- `samples.py`: sample texts written during and after a run;
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

from pitchkeras.train.config import PRECISIONS, STRATEGIES, TrainConfig, parse_memory  # noqa: F401
from pitchkeras.train.devices import DeviceFacts, choose_policy  # noqa: F401


def __getattr__(name: str):
    # Start-up time: `finetune` imports Keras, so it loads on first use and `from pitchkeras.train import
    # TrainConfig` stays cheap.
    if name in ("finetune", "TrainResult"):
        from pitchkeras.train import finetuning as module

        return getattr(module, name)
    raise AttributeError(f"module 'pitchkeras.train' has no attribute {name!r}")
