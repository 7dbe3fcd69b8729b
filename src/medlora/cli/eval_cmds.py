"""`medlora eval`, `bench`, `compare` and `report`: base vs tuned, and the pages that show it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlora.cli.app import (
    AdapterOption,
    ColumnMapOption,
    _quiet_libraries,
    app,
    console,
    parse_map,
    user_errors,
)
from medlora.errors import ConfigError
from medlora.results import EvalResult, JudgeResult, QualityResult, write_result

if TYPE_CHECKING:
    from medlora.evaluate.heldout import EvalOptions
    from medlora.evaluate.judge import JudgeOptions

# Options that several commands share (each command names its own --out help).
CompareBase = Annotated[
    bool, typer.Option("--compare-base", help="Also score the base model in the same run.")
]
MaxNewTokens = Annotated[
    int | None, typer.Option("--max-new-tokens", help="Longest generated answer.")
]
BatchSize = Annotated[int, typer.Option("--batch-size")]

# `medlora eval --judge …`: the judge's options.
JudgeUrl = Annotated[
    str | None,
    typer.Option(
        "--judge",
        help="Judge the answers with a model behind this OpenAI-compatible URL (vLLM, a hosted "
        "API, medlora serve): pairwise tuned vs base in both orders, reference facts.",
    ),
]
JudgeModel = Annotated[
    str | None, typer.Option("--judge-model", help="The judge's model name at --judge.")
]
JudgeKeyEnv = Annotated[
    str, typer.Option("--judge-key-env", help="Environment variable holding the judge's key.")
]
JudgePredictions = Annotated[
    Path | None,
    typer.Option(
        "--judge-predictions",
        help="Judge this predictions JSONL instead of generating answers (no --model/--data).",
    ),
]
JudgeRubric = Annotated[
    Path | None,
    typer.Option(
        "--judge-rubric",
        help='Also score a rubric JSONL: {"question": …, "items": [{"text": …, "points": 5}]}.',
    ),
]
JudgeFacts = Annotated[
    int,
    typer.Option("--judge-facts", min=0, help="Reference statements checked per answer (0: none)."),
]


def _out(help: str) -> Any:
    return typer.Option("--out", "-o", help=help)


@app.command("eval")
@user_errors
def eval_cmd(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model spec (Hub id, folder, .gguf, alias).")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="KIND:PATH or a prepared folder.")
    ] = None,
    adapter: AdapterOption = None,
    split: Annotated[str, typer.Option("--split", help="test | validation | train | all")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", help="Score at most N examples.")] = None,
    compare_base: CompareBase = False,
    out: Annotated[Path | None, _out("Write results JSON here.")] = None,
    column_map: ColumnMapOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", help="Comma-separated: loss, rouge, f1, similarity.")
    ] = "loss",
    max_new_tokens: MaxNewTokens = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help="Per-example answers (default: beside --out)."),
    ] = None,
    unseen: Annotated[
        bool,
        typer.Option(
            "--unseen/--no-unseen",
            help="With --compare-base: also score the run's eval.unseen_sources (second panel).",
        ),
    ] = True,
    judge: JudgeUrl = None,
    judge_model: JudgeModel = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    judge_predictions: JudgePredictions = None,
    judge_rubric: JudgeRubric = None,
    judge_facts: JudgeFacts = 8,
) -> None:
    """Held-out scores: answer-only loss and perplexity; with --metrics also generated-answer
    quality (ROUGE-L, token F1, MiniLM similarity) with 95% bootstrap confidence intervals."""
    _quiet_libraries()
    from medlora.evaluate.heldout import EvalOptions
    from medlora.evaluate.quality import parse_metrics

    judging = _judge_options(
        judge, judge_model, judge_key_env, judge_rubric, judge_facts, judge_predictions
    )
    if judging is not None and judge_predictions is not None:
        _judge_file(judge_predictions, judging, out)
        return
    if model is None or data is None:
        raise ConfigError("add --model SPEC and --data DATA (or --judge-predictions FILE to judge)")
    if compare_base and adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    # The options EvalOptions has, by the same names; the --judge* ones went to `judging`.
    fields = {key: ctx.params[key] for key in EvalOptions.model_fields}
    fields |= {"column_map": parse_map(column_map) or None, "metrics": parse_metrics(metrics)}
    options = EvalOptions(**fields)
    _print_eval(_score(options, judging))
    if out:
        console.print(f"wrote {out}")


def _judge_options(
    url: str | None,
    model: str | None,
    key_env: str,
    rubric: Path | None,
    facts: int,
    predictions: Path | None,
) -> JudgeOptions | None:
    """`--judge URL --judge-model NAME` as options for the judge (None: no judging asked)."""
    from medlora.evaluate.judge import JudgeOptions

    if not (url or model or predictions):
        return None
    if not (url and model):
        raise ConfigError("--judge URL and --judge-model NAME go together")
    return JudgeOptions(url=url, model=model, key_env=key_env, rubric=rubric, max_statements=facts)


def _score(options: EvalOptions, judging: JudgeOptions | None) -> EvalResult:
    """The eval's scores and, with a judge, its verdicts (a dead judge fails before any answer)."""
    from medlora.evaluate.judge import check_judge, judge_eval
    from medlora.evaluate.unseen import evaluate_run

    if judging is not None:
        check_judge(judging, options.metrics)
    with console.status("scoring…"):
        result = evaluate_run(options)
    return result if judging is None else judge_eval(result, judging, options.out)


