"""`medlora report RUN_DIR`: a Hub-ready model card (README.md) and report.html from the run's files.

The card is a huggingface_hub `ModelCard`: its front matter is a `ModelCardData`, its body the
templates/model_card.md.j2 template. `medlora export` renders its cards here too. report.html
(templates/report.html.j2) is the card's content as one self-contained page, charts inlined as data
URIs, rendered from the same context so the two never disagree.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from medlora.io import write_text_atomic
from medlora.report.charts import quality_chart
from medlora.report.context import page_context, short_context, usage
from medlora.report.facts import ReportOptions, RunFacts, ShortFacts, chart_files, collect
from medlora.report.render import render

# Marks a README.md as medlora's card (an HTML comment: invisible on the Hub), so `medlora export`
# can tell it from the template "Model Card for Model ID" that PEFT's save_pretrained writes.
CARD_MARKER = "<!-- medlora:model-card -->"
_CARD_FOOTER = "_Written by `medlora report`"  # cards written before the marker existed
TAGS = ["medical", "lora", "peft"]
# The front matter's key order (ModelCardData sorts its own fields).
FRONT_MATTER_ORDER = ["base_model", "library_name", "license", "tags", "datasets", "language"]


def is_medlora_card(text: str) -> bool:
    """True for a card written by `medlora report` or `medlora export`, False for PEFT's template."""
    return CARD_MARKER in text or _CARD_FOOTER in text


def _model_card(template: str, data: ModelCardData, **context: object) -> ModelCard:
    front = data.to_yaml(original_order=FRONT_MATTER_ORDER)
    content = render(template, card_data=front, marker=CARD_MARKER, **context)
    return ModelCard(content)


def card_data(facts: RunFacts) -> ModelCardData:
    """The Hub metadata of a run's card (the YAML front matter)."""
    return ModelCardData(
        base_model=facts.base_model,
        library_name="peft",
        license=facts.license,
        tags=list(TAGS),
        datasets=facts.datasets,
        language=["en"],
        pipeline_tag="text-generation",
    )


def render_card(facts: RunFacts) -> str:
    """The model card: configuration, data, evaluation, answers, usage, limitations."""
    return str(_model_card("model_card.md.j2", card_data(facts), **page_context(facts)))


def render_short_card(facts: ShortFacts) -> str:
    """The card for a run `collect` cannot read: base, recipe, the metrics it has, usage."""
    data = ModelCardData(base_model=facts.base_model, library_name="peft", tags=list(TAGS))
    return str(_model_card("short_card.md.j2", data, **short_context(facts)))


def merged_usage(repo_id: str, system_prompt: str | None, gguf: bool) -> str:
    """The Usage section of a merged export's card: plain transformers, no peft."""
    return render("usage_merged.md.j2", repo_id=repo_id, gguf=gguf, **usage(system_prompt))


def write_report(
    run_dir: str | os.PathLike[str], options: ReportOptions | None = None
) -> dict[str, Path]:
    """README.md (model card, beside the adapter it describes) and report.html in the run directory."""
    run = Path(run_dir)
    facts = collect(run, options)  # refuses a folder that is not a run before drawing into it
    quality_chart(facts.metrics, run / "charts")
    facts = replace(facts, charts=chart_files(run))  # with the chart just drawn
    card = write_text_atomic(run / "README.md", render_card(facts))
    page = write_text_atomic(run / "report.html", render("report.html.j2", **page_context(facts)))
    return {"card": card, "html": page}
