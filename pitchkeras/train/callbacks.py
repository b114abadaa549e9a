"""Keras callbacks for fine-tuning a keras-hub CausalLM with `fit`, usable in any Keras script.

pitchkeras trains with one optimizer step per Keras epoch (`steps_per_epoch`
is the number of accumulated micro-batches), so `fit(initial_epoch=step)`
resumes a run exactly and every callback here reads "epoch" as "step".

- `StepCheckpoint`: atomic checkpoints of every model and optimizer variable
  plus the data position, keep-last-K, restored by variable path.
- `StopOnSignal`: SIGTERM/SIGINT finish the current step, then every worker
  stops at the same step and `StepCheckpoint` saves it.
- `MetricsCSV`: `metrics.csv` (loss, learning rate, tokens/s, validation
  loss and perplexity, loss scale and skipped updates under float16), continued
  across resumes; the values are also added to `logs` for TensorBoard.
- `LossPlot`: `loss.png` (drawn by `pitchkeras.train.plots`).
- `SampleWriter`: sample texts during training (written by `pitchkeras.train.samples`).
- `ConditionValidation`: validation loss per genre and per score bucket into
  `val_by_condition.csv` and `val_by_condition.png`.
- `Progress`: a tqdm bar and `step N/M: ...` lines.

Example (the README's "From your own Keras script" runs this shape):

>>> ckpt = StepCheckpoint("run/checkpoints", save_every=100)
>>> start = ckpt.restore(causal_lm)          # 0 when there is no checkpoint yet
>>> ds = make_dataset("data/train.csv", tokenizer, sequence_length=256, batch_size=8,
...                   skip_batches=ckpt.data_position)
>>> causal_lm.fit(ds, epochs=1000, steps_per_epoch=1, initial_epoch=start, shuffle=False,
...               callbacks=[StopOnSignal(), MetricsCSV("run/metrics.csv", resume_step=start), ckpt])
"""

from __future__ import annotations

import csv
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import keras

from pitchkeras.data.pipeline import make_group_batches
from pitchkeras.io import atomic_write_text
from pitchkeras.model import attached_preprocessor
from pitchkeras.train import checkpoints as ckpt_files
from pitchkeras.train.optimizer import build_optimizer, current_learning_rate, inner_optimizer
from pitchkeras.train.plots import plot_condition_losses, plot_loss
from pitchkeras.train.samples import write_samples

METRICS_COLUMNS = ("step", "loss", "learning_rate", "tokens_per_sec", "val_loss", "val_perplexity",
                   "loss_scale", "skipped_steps")
# Score buckets of the per-condition validation: (label, lowest score, highest score), both inclusive.
SCORE_BUCKETS = (("0-3.5", 0.0, 3.5), ("4-6.5", 4.0, 6.5), ("7-8.5", 7.0, 8.5), ("9-10", 9.0, 10.0))
CONDITION_COLUMNS = ("step", "condition", "value", "examples", "val_loss", "val_perplexity")


def _steps_per_epoch(callback) -> int:
    """Micro-batches per optimizer step: what one epoch of `fit` holds."""
    return int((callback.params or {}).get("steps") or 1)


