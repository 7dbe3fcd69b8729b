"""Does the demo adapter answer medical questions better than its base? Answer quality on MedQuAD
collections the run never trained on (the recipe's `eval.unseen_sources`) and multiple-choice
benchmarks, base vs tuned in one process, with 95% bootstrap confidence intervals.

    python bench/quality.py [--run runs/demo] [--questions 100] [--pubmedqa-limit 100] [--threads 1]

Answers use the run's `generation:` settings (the ones every command uses).

Writes RUN/eval_quality.json, RUN/predictions.jsonl, RUN/bench.json, RUN/compare.{json,md,html},
RUN/README.md + RUN/report.html (`medlora report`), and the `quality` section of docs/benchmarks.md.
Every figure in that section is read from those files. The same numbers come from the CLI:

    medlora eval --model smollm2-135m-instruct --adapter runs/demo --data runs/demo/data \\
        --split test --limit 32 --max-new-tokens 96 --metrics loss,rouge,f1,similarity \\
        --compare-base --out runs/demo/eval_quality.json
    medlora bench --model smollm2-135m-instruct --adapter runs/demo --tasks pubmedqa \\
        --limit 100 --compare-base --out pubmedqa.json  # then mmlu_medical,mmlu_medical_continuation
    medlora compare --model smollm2-135m-instruct --adapter runs/demo --from-split test --n 6 \\
        --max-new-tokens 96
    medlora report runs/demo --eval runs/demo/eval_quality.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.evaluate.heldout import run_recipe  # noqa: E402
from medlora.evaluate.multiple_choice import BenchOptions, run_bench  # noqa: E402
from medlora.evaluate.panels import loss_base_vs_tuned  # noqa: E402
from medlora.evaluate.quality import evaluate_answers  # noqa: E402
from medlora.evaluate.unseen import unseen_records  # noqa: E402
from medlora.models import load_with_adapter  # noqa: E402
from medlora.report.card import write_report  # noqa: E402
from medlora.report.compare import run_compare  # noqa: E402
from medlora.report.facts import ReportOptions  # noqa: E402
from medlora.report.format import fmt, fmt_ci  # noqa: E402
from medlora.report.panels import panels_markdown, quality_table, transfer_sentence  # noqa: E402
from medlora.results import (  # noqa: E402
    BenchItem,
    BenchResult,
    EvalResult,
    QualityResult,
    TaskScores,
    read_optional,
    write_result,
)


def bench_table(tasks: dict[str, TaskScores]) -> str:
    lines = [
        "| task | n | chance | base acc (95% CI) | tuned acc (95% CI) | difference (paired) "
        "| base acc_norm | tuned acc_norm |",
        "|---|---:|---:|---|---|---|---:|---:|",
    ]
    for name, t in tasks.items():
        lines.append(
            f"| {name} | {t.n} | {fmt(t.chance)} | {fmt_ci(t.base_acc_ci)} | "
            f"{fmt_ci(t.acc_ci)} | {fmt_ci(t.diff_acc, signed=True)} | "
            f"{fmt(t.base_acc_norm)} | {fmt(t.acc_norm)} |"
        )
    for name, t in tasks.items():
        if len(t.subjects) > 1:
            lines += [
                "",
                f"{name} per subject:",
                "",
                "| subject | n | chance | base acc | tuned acc |",
                "|---|---:|---:|---:|---:|",
            ]
            for subject, s in t.subjects.items():
                lines.append(
                    f"| {subject} | {s.n} | {fmt(s.chance)} | {fmt(s.base_acc)} | {fmt(s.acc)} |"
                )
            lines.append(
                f"| macro average | {t.n} | {fmt(t.chance)} | "
                f"{fmt(t.base_macro_acc)} | {fmt(t.macro_acc)} |"
            )
    return "\n".join(lines)


def prediction_spread(items: dict[str, list[BenchItem]]) -> str:
    """How often each model picks its most frequent option: a model that always answers "A" scores
    the share of A answers, whatever it knows."""
    lines = []
    for task, rows in items.items():
        parts = []
        for label, scores in (
            ("base", [r.base_loglikelihoods or [] for r in rows]),
            ("tuned", [r.loglikelihoods for r in rows]),
        ):
            picks = [max(range(len(ll)), key=ll.__getitem__) for ll in scores]
            top = max(set(picks), key=picks.count)
            parts.append(f"{label} picks option {top + 1} in {picks.count(top)} of {len(picks)}")
        gold = [r.answer for r in rows]
        share = max(gold.count(i) for i in set(gold))
        lines.append(
            f"- {task}: {'; '.join(parts)} (most common correct option: {share} of {len(gold)})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--questions", type=int, default=100, help="unseen-source questions")
    parser.add_argument("--pubmedqa-limit", type=int, default=100)
    parser.add_argument("--mmlu-limit", type=int, default=None, help="default: all val questions")
    parser.add_argument("--compare-n", type=int, default=6)
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="answer the unseen sources again even when RUN/eval.json holds both panels",
    )
    # One thread by default: on a shared 2-core machine two torch threads spin against other
    # processes and decoding ran 12x slower (88 s vs 7 s for 8 answers of 32 tokens).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    recipe = run_recipe(run)
    spec = recipe.model.name
    data_dir = Path(os.environ["MEDLORA_DATA_DIR"]).resolve()
    timings: dict[str, float] = {}

    started = time.perf_counter()
    loaded = load_with_adapter(spec, run, recipe.model.dtype)
    # A demo run's eval.json already holds both panels (same settings): read, not regenerated.
    quality_out = run / "eval.json"
    result = read_optional(quality_out, EvalResult)
    if result is None or result.unseen is None or args.regenerate:
        quality_out = run / "eval_quality.json"
        recipe.eval.max_examples = args.questions
        if not recipe.eval.unseen_sources:
            recipe.eval.unseen_sources = ["medquad:7_SeniorHealth_QA", "medquad:9_CDC_QA"]
        records, specs = unseen_records(recipe)
        losses = loss_base_vs_tuned(*loaded, records, recipe)
        quality = evaluate_answers(
            *loaded,
            records,
            recipe.data.system_prompt,
            ["rouge", "f1", "similarity", "repetition", "echo", "length"],
            recipe.generation,
            recipe.eval.batch_size,
            compare_base=True,
            predictions_path=run / "predictions.jsonl",
            seed=recipe.data.seed,
        )
        result = EvalResult.model_validate(
            {"model": spec, "adapter": str(run), "data": specs, "split": "all", **losses}
            | {"quality": quality}
        )
        write_result(quality_out, result)
        timings["unseen-source loss + answers (base and tuned)"] = time.perf_counter() - started

    started = time.perf_counter()
    pubmedqa = run_bench(
        BenchOptions(
            model=spec,
            adapter=run,
            tasks=["pubmedqa"],
            data=[f"pubmedqa:{data_dir / 'pubmedqa' / 'pqal_dev.json'}"],
            limit=args.pubmedqa_limit,
            compare_base=True,
        ),
        model_and_tokenizer=loaded,
    )
    mmlu = run_bench(
        BenchOptions(
            model=spec,
            adapter=run,
            tasks=["mmlu_medical", "mmlu_medical_continuation"],
            data=[f"mmlu:{data_dir / 'mmlu_medical'}"],
            limit=args.mmlu_limit,
            compare_base=True,
        ),
        model_and_tokenizer=loaded,
    )
    bench: BenchResult = pubmedqa.model_copy(
        update={
            "tasks": pubmedqa.tasks | mmlu.tasks,
            "items": pubmedqa.items | mmlu.items,
            "limit": {"pubmedqa": args.pubmedqa_limit, "mmlu": args.mmlu_limit},
        }
    )
    write_result(run / "bench.json", bench)
    timings["benchmarks (base and tuned)"] = time.perf_counter() - started

    started = time.perf_counter()
    run_compare(
        spec,
        run,
        from_split="test",
        n=args.compare_n,
        model_and_tokenizer=loaded,
    )
    timings["side-by-side answers"] = time.perf_counter() - started
    write_report(run, ReportOptions(eval_path=quality_out))

    test_panel = result.test_panel()
    if result.unseen is not None and test_panel is not None:
        answers = (
            "### Answers: held-out topics and sources never trained on (the run's eval.json)\n\n"
            + "\n".join(panels_markdown([test_panel, result.unseen]))
            + "\n\n"
            + transfer_sentence(test_panel, result.unseen)
        )
    else:
        q: QualityResult = result.quality
        assert q is not None
        names = ", ".join(
            Path(d).name for d in ([result.data] if isinstance(result.data, str) else result.data)
        )
        answers = f"""### Answers on sources never trained on ({q.examples} questions of {names})

