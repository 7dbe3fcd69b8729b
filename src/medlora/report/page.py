"""report.html: the model card's content as one self-contained page, charts inlined as data URIs.

Rendered from templates/report.html.j2 (autoescaped: model answers are untrusted text) with the same
context as the card, so the page and README.md never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

from medlora.report.context import page_context
from medlora.report.facts import RunFacts
from medlora.report.format import data_uri
from medlora.report.render import write_page


def write_report_html(facts: RunFacts, path: str | os.PathLike[str]) -> Path:
    """report.html for a run: the model card's content, with the charts inside the page."""
    charts = [{"name": p.stem, "uri": data_uri(p)} for p in facts.charts]
    return write_page(path, "report.html.j2", **page_context(facts), charts=charts)
