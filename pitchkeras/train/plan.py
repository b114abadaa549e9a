"""The memory of one training step, from the XLA compiler's own buffer plan, before any weight exists.

`plan_memory(PlanRequest(...))` builds the GPT-2 `CausalLM` of a preset, a
model directory or `tiny` with every variable left uninitialized
(`keras.StatelessScope(initialize_variables=False)`; the optimizer's slots
are built under `jax.eval_shape`), compiles Keras's own JAX train step
(`model.train_step`, the function `fit` compiles, with its state donated
as `fit` does) for abstract inputs (`jax.ShapeDtypeStruct`), and reads
`compiled.memory_analysis()`. Nothing of the model's size is allocated:
planning the 1.5B model on a CPU takes the memory of the compiler, not of the model.

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
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pitchkeras.errors import UsageError
from pitchkeras.model import TINY, TinyConfig
from pitchkeras.train.config import TrainConfig
from pitchkeras.train.devices import choose_policy
from pitchkeras.train.optimizer import compile_for_training
from pitchkeras.train.remat import remat_transformer_blocks

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


@dataclasses.dataclass
class PlanRequest:
    """What to plan: the settings of a run and the micro-batches to compile.

    Args:
        config: TrainConfig. The run planned; its preset (a GPT-2 preset name, a keras-hub model directory
            or `tiny`), sequence length, precision (`auto` resolves on the planning device), optimizer,
            remat, LoRA rank, accumulation, clipping and tiny shape are what is compiled.
        batch_sizes: list of int. Micro-batches to plan (one compile each).
        search_budget: int. When > 0: plan the largest of `batch_sizes` whose total fits these bytes.
        search_fraction: float. When > 0 (and no `search_budget`): the budget is this fraction of the
            planning device's memory (a CPU has none: then every size is planned).
    """

    config: TrainConfig
    batch_sizes: list
    search_budget: int = 0
    search_fraction: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PlanRequest":
        settings = dict(data["config"])
        settings["tiny"] = TinyConfig(**settings["tiny"])
        return cls(**dict(data, config=TrainConfig(**settings)))


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
    model_shape(request.config.preset, dataclasses.asdict(request.config.tiny))  # a bad model is the caller's error, said before any compile
    # The child only compiles: it must not take the device memory the training process may already hold
    # (JAX preallocates 75% by default) nor autotune kernels in it.
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
    child = subprocess.run([sys.executable, "-m", "pitchkeras.train.plan", json.dumps(request.to_json())],
                           env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in child.stdout.splitlines() if line.startswith("PLAN ")]
    if child.returncode != 0 or not lines:
        errors = [line for line in child.stderr.splitlines() if "Error" in line] or child.stderr.splitlines()[-1:]
        raise UsageError(f"planning {request.config.preset} failed: {errors[-1] if errors else 'no output'}")
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

    keras.config.set_dtype_policy(policy)
    config = request.config
    shape = model_shape(config.preset, dataclasses.asdict(config.tiny))
    shape["max_sequence_length"] = max(shape["max_sequence_length"], config.sequence_length)
    with keras.StatelessScope(initialize_variables=False):  # variables keep shapes and initializers only
        backbone = keras_hub.models.GPT2Backbone(**shape)
        if config.lora_rank:
            backbone.enable_lora(config.lora_rank)
    if config.remat:
        remat_transformer_blocks(backbone)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    compile_for_training(causal_lm, config, jit_compile=True, gradient_gates=False)  # a GPU's program
    # Some optimizer variables have constant initializers, which a StatelessScope refuses: trace instead.
    jax.eval_shape(lambda: causal_lm.optimizer.build(causal_lm.trainable_variables))
    return causal_lm


def _compile_plan(request: PlanRequest, batch_size: int) -> MemoryPlan:
    """Compile Keras's JAX train step for abstract inputs and read its memory analysis."""
    import jax
    import numpy as np

    started = time.perf_counter()
    policy = choose_policy(request.config.mixed_precision)
    causal_lm = _abstract_causal_lm(request, policy)

    def specs(variables):
        return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]

    def nbytes(variables):
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    state = (specs(causal_lm.trainable_variables), specs(causal_lm.non_trainable_variables),
             specs(causal_lm.optimizer.variables), specs(causal_lm.metrics_variables))
    rows = (batch_size, request.config.sequence_length)
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


def gigabytes(count: int) -> str:
    """`count` bytes as GB (10^9) with two decimals, or as MB below 0.1 GB."""
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.2f} MB"


def describe(request: PlanRequest, plan: MemoryPlan, budget: Optional[int]) -> list[str]:
    """The printed lines of one plan, against `budget` bytes when there is one."""
    config = request.config
    tuning = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tune"
    lines = [
        f"{config.preset}: batch {plan.batch_size} x {config.sequence_length} tokens, {plan.policy}, "
        f"{config.optimizer}{', remat' if config.remat else ''}, {tuning}"
        + (f", grad accum {config.grad_accum}" if config.grad_accum > 1 else "")
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
    request = PlanRequest.from_json(json.loads((argv or sys.argv)[1]))
    result = _plan_here(request)
    print("PLAN " + json.dumps({"plans": [dataclasses.asdict(p) for p in result.plans],
                                "device_memory": result.device_memory}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
