"""Medical multiple-choice benchmarks (PubMedQA, MMLU medical, MedMCQA, MedQA) from local files.

Scoring is lm-evaluation-harness itself (`lm_eval.evaluator.evaluate` with its `HFLM` wrapper around
the in-memory model): each option is scored by the log-likelihood of " <option>" after the prompt;
`acc` picks the highest log-likelihood, `acc_norm` the highest log-likelihood per character of the
option. The prompts are the harness's own task templates. The harness's dataset download is replaced
by our loaders (`custom_dataset`), so nothing is fetched: files are read here, bad rows are counted
and skipped (or refused with `strict`), and each subject becomes one harness task.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.data.records import SourceReport
from medlora.data.sample import sample_records
from medlora.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_CHOICES = ["yes", "no", "maybe"]
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
KINDS = ("pubmedqa", "mmlu", "medmcqa", "medqa")
# task name -> (data kind, default path under MEDLORA_DATA_DIR or None)
TASKS: dict[str, tuple[str, str | None]] = {
    "pubmedqa": ("pubmedqa", "pubmedqa/pqal_dev.json"),
    "mmlu_medical": ("mmlu", "mmlu_medical"),
    # The harness's cloze form of MMLU: the option text is scored, not its letter. Models too small
    # to follow the A-D format (SmolLM2-135M answers "A" every time) still show what they know here.
    "mmlu_medical_continuation": ("mmlu", "mmlu_medical"),
    "mmlu": ("mmlu", None),
    "medmcqa": ("medmcqa", None),
    "medqa": ("medqa", None),
}


@dataclass
class MCItem:
    """One multiple-choice question; `context` is PubMedQA's abstract."""

    id: str
    question: str
    options: list[str]
    answer_index: int
    subject: str = ""
    context: str = ""


@dataclass
class Benchmark:
    """The items of one task, its few-shot pool and what the loader skipped."""

    task: str
    kind: str
    items: list[MCItem]
    shots_pool: list[MCItem] = field(default_factory=list)
    report: SourceReport = field(default_factory=lambda: SourceReport(source=""))


# ---------------------------------------------------------------- loaders (one per file shape)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save it as UTF-8") from err


def _skip(report: SourceReport, strict: bool, where: str, reason: str) -> None:
    """Count a bad row, or refuse the file when strict; the first few are named in warnings."""
    if strict:
        raise DataError(f"{where}: {reason}; fix the row or drop --strict to skip bad rows")
    report.skip(reason.split(" (")[0])
    if len(report.warnings) < 5:
        report.warnings.append(f"{where}: {reason}")


def load_pubmedqa(path: Path, strict: bool = False) -> tuple[list[MCItem], SourceReport]:
    """PubMedQA PQA-L JSON: {pubid: {QUESTION, CONTEXTS[], final_decision ∈ yes/no/maybe}}."""
    report = SourceReport(source=f"pubmedqa:{path}")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno} is not valid JSON ({err.msg})") from err
    if isinstance(data, list):  # the same objects as a list, each with its own pubid
        data = {
            str(row.get("pubid", i)) if isinstance(row, dict) else str(i): row
            for i, row in enumerate(data)
        }
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected PubMedQA's {{pubid: {{QUESTION, CONTEXTS, final_decision}}}}"
        )
    items = []
    for pubid, row in data.items():
        where = f"{path}: item {pubid}"
        if not isinstance(row, dict):
            _skip(report, strict, where, "not a JSON object")
            continue
        question, decision = row.get("QUESTION"), str(row.get("final_decision", "")).lower()
        contexts = row.get("CONTEXTS")
        if not isinstance(question, str) or not question.strip():
            _skip(report, strict, where, "no QUESTION")
        elif decision not in PUBMEDQA_CHOICES:
            _skip(report, strict, where, f"final_decision is not yes/no/maybe ({decision!r})")
        elif not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            _skip(report, strict, where, "CONTEXTS is not a list of strings")
        else:
            items.append(
                MCItem(
                    str(pubid),
                    question.strip(),
                    list(PUBMEDQA_CHOICES),
                    PUBMEDQA_CHOICES.index(decision),
                    "pubmedqa",
                    "\n".join(contexts),
                )
            )
    report.records = len(items)
    return items, report


