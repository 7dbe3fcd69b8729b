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


def summarize(
    rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None = None, seed: int = 0
) -> TaskScores:
    """Accuracy, length-normalised accuracy, chance level, per subject and macro; base and paired CI."""
    from medlora.evaluate.quality import bootstrap_ci, paired_bootstrap_ci

    result: dict[str, Any] = {
        "acc": _mean([r["acc"] for r in rows]),
        "acc_norm": _mean([r["acc_norm"] for r in rows]),
        "n": len(rows),
        "chance": _mean([1.0 / r["n_options"] for r in rows]),
        "acc_ci": bootstrap_ci([r["acc"] for r in rows], seed=seed),
        "acc_norm_ci": bootstrap_ci([r["acc_norm"] for r in rows], seed=seed),
    }
    subjects: dict[str, dict[str, Any]] = {}
    for subject in sorted({r["subject"] for r in rows}):
        mine = [i for i, r in enumerate(rows) if r["subject"] == subject]
        entry = {
            "acc": _mean([rows[i]["acc"] for i in mine]),
            "acc_norm": _mean([rows[i]["acc_norm"] for i in mine]),
            "n": len(mine),
            "chance": _mean([1.0 / rows[i]["n_options"] for i in mine]),
        }
        if base_rows is not None:
            entry["base_acc"] = _mean([base_rows[i]["acc"] for i in mine])
            entry["base_acc_norm"] = _mean([base_rows[i]["acc_norm"] for i in mine])
        subjects[subject] = entry
    result["macro_acc"] = _mean([s["acc"] for s in subjects.values()])
    result["macro_acc_norm"] = _mean([s["acc_norm"] for s in subjects.values()])
    result["subjects"] = subjects
    if base_rows is not None:
        if [r["id"] for r in base_rows] != [r["id"] for r in rows]:
            raise AssertionError("base and tuned rows must be the same items in the same order")
        result["base_acc"] = _mean([r["acc"] for r in base_rows])
        result["base_acc_norm"] = _mean([r["acc_norm"] for r in base_rows])
        result["base_acc_ci"] = bootstrap_ci([r["acc"] for r in base_rows], seed=seed)
        result["base_macro_acc"] = _mean([s["base_acc"] for s in subjects.values()])
        for key in ("acc", "acc_norm"):
            result[f"diff_{key}"] = paired_bootstrap_ci(
                [r[key] for r in rows], [r[key] for r in base_rows], seed=seed
            )
    return TaskScores.model_validate(result)


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    data: Sequence[str] = (),
    limit: int | None = None,
    shots: int = 0,
    compare_base: bool = False,
    batch_size: int = 8,
    strict: bool = False,
    chat: bool = False,
    system_prompt: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Score every task (and the base model with the adapter switched off, when asked)."""
    by_kind: dict[str, str] = {}
    for spec in data:
        kind = spec.partition(":")[0]
        if kind not in KINDS:
            raise DataError(
                f"--data {spec!r}: KIND must be one of {', '.join(KINDS)} (e.g. mmlu:DIR)"
            )
        by_kind[kind] = spec
    unused = set(by_kind) - {TASKS[t][0] for t in tasks if t in TASKS}
    if unused:
        raise DataError(
            f"--data {by_kind[sorted(unused)[0]]!r} is for no task in --tasks {','.join(tasks)}; "
            "add its task or drop it"
        )
    if shots < 0:
        raise ConfigError(f"--shots {shots}: give 0 (zero-shot) or more exemplars")
    scores: dict[str, TaskScores] = {}
    items_out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        bench = load_benchmark(task, by_kind.get(TASKS.get(task, ("",))[0]), strict)
        items = sample_records(bench.items, limit, seed)
        units = task_units(bench, items, shots)
        if progress:
            progress(f"{task}: {len(items)} questions, {shots}-shot")
        base_rows = None
        if compare_base:  # the base first, then the adapter folded in for speed
            with adapter_disabled(model):
                base_rows = score_items(model, tokenizer, units, batch_size, chat, system_prompt)
        with adapter_merged(model):
            rows = score_items(model, tokenizer, units, batch_size, chat, system_prompt)
        summary = summarize(rows, base_rows, seed)
        summary.data = bench.report.source
        summary.skipped = bench.report.skipped
        summary.notes = bench.report.warnings
        scores[task] = summary
        items_out[task] = [
            r
            | (
                {
                    "base_acc": b["acc"],
                    "base_acc_norm": b["acc_norm"],
                    "base_loglikelihoods": b["loglikelihoods"],
                }
                if b
                else {}
            )
            for r, b in zip(rows, base_rows or [None] * len(rows), strict=True)
        ]
    return BenchResult.model_validate(
        {
            "shots": shots,
            "limit": limit,
            "engine": _engine_name(),
            "tasks": scores,
            "items": items_out,
        }
    )


def _engine_name() -> str:
    from importlib.metadata import version

    return f"lm-evaluation-harness {version('lm_eval')} (log-likelihood of each option)"


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


def run_bench(
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> BenchResult:
    """`medlora bench`: load the model (with its adapter) once, score every task, write --out."""
    from medlora.evaluate.heldout import load_eval_model, run_recipe

    o = options
    if o.compare_base and o.adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    for task in o.tasks:  # fail on a typo before minutes of model loading
        if task not in TASKS:
            raise ConfigError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    recipe = run_recipe(o.adapter)
    model, tokenizer = load_eval_model(o.model, o.adapter, recipe, model_and_tokenizer)
    result = run_benchmarks(
        model,
        tokenizer,
        o.tasks,
        o.data,
        o.limit,
        o.shots,
        o.compare_base,
        o.batch_size,
        o.strict,
        o.chat,
        recipe.data.system_prompt,
        recipe.data.seed,
        progress,
    )
    adapter = str(o.adapter) if o.adapter else None
    result = result.model_copy(update={"model": o.model, "adapter": adapter})
    if o.out is not None:
        write_result(o.out, result)
    return result