def _judge_file(path: Path, judging: JudgeOptions, out: Path | None) -> None:
    """`--judge-predictions FILE`: judge answers already written, no model loaded."""
    from medlora.evaluate.judge import judge_predictions

    judged = judge_predictions(path, judging)
    _print_judge(judged)
    if out:
        write_result(out, judged)
        console.print(f"wrote {out}")


def _print_eval(result: EvalResult) -> None:
    from medlora.report.format import fmt_ci

    if result.loss is not None:
        line = f"{result.examples} examples, {result.answer_tokens} answer tokens: "
        line += f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}"
        if result.base_loss is not None:
            line += (
                f"   base loss {result.base_loss:.4f}  base perplexity {result.base_perplexity:.2f}"
            )
            line += f"   change {result.loss_change:+.4f}"
        console.print(line)
        if result.example_loss_change is not None:
            change = fmt_ci(result.example_loss_change, 4, signed=True)
            console.print(f"mean per-example loss change, tuned − base [95% CI]: {change}")
    if result.quality is not None:
        _print_quality(result.quality)
    test_panel = result.test_panel()
    if test_panel is not None and result.unseen is not None:
        from medlora.report.panels import panels_markdown, transfer_sentence

        console.print("\nBoth panels:", highlight=False)
        for line in panels_markdown([test_panel, result.unseen]):
            console.print(line, markup=False, highlight=False)
        console.print(transfer_sentence(test_panel, result.unseen), markup=False)
    if result.judge is not None:
        _print_judge(result.judge)


def _print_judge(judged: JudgeResult) -> None:
    from medlora.report.judge import judge_markdown

    console.print()
    for line in judge_markdown(judged):
        console.print(line, markup=False, highlight=False)


def _print_quality(quality: QualityResult) -> None:
    from medlora.report.format import fmt_ci, metric_verdict

    console.print(
        f"{quality.examples} answers ({quality.decoding}, ≤{quality.max_new_tokens} new "
        f"tokens, {quality.empty_predictions} empty); mean [95% CI]:"
    )
    for name, entry in quality.metrics.items():
        line = f"  {name:<11} {fmt_ci(entry.model)}"
        if entry.base is not None:
            line += f"   base {fmt_ci(entry.base)}   difference {fmt_ci(entry.diff, signed=True)}"
            line += f" ({metric_verdict(name, entry.diff)})"
        console.print(line)
    if quality.predictions:
        console.print(f"answers: {quality.predictions}")


