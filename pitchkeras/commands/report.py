"""`pitchkeras report`: quality of a model's samples per condition (copying, diversity, pronouns).

Writes report.json (the figures), report.png (a chart of them) and samples.jsonl (the samples behind them).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from pitchkeras.cli import add_command
from pitchkeras.commands.options import (
    add_compile_cache_flags, add_model_flags, add_progress_flag, add_quantize_flag, add_sampler_flags, field_default,
    format_scores, model_directory, parse_list, parse_scores, sampler_config)
from pitchkeras.conditioning import validate_conditions
from pitchkeras.data.pipeline import read_examples
from pitchkeras.errors import UsageError
from pitchkeras.io import atomic_path, atomic_write_json, atomic_write_text
from pitchkeras.model import load_model
from pitchkeras.quality import MemorizationIndex, summarize
from pitchkeras.quantize import quantize_model
from pitchkeras.sampling import Generator
from pitchkeras.sampling.config import GenerationRequest


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What `pitchkeras report` samples and where it writes: the defaults of its flags.

    Args:
        per_condition: int. Samples per condition.
        scores: sequence of float. The scores sampled.
        genres: sequence of str or None. The genres sampled; None: every genre the model knows.
        prefix: str. Prefix of every sample (the only prompt for a model without conditions).
        batch_size: int. Samples generated together.
        out_dir: str. Where report.json, report.png and samples.jsonl go.
    """

    per_condition: int = 8
    scores: Sequence[float] = (2.0, 5.0, 8.0)
    genres: Optional[Sequence[str]] = None
    prefix: str = GenerationRequest.prefix
    batch_size: int = 8
    out_dir: str = "report"


def add_parser(subparsers):
    def default(name):
        return field_default(ReportOptions, name)

    p = add_command(subparsers, "report",
                    "Sample every condition and report copying, diversity and pronoun counts (JSON + PNG).", __name__)
    add_model_flags(p)
    p.add_argument("--dataset", required=True, help="prepared dataset dir or train.csv (the training data)")
    p.add_argument("--per-condition", type=int, default=default("per_condition"), help="samples per condition")
    p.add_argument("--scores", default=format_scores(default("scores")), help="comma-separated scores to sample")
    p.add_argument("--genres", default=default("genres"),
                   help="comma-separated genres (default: every genre the model knows)%(default).0s")
    p.add_argument("--prefix", default=default("prefix"),
                   help="prefix for every sample (the only prompt for a model without conditions)")
    p.add_argument("--batch-size", type=int, default=default("batch_size"), help="samples generated together")
    add_sampler_flags(p)
    p.add_argument("--out-dir", default=default("out_dir"), help="where report.json, report.png and samples.jsonl go")
    add_progress_flag(p, quiet_alias=True)
    add_compile_cache_flags(p)
    add_quantize_flag(p)
    return p


def _grid(args, info) -> list[dict]:
    names = info.prompt_format.conditions
    if not names:
        return [{}]
    scores = parse_scores(args.scores)
    genres = parse_list(args.genres) if args.genres else [str(g) for g in info.condition_values.get("genre", [])]
    if set(names) != {"score", "genre"}:
        raise UsageError(f"report knows score/genre conditions; this model has {', '.join(names)}")
    if not genres:
        raise UsageError("the model lists no genres; pass --genres")
    return [validate_conditions(info, {"score": s, "genre": g}) for g in genres for s in scores]


def _label(conditions: dict) -> str:
    if not conditions:
        return "all"
    return " ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in conditions.values())


def build_report(samples_by_condition: dict, index, training_texts) -> dict:
    """The report dict from samples grouped by condition label."""
    import collections

    rows = []
    for label, (conditions, samples) in samples_by_condition.items():
        accepted = [s.text for s in samples if not s.rejected]
        row = {"condition": label, "conditions": conditions, "generated": len(samples), "accepted": len(accepted),
               "rejected": dict(collections.Counter(s.rejected for s in samples if s.rejected))}
        row.update(summarize(accepted, index))
        rows.append(row)
    every = [s.text for _, samples in samples_by_condition.values() for s in samples if not s.rejected]
    overall = summarize(every, index)
    overall["generated"] = sum(r["generated"] for r in rows)
    overall["accepted"] = len(every)
    return {"conditions": rows, "overall": overall, "training": summarize(training_texts)}


