"""`finetune(TrainConfig(...))`: the run behind `pitchkeras finetune`, on Keras's own `CausalLM.fit`.

The orchestration only: find the dataset, choose precision and placement,
load the starting model (LoRA, remat), compile it with the optimizer `--optimizer` names and the
per-token loss, restore the latest checkpoint, and call `fit` with the
callbacks of `pitchkeras.train.callbacks` plus Keras's TensorBoard. One
Keras epoch is one optimizer step, so `fit(initial_epoch=step)` resumes.

The run directory `CHECKPOINT_DIR/RUN_NAME/` gets `checkpoints/`,
`metrics.csv`, `logs/` (TensorBoard), `loss.png`, `samples/`,
`val_by_condition.csv/.png`, `config.json` and finally `model/` (a keras-hub
preset directory plus `pitchkeras.json`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import keras

from pitchkeras.conditioning import PLAIN, REVIEWS, PromptFormat
from pitchkeras.errors import UsageError
from pitchkeras.data.pipeline import make_dataset, read_examples
from pitchkeras.io import atomic_write_text
from pitchkeras.model import TINY, ModelInfo, load_causal_lm, save_model_dir, tokenized_inputs
from pitchkeras.train import callbacks as cb
from pitchkeras.train import checkpoints as ckpt_files
from pitchkeras.train.auto_batch import resolve_batch
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.devices import choose_policy
from pitchkeras.train.distribution import make_distribution
from pitchkeras.train.optimizer import build_optimizer, compile_for_training
from pitchkeras.train.remat import remat_transformer_blocks
from pitchkeras.train.samples import write_samples

BASE = "base"  # inside the run dir: the starting `tiny` preset (its tokenizer is learnt, so it is kept)


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Args:
        run_dir: Path. `CHECKPOINT_DIR/RUN_NAME`.
        model_dir: Path or None. The exported model (None when interrupted).
        model_version: str. The run id stored in pitchkeras.json.
        start_step: int. The step the run started (or resumed) at.
        step: int. The last step completed.
        losses: list of (step, loss). Training loss of each step this call ran.
        val_loss: float or None. The last validation loss.
        val_by_condition: dict. {(condition, value): loss} of the last per-condition pass.
        tokens_per_sec: float. Mean training throughput of this call (the first step, compiling, excluded).
        seconds: float. Wall time of this call.
        interrupted: bool. Stopped by SIGTERM/SIGINT after saving a checkpoint.
        policy: str. The mixed-precision policy used.
        replicas: int. Replicas in sync.
        backend: str. The Keras backend.
    """

    run_dir: Path
    model_dir: Optional[Path]
    model_version: str
    start_step: int
    step: int
    losses: list = dataclasses.field(default_factory=list)
    val_loss: Optional[float] = None
    val_by_condition: dict = dataclasses.field(default_factory=dict)
    tokens_per_sec: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    policy: str = "float32"
    replicas: int = 1
    backend: str = "tensorflow"


@dataclasses.dataclass
class DatasetFiles:
    """The files of a training dataset: a prepare output directory or a single CSV."""
    train: Path
    val: Optional[Path]
    prompt_format: Optional[PromptFormat]
    condition_values: Optional[dict]


