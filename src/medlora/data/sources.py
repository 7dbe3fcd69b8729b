"""`KIND:PATH` source specs → records: the one way `prepare` and `eval` read data."""

from __future__ import annotations

import os
from pathlib import Path

from medlora.data.medquad import find_medquad_dir, load_medquad
from medlora.data.pubmedqa import find_pubmedqa_file, load_pubmedqa_answers
from medlora.data.records import Record, SourceReport
from medlora.data.tabular import TABLE_KINDS, load_hf, load_table
from medlora.errors import DataError

KINDS = ("medquad", "pubmedqa", *TABLE_KINDS, "hf")
# Kinds that may be written bare: their data is found under $MEDLORA_DATA_DIR.
BARE_KINDS = ("medquad", "pubmedqa")


def parse_source(spec: str) -> tuple[str, str | None]:
    """`jsonl:~/qa.jsonl` → ("jsonl", "/home/me/qa.jsonl"); bare `medquad` → ("medquad", None).

    Bare `pubmedqa` → ("pubmedqa", None) as well: its file is then found under $MEDLORA_DATA_DIR.
    """
    kind, sep, path = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        suffix = Path(spec).suffix.lstrip(".").lower()
        example = f"{suffix}:{spec}" if suffix in TABLE_KINDS else "jsonl:data/qa.jsonl"
        raise DataError(
            f"unknown source '{spec}': write KIND:PATH with KIND one of {', '.join(KINDS)} "
            f"(e.g. {example})"
        )
    path = path.strip()
    if not path:
        if kind in BARE_KINDS:
            return kind, None
        what = "DATASET_ID" if kind == "hf" else "PATH"
        raise DataError(f"source '{spec}' needs a {what}: write {kind}:{what}")
    if kind == "hf":
        return kind, path  # a Hub id, not a file path
    return kind, os.path.expanduser(os.path.expandvars(path))


def load_source(
    spec: str, column_map: dict[str, str] | None = None, strict: bool = False
) -> tuple[list[Record], SourceReport]:
    """Load one source spec; the report is labelled with the spec as the user wrote it."""
    kind, path = parse_source(spec)
    if kind == "medquad":  # load_medquad names a missing folder
        records, report = load_medquad(Path(path) if path else find_medquad_dir(), strict=strict)
    elif kind == "pubmedqa":
        file = Path(path) if path else find_pubmedqa_file()
        if not file.is_file():
            raise DataError(f"{spec}: file not found: {file}; give pubmedqa:PATH to its JSON file")
        records, report = load_pubmedqa_answers(file, strict=strict)
    elif kind == "hf":
        records, report = load_hf(str(path), column_map)
    else:
        file = Path(str(path))
        if file.is_dir():
            raise DataError(f"{spec}: {file} is a folder; give the {kind} file itself")
        if not file.is_file():
            raise DataError(f"{spec}: file not found: {file}; check the path")
        records, report = load_table(kind, file, column_map)
    report.source = spec
    return records, report
