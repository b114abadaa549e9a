"""The run's charts: loss against step (`loss.png`) and validation loss per condition (`val_by_condition.png`).

Each is drawn with matplotlib's Agg backend from the CSV the matching callback writes and replaced atomically.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pitchkeras.io import atomic_path


def _save_png(fig, out) -> Path:
    """Write `fig` to `out` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(out)


def plot_loss(metrics_csv, out) -> Path:
    """Draw loss (and validation loss) against step from `metrics_csv` into the PNG `out`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, vsteps, vlosses = [], [], [], []
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
            if row.get("val_loss"):
                vsteps.append(int(row["step"]))
                vlosses.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, out)


def plot_condition_losses(csv_path, out) -> Path:
    """`val_by_condition.png`: per condition, the latest validation loss of each value (bars), the first as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["condition"] == name]
        last, first = max(int(r["step"]) for r in mine), min(int(r["step"]) for r in mine)
        values = list(dict.fromkeys(r["value"] for r in mine))
        latest = {r["value"]: float(r["val_loss"]) for r in mine if int(r["step"]) == last}
        earliest = {r["value"]: float(r["val_loss"]) for r in mine if int(r["step"]) == first}
        ax.bar(range(len(values)), [latest.get(v, float("nan")) for v in values], label=f"step {last}")
        if first != last:
            ax.plot(range(len(values)), [earliest.get(v, float("nan")) for v in values], "o", color="black",
                    label=f"step {first}")
        ax.set_xticks(range(len(values)), values, rotation=45, ha="right")
        ax.set_title(f"validation loss by {name}")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    return _save_png(fig, out)
