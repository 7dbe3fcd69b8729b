"""PubMedQA as question-answer records: QUESTION → LONG_ANSWER (the abstract's conclusion).

The file is PubMedQA's JSON, `{pmid: {QUESTION, CONTEXTS, LONG_ANSWER, final_decision, …}}` (or a
list of such objects, each with a `pubid`). `read_pubmedqa` is the one parser of that file: this
loader reads it for training on answers, the multiple-choice benchmark
(`medlora.evaluate.multiple_choice_sets.load_pubmedqa`) for yes/no/maybe items.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medlora.data.records import Record, SourceReport
from medlora.data.tabular import read_text
from medlora.errors import DataError

DEFAULT_FILE = Path("pubmedqa") / "pqal_dev.json"


def find_pubmedqa_file() -> Path:
    """`$MEDLORA_DATA_DIR/pubmedqa/pqal_dev.json`, for a bare `pubmedqa` source."""
    data_dir = os.environ.get("MEDLORA_DATA_DIR")
    candidate = Path(data_dir).expanduser() / DEFAULT_FILE if data_dir else None
    if candidate is None or not candidate.is_file():
        where = f" ({candidate} not found)" if candidate else ""
        raise DataError(
            f"source 'pubmedqa' needs a file{where}: write pubmedqa:PATH to PubMedQA's JSON, "
            f"or set MEDLORA_DATA_DIR to a folder containing {DEFAULT_FILE}"
        )
    return candidate


def read_pubmedqa(path: Path) -> dict[str, Any]:
    """PubMedQA's JSON as `{pmid: item}`; a list of objects is keyed by each one's `pubid`.

    Items are returned as they are (a non-object item included): each loader checks the fields it
    needs and counts or refuses the rest.
    """
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: line {err.lineno} is not valid JSON ({err.msg}); is it PubMedQA's JSON file?"
        ) from err
    if isinstance(data, list):  # the same objects as a list, each with its own pubid
        return {
            str(row.get("pubid", i)) if isinstance(row, dict) else str(i): row
            for i, row in enumerate(data)
        }
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected PubMedQA's {{pmid: {{QUESTION, CONTEXTS, LONG_ANSWER, "
            f"final_decision, ...}}}}, got a JSON {type(data).__name__}"
        )
    return data


def has_text(row: dict[str, Any], key: str) -> bool:
    """Whether the item's `key` (QUESTION, LONG_ANSWER) is non-blank text."""
    value = row.get(key)
    return isinstance(value, str) and bool(value.strip())


def load_pubmedqa_answers(path: Path, strict: bool = False) -> tuple[list[Record], SourceReport]:
    """One record per item: question = QUESTION, answer = LONG_ANSWER, topic = the PMID."""
    path = Path(path)
    items = read_pubmedqa(path)
    report = SourceReport(source=f"pubmedqa:{path}")
    records: list[Record] = []
    for pmid, row in items.items():
        if not isinstance(row, dict):
            problem, what = "not_an_object", "is not a JSON object"
        elif not has_text(row, "QUESTION"):
            problem, what = "no_question", "has no QUESTION"
        elif not has_text(row, "LONG_ANSWER"):
            problem, what = "no_long_answer", "has no LONG_ANSWER"
        else:
            records.append(
                Record(
                    id=f"pubmedqa-{pmid}",
                    question=row["QUESTION"].strip(),
                    answer=row["LONG_ANSWER"].strip(),
                    source="pubmedqa",
                    topic=str(pmid),  # one abstract per topic: its question never crosses splits
                    meta={"pmid": str(pmid), "final_decision": str(row.get("final_decision", ""))},
                )
            )
            continue
        if strict:
            raise DataError(f"{path}: item {pmid} {what}; fix it or drop strict to skip it")
        report.skip(problem)
    if not records and not report.skipped:
        raise DataError(f"{path}: no items found; is it PubMedQA's JSON (pqal_*.json)?")
    # PubMedQA's benchmark reads this same file by default: training on it inflates that score.
    report.warnings.append(
        f"pubmedqa:{path} is trained on; score the PubMedQA benchmark on other items "
        "(e.g. the official test split), not this file"
    )
    return records, report