def _mmlu_rows(path: Path, subject: str, report: SourceReport, strict: bool) -> list[MCItem]:
    """Headerless MMLU CSV rows: question,A,B,C,D,answer."""
    items = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from err
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 6:
            _skip(
                report, strict, where, f"has {len(row)} columns (expected question,A,B,C,D,answer)"
            )
        elif row[5].strip().upper() not in LETTERS[:4]:
            _skip(report, strict, where, f"answer {row[5]!r} is not one of A, B, C, D")
        elif not row[0].strip():
            _skip(report, strict, where, "empty question")
        else:
            items.append(
                MCItem(
                    f"{subject}-{number}",
                    row[0],
                    [c.strip() for c in row[1:5]],
                    LETTERS.index(row[5].strip().upper()),
                    subject,
                )
            )
    return items


def _mmlu_files(folder: Path, split: str) -> dict[str, Path]:
    """{subject: file} for `<subject>_<split>.csv` in `folder` or in `folder/<split>/`."""
    for where in (folder / split, folder):
        files = {
            p.name.removesuffix(f"_{split}.csv"): p for p in sorted(where.glob(f"*_{split}.csv"))
        }
        if files:
            return files
    return {}


def load_mmlu(
    path: Path, strict: bool = False, subjects: Sequence[str] | None = None
) -> tuple[list[MCItem], list[MCItem], SourceReport]:
    """MMLU's CSV layout: evaluate `test/` when present, else `val/`; few-shot exemplars from `dev/`."""
    report = SourceReport(source=f"mmlu:{path}")
    if not path.is_dir():
        raise DataError(
            f"mmlu:{path}: folder not found; give the folder that holds dev/ and val/ or test/"
        )
    split = next((s for s in ("test", "val") if _mmlu_files(path, s)), None)
    if split is None:
        raise DataError(f"mmlu:{path}: no <subject>_test.csv or <subject>_val.csv files found")
    files = _mmlu_files(path, split)
    wanted = set(subjects) if subjects is not None else set(files)
    if subjects is not None and not wanted & set(files):
        raise DataError(
            f"mmlu:{path}: none of the subjects {', '.join(sorted(wanted))} has a {split} file"
        )
    items: list[MCItem] = []
    shots: list[MCItem] = []
    dev_files = _mmlu_files(path.parent if path.name == split else path, "dev")
    for subject in sorted(wanted & set(files)):
        items += _mmlu_rows(files[subject], subject, report, strict)
        if subject in dev_files:
            shots += _mmlu_rows(dev_files[subject], subject, report, strict)
    report.records = len(items)
    report.warnings.insert(0, f"evaluated split: {split}")
    return items, shots, report


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                yield number, None


def _cop_offset(path: Path, rows: list[tuple[int, Any]]) -> int:
    """MedMCQA's `cop` is 1-4 in the authors' release and 0-3 in the Hub copy: tell from the file."""
    values = {
        r.get("cop") for _, r in rows if isinstance(r, dict) and isinstance(r.get("cop"), int)
    }
    if 0 in values and 4 in values:
        raise DataError(
            f"{path}: 'cop' holds both 0 and 4; use 1-4 (authors' files) or 0-3 throughout"
        )
    if 0 in values:
        return 0
    if 4 in values or not values:
        return 1
    raise DataError(
        f"{path}: cannot tell whether 'cop' counts from 0 or 1 (only 1-3 seen); add rows"
    )


