"""What a sweep writes and prints: sweep.md (report/templates/sweep.md.j2: the runs table, and the
unseen-source table with `--unseen`), sweep.png, sweep.json, and the same tables on the terminal.

A table is built once, as headers and rows of text cells (`runs_table`, `unseen_table`), and
rendered as Markdown (`markdown`) or as a rich table (`summary_table`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from medlora.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from medlora.report.format import fmt, fmt_ci, md_cell
from medlora.report.render import render
from medlora.sweep.plan import LOSS_NOTE, SweepResult

Table = tuple[list[str], list[list[str]]]  # the headers, then one row of cells per run

UNSEEN_SHOWN = {
    "rougeL": "ROUGE-L",
    "f1": "token F1",
    "similarity": "MiniLM similarity",
    "repetition": "repeated 4-grams ↓",
    "echo": "echo ↓",
}


def fmt_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def describe_row(row: dict[str, Any]) -> str:
    return (
        f"validation loss {fmt(row['val_loss'], 4)}, {fmt_params(row['trainable_params'])} "
        f"trainable, {row['train_time_s']:.1f} s, {row['tokens_per_s']:.0f} tokens/s"
    )


def _value_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def runs_table(result: SweepResult) -> Table:
    """Per run: trainable parameters (and their share of the base), validation loss, speed."""
    headers = [
        result.key,
        "trainable params",
        "validation loss",
        "train time (s)",
        "tokens/s",
        "steps",
    ]
    rows = []
    for row in result.rows:
        pct = f" ({row['trainable_pct']:.3f}%)" if row.get("trainable_pct") is not None else ""
        rows.append(
            [
                _value_cell(row["value"]),
                f"{row['trainable_params']:,}{pct}",
                fmt(row["val_loss"], 4),
                f"{row['train_time_s']:.1f}",
                f"{row['tokens_per_s']:.0f}",
                str(row["steps"]),
            ]
        )
    return headers, rows


def unseen_table(result: SweepResult) -> Table:
    """Base vs tuned on the unseen sources per run: loss change, and each metric's tuned value
    with its paired difference from the base (95% CI). No rows without `--unseen`."""
    scored = [r for r in result.rows if r.get("unseen")]
    names = [n for n in UNSEEN_SHOWN if scored and n in scored[0]["unseen"]["metrics"]]
    headers = [result.key, "answer loss (base → tuned)"]
    headers += [f"{UNSEEN_SHOWN[n]}: tuned (− base)" for n in names]
    rows = []
    for row in scored:
        u = row["unseen"]
        loss = f"{u['base_loss']:.4f} → {u['loss']:.4f} ({u['loss_change_pct']:+.1f} %)"
        metrics = [u["metrics"][n] for n in names]
        cells = [f"{m['model']['mean']:.3f} ({fmt_ci(m['diff'], signed=True)})" for m in metrics]
        rows.append([_value_cell(row["value"]), loss, *cells])
    return headers, rows


def markdown(table: Table) -> str:
    """A table in Markdown: the first column left-aligned, the figures right-aligned."""
    headers, rows = table
    lines = [headers, *rows]
    text = ["| " + " | ".join(md_cell(cell) for cell in line) + " |" for line in lines]
    text.insert(1, "|---|" + "---:|" * (len(headers) - 1))
    return "\n".join(text)


def summary_table(result: SweepResult) -> Any:
    """The tables of sweep.md as rich tables, for the terminal."""
    from rich.console import Group
    from rich.table import Table as RichTable

    tables = [(f"sweep over {result.key}", runs_table(result))]
    unseen = unseen_table(result)
    if unseen[1]:
        tables.append(("sources never trained on (tuned, then tuned − base)", unseen))
    shown = []
    for title, (headers, rows) in tables:
        table = RichTable(title=title)
        for i, name in enumerate(headers):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        shown.append(table)
    return Group(*shown)


def sweep_markdown(result: SweepResult) -> str:
    unseen = unseen_table(result)
    scored = [row["unseen"] for row in result.rows if row.get("unseen")]
    return render(
        "sweep.md.j2",
        key=result.key,
        fixed=result.fixed,
        runs=markdown(runs_table(result)),
        loss_note=LOSS_NOTE,
        validated=next((row for row in result.rows if row.get("val_examples")), None),
        unseen=markdown(unseen) if scored else "",
        first_unseen=scored[0] if scored else None,
        unseen_sources=", ".join(Path(d).name for d in scored[0]["data"]) if scored else "",
    )


def plot_sweep(result: SweepResult) -> bytes:
    """PNG: validation loss vs the axis (points labelled with trainable params), and train time
    with trainable parameters on a second panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    values = [r["value"] for r in result.rows]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    xs: list[float] = [float(v) for v in values] if numeric else list(range(len(values)))
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)

    scored = [(x, r) for x, r in zip(xs, result.rows, strict=True) if r["val_loss"] is not None]
    ax_loss.plot([x for x, _ in scored], [r["val_loss"] for _, r in scored], marker="o")
    for x, r in scored:
        seconds = r["train_time_s"]
        ax_loss.annotate(
            f"{fmt_params(r['trainable_params'])} params\n{seconds:.{1 if seconds < 10 else 0}f} s",
            (x, r["val_loss"]),
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

    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax_loss.set_xscale("log", base=2)
    for ax, ticks in ((ax_loss, xs), (ax_time, positions)):
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(result.key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_sweep_files(result: SweepResult) -> None:
    """sweep.json, sweep.md and sweep.png, each written atomically (their paths in `result.files`)."""
    out = result.out_dir
    result.files = {
        "json": str(out / "sweep.json"),
        "markdown": str(out / "sweep.md"),
        "plot": str(out / "sweep.png"),
    }
    write_bytes_atomic(out / "sweep.png", plot_sweep(result))
    write_text_atomic(out / "sweep.md", sweep_markdown(result))
    write_json_atomic(out / "sweep.json", result.to_dict())
