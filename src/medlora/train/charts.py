"""PNG charts of a run's metrics: the model card's loss, learning rate and grad norm plots."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from medlora.io import read_jsonl, write_bytes_atomic

CHARTS = {
    "loss": ("Loss (answer tokens)", ["loss", "eval_loss"]),
    "learning_rate": ("Learning rate", ["learning_rate"]),
    "grad_norm": ("Gradient norm", ["grad_norm"]),
}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None and "step" in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_charts(
    metrics_path: str | os.PathLike[str], charts_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write charts/{loss,learning_rate,grad_norm}.png from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, nor on most training servers
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    out = Path(charts_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in CHARTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        plotted = False
        for key in keys:
            steps, values = _series(rows, key)
            if not steps:
                continue
            plotted = True
            style = {"marker": "o", "linestyle": "--"} if key.startswith("eval_") else {}
            label = "validation" if key.startswith("eval_") else "train" if key == "loss" else key
            ax.plot(steps, values, label=label, **style)
        if not plotted:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close(fig)
        written.append(write_bytes_atomic(out / f"{name}.png", png.getvalue()))
    return written