{q.decoding.capitalize()} decoding with the training chat template and the run's `generation:`
settings ({", ".join(f"{k}={v}" for k, v in q.generation.items())}); empty answers: base
{q.base_empty_predictions}, tuned {q.empty_predictions}. Answer-token loss on the same
questions: base {fmt(result.base_loss, 4)} → tuned {fmt(result.loss, 4)}
({result.loss_change_pct:+.1f} %).

{chr(10).join(quality_table(q))}"""
    command = " ".join(["python", "bench/quality.py", *sys.argv[1:]])
    body = f"""## Quality: is the demo adapter a better medical model than its base?

Command: `{command}` (run `{run}`, base `{spec}`, {os.cpu_count()} CPU cores,
{args.threads} torch thread(s), {platform.machine()}, torch {torch.__version__}). Base and tuned are the same loaded
model with the LoRA adapter switched off and on; every interval is a 95% percentile bootstrap over
questions (2,000 resamples), and differences are paired (same questions, resampled together).
Files: `{quality_out}`, `{run}/bench.json`,
`{run}/compare.md`, model card `{run}/README.md`, `{run}/report.html`.

{answers}

### Medical multiple choice ({bench.engine})

Zero-shot, raw harness prompts (no chat template). PubMedQA: a seeded sample of {args.pubmedqa_limit}
of the 500 PQA-L dev items; MMLU: the medical subjects' `val` files
({"all" if args.mmlu_limit is None else args.mmlu_limit} questions), in the harness's letter format
(`mmlu_medical`) and in its cloze format, which scores each option's text
(`mmlu_medical_continuation`).

{bench_table(bench.tasks)}

Most frequent prediction per task (a constant answer scores the share of that option):

{prediction_spread(bench.items)}

Wall time on this machine: {"; ".join(f"{k} {v:.0f} s" for k, v in timings.items())}.
"""
    print(body)
    update_section("quality", body)


if __name__ == "__main__":
    main()
