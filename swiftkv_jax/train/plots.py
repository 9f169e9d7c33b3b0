"""The loss curve of a distillation run, drawn from its metrics.jsonl with matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Writes a PNG of loss, KL and MSE per step (log scale) and the learning rate."""
    # A bare Figure, not pyplot: it needs no display and leaves the process's matplotlib backend
    # alone (switching it to Agg would stop a notebook that called distill from showing plots).
    from matplotlib.figure import Figure

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    if not records:
        return
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(7, 6))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    labels = {"loss": "loss", "kl": "tau^2 KL at tau", "mse": "MSE into the last layer"}
    for key, label in labels.items():
        ax.plot(steps, [r[key] for r in records], label=label, linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("train loss (per supervised token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