def _perplexity(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))  # exp(50) already says "not learnt"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _truncate_csv(path: Path, columns: Sequence[str], keep_through: Optional[int]) -> None:
    """Rewrite `path` with its header and the rows of steps <= `keep_through` (all rows dropped when None)."""
    rows = []
    if keep_through is not None and path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if str(r.get("step", "")).isdigit() and int(r["step"]) <= keep_through]
    lines = [",".join(columns)] + [",".join(r.get(c, "") or "" for c in columns) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


class StepCheckpoint(keras.callbacks.Callback):
    """Atomic step checkpoints of the model and optimizer, and exact resume.

    Saves every `save_every` steps, when training is stopped early (e.g. by
    `StopOnSignal`) and when it ends, into `directory/ckpt-<step>/`, keeping
    the newest `keep`. `restore(model)` loads `latest` (or a given
    checkpoint) by variable path and returns the step to pass to
    `fit(initial_epoch=...)`; `data_position` is then the number of batches
    already consumed, for `make_dataset(skip_batches=...)`.

    Args:
        directory: str. The `checkpoints/` directory.
        save_every: int. Steps between saves (0 = only when stopped or done).
        keep: int. Checkpoints kept.
        state: callable or None. Returns extra JSON-able state to store (run id, preset...).
        chief: bool. Whether this process writes (one writer per multi-worker cluster).
        on_save: callable or None. Called with the checkpoint path after each save.
    """

    def __init__(self, directory, save_every: int = 0, keep: int = 3, *, state: Optional[Callable[[], dict]] = None,
                 chief: bool = True, on_save: Optional[Callable[[Path], None]] = None):
        super().__init__()
        self.directory = Path(directory)
        self.save_every, self.keep, self.chief = int(save_every), int(keep), chief
        self._state, self.on_save = state, on_save
        self.restored_state: dict = {}
        self._last_saved: Optional[int] = None
        self._step = 0
        self.data_position = 0

    def restore(self, model, checkpoint=None) -> int:
        """Load `checkpoint` (default: `latest` in `directory`, if any) into `model` and its optimizer.

        The optimizer is built first (its slots must exist to be assigned).

        Returns:
            The restored step (0 when there is nothing to restore).
        """
        path = ckpt_files.find_checkpoint(self.directory.parent, str(checkpoint)) if checkpoint else self._latest()
        if path is None:
            return 0
        build_optimizer(model)
        self.restored_state = ckpt_files.restore_checkpoint(path, ckpt_files.training_variables(model))
        self._step = self._last_saved = int(self.restored_state["step"])
        self.data_position = int(self.restored_state.get("data_position", 0))
        return self._step

    def _latest(self) -> Optional[Path]:
        pointer = self.directory / ckpt_files.LATEST
        if not pointer.is_file():
            return None
        return self.directory / pointer.read_text(encoding="utf-8").strip()

    def save(self, step: int) -> Optional[Path]:
        """Write the checkpoint of `step` now (chief only)."""
        self._last_saved = step
        if not self.chief:
            return None
        per_step = _steps_per_epoch(self)
        state = dict(self._state() if self._state else {}, step=step, data_position=step * per_step)
        path = ckpt_files.save_checkpoint(self.directory, ckpt_files.training_variables(self.model), state, self.keep)
        if self.on_save:
            self.on_save(path)
        return path

    def on_epoch_end(self, epoch, logs=None):
        self._step = step = epoch + 1
        if self.model.stop_training or (self.save_every and step % self.save_every == 0):
            self.save(step)

    def on_train_end(self, logs=None):
        if self._step and self._last_saved != self._step:
            self.save(self._step)


class StopOnSignal(keras.callbacks.Callback):
    """SIGTERM/SIGINT end training after the current step, on every worker at the same step.

    The handlers are installed for the length of `fit` (main thread only);
    a second Ctrl-C raises KeyboardInterrupt at once. With several workers,
    `any_worker` (a collective every worker calls each step) spreads one
    worker's signal to all, so all stop, and the chief saves, at one step.

    Args:
        any_worker: callable or None. `flag -> bool` reduced over workers (None: this process only).
    """

    def __init__(self, any_worker: Optional[Callable[[bool], bool]] = None):
        super().__init__()
        self._any_worker = any_worker
        self.signal: Optional[int] = None
        self.stopped_at: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def on_train_begin(self, logs=None):
        self.signal = self.stopped_at = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_epoch_end(self, epoch, logs=None):
        stop = self.signal is not None
        if self._any_worker is not None:
            stop = self._any_worker(stop)
        if stop:
            self.stopped_at = epoch + 1
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class MetricsCSV(keras.callbacks.Callback):
    """`metrics.csv`: one row per step, continued across resumes.

    Adds `learning_rate`, `tokens_per_sec`, `val_perplexity` and, under a
    `LossScaleOptimizer`, `loss_scale` and `skipped_steps` (micro-batches
    whose gradients were not finite and were skipped, since the run began)
    to `logs`, so callbacks after it (TensorBoard) see them too.

    Args:
        path: str. The CSV file.
        resume_step: int or None. Rows after this step are dropped (a resumed run rewrites them);
            None starts a new file.
        tokens_per_step: int. Tokens one step trains on (for tokens/s; 0 leaves it empty).
        chief: bool. Whether this process writes.
    """

    def __init__(self, path, resume_step: Optional[int] = None, tokens_per_step: int = 0, chief: bool = True):
        super().__init__()
        self.path, self.resume_step, self.tokens_per_step, self.chief = Path(path), resume_step, tokens_per_step, chief
        self._file = self._writer = None
        self._started = self._paused = self._test_started = 0.0

    def on_train_begin(self, logs=None):
        if self.chief:
            _truncate_csv(self.path, METRICS_COLUMNS, self.resume_step)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)

    def on_epoch_begin(self, epoch, logs=None):
        self._started, self._paused = time.perf_counter(), 0.0

    def on_test_begin(self, logs=None):  # fit's own validation pass: not training time
        self._test_started = time.perf_counter()

    def on_test_end(self, logs=None):
        self._paused += time.perf_counter() - self._test_started

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        elapsed = time.perf_counter() - self._started - self._paused
        optimizer = self.model.optimizer
        logs["learning_rate"] = current_learning_rate(optimizer)
        if self.tokens_per_step and elapsed > 0:
            logs["tokens_per_sec"] = self.tokens_per_step / elapsed
        if logs.get("val_loss") is not None:
            logs["val_perplexity"] = _perplexity(float(logs["val_loss"]))
        if hasattr(optimizer, "dynamic_scale"):
            logs["loss_scale"] = float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
            applied = int(keras.ops.convert_to_numpy(inner_optimizer(optimizer)._iterations))
            logs["skipped_steps"] = (epoch + 1) * _steps_per_epoch(self) - applied
        if self._writer is not None:
            row = dict(logs, step=epoch + 1)
            self._writer.writerow([_fmt(float(row[c]) if c not in ("step", "skipped_steps") and row.get(c) is not None
                                        else row.get(c)) for c in METRICS_COLUMNS])
            self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


