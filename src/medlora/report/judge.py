"""`medlora eval --judge`'s result in words: Markdown tables and lines for the model card, the
report and the terminal (`evaluate/judge.py` judges)."""

from __future__ import annotations

from pathlib import Path

from medlora.report.format import fmt, fmt_ci, md_table
from medlora.results import JudgeResult, MetricCI


def judge_markdown(result: JudgeResult) -> list[str]:
    """The judge, pairwise rates, consistency, unparseable counts, fact recall / contradiction per
    model, the rubric score."""
    lines = [
        f"judge: {result.judge_model} at {result.judge_url} ({result.examples} questions, "
        f"{result.requests} requests sent, {result.cached} verdicts from the cache)",
    ]
    pair, facts, rubric = result.pairwise, result.facts, result.rubric
    if pair is not None:
        rates = [
            ("win", fmt_ci(pair.win)),
            ("tie (or the orders disagree)", fmt_ci(pair.tie)),
            ("loss", fmt_ci(pair.loss)),
            ("win − loss (paired)", fmt_ci(pair.win_minus_loss, signed=True)),
        ]
        lines += ["", *md_table(["tuned vs base, judged in both orders", "share (95% CI)"], rates)]
        lines += [
            "",
            f"Position consistency: {fmt(pair.position_consistency)} (both orders agree on "
            f"{pair.consistent} of {pair.pairs - pair.unparseable} pairs); unparseable: "
            f"{pair.unparseable} of {pair.pairs} pairs, left out.",
        ]
    scores: list[tuple[str, MetricCI]] = []
    if facts is not None:
        scores += [("fact recall (statements covered)", facts.recall)]
        scores += [("contradiction rate (lower is better)", facts.contradiction)]
    if rubric is not None:
        scores += [(f"rubric score ({Path(rubric.file).name})", rubric.score)]
    if scores:
        head = ["per question, mean (95% CI)", "base", "tuned", "tuned − base (paired)"]
        cells = [
            (name, fmt_ci(m.base), fmt_ci(m.model), fmt_ci(m.diff, signed=True))
            for name, m in scores
        ]
        lines += ["", *md_table(head, cells), ""]
    if facts is not None:
        lines.append(
            f"Reference facts: {facts.statements} statements from {facts.questions} references "
            f"(at most {facts.max_statements} each, first sentences), marked covered / "
            f"contradicted / absent; unparseable verdicts left out: {facts.unparseable}."
        )
    if rubric is not None:
        lines.append(
            f"Rubric: {rubric.questions} questions (HealthBench scoring: points met / positive "
            f"points, clipped to [0, 1]); {rubric.unmatched} not among the predictions; "
            f"{rubric.unparseable} unparseable item verdicts, {rubric.excluded} question scores "
            "left out for them."
        )
    return lines