def format_report(report: dict) -> str:
    """A fixed-width table: one row per condition, then overall and training lines."""
    header = f"{'condition':<24} {'ok/gen':>7} {'dist-2':>7} {'dist-3':>7} {'copied':>7} {'run':>4} " \
             f"{'he':>5} {'she':>5} {'they':>5}  rejected"
    lines = [header, "-" * len(header)]

    def line(name, r):
        p = r["pronouns"]
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rejected", {}).items())) or "-"
        ok = f"{r.get('accepted', r['samples'])}/{r.get('generated', r['samples'])}"
        copied = r.get("mean_copied_ngram_fraction")
        return (f"{name[:24]:<24} {ok:>7} {r['distinct_2']:>7.3f} {r['distinct_3']:>7.3f} "
                f"{'-' if copied is None else f'{copied:.3f}':>7} {r.get('max_longest_copied_run', '-'):>4} "
                f"{p['he']:>5} {p['she']:>5} {p['they']:>5}  {rejected}")

    for row in report["conditions"]:
        lines.append(line(row["condition"], row))
    lines.append("-" * len(header))
    lines.append(line("overall", report["overall"]))
    lines.append(line("training data", report["training"]))
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """report.png: pronoun shares, distinct-n and acceptance per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["conditions"] + [dict(report["training"], condition="training")]
    labels = [r["condition"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.5 * len(rows) + 2), 10), sharex=True)
    bottom = np.zeros(len(rows))
    for group in ("he", "she", "they"):
        counts = np.array([r["pronouns"][group] for r in rows], dtype=float)
        totals = np.array([max(1, sum(r["pronouns"].values())) for r in rows], dtype=float)
        axes[0].bar(x, counts / totals, bottom=bottom, label=group)
        bottom += counts / totals
    axes[0].set_ylabel("pronoun share")
    axes[0].legend(loc="upper right")
    axes[1].bar(x - 0.2, [r["distinct_2"] for r in rows], 0.4, label="distinct-2")
    axes[1].bar(x + 0.2, [r["distinct_3"] for r in rows], 0.4, label="distinct-3")
    axes[1].set_ylabel("diversity")
    axes[1].legend(loc="lower right")
    axes[2].bar(x, [r.get("accepted", r["samples"]) / max(1, r.get("generated", r["samples"])) for r in rows],
                label="accepted")
    axes[2].plot(x, [r.get("mean_copied_ngram_fraction", 0.0) for r in rows], "k.", label="copied 8-gram share")
    axes[2].set_ylabel("share")
    axes[2].legend(loc="upper right")
    axes[2].set_xticks(x, labels, rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args) -> int:
    import json
    from pathlib import Path

    if args.per_condition < 1:
        raise UsageError(f"--per-condition must be >= 1, got {args.per_condition}")
    config = sampler_config(args)
    model = quantize_model(load_model(model_directory(args)), args.quantize)
    fmt = model.prompt_format
    grid = _grid(args, model.info)

    dataset = Path(args.dataset)
    examples = read_examples(dataset / "train.csv" if dataset.is_dir() else dataset)
    bodies = []
    for example in examples:
        try:
            bodies.append(fmt.split(example)[1] if fmt.conditions else example)
        except ValueError:
            bodies.append(example)
    index = MemorizationIndex.from_examples(bodies)
    generator = Generator(model, batch_size=args.batch_size, max_new_tokens=args.length, memorization=index)
    requests = [GenerationRequest(conditions or None, args.prefix, args.seed + i * args.per_condition + j)
                for i, conditions in enumerate(grid) for j in range(args.per_condition)]
    samples = generator.generate(requests, config=config, progress=not args.no_progress)
    grouped: dict = {}
    for request, sample in zip(requests, samples):
        label = _label(request.conditions or {})
        grouped.setdefault(label, (request.conditions or {}, []))[1].append(sample)
    report = build_report(grouped, index, bodies[:2000])
    report.update({"model_version": model.info.model_version, "sampler": config.to_json(),
                   "per_condition": args.per_condition, "length": args.length})

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    # The samples behind the figures, so a reader can check them and see what was rejected.
    atomic_write_text(out_dir / "samples.jsonl",
                      "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples))
    with atomic_path(out_dir / "report.png") as tmp_png:
        plot_report(report, tmp_png)
    print(format_report(report))
    print(f"model {model.info.model_version}: wrote {out_dir / 'report.json'}, {out_dir / 'report.png'} "
          f"and {out_dir / 'samples.jsonl'}")
    return 0
