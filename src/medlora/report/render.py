"""The jinja2 environment every page and card is rendered with (templates/ ships with the package).

`*.html.j2` templates are autoescaped (model answers are untrusted text); Markdown templates are
not, and escape table cells with the `md` filter or build whole tables with `md_table` instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from medlora.report.format import (
    data_uri,
    fmt,
    fmt_ci,
    md_cell,
    md_table,
    metric_verdict,
    short,
    verdict,
)
from medlora.report.panels import metric_label

TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        fmt=fmt,
        ci=fmt_ci,
        verdict=verdict,
        metric_verdict=metric_verdict,
        label=metric_label,
        md=md_cell,
        short=short,
        pyrepr=repr,
        data_uri=data_uri,
    )
    env.globals["md_table"] = lambda *table, **align: "\n".join(md_table(*table, **align))
    return env


def render(template: str, **context: Any) -> str:
    """templates/`template` rendered with `context`."""
    return environment().get_template(template).render(**context)
