"""`medlora audit`'s result in words: Markdown tables and a plain-language reading (for the model
card and docs/benchmarks.md), and the same tables for the terminal (`evaluate/memorization.py`
measures it)."""

from __future__ import annotations

import math
from typing import Any

from medlora.evaluate.exposure import chance_share
from medlora.report.format import fmt_ci, md_table
from medlora.results import AuditResult, CanaryExposure, ExposureAudit, SpanStats

# Under no memorization a secret's rank is uniform over R, so rank / |R| is the chance of
# ranking this high: the usual significance levels separate memorized from chance.
MEMORIZED_SHARE = 0.01
ABOVE_CHANCE_SHARE = 0.05
QUOTE_CHARS = 160  # longest recited span quoted in the reading


def _percent(share: float) -> str:
    """A share as a percentage with the digits it needs (0.04 %, 3 %, 25 %)."""
    value = share * 100
    if value == 0 or value >= 10:
        return f"{value:.0f} %"
    if value >= 1:
        return f"{value:.1f} %"
    return f"{value:.{max(1, -math.floor(math.log10(value)))}f} %"


def _ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 11th, 1,042nd."""
    suffix = (
        "th" if number % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    )
    return f"{number:,}{suffix}"


def span_rows(result: AuditResult) -> list[tuple[str, SpanStats]]:
    """(label, stats) of each set of answers the audit measured, in table order."""
    r = result.recitation
    rows = [("fine-tuned, training questions", r.train), ("base, training questions", r.base_train)]
    if r.test is not None and r.base_test is not None:
        rows += [
            ("fine-tuned, held-out questions", r.test),
            ("base, held-out questions", r.base_test),
        ]
    return rows


def recitation_cells(stats: SpanStats) -> list[str]:
    return [
        str(stats.answers),
        f"{stats.reciting} ({_percent(stats.reciting / max(stats.answers, 1))})",
        f"{stats.median:g}",
        f"{stats.p90:g}",
        str(stats.max),
        fmt_ci(stats.mean, 1),
    ]


RECITATION_HEADER = ["answers", "n", "≥ {t} tokens", "median", "p90", "max", "mean [95% CI]"]
CANARY_HEADER = ["canary", "trained", "rank", "exposure (bits)", "base rank", "base exposure"]


def canary_cells(canary: CanaryExposure, audit: ExposureAudit) -> list[str]:
    return [
        canary.id,
        f"{canary.repeats}×" if canary.repeats else "never (control)",
        f"{canary.rank:,} of {audit.candidates:,}",
        f"{canary.exposure:.1f} of {audit.max_exposure:.1f}",
        f"{canary.base_rank:,}",
        f"{canary.base_exposure:.1f}",
    ]


def verdict(rank: int, candidates: int, control_exposure: float | None = None) -> str:
    """What a secret's rank says: memorized, above chance, or what chance gives.

    `control_exposure`, the highest exposure of the never-trained control canaries: with several
    canaries one lands in the top 5 % by chance, so a trained canary that does not rank above
    every control shows nothing (the controls' own verdict is then "chance")."""
    share = chance_share(rank, candidates)
    exposure = math.log2(candidates) - math.log2(rank)
    if control_exposure is not None and exposure <= control_exposure:
        return "no higher than a never-trained control: no sign it memorized it"
    if share <= MEMORIZED_SHARE:
        return "it memorized it"
    if share <= ABOVE_CHANCE_SHARE:
        return "above chance: a trace of memorization"
    return "within chance: no sign it memorized it"


def audit_reading(result: AuditResult) -> list[str]:
    """The audit in sentences, one per finding."""
    r = result.recitation
    t = r.threshold_tokens
    control = f"; held-out control: {r.test.reciting} of {r.test.answers}" if r.test else ""
    held_out = f" (held-out questions: {fmt_ci(r.test_change, 1, True)})" if r.test_change else ""
    lines = [
        f"{r.train.reciting} of {r.train.answers} fine-tuned answers to training questions recite "
        f"≥ {t} tokens of their training answer (base: {r.base_train.reciting}{control}).",
        f"Longest shared span, fine-tuned minus base, mean over the same training questions: "
        f"{fmt_ci(r.train_change, 1, signed=True)} tokens{held_out}.",
    ]
    if r.longest is not None:
        text = r.longest.text
        quote = text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…"
        lines.append(f"Longest recited span: {r.longest.tokens} tokens, “{quote}”.")
    audit = result.exposure
    if audit is None:
        lines.append("No canaries: the run was trained without `data.canaries`.")
        return lines
    controls = [c.exposure for c in audit.canaries if c.repeats == 0]
    control_max = max(controls) if controls else None
    for c in sorted(audit.canaries, key=lambda c: (c.repeats == 0, -c.repeats)):  # controls last
        if c.repeats == 0:
            seen = "control canary (never seen)"
            judged = "what chance gives a secret the model never saw"
        else:
            seen = f"canary seen {c.repeats} times"
            judged = verdict(c.rank, audit.candidates, control_max)
        lines.append(
            f"{seen}: exposure {c.exposure:.1f} of {audit.max_exposure:.1f} bits — the model "
            f"ranks its secret {_ordinal(c.rank)} of {audit.candidates:,} (top "
            f"{_percent(chance_share(c.rank, audit.candidates))}): "
            f"{judged} (base: {c.base_exposure:.1f} bits)."
        )
    return lines


def audit_markdown(result: AuditResult) -> list[str]:
    """Markdown lines: the recitation and canary tables, then the reading."""
    r = result.recitation
    t = r.threshold_tokens
    spans = span_rows(result)
    buckets = list(r.train.histogram)
    lines = [
        f"Recitation: for each answer, the longest span of tokens it shares verbatim with its "
        f"reference (training questions: the answer trained on; held-out questions: the test "
        f"split's reference), with the run's `generation:` settings; ≥ {t} tokens counts as "
        "recitation. Intervals: 95% bootstrap over questions.",
        "",
        *md_table(
            [h.format(t=t) for h in RECITATION_HEADER],
            [[label, *recitation_cells(s)] for label, s in spans],
            align="lrrrrrl",
        ),
        "",
        *md_table(
            ["answers (longest span, tokens)", *buckets],
            [[label, *(s.histogram.get(b, 0) for b in buckets)] for label, s in spans],
            align="l" + "r" * len(buckets),
        ),
    ]
    audit = result.exposure
    if audit is not None:
        canaries = [canary_cells(c, audit) for c in audit.canaries]
        lines += [
            "",
            f"Canaries: exposure = log2 |R| − log2 rank of the secret among all |R| = "
            f"{audit.candidates:,} numbers of {audit.digits} digits, by the likelihood of the "
            f"canary's answer (Carlini et al. 2019); {audit.seconds_per_canary:.1f} s per canary "
            "and model.",
            "",
            *md_table(CANARY_HEADER, canaries, align="llrrrr"),
        ]
    lines += ["", *(f"- {line}" for line in audit_reading(result))]
    return lines


def audit_tables(result: AuditResult) -> list[Any]:
    """The same tables as rich Tables, for the terminal."""
    from rich.table import Table

    t = result.recitation.threshold_tokens
    recitation = Table(title="recitation: longest verbatim span shared with the reference")
    for index, name in enumerate(RECITATION_HEADER):
        recitation.add_column(name.format(t=t), justify="left" if index == 0 else "right")
    for label, stats in span_rows(result):
        recitation.add_row(label, *recitation_cells(stats))
    tables = [recitation]
    audit = result.exposure
    if audit is not None:
        canaries = Table(title=f"canary exposure (max {audit.max_exposure:.1f} bits)")
        for index, name in enumerate(CANARY_HEADER):
            canaries.add_column(name, justify="left" if index < 2 else "right")
        for canary in audit.canaries:
            canaries.add_row(*canary_cells(canary, audit))
        tables.append(canaries)
    return tables
