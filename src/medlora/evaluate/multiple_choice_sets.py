"""Medical multiple-choice sets (PubMedQA, MMLU medical, MedMCQA, MedQA) read from local files.

Bad rows are counted and skipped (or refused with `strict`); nothing is downloaded. Scoring lives in
`evaluate/harness.py` (lm-evaluation-harness) and the run + summary in `evaluate/multiple_choice.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.data.pubmedqa import DEFAULT_FILE as PUBMEDQA_FILE
from medlora.data.pubmedqa import has_text, read_pubmedqa
from medlora.data.records import SourceReport
from medlora.data.tabular import jsonl_lines, read_csv_rows
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
    "pubmedqa": ("pubmedqa", PUBMEDQA_FILE.as_posix()),
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

# Each file shape has a row reader: a row becomes an item, the reason it is unusable, or None (a
# blank row, not counted). `_read_rows` counts or refuses the unusable ones the same way for all.
Row = tuple[str, str, Any]  # (where, for messages; the item's fallback id; the row)
ParseRow = Callable[[str, Any], "MCItem | str | None"]


def _read_rows(
    rows: Iterable[Row], parse: ParseRow, report: SourceReport, strict: bool
) -> list[MCItem]:
    """The usable rows as items; a bad row is counted (its first few named) or, when strict, refused."""
    items = []
    for where, key, row in rows:
        item = parse(key, row)
        if isinstance(item, MCItem):
            items.append(item)
        elif item is not None:
            if strict:
                raise DataError(f"{where}: {item}; fix the row or drop --strict to skip bad rows")
            report.skip(item.split(" (")[0])
            if len(report.warnings) < 5:
                report.warnings.append(f"{where}: {item}")
    return items


def _load_objects(
    kind: str, path: Path, rows: Iterable[Row], parse: ParseRow, strict: bool
) -> tuple[list[MCItem], SourceReport]:
    """A file of JSON objects, one per item: anything else in it is a bad row."""
    report = SourceReport(source=f"{kind}:{path}")

    def parse_object(key: str, row: Any) -> MCItem | str | None:
        return parse(key, row) if isinstance(row, dict) else "not a JSON object"

    items = _read_rows(rows, parse_object, report, strict)
    return items, report


def _pubmedqa_item(pubid: str, row: dict[str, Any]) -> MCItem | str:
    decision = str(row.get("final_decision", "")).lower()
    contexts = row.get("CONTEXTS")
    if not has_text(row, "QUESTION"):
        return "no QUESTION"
    if decision not in PUBMEDQA_CHOICES:
        return f"final_decision is not yes/no/maybe ({decision!r})"
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        return "CONTEXTS is not a list of strings"
    index = PUBMEDQA_CHOICES.index(decision)
    question = row["QUESTION"].strip()
    return MCItem(pubid, question, list(PUBMEDQA_CHOICES), index, "pubmedqa", "\n".join(contexts))


def load_pubmedqa(path: Path, strict: bool = False) -> tuple[list[MCItem], SourceReport]:
    """PubMedQA PQA-L JSON: {pubid: {QUESTION, CONTEXTS[], final_decision ∈ yes/no/maybe}}."""
    rows = [
        (f"{path}: item {pubid}", str(pubid), row) for pubid, row in read_pubmedqa(path).items()
    ]
    return _load_objects("pubmedqa", path, rows, _pubmedqa_item, strict)


def _mmlu_rows(path: Path, subject: str, report: SourceReport, strict: bool) -> list[MCItem]:
    """Headerless MMLU CSV rows: question,A,B,C,D,answer."""

    def parse(key: str, row: list[str]) -> MCItem | str | None:
        if not any(cell.strip() for cell in row):
            return None
        if len(row) != 6:
            return f"has {len(row)} columns (expected question,A,B,C,D,answer)"
        if row[5].strip().upper() not in LETTERS[:4]:
            return f"answer {row[5]!r} is not one of A, B, C, D"
        if not row[0].strip():
            return "empty question"
        answer = LETTERS.index(row[5].strip().upper())
        return MCItem(key, row[0], [c.strip() for c in row[1:5]], answer, subject)

    rows = [
        (f"{path}: row {number}", f"{subject}-{number}", row)
        for number, row in enumerate(read_csv_rows(path), start=1)
    ]
    return _read_rows(rows, parse, report, strict)


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
    report.warnings.insert(0, f"evaluated split: {split}")
    return items, shots, report


def _jsonl_rows(path: Path) -> list[Row]:
    """One row per line; None for a line that is not JSON (counted as a bad row)."""
    rows: list[Row] = []
    for number, line in jsonl_lines(path):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        rows.append((f"{path}: line {number}", str(number), value))
    return rows


def _cop_offset(path: Path, rows: list[Row]) -> int:
    """MedMCQA's `cop` is 1-4 in the authors' release and 0-3 in the Hub copy: tell from the file."""
    values = {
        r.get("cop") for _, _, r in rows if isinstance(r, dict) and isinstance(r.get("cop"), int)
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
    rows = _jsonl_rows(path)
    offset = _cop_offset(path, rows)

    def parse(number: str, row: dict[str, Any]) -> MCItem | str:
        options = [row.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        if not isinstance(row.get("question"), str) or not all(isinstance(o, str) for o in options):
            return "missing question or one of opa/opb/opc/opd"
        if not isinstance(cop, int) or not 0 <= cop - offset < 4:
            return f"cop {cop!r} is not a valid option number"
        subject = str(row.get("subject_name") or "medmcqa")
        return MCItem(str(row.get("id", number)), row["question"], options, cop - offset, subject)

    return _load_objects("medmcqa", path, rows, parse, strict)


def _medqa_item(number: str, row: dict[str, Any]) -> MCItem | str:
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
    return _load_objects("medqa", path, _jsonl_rows(path), _medqa_item, strict)


def load_benchmark(task: str, data: str | None, strict: bool = False) -> Benchmark:
    """Items of `task` from `data` (KIND:PATH, default: the task's file in $MEDLORA_DATA_DIR);
    `mmlu_medical` keeps the six medical subjects."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    kind, relative = TASKS[task]
    root = os.environ.get("MEDLORA_DATA_DIR")
    if not data and relative and root and (Path(root) / relative).exists():
        data = f"{kind}:{Path(root) / relative}"
    if not data:
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