class LossPlot(keras.callbacks.Callback):
    """`loss.png` from `metrics.csv`, every `every` steps (0 = only at the end) and when training ends.

    Place it after `MetricsCSV`.

    Args:
        metrics_csv: str. The file `MetricsCSV` writes.
        out: str. The PNG.
        every: int. Steps between redraws.
        chief: bool. Whether this process writes.
    """

    def __init__(self, metrics_csv, out, every: int = 0, chief: bool = True):
        super().__init__()
        self.metrics_csv, self.out, self.every, self.chief = Path(metrics_csv), Path(out), int(every), chief
        self._step = None  # the last step that ended
        self._drawn = None  # the last step the PNG shows

    def on_epoch_end(self, epoch, logs=None):
        self._step = epoch + 1
        if self.chief and self.every and self._step % self.every == 0:
            plot_loss(self.metrics_csv, self.out)
            self._drawn = self._step

    def on_train_end(self, logs=None):
        # Not again when the last step's redraw already shows every row (MetricsCSV writes nothing at the end).
        if self.chief and self.metrics_csv.is_file() and (self._step is None or self._drawn != self._step):
            plot_loss(self.metrics_csv, self.out)
            self._drawn = self._step


class SampleWriter(keras.callbacks.Callback):
    """Sample texts every `every` steps into `directory/step-<step>.txt`, and `final.txt` at the end.

    Args:
        info: ModelInfo. The prompt format and condition values to prompt with.
        directory: str. Where the files go.
        every: int. Steps between samples (0 = off, `final.txt` only when `final`).
        preprocessor: keras_hub Preprocessor or None. Attached while sampling when `fit` runs with
            `causal_lm.preprocessor = None` (pre-tokenized batches).
        seed: int. Sampling seed.
        final: bool. Write `final.txt` when training ends.
        chief: bool. Whether this process writes.
        replicas: int. Devices a batch is split over (keras.distribution.DataParallel needs a multiple).
    """

    def __init__(self, info, directory, every: int, *, preprocessor=None, seed: int = 0, final: bool = True,
                 chief: bool = True, replicas: int = 1):
        super().__init__()
        self.info, self.directory, self.every = info, Path(directory), int(every)
        self.preprocessor, self.seed, self.final, self.chief = preprocessor, seed, final, chief
        self.count = -(-3 // replicas) * replicas  # three samples, or the next multiple of the replicas

    def _write(self, name: str):
        with attached_preprocessor(self.model, self.preprocessor):
            write_samples(self.model, self.info, self.directory / name, seed=self.seed, count=self.count)

    def on_epoch_end(self, epoch, logs=None):
        if self.chief and self.every and (epoch + 1) % self.every == 0 and not self.model.stop_training:
            self._write(f"step-{epoch + 1:08d}.txt")

    def on_train_end(self, logs=None):
        if self.chief and self.every and self.final and not self.model.stop_training:
            self._write("final.txt")


def condition_groups(examples: Sequence[str], prompt_format) -> dict[tuple[str, str], list[str]]:
    """The validation examples grouped per condition value: numeric ones in `SCORE_BUCKETS`.

    Returns:
        {(condition, value or bucket label): [example, ...]}, in a stable order.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for example in examples:
        try:
            values, _ = prompt_format.split(example)
        except ValueError:
            continue
        for name, value in values.items():
            if name in prompt_format.numeric:
                # A score between two buckets' bounds (7.8) goes with the lower one: 0-3.5 means [0, 4).
                below = [b for b, low, _ in SCORE_BUCKETS if float(value) >= low]
                if not below or float(value) > SCORE_BUCKETS[-1][2]:
                    continue
                label = below[-1]
            else:
                label = str(value)
            groups.setdefault((name, label), []).append(example)
    order = {name: i for i, name in enumerate(prompt_format.conditions)}
    buckets = {b: i for i, (b, _, _) in enumerate(SCORE_BUCKETS)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), buckets.get(kv[0][1], 99), kv[0][1])))


class ConditionValidation(keras.callbacks.Callback):
    """Validation loss per genre and per score bucket, so one sees which conditions are learnt.

    Every `every` steps (0 = only at the end) and when training ends, each
    group of `condition_groups(examples)` (at most `max_examples` of it) is
    evaluated, one padded example per row so a row's loss is that example's
    alone. One `model.evaluate` pass covers every group: the groups' batches
    run one group after another, and a group's loss is read from the running
    loss at its first and last batch (Keras weighs each batch by its rows), so
    it is the loss `model.evaluate` gives on that group alone, at the cost of
    one pass. Rows go to `val_by_condition.csv` (continued across resumes) and
    the latest pass is drawn in `val_by_condition.png`.

    Args:
        examples: list of str. Validation examples in the prompt format.
        prompt_format: PromptFormat. How conditions head each example.
        tokenizer: keras_hub Tokenizer. The model's own.
        out_dir: str. Where `val_by_condition.csv/.png` go.
        sequence_length: int. Tokens per row.
        batch_size: int. Rows per evaluation batch.
        every: int. Steps between passes.
        max_examples: int. Examples per group at most (0 = all).
        resume_step: int or None. Rows after this step are dropped; None starts a new file.
        chief: bool. Whether this process writes.
        replicas: int. Replicas the batch is split over: with several, a group is filled up to whole
            batches by repeating its own examples (each replica needs an equal share).
    """

    def __init__(self, examples, prompt_format, tokenizer, out_dir, *, sequence_length: int, batch_size: int,
                 every: int = 0, max_examples: int = 64, resume_step: Optional[int] = None, chief: bool = True,
                 replicas: int = 1):
        super().__init__()
        self.groups = condition_groups(examples, prompt_format)
        if max_examples:
            self.groups = {k: v[:max_examples] for k, v in self.groups.items()}
        self.replicas = replicas
        self.tokenizer, self.sequence_length, self.batch_size = tokenizer, sequence_length, batch_size
        self.every, self.resume_step, self.chief = int(every), resume_step, chief
        self.csv_path = Path(out_dir) / "val_by_condition.csv"
        self.png_path = Path(out_dir) / "val_by_condition.png"
        self._dataset = None
        self._rows: list[int] = []  # rows each group runs (its examples, filled up to whole batches with replicas)
        self._batches: list[int] = []  # batches each group runs
        self._step = None
        self._done = None
        self.last: dict[tuple[str, str], float] = {}

    def on_train_begin(self, logs=None):
        if self.chief:
            _truncate_csv(self.csv_path, CONDITION_COLUMNS, self.resume_step)

    def evaluate(self, step: int) -> dict:
        """Run one pass now; returns {(condition, value): loss}."""
        if not self.groups:
            return {}
        if self._dataset is None:  # tokenized and padded once, in memory for every later pass
            groups = [self._whole_batches(rows) for rows in self.groups.values()]
            self._rows = [len(rows) for rows in groups]
            # Each group's batches whole and in order: no batch mixes two groups.
            self._dataset, self._batches = make_group_batches(
                groups, self.tokenizer, sequence_length=self.sequence_length, batch_size=self.batch_size)
        running = _RunningLoss(self._batches)
        self.model.evaluate(self._dataset, verbose=0, callbacks=[running])
        # The running loss is the row-weighted mean over every batch so far: a group's sum is the difference of
        # the running sums at its two ends (float64 here; Keras's float32 mean rounds in the 7th digit).
        self.last, before, rows_before = {}, 0.0, 0
        for key, rows, mean in zip(self.groups, self._rows, running.means):
            total = mean * (rows_before + rows)
            self.last[key] = (total - before) / rows
            before, rows_before = total, rows_before + rows
        self._done = step
        if self.chief and self.last:
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for (name, value), loss in self.last.items():
                    writer.writerow([step, name, value, len(self.groups[(name, value)]), _fmt(loss),
                                     _fmt(_perplexity(loss))])
            plot_condition_losses(self.csv_path, self.png_path)
        return self.last

    def _whole_batches(self, rows: list) -> list:
        if self.replicas == 1 or len(rows) % self.batch_size == 0:
            return rows
        missing = self.batch_size - len(rows) % self.batch_size
        return rows + [rows[i % len(rows)] for i in range(missing)]

    def on_epoch_end(self, epoch, logs=None):
        self._step = epoch + 1
        if self.every and self._step % self.every == 0 and not self.model.stop_training:
            self.evaluate(self._step)

    def on_train_end(self, logs=None):
        if self._step and self._done != self._step and not self.model.stop_training and self.groups:
            self.evaluate(self._step)


class _RunningLoss(keras.callbacks.Callback):
    """The running `loss` of a `model.evaluate` pass at the end of each group of batches (`batches`: per group)."""

    def __init__(self, batches: Sequence[int]):
        super().__init__()
        self.ends = set()
        end = 0
        for count in batches:
            end += count
            self.ends.add(end - 1)
        self.means: list[float] = []

    def on_test_batch_end(self, batch, logs=None):
        if batch in self.ends:
            self.means.append(float(logs["loss"]))


class Progress(keras.callbacks.Callback):
    """A tqdm bar over the run's steps and a `step N/M: loss ... lr ... tokens/s` line every `print_every`.

    Place it after `MetricsCSV` (it prints what that adds to `logs`).

    Args:
        steps: int. The last step.
        initial: int. The step the run starts at.
        print_every: int. Steps between lines (0 = none).
        say: callable. Where lines go (they are written above the bar when there is one).
        bar: bool. Show the tqdm bar.
    """

    def __init__(self, steps: int, initial: int = 0, print_every: int = 0, say: Callable[[str], None] = print,
                 bar: bool = True):
        super().__init__()
        self.steps, self.initial, self.print_every, self._say, self.show_bar = steps, initial, print_every, say, bar
        self.bar = None

    def say(self, line: str) -> None:
        (self.bar.write if self.bar is not None else self._say)(line)

    def on_train_begin(self, logs=None):
        if self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=self.initial, desc="finetune", unit="step", dynamic_ncols=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step, loss = epoch + 1, float(logs.get("loss", float("nan")))
        tps = logs.get("tokens_per_sec") or 0.0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(1)
        if self.print_every and step % self.print_every == 0:
            line = f"step {step}/{self.steps}: loss {loss:.4f} lr {logs.get('learning_rate', 0.0):.3g} {tps:,.0f} tokens/s"
            if logs.get("loss_scale") is not None:
                line += f" loss scale {logs['loss_scale']:g} skipped {logs['skipped_steps']}"
            self.say(line)
        if logs.get("val_loss") is not None:
            self.say(f"step {step}: val_loss {float(logs['val_loss']):.4f} "
                     f"val_perplexity {_perplexity(float(logs['val_loss'])):.2f}")

    def on_train_end(self, logs=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
