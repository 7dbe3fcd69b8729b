"""The two panels side by side (held-out topics | sources never trained on) and the one sentence
that says what transferred: the same rows for the demo summary, the model card, report.html and
`medlora eval`'s output."""

from __future__ import annotations

from dataclasses import astuple, dataclass

from medlora.evaluate.quality import NEITHER_BETTER
from medlora.report.format import fmt, fmt_ci, md_table, metric_verdict
from medlora.results import MetricCI, PanelScores, QualityResult

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


def metric_cell(name: str, entry: MetricCI | None) -> PanelCell:
    """One answer metric: base, fine-tuned, the paired difference and its verdict ('—' if absent)."""
    if entry is None:
        return PanelCell("—", "—", "—", "")
    digits = 1 if name in NEITHER_BETTER else 3  # lengths in words
    return PanelCell(
        fmt_ci(entry.base, digits),
        fmt_ci(entry.model, digits),
        fmt_ci(entry.diff, digits, signed=True),
        metric_verdict(name, entry.diff),
    )


def panel_rows(panels: list[PanelScores]) -> list[PanelRow]:
    """Answer loss, each answer metric and the reference length, one cell per panel."""
    qualities = [p.quality for p in panels]
    names = dict.fromkeys(name for q in qualities if q for name in q.metrics)  # first-seen order
    rows = [PanelRow("answer loss (token-weighted)", [_loss_cell(p) for p in panels])]
    rows += [
        PanelRow(
            metric_label(name),
            [metric_cell(name, q.metrics.get(name) if q else None) for q in qualities],
        )
        for name in names
    ]
    if any(q and q.reference_words is not None for q in qualities):
        words = [fmt(q.reference_words, 1) if q else "—" for q in qualities]
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
        head += [f"{panel.panel}: {column}" for column in ("base", "fine-tuned", "difference")]
    rows = [
        [
            row.name,
            *(x for c in row.cells for x in (c.base, c.tuned, f"{c.diff} {c.verdict}".strip())),
        ]
        for row in panel_rows(panels)
    ]
    headings = [f"- **{p.panel}**: {panel_heading(p)}" for p in panels]
    return [*headings, "", *md_table(head, rows)]


def quality_table(quality: QualityResult) -> list[str]:
    """One set of answers' metrics as a Markdown table: base, fine-tuned, paired difference."""
    head = ["metric", "base", "fine-tuned", "difference (paired 95% CI)", "verdict"]
    rows = [[metric_label(n), *astuple(metric_cell(n, m))] for n, m in quality.metrics.items()]
    if quality.reference_words is not None:
        rows.append(
            ["reference answers' length (words)", f"{quality.reference_words:.1f}", "", "", ""]
        )
    return md_table(head, rows)


def _significant(panel: PanelScores, verdict: str) -> list[str]:
    metrics = panel.quality.metrics if panel.quality else {}
    return [metric_label(n) for n, m in metrics.items() if metric_verdict(n, m.diff) == verdict]


def _describe(panel: PanelScores) -> str:
    """`answer loss -12.5 %; better on ROUGE-L (F); answers shorter`: what changed on one panel."""
    parts = [] if panel.loss_change_pct is None else [f"answer loss {panel.loss_change_pct:+.1f} %"]
    changed = [(verdict, _significant(panel, verdict)) for verdict in ("better", "worse")]
    parts += [f"{verdict} on {', '.join(found)}" for verdict, found in changed if found]
    parts += [f"answers {v}" for v in ("longer", "shorter") if _significant(panel, v)]
    if panel.quality is not None and not any(found for _, found in changed):
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
