"""`medlora bench`: score base and tuned on the multiple-choice sets and summarize the difference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medlora.data.sample import sample_records
from medlora.errors import ConfigError, DataError
from medlora.evaluate.generate import adapter_disabled, adapter_merged
from medlora.evaluate.harness import score_items, task_units
from medlora.evaluate.multiple_choice_sets import KINDS, TASKS, load_benchmark
from medlora.results import BenchResult, TaskScores, write_result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, length-normalised accuracy, count and chance level of some scored items."""
    return {
        "acc": _mean([r["acc"] for r in rows]),
        "acc_norm": _mean([r["acc_norm"] for r in rows]),
        "n": len(rows),
        "chance": _mean([1.0 / r["n_options"] for r in rows]),
    }


def summarize(
    rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None = None, seed: int = 0
) -> TaskScores:
    """Accuracy, length-normalised accuracy, chance level, per subject and macro; base and paired CI."""
    from medlora.evaluate.quality import bootstrap_ci, paired_bootstrap_ci

    if base_rows is not None and [r["id"] for r in base_rows] != [r["id"] for r in rows]:
        raise AssertionError("base and tuned rows must be the same items in the same order")
    result = _accuracy(rows) | {
        "acc_ci": bootstrap_ci([r["acc"] for r in rows], seed=seed),
        "acc_norm_ci": bootstrap_ci([r["acc_norm"] for r in rows], seed=seed),
    }
    subjects: dict[str, dict[str, Any]] = {}
    for subject in sorted({r["subject"] for r in rows}):
        mine = [i for i, r in enumerate(rows) if r["subject"] == subject]
        subjects[subject] = _accuracy([rows[i] for i in mine])
        if base_rows is not None:
            base = _accuracy([base_rows[i] for i in mine])
            subjects[subject] |= {"base_acc": base["acc"], "base_acc_norm": base["acc_norm"]}
    result["macro_acc"] = _mean([s["acc"] for s in subjects.values()])
    result["macro_acc_norm"] = _mean([s["acc_norm"] for s in subjects.values()])
    result["subjects"] = subjects
    if base_rows is not None:
        base = _accuracy(base_rows)
        result["base_acc"], result["base_acc_norm"] = base["acc"], base["acc_norm"]
        result["base_acc_ci"] = bootstrap_ci([r["acc"] for r in base_rows], seed=seed)
        result["base_macro_acc"] = _mean([s["base_acc"] for s in subjects.values()])
        for key in ("acc", "acc_norm"):
            result[f"diff_{key}"] = paired_bootstrap_ci(
                [r[key] for r in rows], [r[key] for r in base_rows], seed=seed
            )
    return TaskScores.model_validate(result)


class BenchOptions(BaseModel):
    """What `medlora bench` scores and where it writes (the CLI's options, as one object)."""

    model: str  # model spec
    tasks: list[str]  # names in TASKS
    adapter: Path | None = None  # run directory with the adapter
    data: list[str] = []  # KIND:PATH per benchmark (default: under $MEDLORA_DATA_DIR)
    limit: int | None = None  # at most this many questions per task
    shots: int = 0
    compare_base: bool = False  # also score the base model (the adapter switched off)
    out: Path | None = None  # bench.json
    batch_size: int = 8
    chat: bool = False  # wrap prompts in the chat template
    strict: bool = False  # fail on a bad row


def _data_by_kind(options: BenchOptions) -> dict[str, str]:
    """`--data` per data kind, after refusing what cannot work (before minutes of model loading)."""
    if options.compare_base and options.adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    for task in options.tasks:
        if task not in TASKS:
            raise ConfigError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    if options.shots < 0:
        raise ConfigError(f"--shots {options.shots}: give 0 (zero-shot) or more exemplars")
    by_kind = {spec.partition(":")[0]: spec for spec in options.data}
    for kind, spec in by_kind.items():
        if kind not in KINDS:
            raise DataError(
                f"--data {spec!r}: KIND must be one of {', '.join(KINDS)} (e.g. mmlu:DIR)"
            )
        if kind not in {TASKS[task][0] for task in options.tasks}:
            raise DataError(
                f"--data {spec!r} is for no task in --tasks {','.join(options.tasks)}; "
                "add its task or drop it"
            )
    return by_kind


def run_bench(
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> BenchResult:
    """`medlora bench`: load the model (with its adapter) once, score every task (and the base
    with the adapter switched off, when asked), write --out."""
    from medlora.evaluate.heldout import load_eval_model, run_recipe

    o = options
    data = _data_by_kind(o)
    recipe = run_recipe(o.adapter)
    model, tokenizer = load_eval_model(o.model, o.adapter, recipe, model_and_tokenizer)
    score_args = (o.batch_size, o.chat, recipe.data.system_prompt)
    scores: dict[str, TaskScores] = {}
    items_out: dict[str, list[dict[str, Any]]] = {}
    for task in o.tasks:
        bench = load_benchmark(task, data.get(TASKS[task][0]), o.strict)
        items = sample_records(bench.items, o.limit, recipe.data.seed)
        units = task_units(bench, items, o.shots)
        if progress:
            progress(f"{task}: {len(items)} questions, {o.shots}-shot")
        base_rows = None
        if o.compare_base:  # the base first, then the adapter folded in for speed
            with adapter_disabled(model):
                base_rows = score_items(model, tokenizer, units, *score_args)
        with adapter_merged(model):
            rows = score_items(model, tokenizer, units, *score_args)
        summary = summarize(rows, base_rows, recipe.data.seed)
        summary.data = bench.report.source
        summary.skipped = bench.report.skipped
        summary.notes = bench.report.warnings
        scores[task] = summary
        for row, base in zip(rows, base_rows or [], strict=False):
            row["base_acc"], row["base_acc_norm"] = base["acc"], base["acc_norm"]
            row["base_loglikelihoods"] = base["loglikelihoods"]
        items_out[task] = rows
    result = BenchResult.model_validate(
        {
            "model": o.model,
            "adapter": str(o.adapter) if o.adapter else None,
            "shots": o.shots,
            "limit": o.limit,
            "engine": _engine_name(),
            "tasks": scores,
            "items": items_out,
        }
    )
    if o.out is not None:
        write_result(o.out, result)
    return result


def _engine_name() -> str:
    from importlib.metadata import version

    return f"lm-evaluation-harness {version('lm_eval')} (log-likelihood of each option)"