def load_medmcqa(path: Path, strict: bool = False) -> tuple[list[MCItem], SourceReport]:
    """MedMCQA JSONL: question, opa, opb, opc, opd, cop (correct option), subject_name."""
    report = SourceReport(source=f"medmcqa:{path}")
    rows = list(_jsonl_rows(path))
    offset = _cop_offset(path, rows)
    items = []
    for number, row in rows:
        where = f"{path}: line {number}"
        if not isinstance(row, dict):
            _skip(report, strict, where, "not a JSON object")
            continue
        options = [row.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        if not isinstance(row.get("question"), str) or not all(isinstance(o, str) for o in options):
            _skip(report, strict, where, "missing question or one of opa/opb/opc/opd")
        elif not isinstance(cop, int) or not 0 <= cop - offset < 4:
            _skip(report, strict, where, f"cop {cop!r} is not a valid option number")
        else:
            items.append(
                MCItem(
                    str(row.get("id", number)),
                    row["question"],
                    options,
                    cop - offset,
                    str(row.get("subject_name") or "medmcqa"),
                )
            )
    report.records = len(items)
    return items, report


def _medqa_item(row: dict[str, Any], number: int) -> MCItem | str:
    """Either MedQA shape, or the reason the row is unusable."""
    if "sent1" in row:  # the Hub's 4-option copy: sent1, ending0..3, label
        options = [row.get(f"ending{i}") for i in range(4)]
        question, answer = row.get("sent1"), row.get("label")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            return f"label {answer!r} is not 0-3"
    else:  # the authors' JSONL: question, options {A: …}, answer_idx
        raw = row.get("options")
        if not isinstance(raw, dict) or not raw:
            return "no options object"
        keys = sorted(raw)
        options, question = [raw[k] for k in keys], row.get("question")
        if row.get("answer_idx") not in keys:
            return f"answer_idx {row.get('answer_idx')!r} is not one of {', '.join(keys)}"
        answer = keys.index(row["answer_idx"])
    if not isinstance(question, str) or not all(isinstance(o, str) for o in options):
        return "missing question or option text"
    return MCItem(str(row.get("id", number)), question, options, answer, "medqa")


def load_medqa(path: Path, strict: bool = False) -> tuple[list[MCItem], SourceReport]:
    """MedQA JSONL, authors' shape (question, options, answer_idx) or the Hub's (sent1, ending0-3, label)."""
    report = SourceReport(source=f"medqa:{path}")
    items = []
    for number, row in _jsonl_rows(path):
        item = _medqa_item(row, number) if isinstance(row, dict) else "not a JSON object"
        if isinstance(item, str):
            _skip(report, strict, f"{path}: line {number}", item)
        else:
            items.append(item)
    report.records = len(items)
    return items, report


def default_data(task: str) -> str | None:
    """`KIND:PATH` of the task's file in $MEDLORA_DATA_DIR, when that is set and holds it."""
    kind, relative = TASKS[task]
    root = os.environ.get("MEDLORA_DATA_DIR")
    if relative and root and (Path(root) / relative).exists():
        return f"{kind}:{Path(root) / relative}"
    return None


def load_benchmark(task: str, data: str | None, strict: bool = False) -> Benchmark:
    """Items of `task` from `data` (KIND:PATH); `mmlu_medical` keeps the six medical subjects."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    kind = TASKS[task][0]
    data = data or default_data(task)
    if data is None:
        raise DataError(f"task {task} needs its file: add --data {kind}:PATH")
    given, _, raw = data.partition(":")
    if given != kind or not raw:
        raise DataError(f"--data {data!r} does not fit task {task}: write {kind}:PATH")
    path = Path(os.path.expanduser(os.path.expandvars(raw)))
    if kind == "mmlu":
        subjects = MMLU_MEDICAL if task.startswith("mmlu_medical") else None
        items, shots, report = load_mmlu(path, strict, subjects)
    else:
        loader = {"pubmedqa": load_pubmedqa, "medmcqa": load_medmcqa, "medqa": load_medqa}[kind]
        items, report = loader(path, strict)
        shots = items  # no dev file: `task_units` takes the exemplars from this file itself
    if not items:
        raise DataError(f"{data}: no usable question ({report.skipped or 'file is empty'})")
    return Benchmark(task, kind, items, shots, report)


# ---------------------------------------------------------------- prompts (the harness's templates)


def _letters(item: MCItem) -> str:
    return "".join(f"{LETTERS[i]}. {option}\n" for i, option in enumerate(item.options))


def prompt_of(kind: str, item: MCItem) -> str:
    """The harness's doc_to_text for each task family."""
    if kind == "mmlu_continuation":
        return f"Question: {item.question.strip()}\nAnswer:"
    if kind == "pubmedqa":
        return f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"
    if kind == "mmlu":
        return f"{item.question.strip()}\n{_letters(item)}Answer:"
    if kind == "medmcqa":
        return f"Question: {item.question}\nChoices:\n{_letters(item)}Answer:"
    return f"Question: {item.question}\n{_letters(item)}Answer:"


def choices_of(kind: str, item: MCItem) -> list[str]:
    """What is scored after the prompt: the option text (PubMedQA, cloze MMLU) or its letter."""
    if kind in ("pubmedqa", "mmlu_continuation"):
        return list(item.options)
    return list(LETTERS[: len(item.options)])


def _doc(kind: str, item: MCItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "subject": item.subject,
        "text": prompt_of(kind, item),
        "choices": choices_of(kind, item),
        "answer": item.answer_index,
    }


def harness_task(
    name: str,
    kind: str,
    items: Sequence[MCItem],
    shots_pool: Sequence[MCItem],
    shots: int,
    description: str = "",
) -> Any:
    """One lm-eval `ConfigurableTask` over in-memory docs (no download, no dataset cache)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    docs = [_doc(kind, item) for item in items]
    pool = [_doc(kind, item) for item in shots_pool]

    def dataset(**_: Any) -> dict[str, Any]:
        splits = {"test": datasets.Dataset.from_list(docs)}
        if pool:
            splits["dev"] = datasets.Dataset.from_list(pool)
        return splits

    config: dict[str, Any] = {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "text",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "description": description,
        "num_fewshot": shots,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    if shots:
        config["fewshot_split"] = "dev"
        config["fewshot_config"] = {"sampler": "first_n"}  # the harness's MMLU setting
    with _quiet_harness():
        return ConfigurableTask(config=config)


@contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs a warning per custom task and per wrapped model: keep them off the terminal."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "lm_eval.api.task", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def task_units(bench: Benchmark, items: list[MCItem], shots: int) -> dict[str, Any]:
    """One harness task per subject (MMLU's own split); the other benchmarks are one task each."""
    if bench.kind != "mmlu":
        if bench.shots_pool is bench.items:
            # Exemplars from the evaluated file itself (PubMedQA): the first k items, never scored.
            exemplars = bench.items[:shots]
            items = [item for item in items if item not in exemplars]
        else:
            exemplars = bench.shots_pool
        if shots > len(exemplars):
            raise DataError(
                f"{bench.report.source}: {len(exemplars)} exemplars, fewer than --shots {shots}"
            )
        return {bench.task: harness_task(bench.task, bench.kind, items, exemplars, shots)}
    units = {}
    for subject in sorted({item.subject for item in items}):
        mine = [item for item in items if item.subject == subject]
        pool = [item for item in bench.shots_pool if item.subject == subject]
        if shots > len(pool):
            raise DataError(
                f"{bench.report.source}: {subject} has {len(pool)} dev exemplars, fewer than --shots {shots}"
            )
        about = subject.replace("_", " ")
        cloze = bench.task.endswith("_continuation")
        units[f"{bench.task}:{subject}"] = harness_task(
            f"{bench.task}:{subject}",
            "mmlu_continuation" if cloze else bench.kind,
            mine,
            pool,
            shots,
            f"The following are {'' if cloze else 'multiple choice '}questions (with answers) "
            f"about {about}.\n\n",
        )
    return units


def score_items(
    model: Any,
    tokenizer: Any,
    units: dict[str, Any],
    batch_size: int = 8,
    chat: bool = False,
    system_prompt: str | None = None,
    keep_prompts: bool = False,
) -> list[dict[str, Any]]:
    """Run the harness on prepared tasks; one row per item with its option log-likelihoods."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    model.eval()
    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        result = evaluate(
            lm=lm,
            task_dict=units,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
            apply_chat_template=chat,
            system_instruction=system_prompt if chat else None,
        )
    if was_training:
        model.train()
    assert result is not None
    rows = []
    for name, samples in result["samples"].items():
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            rows.append(
                {
                    "task": name.split(":")[0],
                    "id": sample["doc"]["id"],
                    "subject": sample["doc"]["subject"],
                    "n_options": len(sample["doc"]["choices"]),
                    "answer": sample["doc"]["answer"],
                    "loglikelihoods": [float(r[0]) for r in sample["filtered_resps"]],
                    "acc": float(sample["acc"]),
                    "acc_norm": float(sample["acc_norm"]),
                }
                | ({"prompt": sample["arguments"][0][0]} if keep_prompts else {})
            )
    return rows


# ---------------------------------------------------------------- aggregation


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(
    rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None = None, seed: int = 0
) -> dict[str, Any]:
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
    return result


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
) -> dict[str, Any]:
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
    out: dict[str, Any] = {"shots": shots, "limit": limit, "engine": _engine_name(), "tasks": {}}
    items_out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        bench = load_benchmark(task, by_kind.get(TASKS.get(task, ("",))[0]), strict)
        items = sample_records(bench.items, limit, seed)
        units = task_units(bench, items, shots)
        if progress:
            progress(f"{task}: {len(items)} questions, {shots}-shot")
        rows = score_items(model, tokenizer, units, batch_size, chat, system_prompt)
        base_rows = None
        if compare_base:
            with _adapter_off(model):
                base_rows = score_items(model, tokenizer, units, batch_size, chat, system_prompt)
        summary = summarize(rows, base_rows, seed)
        summary["data"] = bench.report.source
        summary["skipped"] = bench.report.skipped
        summary["notes"] = bench.report.warnings
        out["tasks"][task] = summary
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
    out["items"] = items_out
    return out


@contextmanager
def _adapter_off(model: Any) -> Iterator[None]:
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else nullcontext():
        yield


def _engine_name() -> str:
    from importlib.metadata import version

    return f"lm-evaluation-harness {version('lm_eval')} (log-likelihood of each option)"


def run_bench(
    model_spec: str,
    adapter: str | os.PathLike[str] | None,
    tasks: Sequence[str],
    data: Sequence[str] = (),
    limit: int | None = None,
    shots: int = 0,
    compare_base: bool = False,
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    chat: bool = False,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """`medlora bench`: load the model (with its adapter) once, score every task, write --out."""
    from medlora.evaluate.heldout import load_eval_model, run_recipe
    from medlora.io import write_json_atomic

    if compare_base and adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    for task in tasks:  # fail on a typo before minutes of model loading
        if task not in TASKS:
            raise ConfigError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    recipe = run_recipe(adapter)
    model, tokenizer = load_eval_model(model_spec, adapter, recipe, model_and_tokenizer)
    result = run_benchmarks(
        model,
        tokenizer,
        tasks,
        data,
        limit,
        shots,
        compare_base,
        batch_size,
        strict,
        chat,
        recipe.data.system_prompt,
        recipe.data.seed,
        progress,
    )
    result = {"model": model_spec, "adapter": str(adapter) if adapter else None, **result}
    if out is not None:
        write_json_atomic(out, result)
    return result
