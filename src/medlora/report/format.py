"""How figures and text look on every page: numbers, intervals, verdicts, Markdown cells, images.

The one place that formats a number or lays out a Markdown table; the card, the HTML pages,
compare.md, the demo summary, sweep tables and the CLI all use these.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medlora.results import CI


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, '—' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(ci: CI | Mapping[str, float] | None) -> CI | None:
    if ci is None or isinstance(ci, CI):
        return ci
    return CI.model_validate(ci) if ci else None


def fmt_ci(ci: CI | Mapping[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    """`0.412 [0.371, 0.455]` from a mean with its interval; '—' when missing or NaN."""
    interval = _ci(ci)
    if interval is None or math.isnan(interval.mean):
        return "—"
    sign = "+" if signed else ""
    return (
        f"{interval.mean:{sign}.{digits}f} "
        f"[{interval.low:{sign}.{digits}f}, {interval.high:{sign}.{digits}f}]"
    )


def verdict(ci: CI | Mapping[str, float] | None, higher_is_better: bool | None = True) -> str:
    """'better' / 'worse' when the whole 95% interval of the difference is on one side of 0;
    with `higher_is_better=None` (a length: neither side is better) 'longer' / 'shorter'."""
    interval = _ci(ci)
    if interval is None or math.isnan(interval.low) or math.isnan(interval.high):
        return ""
    low, high = (
        (interval.low, interval.high)
        if higher_is_better is not False
        else (-interval.high, -interval.low)
    )
    up, down = ("longer", "shorter") if higher_is_better is None else ("better", "worse")
    if low > 0:
        return up
    if high < 0:
        return down
    return "no significant change"


def metric_verdict(name: str, ci: CI | Mapping[str, float] | None) -> str:
    """The verdict of one answer metric's paired difference (tuned − base), by its direction."""
    from medlora.evaluate.quality import LOWER_IS_BETTER, NEITHER_BETTER

    return verdict(ci, None if name in NEITHER_BETTER else name not in LOWER_IS_BETTER)


def short(text: Any, limit: int = 700) -> str:
    """Whitespace collapsed to single spaces, cut after `limit` characters with ' …'."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def md_cell(text: Any) -> str:
    """Text for one cell of a Markdown table: on one line, its `|` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def md_table(head: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table's lines, each cell through `md_cell`. `align`: a letter per column, "r"
    right-aligns that column ("lrr": the first left, the next two right; missing letters: left)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(head), "l"))
    return [md_row(head), rule, *(md_row(row) for row in rows)]


def md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def data_uri(path: str | os.PathLike[str]) -> str:
    """A PNG as a data URI, so the page carries its images inside it."""
    raw = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
