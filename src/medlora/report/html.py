"""Self-contained HTML pages (report.html, compare.html): one file, charts inlined as data URIs.

Pages are rendered with jinja2 (autoescaped: model answers are untrusted text) from the same facts the
model card uses, so the page and README.md never disagree.
"""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path
from typing import Any

from medlora.io import write_text_atomic

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccd;padding:.35em .6em;vertical-align:top;text-align:left}
th{background:#f0f2f7}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#0a6b2f;font-weight:600}.worse{color:#a3261b;font-weight:600}
.muted{color:#667}.charts img{max-width:48%;margin:.3em;border:1px solid #dde}
.qa td{max-width:330px}.disclaimer{background:#fff6e0;border:1px solid #e8c770;padding:.8em;
border-radius:4px}pre{background:#f5f6f9;padding:.8em;overflow-x:auto;font-size:.85em}
"""


def data_uri(path: str | os.PathLike[str]) -> str:
    """A PNG as a data URI, so the page carries its images inside it."""
    raw = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: fixed digits, '—' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(ci: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    """`0.412 [0.371, 0.455]` from {"mean", "low", "high"}."""
    if not ci:
        return "—"
    sign = "+" if signed else ""
    mean = ci.get("mean")
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:{sign}.{digits}f} [{ci['low']:{sign}.{digits}f}, {ci['high']:{sign}.{digits}f}]"


def verdict(ci: dict[str, float] | None, higher_is_better: bool = True) -> str:
    """'better' / 'worse' when the whole 95% interval of the difference is on one side of 0."""
    if not ci or any(math.isnan(ci.get(k, math.nan)) for k in ("low", "high")):
        return ""
    low, high = (ci["low"], ci["high"]) if higher_is_better else (-ci["high"], -ci["low"])
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant change"


def environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.filters["fmt"] = fmt
    env.filters["ci"] = fmt_ci
    env.filters["verdict"] = verdict
    env.globals["style"] = STYLE
    return env


def render(template: str, **context: Any) -> str:
    return environment().from_string(template).render(**context)


def write_page(path: str | os.PathLike[str], template: str, **context: Any) -> Path:
    return write_text_atomic(path, render(template, **context))


REPORT_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p>{{ description }}</p>
<p class="disclaimer">{{ disclaimer }}</p>

<h2>Training configuration</h2>
<table id="config"><tr><th>setting</th><th>value</th></tr>
{% for key, value in config_rows %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}
</table>
<details><summary>Full recipe (recipe.yaml)</summary><pre id="recipe">{{ recipe_yaml }}</pre></details>
{% if train_rows %}
<table id="training"><tr><th>training run</th><th>value</th></tr>
{% for key, value in train_rows %}<tr><td>{{ key }}</td><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
{% endif %}

<h2>Training charts</h2>
<div class="charts">
{% for chart in charts %}<img src="{{ chart.uri }}" alt="{{ chart.name }}" title="{{ chart.name }}">{% endfor %}
{% if not charts %}<p class="muted">No charts in this run.</p>{% endif %}
</div>

<h2>Data</h2>
<table id="data"><tr><th>what</th><th>value</th></tr>
{% for key, value in data_rows %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}
</table>

<h2>Held-out evaluation</h2>
{% if loss_rows %}
<table id="loss"><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>change</th></tr>
{% for row in loss_rows %}<tr><td>{{ row.name }}</td><td class="num">{{ row.base }}</td>
<td class="num">{{ row.tuned }}</td><td class="num">{{ row.change }}</td></tr>{% endfor %}
</table>
{% endif %}
{% if quality_rows %}
<table id="quality"><tr><th>answer quality (95% CI)</th><th>base</th><th>fine-tuned</th>
<th>difference</th><th></th></tr>
{% for row in quality_rows %}<tr><td>{{ row.name }}</td><td class="num">{{ row.base | ci }}</td>
<td class="num">{{ row.model | ci }}</td><td class="num">{{ row.diff | ci(3, true) }}</td>
<td class="{{ 'better' if row.verdict == 'better' else 'worse' if row.verdict == 'worse' else 'muted' }}">
{{ row.verdict }}</td></tr>{% endfor %}
</table>
<p class="muted">{{ quality_note }}</p>
{% endif %}
{% if not loss_rows and not quality_rows %}<p class="muted">{{ missing_eval }}</p>{% endif %}

<h2>Medical benchmarks (multiple choice)</h2>
{% if bench_rows %}
<table id="bench"><tr><th>task</th><th>n</th><th>chance</th><th>base acc</th><th>fine-tuned acc (95% CI)</th>
<th>difference (95% CI)</th><th>base acc_norm</th><th>fine-tuned acc_norm</th></tr>
{% for row in bench_rows %}<tr><td>{{ row.task }}</td><td class="num">{{ row.n }}</td>
<td class="num">{{ row.chance | fmt }}</td><td class="num">{{ row.base_acc | fmt }}</td>
<td class="num">{{ row.acc_ci | ci }}</td><td class="num">{{ row.diff | ci(3, true) }}</td>
<td class="num">{{ row.base_acc_norm | fmt }}</td><td class="num">{{ row.acc_norm | fmt }}</td></tr>{% endfor %}
</table>
{% if subject_rows %}
<table id="subjects"><tr><th>task / subject</th><th>n</th><th>chance</th><th>base acc</th><th>fine-tuned acc</th></tr>
{% for row in subject_rows %}<tr><td>{{ row.name }}</td><td class="num">{{ row.n }}</td>
<td class="num">{{ row.chance | fmt }}</td><td class="num">{{ row.base_acc | fmt }}</td>
<td class="num">{{ row.acc | fmt }}</td></tr>{% endfor %}
</table>
{% endif %}
<p class="muted">{{ bench_note }}</p>
{% else %}<p class="muted">{{ missing_bench }}</p>{% endif %}

<h2>Normal vs fine-tuned answers</h2>
{% if compare_rows %}
<table class="qa" id="compare"><tr><th>question</th><th>reference</th><th>base answer</th><th>fine-tuned answer</th></tr>
{% for row in compare_rows %}<tr><td>{{ row.question }}</td><td>{{ row.reference }}</td>
<td>{{ row.base }}<br><span class="muted">{{ row.base_scores }}</span></td>
<td>{{ row.tuned }}<br><span class="muted">{{ row.tuned_scores }}</span></td></tr>{% endfor %}
</table>
{% else %}<p class="muted">{{ missing_compare }}</p>{% endif %}

<h2>Limitations</h2>
<ul>{% for item in limitations %}<li>{{ item }}</li>{% endfor %}</ul>
<p class="muted">Every figure on this page is read from the files in {{ run_dir }}.</p>
</body></html>
"""


def write_report_html(facts: Any, path: str | os.PathLike[str]) -> Path:
    """report.html for a run: the model card's content, with the charts inside the page."""
    from medlora.report.card import page_context

    context = page_context(facts)
    context["charts"] = [{"name": p.stem, "uri": data_uri(p)} for p in facts.charts]
    return write_page(path, REPORT_TEMPLATE, **context)
