"""The core data types every source produces and every later stage reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)  # no per-instance __dict__: a large source holds many records
class Record:
    """One question-answer pair, as read from a source and before any tokenization."""

    id: str
    question: str
    answer: str
    source: str  # e.g. "medquad/2_GARD_QA" or "jsonl/my_file"
    topic: str = ""  # what splits are grouped by (MedQuAD Focus; else the question)
    qtype: str = ""  # MedQuAD question type (symptoms, treatment, …) when known
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        return cls(
            id=str(row["id"]),
            question=row["question"],
            answer=row["answer"],
            source=row.get("source", ""),
            topic=row.get("topic", ""),
            qtype=row.get("qtype", ""),
            meta=dict(row.get("meta") or {}),
        )


@dataclass
class SourceReport:
    """What a loader read and what it skipped, for the data card."""

    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
