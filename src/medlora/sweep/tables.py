"""What a sweep writes and prints: sweep.md (the table, and the unseen-source table with
`--unseen`), sweep.png, sweep.json and the terminal's summary table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from medlora.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from medlora.sweep.plan import LOSS_NOTE, SweepPlan, SweepResult


def fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def describe_row(row: dict[str, Any]) -> str:
    return (
        f"validation loss {_fmt(row['val_loss'], 4)}, {fmt_params(row['trainable_params'])} "
        f"trainable, {row['train_time_s']:.1f} s, {row['tokens_per_s']:.0f} tokens/s"
    )


def markdown_table(result: SweepResult) -> str:
    lines = [
        f"| {result.key} | trainable params | validation loss | train time (s) | tokens/s | steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        pct = f" ({row['trainable_pct']:.3f}%)" if row.get("trainable_pct") is not None else ""
        lines.append(
            f"| {_value_cell(row['value'])} "
            f"| {row['trainable_params']:,}{pct} | {_fmt(row['val_loss'], 4)} "
            f"| {row['train_time_s']:.1f} | {row['tokens_per_s']:.0f} | {row['steps']} |"
        )
    return "\n".join(lines)


UNSEEN_SHOWN = {
    "rougeL": "ROUGE-L",
    "f1": "token F1",
    "similarity": "MiniLM similarity",
    "repetition": "repeated 4-grams ↓",
    "echo": "echo ↓",
}


def unseen_table(result: SweepResult) -> str:
    """Base vs tuned on the unseen sources per run: loss change, and each metric's tuned value
    with its paired difference from the base (95% CI)."""
    from medlora.report.format import fmt_ci

    rows = [r for r in result.rows if r.get("unseen")]
    if not rows:
        return ""
    names = [n for n in UNSEEN_SHOWN if n in rows[0]["unseen"]["metrics"]]
    lines = [
        f"| {result.key} | answer loss (base → tuned) | "
        + " | ".join(f"{UNSEEN_SHOWN[n]}: tuned (− base)" for n in names)
        + " |",
        "|---|---:|" + "---|" * len(names),
    ]
    for row in rows:
        u = row["unseen"]
        cells = [
            f"{u['metrics'][n]['model']['mean']:.3f} ({fmt_ci(u['metrics'][n]['diff'], signed=True)})"
            for n in names
        ]
        lines.append(
            f"| {_value_cell(row['value'])} | {u['base_loss']:.4f} → {u['loss']:.4f} "
            f"({u['loss_change_pct']:+.1f} %) | " + " | ".join(cells) + " |"
        )
    first = rows[0]["unseen"]
    g = first["generation"]
    return (
        "\n".join(lines)
        + f"\n\n- unseen sources: {', '.join(Path(d).name for d in first['data'])}, "
        f"{first['examples']} questions; answers {'sampled' if g['do_sample'] else 'greedy'}, "
        f"at most {g['max_new_tokens']} new tokens, repetition_penalty {g['repetition_penalty']}, "
        f"no_repeat_ngram_size {g['no_repeat_ngram_size']}; tuned value, then tuned − base with "
        "its paired 95% bootstrap interval (↓: lower is better).\n"
    )


def _value_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sweep_markdown(result: SweepResult, plan: SweepPlan) -> str:
    first = next((r for r in result.rows if r.get("val_examples")), None)
    scored = (
        f" ({first['val_examples']} examples, {first['val_answer_tokens']} answer tokens)"
        if first
        else ""
    )
    fixed = ", ".join(f"`{f}`" for f in plan.fixed) or "none"
    unseen = unseen_table(result)
    unseen = f"## Sources never trained on\n\n{unseen}\n" if unseen else ""
    return (
        f"# Sweep over `{result.key}`\n\n"
        f"Fixed overrides: {fixed}. One run per value, each under `{result.key}=VALUE/`.\n\n"
        f"{markdown_table(result)}\n\n"
        f"- {LOSS_NOTE}{scored}.\n"
        "- train time: wall time of the training loop; tokens/s: prompt + answer tokens through "
        "training steps per second of it.\n\n"
        "![sweep](sweep.png)\n" + (f"\n{unseen}" if unseen else "")
    )


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_sweep(result: SweepResult) -> bytes:
    """PNG: validation loss vs the axis (points labelled with trainable params), and train time
    with trainable parameters on a second panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    values = [r["value"] for r in result.rows]
    numeric = _numeric(values)
    xs: list[float] = [float(v) for v in values] if numeric else list(range(len(values)))
    log2 = numeric and min(xs) > 0 and max(xs) / min(xs) >= 8
    labels = [str(v) for v in values]
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)

    points = [(x, r["val_loss"], r) for x, r in zip(xs, result.rows, strict=True)]
    scored = [(x, y, r) for x, y, r in points if y is not None]
    if scored:
        ax_loss.plot([p[0] for p in scored], [p[1] for p in scored], marker="o")
        for x, y, r in scored:
            ax_loss.annotate(
                f"{fmt_params(r['trainable_params'])} params\n{_fmt_seconds(r['train_time_s'])}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    ax_loss.margins(x=0.12, y=0.25)  # room for the labels above the points
    ax_loss.set_title("Validation answer loss (token-weighted)")
    ax_loss.set_ylabel("loss")

    positions = list(range(len(values)))  # bars read best evenly spaced, whatever the values
    ax_time.bar(positions, [r["train_time_s"] for r in result.rows], width=0.6)
    ax_time.set_ylabel("train time (s)")
    ax_time.set_title("Train time and trainable parameters")
    ax_params = ax_time.twinx()
    ax_params.plot(positions, [r["trainable_params"] for r in result.rows], color="C3", marker="s")
    ax_params.set_ylabel("trainable parameters", color="C3")

    if log2:
        ax_loss.set_xscale("log", base=2)
    for ax, ticks in ((ax_loss, xs), (ax_time, positions)):
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.set_xlabel(result.key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_sweep_files(result: SweepResult, plan: SweepPlan) -> dict[str, str]:
    """sweep.json, sweep.md and sweep.png, each written atomically."""
    out = result.out_dir
    files = {
        "json": str(out / "sweep.json"),
        "markdown": str(out / "sweep.md"),
        "plot": str(out / "sweep.png"),
    }
    write_bytes_atomic(out / "sweep.png", plot_sweep(result))
    write_text_atomic(out / "sweep.md", sweep_markdown(result, plan))
    result.files = files
    write_json_atomic(out / "sweep.json", {**result.to_dict(), "fixed_overrides": plan.fixed})
    return files


def summary_table(result: SweepResult) -> Any:
    """The results as a rich table, for the terminal."""
    from rich.table import Table

    table = Table(title=f"sweep over {result.key}")
    columns = [result.key, "trainable params", "validation loss", "train time (s)", "tokens/s"]
    scored = any(row.get("unseen") for row in result.rows)
    if scored:
        columns += ["unseen loss Δ", "MiniLM Δ", "repeated 4-grams (base)"]
    for name in columns:
        table.add_column(name, justify="left" if name == result.key else "right")
    for row in result.rows:
        cells = [
            str(row["value"]),
            f"{row['trainable_params']:,}",
            _fmt(row["val_loss"], 4),
            f"{row['train_time_s']:.1f}",
            f"{row['tokens_per_s']:.0f}",
        ]
        u = row.get("unseen")
        if scored and u:
            sim, rep = u["metrics"].get("similarity"), u["metrics"].get("repetition")
            cells += [
                f"{u['loss_change_pct']:+.1f} %",
                f"{sim['diff']['mean']:+.3f}" if sim else "–",
                f"{rep['model']['mean']:.3f} ({rep['base']['mean']:.3f})" if rep else "–",
            ]
        elif scored:
            cells += ["–", "–", "–"]
        table.add_row(*cells)
    return table
