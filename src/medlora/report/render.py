"""The jinja2 environment every page and card is rendered with (templates/ ships with the package).

`*.html.j2` templates are autoescaped (model answers are untrusted text); Markdown templates are
not, and escape table cells with the `md` filter instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jinja2

from medlora.io import write_text_atomic
from medlora.report.format import fmt, fmt_ci, md_cell, short, verdict

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
    env.filters.update(fmt=fmt, ci=fmt_ci, verdict=verdict, md=md_cell, short=short, pyrepr=repr)
    return env


def render(template: str, **context: Any) -> str:
    """templates/`template` rendered with `context`."""
    return environment().get_template(template).render(**context)


def write_page(path: str | os.PathLike[str], template: str, **context: Any) -> Path:
    return write_text_atomic(path, render(template, **context))