@app.command("bench")
@user_errors
def bench_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec.")],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="pubmedqa, mmlu_medical, mmlu_medical_continuation, mmlu, medmcqa, medqa",
        ),
    ] = "pubmedqa,mmlu_medical",
    adapter: AdapterOption = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="KIND:PATH (repeatable): pubmedqa:FILE, mmlu:DIR, medmcqa:FILE, medqa:FILE "
            "(default: under $MEDLORA_DATA_DIR).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most N questions per task.")
    ] = None,
    shots: Annotated[int, typer.Option("--shots", help="Few-shot exemplars (0: zero-shot).")] = 0,
    compare_base: CompareBase = False,
    out: Annotated[Path | None, _out("Results JSON.")] = None,
    batch_size: BatchSize = 8,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap prompts in the chat template (default: raw).")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a bad row.")] = False,
) -> None:
    """Multiple-choice medical benchmarks scored by option log-likelihood (lm-evaluation-harness)."""
    _quiet_libraries()
    from medlora.evaluate.multiple_choice import BenchOptions, run_bench
    from medlora.report.format import fmt, fmt_ci

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    options = BenchOptions(**{**ctx.params, "tasks": task_list, "data": data or []})
    result = run_bench(options, progress=console.print)
    for task, r in result.tasks.items():
        line = f"{task}: n={r.n}  acc {fmt_ci(r.acc_ci)}  acc_norm {fmt(r.acc_norm)}"
        line += f"  chance {fmt(r.chance)}"
        if r.base_acc is not None:
            line += f"  | base acc {fmt(r.base_acc)}  acc_norm {fmt(r.base_acc_norm)}"
            line += f"  | difference {fmt_ci(r.diff_acc, signed=True)}"
        console.print(line)
        if len(r.subjects) > 1:
            for subject, s in r.subjects.items():
                base = f"  base {fmt(s.base_acc)}" if s.base_acc is not None else ""
                console.print(
                    f"  {subject:<22} n={s.n:<4} acc {fmt(s.acc)}{base}  chance {fmt(s.chance)}"
                )
            console.print(f"  {'macro average':<22} acc {fmt(r.macro_acc)}  chance {fmt(r.chance)}")
        if r.skipped:
            console.print(f"  skipped rows: {r.skipped}")
    if out:
        console.print(f"wrote {out}")


@app.command("compare")
@user_errors
def compare_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model spec.")],
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Run directory.")],
    questions: Annotated[
        Path | None, typer.Option("--questions", help=".txt/.jsonl/.json/.csv of questions.")
    ] = None,
    from_split: Annotated[
        str | None, typer.Option("--from-split", help="Take questions from the run's split.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many questions.")] = 20,
    out: Annotated[Path | None, _out("Folder for compare.* (default: the run).")] = None,
    max_new_tokens: MaxNewTokens = None,
    batch_size: BatchSize = 4,
) -> None:
    """Base vs fine-tuned answers side by side: compare.html, compare.md, compare.json."""
    _quiet_libraries()
    from medlora.report.compare import run_compare
    from medlora.report.format import fmt_ci

    with console.status("answering with both models…"):
        result = run_compare(
            model, adapter, questions, from_split, n, out, max_new_tokens, batch_size
        )
    for name, m in result.metrics.items():
        console.print(
            f"{name}: base {fmt_ci(m.base)}  fine-tuned {fmt_ci(m.model)}  "
            f"difference {fmt_ci(m.diff, signed=True)}"
        )
    console.print("wrote " + ", ".join(result.files.values()))


@app.command("report")
@user_errors
def report_cmd(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    eval_path: Annotated[
        Path | None, typer.Option("--eval", help="Eval JSON (default RUN/eval.json).")
    ] = None,
    bench_path: Annotated[
        Path | None, typer.Option("--bench", help="Bench JSON (default RUN/bench.json).")
    ] = None,
    compare_path: Annotated[
        Path | None, typer.Option("--compare", help="compare.json (default RUN/compare.json).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Hub id of the base for the card.")
    ] = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub repo the adapter will live in.")
    ] = None,
    license: Annotated[str | None, typer.Option("--license", help="Card licence id.")] = None,
) -> None:
    """report.html (self-contained) and a Hub-ready README.md model card, from the run's files."""
    from medlora.report.card import write_report
    from medlora.report.facts import ReportOptions

    options = {key: value for key, value in ctx.params.items() if key != "run_dir"}
    paths = write_report(run_dir, ReportOptions(**options))
    console.print(f"wrote {paths['card']} and {paths['html']}")
