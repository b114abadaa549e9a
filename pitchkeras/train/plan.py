"""The memory of one training step, from the XLA compiler's own buffer plan, before any weight exists.

`plan_memory(PlanRequest(...))` builds the GPT-2 `CausalLM` of a preset, a
model directory or `tiny` with every variable left uninitialized
(`keras.StatelessScope(initialize_variables=False)`; the optimizer's slots
are built under `jax.eval_shape`), compiles Keras's own JAX train step
(`model.train_step`, the function `fit` compiles, with its state donated
as `fit` does) for abstract inputs (`jax.ShapeDtypeStruct`), and reads
`compiled.memory_analysis()`. Nothing of the model's size is allocated:
planning the 1.5B model on a CPU takes the memory of the compiler, not 6 GB.

It runs in a child process on KERAS_BACKEND=jax (a TensorFlow `finetune`
plans with JAX too, and no uninitialized variable outlives the plan), on
the local JAX device: a GPU's plan where there is one, the CPU's otherwise
(see BUILD_NOTES.md for how the two differ).

The figures: `weights` and `optimizer_state` are the bytes of the model's
and the optimizer's variables (what the parameter counts and dtypes imply);
`gradients` are the bytes of the trainable variables, which XLA holds among
its temporaries; `temporaries` is the rest of XLA's temporary buffers
(activations kept for the backward pass, logits, workspace); `total` is
arguments + temporaries + outputs not aliased to (donated) arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from pitchkeras.errors import UsageError

# The four published GPT-2 shapes. keras-hub 0.32 ships only each preset's parameter count locally
# (gpt2_presets.py); the shapes live in each preset's config.json on Kaggle, so they are written out
# here to plan without a download. tests/test_plan.py checks them against keras-hub's parameter counts.
GPT2_SHAPES = {
    "gpt2_base_en": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072),
    "gpt2_medium_en": dict(num_layers=24, num_heads=16, hidden_dim=1024, intermediate_dim=4096),
    "gpt2_large_en": dict(num_layers=36, num_heads=20, hidden_dim=1280, intermediate_dim=5120),
    "gpt2_extra_large_en": dict(num_layers=48, num_heads=25, hidden_dim=1600, intermediate_dim=6400),
}
GPT2_VOCABULARY = 50257
GPT2_POSITIONS = 1024
GPT2_DROPOUT = 0.1
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def _train_default(name: str):
    from pitchkeras.train.config import TrainConfig

    return TrainConfig.default(name)


def parse_memory(text: str) -> int:
    """Bytes of a memory size like `16GB`, `15.5GiB` or `800MB` (GB = 10^9 bytes, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"memory {text!r} is not a size like 16GB, 15.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


@dataclasses.dataclass
class PlanRequest:
    """What to plan: a model, a shape and the memory options of `TrainConfig`.

    Args:
        model: str. A GPT-2 preset name, a keras-hub model directory, or `tiny`.
        sequence_length: int. Tokens per row.
        batch_sizes: list of int. Micro-batches to plan (one compile each).
        mixed_precision: str. A `TrainConfig.mixed_precision` value (`auto` resolves on the planning device).
        optimizer: str. `adamw`, `adafactor` or `lion`.
        remat: bool. Rematerialized transformer blocks.
        lora_rank: int. keras-hub LoRA rank (0 = full fine-tuning).
        grad_accum: int. Micro-batches per optimizer step (Keras keeps one accumulator per weight).
        clipnorm: float. Global gradient-norm clip (0 = off).
        tiny: dict. `TinyConfig` fields, for `tiny`.
        search_budget: int. When > 0: plan the largest of `batch_sizes` whose total fits these bytes.
        search_fraction: float. When > 0 (and no `search_budget`): the budget is this fraction of the
            planning device's memory (a CPU has none: then every size is planned).
    """

    model: str
    sequence_length: int
    batch_sizes: list
    mixed_precision: str = "auto"
    optimizer: str = "adamw"
    remat: bool = False
    lora_rank: int = 0
    grad_accum: int = 1
    clipnorm: float = dataclasses.field(default_factory=lambda: _train_default("clipnorm"))
    tiny: dict = dataclasses.field(default_factory=dict)
    search_budget: int = 0
    search_fraction: float = 0.0


@dataclasses.dataclass
class MemoryPlan:
    """The compiler's memory plan of one training step (bytes).

    Args:
        batch_size: int. The micro-batch planned.
        params: int. Parameters of the model.
        trainable_params: int. Parameters the optimizer updates.
        policy: str. The dtype policy compiled.
        platform: str. The JAX platform compiled for (`cpu`, `gpu`, `tpu`).
        weights: int. Model variables.
        optimizer_state: int. Optimizer variables (moments, accumulators, counters).
        gradients: int. One gradient per trainable weight (inside XLA's temporaries).
        temporaries: int. XLA's other temporary buffers: activations, logits, workspace.
        total: int. Peak of the step: arguments + temporaries + outputs not aliased to arguments.
        compile_seconds: float. Lowering plus compiling.
    """

    batch_size: int
    params: int
    trainable_params: int
    policy: str
    platform: str
    weights: int
    optimizer_state: int
    gradients: int
    temporaries: int
    total: int
    compile_seconds: float


@dataclasses.dataclass
class PlanResult:
    """Plans of one request, and the planning device's memory (None on a CPU)."""

    plans: list
    device_memory: Optional[int]


def model_shape(model: str, tiny: Optional[dict] = None) -> dict:
    """`GPT2Backbone` arguments of a preset name, a keras-hub model directory or `tiny`."""
    from pitchkeras.model import TINY, TinyConfig

    if model in GPT2_SHAPES:
        return dict(GPT2_SHAPES[model], vocabulary_size=GPT2_VOCABULARY, max_sequence_length=GPT2_POSITIONS,
                    dropout=GPT2_DROPOUT)
    if model == TINY:
        fields = dataclasses.asdict(TinyConfig(**(tiny or {})))
        return {k: fields[k] for k in ("vocabulary_size", "num_layers", "num_heads", "hidden_dim",
                                       "intermediate_dim", "max_sequence_length", "dropout")}
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise UsageError(f"cannot plan {model!r}: not a GPT-2 preset name ({', '.join(GPT2_SHAPES)}), `tiny`, "
                         "or a model directory with config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("class_name") != "GPT2Backbone":
        raise UsageError(f"cannot plan {model}: its backbone is {config.get('class_name')!r}, not GPT2Backbone")
    keys = ("vocabulary_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim",
            "max_sequence_length", "dropout")
    return {k: config["config"][k] for k in keys if k in config["config"]}


def plan_memory(request: PlanRequest, *, timeout: float = 1800) -> PlanResult:
    """Plan `request` in a KERAS_BACKEND=jax child process.

    Raises:
        UsageError: a model that cannot be planned, or a child that failed (its last error line).
    """
    model_shape(request.model, request.tiny)  # a bad model is the caller's error, said before any compile
    # The child only compiles: it must not take the device memory the training process may already hold
    # (JAX preallocates 75% by default) nor autotune kernels in it.
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
    child = subprocess.run([sys.executable, "-m", "pitchkeras.train.plan", json.dumps(dataclasses.asdict(request))],
                           env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in child.stdout.splitlines() if line.startswith("PLAN ")]
    if child.returncode != 0 or not lines:
        errors = [line for line in child.stderr.splitlines() if "Error" in line] or child.stderr.splitlines()[-1:]
        raise UsageError(f"planning {request.model} failed: {errors[-1] if errors else 'no output'}")
    found = json.loads(lines[-1][len("PLAN "):])
    return PlanResult([MemoryPlan(**p) for p in found["plans"]], found["device_memory"])


def _plan_here(request: PlanRequest) -> PlanResult:
    """The child's work: compile and measure each batch size (or search them against the budget)."""
    import jax

    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    sizes = sorted(set(int(b) for b in request.batch_sizes))
    budget = request.search_budget or int((memory or 0) * request.search_fraction)
    if not budget:
        return PlanResult([_compile_plan(request, b) for b in sizes], memory)
    plans, low, high = [], 0, len(sizes) - 1  # memory grows with the batch: bisect for the largest that fits
    while low <= high:
        middle = (low + high) // 2
        plans.append(_compile_plan(request, sizes[middle]))
        low, high = (middle + 1, high) if plans[-1].total <= budget else (low, middle - 1)
    return PlanResult(plans, memory)


def _abstract_causal_lm(request: PlanRequest, policy: str):
    """The compiled GPT2CausalLM of `request` with no variable allocated."""
    import jax
    import keras
    import keras_hub

    from pitchkeras.train.config import TrainConfig, compile_for_training
    from pitchkeras.train.remat import remat_transformer_blocks

    keras.config.set_dtype_policy(policy)
    shape = model_shape(request.model, request.tiny)
    shape["max_sequence_length"] = max(shape["max_sequence_length"], request.sequence_length)
    with keras.StatelessScope(initialize_variables=False):  # variables keep shapes and initializers only
        backbone = keras_hub.models.GPT2Backbone(**shape)
        if request.lora_rank:
            backbone.enable_lora(request.lora_rank)
    if request.remat:
        remat_transformer_blocks(backbone)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    config = TrainConfig(dataset="-", optimizer=request.optimizer, grad_accum=request.grad_accum,
                         clipnorm=request.clipnorm, sequence_length=request.sequence_length)
    compile_for_training(causal_lm, config, jit_compile=True, gradient_gates=False)  # a GPU's program
    # Some optimizer variables have constant initializers, which a StatelessScope refuses: trace instead.
    jax.eval_shape(lambda: causal_lm.optimizer.build(causal_lm.trainable_variables))
    return causal_lm


def _compile_plan(request: PlanRequest, batch_size: int) -> MemoryPlan:
    """Compile Keras's JAX train step for abstract inputs and read its memory analysis."""
    import jax
    import numpy as np

    from pitchkeras.train.config import choose_policy

    started = time.perf_counter()
    policy = choose_policy(request.mixed_precision)
    causal_lm = _abstract_causal_lm(request, policy)

    def specs(variables):
        return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]

    def nbytes(variables):
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    state = (specs(causal_lm.trainable_variables), specs(causal_lm.non_trainable_variables),
             specs(causal_lm.optimizer.variables), specs(causal_lm.metrics_variables))
    rows = (batch_size, request.sequence_length)
    data = ({"token_ids": jax.ShapeDtypeStruct(rows, "int32"), "padding_mask": jax.ShapeDtypeStruct(rows, "int32")},
            jax.ShapeDtypeStruct(rows, "int32"), jax.ShapeDtypeStruct(rows, "float32"))
    compiled = jax.jit(causal_lm.train_step, donate_argnums=0).lower(state, data).compile()
    stats = compiled.memory_analysis()
    gradients = nbytes(causal_lm.trainable_variables)
    return MemoryPlan(
        batch_size=batch_size, params=sum(int(np.prod(v.shape)) for v in causal_lm.weights),
        trainable_params=sum(int(np.prod(v.shape)) for v in causal_lm.trainable_weights), policy=policy,
        platform=jax.devices()[0].platform, weights=nbytes(causal_lm.weights),
        optimizer_state=nbytes(causal_lm.optimizer.variables), gradients=gradients,
        temporaries=max(int(stats.temp_size_in_bytes) - gradients, 0),
        total=int(stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
                  - stats.alias_size_in_bytes),
        compile_seconds=time.perf_counter() - started)


def resolve_batch(config, state: dict, replicas: int, say: Callable[[str], None]):
    """`config` with the micro-batch and accumulation `auto_batch` chose (unchanged without `auto_batch`).

    The effective batch `batch_size * grad_accum` is kept: the micro-batch is
    the largest divisor of it (a multiple of `replicas`) whose planned step fits
    `memory` (or the local accelerator's memory) less `memory_margin`, and
    `grad_accum` makes up the rest. A resumed run repeats the choice recorded
    in its checkpoint (`state`). With neither a budget nor an accelerator
    (a CPU), the batch stays as given.

    Raises:
        UsageError: not even the smallest micro-batch fits the budget.
    """
    if not config.auto_batch:
        return config
    if "batch_size" in state and "grad_accum" in state:
        say(f"auto batch: micro-batch {state['batch_size']} x {state['grad_accum']} accumulated, as the checkpoint ran")
        return dataclasses.replace(config, batch_size=int(state["batch_size"]), grad_accum=int(state["grad_accum"]))
    from pitchkeras.train.config import DeviceFacts

    target = config.batch_size * config.grad_accum
    budget = int(parse_memory(config.memory) * (1 - config.memory_margin)) if config.memory else 0
    facts = DeviceFacts.detect()
    if not budget and not (facts.tpus or facts.gpu_capabilities):
        say(f"auto batch: no accelerator and no --memory: micro-batch {config.batch_size} x {config.grad_accum} "
            "accumulated, as given")
        return config
    sizes = [d for d in range(replicas, target + 1, replicas) if target % d == 0]
    request = PlanRequest(model=config.preset, sequence_length=config.sequence_length,
                          batch_sizes=[d // replicas for d in sizes], mixed_precision=config.mixed_precision,
                          optimizer=config.optimizer, remat=config.remat, lora_rank=config.lora_rank,
                          clipnorm=config.clipnorm, grad_accum=2 if target > 1 else 1,  # accumulators counted whenever they may be used
                          tiny=dataclasses.asdict(config.tiny), search_budget=budget,
                          search_fraction=0.0 if budget else 1 - config.memory_margin)
    result = plan_memory(request)
    budget = budget or int((result.device_memory or 0) * (1 - config.memory_margin))
    fitting = [p for p in result.plans if p.total <= budget]
    if not fitting:
        smallest = min(result.plans, key=lambda p: p.batch_size)
        raise UsageError(f"auto batch: even micro-batch {smallest.batch_size * replicas} needs "
                         f"{gigabytes(smallest.total)} of {gigabytes(budget)}; try --remat, --optimizer adafactor "
                         "or lion, --lora-rank, --mixed-precision or a shorter --sequence-length")
    chosen = max(fitting, key=lambda p: p.batch_size)
    micro = chosen.batch_size * replicas
    say(f"auto batch: micro-batch {micro} x {target // micro} accumulated = {target} per step "
        f"(planned {gigabytes(chosen.total)} of {gigabytes(budget)} after a {config.memory_margin:.0%} margin)")
    return dataclasses.replace(config, batch_size=micro, grad_accum=target // micro)


def gigabytes(count: int) -> str:
    """`count` bytes as GB (10^9) with two decimals, or as MB below 0.1 GB."""
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.2f} MB"


def describe(request: PlanRequest, plan: MemoryPlan, budget: Optional[int]) -> list[str]:
    """The printed lines of one plan, against `budget` bytes when there is one."""
    tuning = f"LoRA rank {request.lora_rank}" if request.lora_rank else "full fine-tune"
    lines = [
        f"{request.model}: batch {plan.batch_size} x {request.sequence_length} tokens, {plan.policy}, "
        f"{request.optimizer}{', remat' if request.remat else ''}, {tuning}"
        + (f", grad accum {request.grad_accum}" if request.grad_accum > 1 else "")
        + f" ({plan.params / 1e6:,.1f}M params, {plan.trainable_params / 1e6:,.1f}M trainable; "
          f"planned for {plan.platform} in {plan.compile_seconds:.0f} s)",
        f"  weights              {gigabytes(plan.weights):>10}",
        f"  optimizer state      {gigabytes(plan.optimizer_state):>10}",
        f"  gradients            {gigabytes(plan.gradients):>10}",
        f"  activations/temps    {gigabytes(plan.temporaries):>10}",
    ]
    verdict = ""
    if budget:
        verdict = f"  of {gigabytes(budget)}: {'fits' if plan.total <= budget else 'does NOT fit'}"
    lines.append(f"  total                {gigabytes(plan.total):>10}{verdict}")
    return lines


def main(argv=None) -> int:
    """Child process: plan the JSON request in argv[1] and print `PLAN <json>`."""
    request = PlanRequest(**json.loads((argv or sys.argv)[1]))
    result = _plan_here(request)
    print("PLAN " + json.dumps({"plans": [dataclasses.asdict(p) for p in result.plans],
                                "device_memory": result.device_memory}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
