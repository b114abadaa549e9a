"""`pitchkeras plan`: the device memory one fine-tuning step needs, from the compiler, before training.

Every default comes from `pitchkeras.train.TrainConfig`, so `plan` and
`finetune` describe the same step unless told otherwise.
"""

from __future__ import annotations

from pitchkeras.cli import add_command
from pitchkeras.errors import UsageError
from pitchkeras.train.config import OPTIMIZERS, PRECISIONS, TrainConfig, parse_memory
from pitchkeras.train.plan import PlanRequest, describe, plan_memory


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in str(text).split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-size {text!r}: give one or more positive integers, comma-separated (1,2,4)")
    return sizes


def add_parser(subparsers):
    p = add_command(subparsers, "plan", "Plan the device memory of one training step (JAX compiler, no weights "
                                        "allocated, no download).", __name__)
    p.add_argument("--preset", default=TrainConfig.default("preset"),
                   help="gpt2_base_en, gpt2_medium_en, gpt2_large_en, gpt2_extra_large_en, a model directory, or tiny")
    p.add_argument("--sequence-length", type=int, default=TrainConfig.default("sequence_length"), help="tokens per row")
    p.add_argument("--batch-size", default=TrainConfig.default("batch_size"),
                   help="micro-batch(es) to plan, comma-separated")
    p.add_argument("--mixed-precision", default=TrainConfig.default("mixed_precision"), choices=PRECISIONS,
                   help="dtype policy (auto: as finetune would choose on this machine)")
    p.add_argument("--optimizer", default=TrainConfig.default("optimizer"), choices=OPTIMIZERS, help="optimizer")
    p.add_argument("--remat", action="store_true", default=TrainConfig.default("remat"),
                   help="rematerialize the transformer blocks")
    p.add_argument("--lora-rank", type=int, default=TrainConfig.default("lora_rank"), help="LoRA rank (0 = full)")
    p.add_argument("--grad-accum", type=int, default=TrainConfig.default("grad_accum"),
                   help="micro-batches per optimizer step")
    p.add_argument("--memory", default=TrainConfig.default("memory"),
                   help="device budget, e.g. 16GB (default: the local accelerator's memory; none on a CPU)")
    return p


def run(args) -> int:
    sizes = _batch_sizes(args.batch_size)
    for name in ("sequence_length", "grad_accum"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lora_rank < 0:
        raise UsageError(f"--lora-rank must be 0 or more, got {args.lora_rank}")
    budget = parse_memory(args.memory) if args.memory else None
    config = TrainConfig(preset=args.preset, sequence_length=args.sequence_length, mixed_precision=args.mixed_precision,
                         optimizer=args.optimizer, remat=args.remat, lora_rank=args.lora_rank, grad_accum=args.grad_accum)
    request = PlanRequest(config, batch_sizes=sizes)
    result = plan_memory(request)
    budget = budget or result.device_memory
    for plan in result.plans:
        print("\n".join(describe(request, plan, budget)))
    return 0