def resolve_dataset(dataset: str) -> DatasetFiles:
    """Find train.csv / val.csv / stats.json for `dataset` (a directory or a CSV)."""
    path = Path(dataset)
    if path.is_dir():
        train = path / "train.csv"
        if not train.is_file():
            raise UsageError(f"{path} has no train.csv; pass a `pitchkeras prepare` output directory or a CSV")
        val = path / "val.csv"
        stats_path = path / "stats.json"
        prompt_format = condition_values = None
        if stats_path.is_file():
            try:
                stats = json.loads(stats_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UsageError(f"{stats_path}: not valid JSON ({err})") from None
            if "prompt_format" in stats:
                prompt_format = PromptFormat.from_json(stats["prompt_format"])
            if "condition_values" in stats:
                condition_values = stats["condition_values"]
        has_val = val.is_file() and val.stat().st_size > 0
        return DatasetFiles(train, val if has_val else None, prompt_format, condition_values)
    if path.is_file():
        return DatasetFiles(path, None, None, None)
    raise UsageError(f"dataset {dataset} does not exist (a `pitchkeras prepare` output directory or a CSV)")


def infer_conditions(examples: list[str]) -> tuple[PromptFormat, dict]:
    """Guess the prompt format from the examples when stats.json is absent.

    Reviews (`score` then `genre` header lines) if every example parses that
    way, else a plain corpus; returns the format and the values seen.
    """
    values: dict[str, set] = {"score": set(), "genre": set()}
    for example in examples:
        try:
            parsed, _ = REVIEWS.split(example)
        except ValueError:
            return PLAIN, {}
        for name, value in parsed.items():
            values[name].add(value)
    return REVIEWS, {name: sorted(v) for name, v in values.items()}


def new_run_id(run_name: str) -> str:
    """`RUN_NAME-<UTC timestamp>-<4 hex>`: the model_version of everything this run generates."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{run_name}-{stamp}-{secrets.token_hex(2)}"


class _Record(keras.callbacks.Callback):
    """Collects each step's loss and throughput into a `TrainResult`; stops on a non-finite loss.

    Place it after `MetricsCSV`, whose `tokens_per_sec` (validation time excluded) it sums up.
    """

    def __init__(self, result: TrainResult, tokens_per_step: int):
        super().__init__()
        self.result, self.tokens_per_step = result, tokens_per_step
        self.seconds, self.tokens = 0.0, 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        elapsed = self.tokens_per_step / logs["tokens_per_sec"] if logs.get("tokens_per_sec") else 0.0
        loss = float(logs.get("loss", float("nan")))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {epoch + 1}; lower --learning-rate")
        if self.result.losses:  # the first step of a call includes compilation
            self.seconds += elapsed
            self.tokens += self.tokens_per_step
        self.result.losses.append((epoch + 1, loss))
        self.result.step = epoch + 1
        if logs.get("val_loss") is not None:
            self.result.val_loss = float(logs["val_loss"])


def finetune(config: TrainConfig, *, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Fine-tune `config.preset` on `config.dataset` with `CausalLM.fit`; resumable; exports `model/`.

    Args:
        config: TrainConfig. Every setting of the run.
        log: callable or None. Where progress lines go (default: print, if `config.progress`).

    Returns:
        TrainResult.

    Raises:
        UsageError / InvalidArgument: bad settings, dataset, preset or checkpoint.
    """
    config.validate()
    previous_policy = keras.config.dtype_policy()
    previous_distribution = keras.distribution.distribution() if keras.config.backend() == "jax" else None
    try:
        return _finetune(config, log)
    finally:  # the run's policy and device layout do not outlive it
        keras.config.set_dtype_policy(previous_policy)
        if keras.config.backend() == "jax":
            keras.distribution.set_distribution(previous_distribution)


@dataclasses.dataclass
class _Run:
    """What the steps of one `finetune` call share (settled by `_start`, the model by `_build_model`)."""
    config: TrainConfig
    say: Callable[[str], None]
    distribution: object
    policy: str
    backend: str
    jit: bool
    run_dir: Path
    checkpoint: Optional[Path]
    state: dict
    files: DatasetFiles
    texts: list
    prompt_format: PromptFormat
    condition_values: dict
    causal_lm: object = None

    @property
    def chief(self) -> bool:
        return self.distribution.chief


def _finetune(config: TrainConfig, log: Optional[Callable[[str], None]]) -> TrainResult:
    started = time.perf_counter()
    run = _start(config, log)
    run.causal_lm = _build_model(run)
    run_id = new_run_id(run.config.run_name)
    checkpointer = _checkpointer(run, run_id)
    start_step = 0
    if run.checkpoint is not None:
        start_step = checkpointer.restore(run.causal_lm, run.checkpoint)
        run_id = checkpointer.restored_state.get("model_version", run_id)
        run.say(f"restored {run.checkpoint} at step {start_step}")
    elif run.config.restore_from == "latest":
        run.say(f"no checkpoint in {run.run_dir / ckpt_files.CHECKPOINTS}: starting fresh from {run.config.preset}")
    info = ModelInfo(prompt_format=run.prompt_format, condition_values=run.condition_values or {},
                     model_version=run_id, base_preset=run.config.preset,
                     sequence_length=run.config.sequence_length)
    train_ds, val_ds, val_steps = _datasets(run, checkpointer.data_position)
    _write_run_config(run, run_id)
    result = TrainResult(run_dir=run.run_dir, model_dir=None, model_version=run_id, start_step=start_step,
                         step=start_step, policy=run.policy, replicas=run.distribution.replicas, backend=run.backend)
    resume = start_step if run.checkpoint is not None else None
    loop = _callbacks(run, info, result, checkpointer, resume)
    _fit(run, loop, train_ds, val_ds, val_steps, start_step)
    _finish(run, loop, info, result)
    result.seconds = time.perf_counter() - started
    return result


def _start(config: TrainConfig, log: Optional[Callable[[str], None]]) -> _Run:
    """Placement, precision, seed, the checkpoint to resume, the batch, and the dataset's conditions."""
    say = log or (print if config.progress else (lambda _msg: None))
    files = resolve_dataset(config.dataset)
    backend = keras.config.backend()
    distribution = make_distribution(config.strategy)  # first: multi-worker needs it before other TF work
    if not distribution.chief:
        say = lambda _msg: None  # noqa: E731 - one voice per cluster
    policy = choose_policy(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    run_dir = Path(config.checkpoint_dir) / config.run_name
    checkpoint, state = _resumed_checkpoint(config, run_dir, distribution.chief)
    config = resolve_batch(config, state, distribution.replicas, say)
    replicas = distribution.replicas
    if config.batch_size % replicas:
        raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the {replicas} replicas")
    jit = {"true": True, "false": False}.get(str(config.jit_compile).lower(),
                                             replicas == 1 or backend == "jax")  # auto: XLA on one TF device
    say(f"precision policy: {policy} ({'requested' if config.mixed_precision != 'auto' else 'auto'}); "
        f"backend: {backend}; distribution: {distribution.description}; XLA: {'on' if jit else 'off'}; "
        f"optimizer: {config.optimizer}{'; remat' if config.remat else ''}")
    texts = read_examples(files.train)
    prompt_format, condition_values = files.prompt_format, files.condition_values
    if prompt_format is None:
        prompt_format, condition_values = infer_conditions(texts)
    elif condition_values is None:
        _, condition_values = infer_conditions(texts)
    return _Run(config, say, distribution, policy, backend, jit, run_dir, checkpoint, state, files, texts,
                prompt_format, condition_values)


def _resumed_checkpoint(config: TrainConfig, run_dir: Path, chief: bool) -> tuple[Optional[Path], dict]:
    """The checkpoint `config.restore_from` names and its state; refuses one from another preset or optimizer."""
    checkpoints_dir = run_dir / ckpt_files.CHECKPOINTS
    checkpoint = ckpt_files.find_checkpoint(run_dir, config.restore_from)
    if config.restore_from == "fresh" and chief and checkpoints_dir.exists():
        shutil.rmtree(checkpoints_dir)
    if checkpoint is None:
        return None, {}
    state = ckpt_files.read_state(checkpoint)
    for key, flag, value in (("base_preset", "--preset", config.preset), ("optimizer", "--optimizer", config.optimizer)):
        if state.get(key) not in (None, value):
            raise UsageError(f"checkpoint {checkpoint} was trained with {flag} {state[key]}, not {value}; "
                             f"pass {flag} {state[key]} or --restore-from fresh")
    return checkpoint, state


def _build_model(run: _Run):
    """The starting CausalLM (reusing a resumed `tiny`'s tokenizer), LoRA, remat, compiled, optimizer built."""
    config = run.config
    with run.distribution.scope():
        base_dir = run.run_dir / BASE
        if config.preset == TINY and run.checkpoint is not None and base_dir.is_dir():
            # The tokenizer was learnt at the first start: reuse it, do not relearn it.
            causal_lm = load_causal_lm(str(base_dir), dtype=run.policy)
        else:
            causal_lm = load_causal_lm(config.preset, texts=run.texts, tiny=config.tiny,
                                       sequence_length=config.sequence_length, seed=config.seed, dtype=run.policy)
            if config.preset == TINY and run.chief:
                save_model_dir(causal_lm, ModelInfo(prompt_format=run.prompt_format, base_preset=TINY), base_dir)
        if config.lora_rank:
            causal_lm.backbone.enable_lora(config.lora_rank)
        if config.remat:
            remat_transformer_blocks(causal_lm.backbone)
        causal_lm.preprocessor.sequence_length = config.sequence_length
        compile_for_training(causal_lm, config, jit_compile=run.jit)
        build_optimizer(causal_lm)
    return causal_lm


def _checkpointer(run: _Run, run_id: str):
    """The `StepCheckpoint` of the run; its state records what a resume must repeat."""
    config = run.config

    def state():
        return {"model_version": run_id, "base_preset": config.preset, "lora_rank": config.lora_rank,
                "policy": run.policy, "backend": run.backend, "optimizer": config.optimizer, "remat": config.remat,
                "batch_size": config.batch_size, "grad_accum": config.grad_accum}

    return cb.StepCheckpoint(run.run_dir / ckpt_files.CHECKPOINTS, config.save_every, config.max_checkpoints,
                             chief=run.chief, state=state)


def _datasets(run: _Run, data_position: int):
    """The training dataset (continuing at `data_position` batches) and the validation one with its steps."""
    config, replicas = run.config, run.distribution.replicas
    tokenizer = run.causal_lm.preprocessor.tokenizer
    cache_dir = None if config.cache_dir == "none" else (
        config.cache_dir or str(Path(config.checkpoint_dir) / ".token-cache"))
    if not run.chief:
        cache_dir = None  # one writer per cluster: other workers tokenize in memory (it is fast)
    train_ds = make_dataset(run.files.train, tokenizer, sequence_length=config.sequence_length,
                            batch_size=config.batch_size, packing=config.packing, seed=config.seed,
                            cache_dir=cache_dir, skip_batches=data_position)
    if run.distribution.name == "multiworker":
        run.distribution.adapt_keras_model(run.causal_lm, next(iter(train_ds)))
    if run.files.val is None:
        return train_ds, None, []
    # Validated every --val-every steps and at the last one.
    val_ds = make_dataset(run.files.val, tokenizer, sequence_length=config.sequence_length,
                          batch_size=config.batch_size, packing=config.packing, shuffle=False, repeat=False,
                          cache_dir=cache_dir, drop_remainder=replicas > 1)
    if config.val_batches:
        val_ds = val_ds.take(config.val_batches)  # the same batches at every pass
    every = config.val_every or config.steps
    return train_ds, val_ds, sorted({s for s in range(every, config.steps + 1, every)} | {config.steps})


def _write_run_config(run: _Run, run_id: str) -> None:
    """`config.json`: every setting as run (the batch `auto` chose included), the run id and backend."""
    if not run.chief:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "samples").mkdir(exist_ok=True)
    atomic_write_text(run.run_dir / "config.json", json.dumps(
        dict(dataclasses.asdict(run.config), model_version=run_id, backend=run.backend), indent=2, default=str))


@dataclasses.dataclass
class _Loop:
    """The callbacks of `fit` and the ones read afterwards."""
    callbacks: list
    record: _Record
    stopper: object
    progress: object
    conditions: object


def _callbacks(run: _Run, info: ModelInfo, result: TrainResult, checkpointer, resume: Optional[int]) -> _Loop:
    """Metrics, record, progress, signals, TensorBoard, samples, per-condition validation, checkpoints, plot."""
    config, chief, replicas = run.config, run.chief, run.distribution.replicas
    tokens_per_step = config.batch_size * config.sequence_length * config.grad_accum
    stopper = cb.StopOnSignal(run.distribution.any_worker if run.distribution.workers > 1 else None)
    progress = cb.Progress(config.steps, result.start_step, config.print_every, run.say, bar=config.progress and chief)
    record = _Record(result, tokens_per_step)
    callbacks = [cb.MetricsCSV(run.run_dir / "metrics.csv", resume_step=resume, tokens_per_step=tokens_per_step,
                               chief=chief), record, progress, stopper]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(str(run.run_dir / "logs"), write_graph=False,
                                                     update_freq="epoch"))
    if config.sample_every:
        callbacks.append(cb.SampleWriter(info, run.run_dir / "samples", config.sample_every,
                                         preprocessor=run.causal_lm.preprocessor, seed=config.seed, final=False,
                                         chief=chief, replicas=replicas if run.backend == "jax" else 1))
    conditions = None
    if run.files.val is not None and run.prompt_format.conditions:
        conditions = cb.ConditionValidation(
            read_examples(run.files.val), run.prompt_format, run.causal_lm.preprocessor.tokenizer, run.run_dir,
            sequence_length=config.sequence_length, batch_size=config.batch_size, every=config.val_every,
            resume_step=resume, chief=chief, replicas=replicas,
            max_examples=max(config.val_batches, 1) * config.batch_size if config.val_batches else 0)
        callbacks.append(conditions)
    callbacks += [checkpointer, cb.LossPlot(run.run_dir / "metrics.csv", run.run_dir / "loss.png",
                                            config.save_every, chief)]
    checkpointer.on_save = lambda path: progress.say(f"saved {path}")  # above the bar, not through it
    return _Loop(callbacks, record, stopper, progress, conditions)


