"""The batch-size chooser behind `--batch-size auto`: the largest micro-batch whose memory plan fits the device."""

from __future__ import annotations

import dataclasses
from typing import Callable

from pitchkeras.errors import UsageError
from pitchkeras.train.config import TrainConfig, parse_memory
from pitchkeras.train.devices import DeviceFacts
from pitchkeras.train.plan import PlanRequest, gigabytes, plan_memory


def resolve_batch(config: TrainConfig, state: dict, replicas: int, say: Callable[[str], None]):
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
    target = config.batch_size * config.grad_accum
    budget = int(parse_memory(config.memory) * (1 - config.memory_margin)) if config.memory else 0
    facts = DeviceFacts.detect()
    if not budget and not (facts.tpus or facts.gpu_capabilities):
        say(f"auto batch: no accelerator and no --memory: micro-batch {config.batch_size} x {config.grad_accum} "
            "accumulated, as given")
        return config
    sizes = [d for d in range(replicas, target + 1, replicas) if target % d == 0]
    # Accumulators are counted whenever the chosen micro-batch may need them.
    planned = dataclasses.replace(config, grad_accum=2 if target > 1 else 1)
    request = PlanRequest(planned, batch_sizes=[d // replicas for d in sizes], search_budget=budget,
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
