"""Tabular sources (JSONL, JSON, CSV, Parquet, Hugging Face Hub) → records.

Every format is read into plain row dicts (`ROW_READERS`, `read_hub`); one function
(`rows_to_records`) then recognises the row shape, in this order:
  1. question/answer columns (plain names, or renamed with `column_map`, e.g. {"question": "Q"});
     optional `topic`, `id`, `qtype` columns, plain or mapped;
  2. Alpaca: `instruction`, optional `input`, `output`;
  3. chat: `messages` = [{role, content}, …] (first user turn, first assistant turn after it).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medlora.data.records import Record, SourceReport
from medlora.errors import DataError

MAP_HINT = "map yours with --map question=COL,answer=COL"


def read_text(path: Path) -> str:
    """The file as text; a bad byte names its line so the user can find it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the BOM Excel writes
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} (byte {err.start}) is not valid UTF-8; re-save the file as UTF-8"
        ) from err


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of every non-blank line of a JSONL file, read a line at a time."""
    if not Path(path).is_file():
        read_text(path)  # raises the one "file not found" message
    # Binary lines end at b"\n" only: U+2028 inside a JSON string does not break a line.
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                read_text(path)  # raises the message naming the bad byte's line
                raise
            if line.strip():
                yield number, line


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a bad line is refused with its number."""
    rows = []
    for number, line in jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                "fix or remove that line"
            ) from err
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object; each line needs {{...}}")
        rows.append(row)
    return rows


def read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        hint = "; one object per line? use jsonl:" if err.msg == "Extra data" else ""
        raise DataError(
            f"{path}: line {err.lineno} is not valid JSON ({err.msg} at column {err.colno}){hint}"
        ) from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: item {index} is not a JSON object; expected a list of {{...}}"
            )
    return data


def _parse_csv(path: Path, make_reader: Callable[[io.StringIO], Any]) -> list[Any]:
    """The rows of a CSV file: the one place CSV text is parsed, for both row shapes."""
    # Long answers overflow csv's default 128 KiB field limit; raise it (process-wide, harmless).
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = make_reader(io.StringIO(read_text(path), newline=""))
    try:
        return list(reader)
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from err


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows keyed by the header line."""
    return _parse_csv(path, csv.DictReader)


def read_csv_rows(path: Path) -> list[list[str]]:
    """The rows of a headerless CSV file (MMLU's question,A,B,C,D,answer), as lists of cells."""
    return _parse_csv(path, csv.reader)


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err


# The file kinds a source may name, each with its reader (file → row dicts).
ROW_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
}
TABLE_KINDS = tuple(ROW_READERS)


def read_hub(dataset_id: str, split: str = "train") -> Any:
    """A Hugging Face Hub dataset split (its rows are dicts), via `datasets.load_dataset`."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # offline, unknown id, gated, missing split: all mean "not loadable"
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DataError(
            f"hf:{dataset_id} (split {split}) could not be loaded from the Hub "
            f"(offline? {reason}); download it and use jsonl:PATH or parquet:PATH instead"
        ) from err


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ordered union of the rows' keys: JSON rows need not all share them. (csv keeps a
    row's cells beyond the header under the key None: not a column.)"""
    return [key for key in dict.fromkeys(key for row in rows for key in row) if key is not None]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN, as pandas writes a missing cell
        return ""
    return value if isinstance(value, str) else str(value)


def _detect_shape(columns: Sequence[str], column_map: dict[str, str], where: str) -> str:
    """'qa', 'alpaca' or 'chat'; else a DataError naming the first missing column."""
    present = set(columns)
    for ours in ("topic", "id", "qtype"):
        if ours in column_map and column_map[ours] not in present:
            raise _missing(where, column_map[ours], columns)
    wanted = [column_map.get("question", "question"), column_map.get("answer", "answer")]
    if all(col in present for col in wanted):
        return "qa"
    if {"instruction", "output"} <= present:
        return "alpaca"
    if "messages" in present:
        return "chat"
    raise _missing(where, next(col for col in wanted if col not in present), columns)


def _missing(where: str, column: str, columns: Sequence[str]) -> DataError:
    listed = ", ".join(columns) or "none"
    return DataError(f"{where}: missing column '{column}' (columns: {listed}); {MAP_HINT}")


def _chat_pair(messages: Any) -> tuple[str, str, str]:
    """(question, answer, system) from a list of {role, content} turns."""
    question = answer = system = ""
    if isinstance(messages, str):  # a CSV cell holding the turns as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            messages = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), _as_text(message.get("content")).strip()
        if role == "system" and not system and not question:
            system = content
        elif role == "user" and not question:
            question = content
        elif role == "assistant" and question:
            answer = content
            break
    return question, answer, system


def rows_to_records(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    source: str,
    id_prefix: str,
    where: str,
    column_map: dict[str, str] | None = None,
) -> tuple[list[Record], SourceReport]:
    """The one row → Record mapping shared by files and Hub datasets."""
    column_map = dict(column_map or {})
    shape = _detect_shape(columns, column_map, where)
    q_col = column_map.get("question", "question")
    a_col = column_map.get("answer", "answer")
    # Optional columns: the mapped name, else the plain name when the file has it.
    optional = {ours: column_map.get(ours, ours) for ours in ("topic", "id", "qtype")}
    optional = {ours: col for ours, col in optional.items() if col in set(columns)}
    report = SourceReport(source=where)
    records: list[Record] = []
    for index, row in enumerate(rows):
        meta: dict[str, Any] = {}
        if shape == "qa":
            question, answer = _as_text(row.get(q_col)).strip(), _as_text(row.get(a_col)).strip()
        elif shape == "alpaca":
            question = _as_text(row.get("instruction")).strip()
            extra_input = _as_text(row.get("input")).strip()
            if question and extra_input:
                question = f"{question}\n\n{extra_input}"
            answer = _as_text(row.get("output")).strip()
        else:
            question, answer, system = _chat_pair(row.get("messages"))
            if system:
                meta["system"] = system
        if not question:
            report.skip("empty_question")
            continue
        if not answer:
            report.skip("empty_answer")
            continue
        extra = {ours: _as_text(row.get(col)).strip() for ours, col in optional.items()}
        records.append(
            Record(
                id=extra.get("id") or f"{id_prefix}-{index}",
                question=question,
                answer=answer,
                source=source,
                topic=extra.get("topic", ""),
                qtype=extra.get("qtype", ""),
                meta=meta,
            )
        )
    return records, report


def load_table(
    kind: str, path: Path, column_map: dict[str, str] | None = None
) -> tuple[list[Record], SourceReport]:
    """Records from a JSONL, JSON (list of objects), CSV or Parquet file."""
    path = Path(path)
    rows = ROW_READERS[kind](path)
    if not rows:
        raise DataError(f"{path}: no rows found; is it the right file (and the right {kind}:)?")
    records, report = rows_to_records(
        rows,
        columns_of(rows),
        source=f"{kind}/{path.stem}",
        id_prefix=path.stem,
        where=str(path),
        column_map=column_map,
    )
    report.source = f"{kind}:{path}"
    return records, report


def load_hf(
    dataset_id: str, column_map: dict[str, str] | None = None, split: str = "train"
) -> tuple[list[Record], SourceReport]:
    """Records from a Hugging Face Hub dataset split."""
    dataset = read_hub(dataset_id, split)
    return rows_to_records(
        dataset,
        list(dataset.column_names),
        source=f"hf/{dataset_id}",
        id_prefix=dataset_id,
        where=f"hf:{dataset_id}",
        column_map=column_map,
    )