def _fit(run: _Run, loop: _Loop, train_ds, val_ds, val_steps: list, start_step: int) -> None:
    """`CausalLM.fit` from `start_step` to `config.steps`, one optimizer step per epoch."""
    config = run.config
    if start_step >= config.steps:
        run.say(f"already at step {start_step} of {config.steps}: nothing to train")
        return
    with tokenized_inputs(run.causal_lm):
        run.causal_lm.fit(train_ds, epochs=config.steps, steps_per_epoch=config.grad_accum, initial_epoch=start_step,
                          validation_data=val_ds, validation_freq=val_steps or 1, callbacks=loop.callbacks,
                          shuffle=False, verbose=0)


def _finish(run: _Run, loop: _Loop, info: ModelInfo, result: TrainResult) -> None:
    """Interrupted or not, per-condition losses, the exported model and final samples, the throughput."""
    replicas = run.distribution.replicas
    if loop.stopper.stopped_at is not None:
        result.interrupted = True
        run.say(f"stopped by signal at step {result.step}; resume with --restore-from latest")
    if loop.conditions is not None:
        result.val_by_condition = dict(loop.conditions.last)
    if not result.interrupted and run.chief:
        result.model_dir = save_model_dir(run.causal_lm, info, run.run_dir / "model")
        if run.config.sample_every:
            write_samples(run.causal_lm, info, run.run_dir / "samples" / "final.txt", seed=run.config.seed,
                          count=-(-3 // replicas) * replicas if run.backend == "jax" else 3)
        run.say(f"model {result.model_version} exported to {result.model_dir}")
    result.tokens_per_sec = loop.record.tokens / loop.record.seconds if loop.record.seconds else 0.0
