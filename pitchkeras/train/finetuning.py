"""`finetune(TrainConfig(...))`: the run behind `pitchkeras finetune`, on Keras's own `CausalLM.fit`.

The orchestration only: find the dataset, choose precision and placement,
load the starting model, compile it with `keras.optimizers.AdamW` and the
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
from pitchkeras.model import TINY, ModelInfo, atomic_write_text
from pitchkeras.train import checkpoints as ckpt_files
from pitchkeras.train.config import TrainConfig, choose_policy

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


def _finetune(config: TrainConfig, log: Optional[Callable[[str], None]]) -> TrainResult:
    started = time.perf_counter()
    say = log or (print if config.progress else (lambda _msg: None))
    files = resolve_dataset(config.dataset)

    from pitchkeras.data.pipeline import make_dataset, read_examples
    from pitchkeras.model import load_causal_lm, save_model_dir, tokenized_inputs
    from pitchkeras.train import callbacks as cb
    from pitchkeras.train.config import compile_for_training
    from pitchkeras.train.distribution import make_distribution

    backend = keras.config.backend()
    distribution = make_distribution(config.strategy)  # first: multi-worker needs it before other TF work
    chief = distribution.chief
    if not chief:
        say = lambda _msg: None  # noqa: E731 - one voice per cluster
    policy = choose_policy(config.mixed_precision)
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    replicas = distribution.replicas
    if config.batch_size % replicas:
        raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the {replicas} replicas")
    jit = {"true": True, "false": False}.get(str(config.jit_compile).lower(),
                                             replicas == 1 or backend == "jax")  # auto: XLA on one TF device
    say(f"precision policy: {policy} ({'requested' if config.mixed_precision != 'auto' else 'auto'}); "
        f"backend: {backend}; distribution: {distribution.description}; XLA: {'on' if jit else 'off'}")

    run_dir = Path(config.checkpoint_dir) / config.run_name
    checkpoints_dir = run_dir / ckpt_files.CHECKPOINTS
    checkpoint = ckpt_files.find_checkpoint(run_dir, config.restore_from)
    if config.restore_from == "fresh" and chief and checkpoints_dir.exists():
        shutil.rmtree(checkpoints_dir)
    state: dict = {}
    if checkpoint is not None:
        state = ckpt_files.read_state(checkpoint)
        if state.get("base_preset") not in (None, config.preset):
            raise UsageError(
                f"checkpoint {checkpoint} was trained from preset {state['base_preset']!r}, not {config.preset!r}; "
                "pass the same --preset or --restore-from fresh")

    texts = read_examples(files.train)
    if files.prompt_format is not None:
        prompt_format = files.prompt_format
        condition_values = files.condition_values
        if condition_values is None:
            _, condition_values = infer_conditions(texts)
    else:
        prompt_format, condition_values = infer_conditions(texts)

    with distribution.scope():
        base_dir = run_dir / BASE
        if config.preset == TINY and checkpoint is not None and base_dir.is_dir():
            # The tokenizer was learnt at the first start: reuse it, do not relearn it.
            causal_lm = load_causal_lm(str(base_dir), dtype=policy)
        else:
            causal_lm = load_causal_lm(config.preset, texts=texts, tiny=config.tiny,
                                       sequence_length=config.sequence_length, seed=config.seed, dtype=policy)
            if config.preset == TINY and chief:
                save_model_dir(causal_lm, ModelInfo(prompt_format=prompt_format, base_preset=TINY), base_dir)
        if config.lora_rank:
            causal_lm.backbone.enable_lora(config.lora_rank)
        causal_lm.preprocessor.sequence_length = config.sequence_length
        compile_for_training(causal_lm, config, jit_compile=jit)
        cb.build_optimizer(causal_lm)

    run_id = new_run_id(config.run_name)
    checkpointer = cb.StepCheckpoint(
        checkpoints_dir, config.save_every, config.max_checkpoints, chief=chief,
        state=lambda: {"model_version": run_id, "base_preset": config.preset, "lora_rank": config.lora_rank,
                       "policy": policy, "backend": backend})
    start_step = 0
    if checkpoint is not None:
        start_step = checkpointer.restore(causal_lm, checkpoint)
        run_id = checkpointer.restored_state.get("model_version", run_id)
        say(f"restored {checkpoint} at step {start_step}")
    elif config.restore_from == "latest":
        say(f"no checkpoint in {checkpoints_dir}: starting fresh from {config.preset}")

    info = ModelInfo(prompt_format=prompt_format, condition_values=condition_values or {}, model_version=run_id,
                     base_preset=config.preset, sequence_length=config.sequence_length)
    tokenizer = causal_lm.preprocessor.tokenizer
    cache_dir = None if config.cache_dir == "none" else (config.cache_dir or str(Path(config.checkpoint_dir) / ".token-cache"))
    if not chief:
        cache_dir = None  # one writer per cluster: other workers tokenize in memory (it is fast)
    train_ds = make_dataset(files.train, tokenizer, sequence_length=config.sequence_length,
                            batch_size=config.batch_size, packing=config.packing, seed=config.seed,
                            cache_dir=cache_dir, skip_batches=checkpointer.data_position)
    if distribution.name == "multiworker":
        distribution.adapt_keras_model(causal_lm, next(iter(train_ds)))
    val_ds, val_steps = None, []
    if files.val is not None:  # validated every --val-every steps and at the last one
        val_ds = make_dataset(files.val, tokenizer, sequence_length=config.sequence_length,
                              batch_size=config.batch_size, packing=config.packing, shuffle=False, repeat=False,
                              cache_dir=cache_dir, drop_remainder=replicas > 1)
        if config.val_batches:
            val_ds = val_ds.take(config.val_batches)  # the same batches at every pass
        every = config.val_every or config.steps
        val_steps = sorted({s for s in range(every, config.steps + 1, every)} | {config.steps})

    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(
            dict(dataclasses.asdict(config), model_version=run_id, backend=backend), indent=2, default=str))

    tokens_per_step = config.batch_size * config.sequence_length * config.grad_accum
    result = TrainResult(run_dir=run_dir, model_dir=None, model_version=run_id, start_step=start_step,
                         step=start_step, policy=policy, replicas=replicas, backend=backend)
    resume = start_step if checkpoint is not None else None
    stopper = cb.StopOnSignal(distribution.any_worker if distribution.workers > 1 else None)
    progress = cb.Progress(config.steps, start_step, config.print_every, say, bar=config.progress and chief)
    record = _Record(result, tokens_per_step)
    callbacks = [
        cb.MetricsCSV(run_dir / "metrics.csv", resume_step=resume, tokens_per_step=tokens_per_step, chief=chief),
        record, progress, stopper,
    ]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False, update_freq="epoch"))
    if config.sample_every:
        callbacks.append(cb.SampleWriter(info, run_dir / "samples", config.sample_every,
                                         preprocessor=causal_lm.preprocessor, seed=config.seed, final=False,
                                         chief=chief, replicas=replicas if backend == "jax" else 1))
    conditions = None
    if files.val is not None and prompt_format.conditions:
        conditions = cb.ConditionValidation(
            read_examples(files.val), prompt_format, tokenizer, run_dir, sequence_length=config.sequence_length,
            batch_size=config.batch_size, every=config.val_every, resume_step=resume, chief=chief, replicas=replicas,
            max_examples=max(config.val_batches, 1) * config.batch_size if config.val_batches else 0)
        callbacks.append(conditions)
    callbacks += [checkpointer, cb.LossPlot(run_dir / "metrics.csv", run_dir / "loss.png", config.save_every, chief)]

    checkpointer.on_save = lambda path: progress.say(f"saved {path}")  # above the bar, not through it
    if start_step < config.steps:
        with tokenized_inputs(causal_lm):
            causal_lm.fit(train_ds, epochs=config.steps, steps_per_epoch=config.grad_accum, initial_epoch=start_step,
                          validation_data=val_ds, validation_freq=val_steps or 1, callbacks=callbacks, shuffle=False,
                          verbose=0)
    else:
        say(f"already at step {start_step} of {config.steps}: nothing to train")
    if stopper.stopped_at is not None:
        result.interrupted = True
        say(f"stopped by signal at step {result.step}; resume with --restore-from latest")
    if conditions is not None:
        result.val_by_condition = dict(conditions.last)

    if not result.interrupted and chief:
        result.model_dir = save_model_dir(causal_lm, info, run_dir / "model")
        if config.sample_every:
            cb.write_samples(causal_lm, info, run_dir / "samples" / "final.txt", seed=config.seed,
                             count=-(-3 // replicas) * replicas if backend == "jax" else 3)
        say(f"model {run_id} exported to {result.model_dir}")
    result.tokens_per_sec = record.tokens / record.seconds if record.seconds else 0.0
    result.seconds = time.perf_counter() - started
    return result
