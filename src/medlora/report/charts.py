"""charts/quality.png: the answer-quality and benchmark scores logged during training."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quality_chart(metrics: list[dict[str, Any]], charts_dir: Path) -> Path | None:
    """charts/quality.png from metrics.jsonl rows (quality_*, bench_* keys), when there are any."""
    keys = sorted({k for row in metrics for k in row if k.startswith(("quality_", "bench_"))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key in keys:
        points = [
            (r["step"], r[key]) for r in metrics if key in r and isinstance(r[key], int | float)
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_title("Quality during training")
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    charts_dir.mkdir(parents=True, exist_ok=True)
    tmp = charts_dir / "quality.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    return tmp.replace(charts_dir / "quality.png")
