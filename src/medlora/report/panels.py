"""The two panels side by side (held-out topics | sources never trained on) and the one sentence
that says what transferred: the same rows for the demo summary, the model card, report.html and
`medlora eval`'s output."""

from __future__ import annotations

from dataclasses import dataclass

from medlora.evaluate.quality import NEITHER_BETTER
from medlora.report.format import fmt, fmt_ci, md_cell, metric_verdict
from medlora.results import PanelScores, QualityResult

METRIC_LABELS = {
    "rougeL": "ROUGE-L (F)",
    "f1": "token F1",
    "similarity": "MiniLM similarity",
    "repetition": "repeated word 4-grams ↓",
    "echo": "answers restating the question ↓",
    "length": "answer length (words)",
}
PANEL_TITLES = {
    "test": "held-out topics of the trained sources",
    "unseen": "sources never trained on",
}


@dataclass
class PanelCell:
    base: str
    tuned: str
    diff: str
    verdict: str


@dataclass
class PanelRow:
    name: str
    cells: list[PanelCell]  # one per panel, in the panels' order


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _loss_cell(panel: PanelScores) -> PanelCell:
    change = "" if panel.loss_change_pct is None else f"{panel.loss_change_pct:+.1f} %"
    verdict = ""
    if panel.examples_better is not None:
        verdict = f"lower on {panel.examples_better} of {panel.examples} answers"
    return PanelCell(fmt(panel.base_loss, 4), fmt(panel.loss, 4), change, verdict)


def panel_rows(panels: list[PanelScores]) -> list[PanelRow]:
    """Answer loss, each answer metric and the reference length, one cell per panel."""
    rows = [PanelRow("answer loss (token-weighted)", [_loss_cell(p) for p in panels])]
    names: list[str] = []
    for panel in panels:
        for name in panel.quality.metrics if panel.quality else {}:
            if name not in names:
                names.append(name)
    blank = PanelCell("—", "—", "—", "")
    for name in names:
        cells = []
        for panel in panels:
            entry = panel.quality.metrics.get(name) if panel.quality else None
            if entry is None:
                cells.append(blank)
                continue
            digits = 1 if name in NEITHER_BETTER else 3
            cells.append(
                PanelCell(
                    fmt_ci(entry.base, digits),
                    fmt_ci(entry.model, digits),
                    fmt_ci(entry.diff, digits, signed=True),
                    metric_verdict(name, entry.diff),
                )
            )
        rows.append(PanelRow(metric_label(name), cells))
    if any(p.quality and p.quality.reference_words is not None for p in panels):
        words = [fmt(p.quality.reference_words, 1) if p.quality else "—" for p in panels]
        rows.append(
            PanelRow("reference answers' length (words)", [PanelCell(w, "", "", "") for w in words])
        )
    return rows


def panel_heading(panel: PanelScores) -> str:
    sources = ", ".join(d.rsplit("/", 1)[-1] for d in panel.data)
    return f"{PANEL_TITLES[panel.panel]} ({panel.examples} questions{': ' + sources if sources else ''})"


def panels_markdown(panels: list[PanelScores]) -> list[str]:
    """The panels as one Markdown table: per panel base, fine-tuned and the paired difference."""
    head = ["metric"]
    for panel in panels:
        head += [f"{panel.panel}: base", f"{panel.panel}: fine-tuned", f"{panel.panel}: difference"]
    lines = [
        *(f"- **{p.panel}**: {panel_heading(p)}" for p in panels),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in panel_rows(panels):
        cells = [row.name]
        for cell in row.cells:
            diff = f"{cell.diff} {cell.verdict}".strip()
            cells += [cell.base, cell.tuned, diff]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return lines


def _significant(panel: PanelScores, verdict: str) -> list[str]:
    if panel.quality is None:
        return []
    return [
        metric_label(name)
        for name, entry in panel.quality.metrics.items()
        if metric_verdict(name, entry.diff) == verdict
    ]


def _describe(panel: PanelScores) -> str:
    loss = (
        f"answer loss {panel.loss_change_pct:+.1f} %" if panel.loss_change_pct is not None else ""
    )
    parts = [loss] if loss else []
    for verdict in ("better", "worse", "longer", "shorter"):
        found = _significant(panel, verdict)
        if found:
            parts.append(
                f"{verdict} on {', '.join(found)}"
                if verdict in ("better", "worse")
                else f"answers {verdict}"
            )
    if panel.quality is not None and not any(_significant(panel, v) for v in ("better", "worse")):
        parts.append("no answer metric significantly different")
    return "; ".join(parts)


def transfer_sentence(test: PanelScores, unseen: PanelScores) -> str:
    """One sentence: what the fine-tune changed on each panel, and what transferred."""
    test_better = set(_significant(test, "better"))
    unseen_better = set(_significant(unseen, "better"))
    lower_loss = (unseen.loss_change_pct or 0) < 0 and (test.loss_change_pct or 0) < 0
    if test_better & unseen_better:
        verdict = (
            f"{', '.join(sorted(test_better & unseen_better))} improved on both: that transferred"
        )
    elif test_better:
        verdict = "the answers improved only on topics of the trained sources" + (
            "; to new sources only the lower answer loss transferred" if lower_loss else ""
        )
    elif unseen_better:
        verdict = "the answers improved only on the new sources"
    else:
        verdict = "no answer metric improved significantly on either panel" + (
            " (the answer loss fell on both)" if lower_loss else ""
        )
    return (
        f"Held-out topics: {_describe(test)}. Sources never trained on: {_describe(unseen)}. "
        f"In short, {verdict}."
    )


def quality_table(quality: QualityResult) -> list[str]:
    """One set of answers' metrics as a Markdown table: base, fine-tuned, paired difference."""
    lines = [
        "| metric | base | fine-tuned | difference (paired 95% CI) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, m in quality.metrics.items():
        digits = 1 if name in NEITHER_BETTER else 3
        lines.append(
            f"| {metric_label(name)} | {fmt_ci(m.base, digits)} | {fmt_ci(m.model, digits)} | "
            f"{fmt_ci(m.diff, digits, signed=True)} | {metric_verdict(name, m.diff)} |"
        )
    if quality.reference_words is not None:
        lines.append(f"| reference answers' length (words) | {quality.reference_words:.1f} | | | |")
    return lines
