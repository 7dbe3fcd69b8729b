"""JSONL / JSON / CSV / Parquet / Hub rows → records, and the errors a user sees for bad files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medlora.data.tabular import load_hf, load_table
from medlora.errors import DataError


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_question_answer_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "faq.jsonl",
        [
            {"question": "What is asthma?", "answer": "A lung disease.", "topic": "Asthma"},
            {"question": "Is flu contagious?", "answer": "Yes.", "id": "q-7", "qtype": "cause"},
        ],
    )
    records, report = load_table("jsonl", path)
    assert [r.question for r in records] == ["What is asthma?", "Is flu contagious?"]
    assert [r.id for r in records] == ["faq-0", "q-7"]
    assert [r.topic for r in records] == ["Asthma", ""]
    assert records[1].qtype == "cause"
    assert {r.source for r in records} == {"jsonl/faq"}
    assert len(records) == 2 and report.skipped == {}


def test_json_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "Q1?", "answer": "A1."}]), encoding="utf-8")
    records, _ = load_table("json", path)
    assert records[0].answer == "A1." and records[0].source == "json/qa"


def test_json_lines_given_as_json_suggests_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.json", [{"question": "a", "answer": "b"}] * 2)
    with pytest.raises(DataError, match="line 2 .*use jsonl:"):
        load_table("json", path)


def test_csv_with_column_map(tmp_path: Path) -> None:
    path = tmp_path / "clinic.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Q", "A", "Disease"])
        writer.writerow(["What helps a cough?", "Honey, rest and fluids.\nSee a doctor.", "Cough"])
        writer.writerow(["Empty one?", "", "Cough"])
    mapping = {"question": "Q", "answer": "A", "topic": "Disease"}
    records, report = load_table("csv", path, mapping)
    assert len(records) == 1
    assert records[0].answer == "Honey, rest and fluids.\nSee a doctor."
    assert records[0].topic == "Cough"
    assert records[0].source == "csv/clinic"
    assert report.skipped == {"empty_answer": 1}


def test_missing_column_names_the_columns_and_the_fix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "text": "t"}])
    with pytest.raises(DataError) as info:
        load_table("jsonl", path)
    assert str(info.value) == (
        f"{path}: missing column 'answer' (columns: question, text); "
        "map yours with --map question=COL,answer=COL"
    )


def test_mapped_column_that_is_missing_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"Q": "q", "B": "t"}])
    with pytest.raises(DataError, match=r"missing column 'A' \(columns: Q, B\)"):
        load_table("jsonl", path, {"question": "Q", "answer": "A"})


def test_empty_answers_and_questions_are_counted(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"question": "ok?", "answer": "yes"},
            {"question": "blank?", "answer": "   "},
            {"question": "null?", "answer": None},
            {"question": "missing key?"},
            {"question": "", "answer": "orphan"},
        ],
    )
    records, report = load_table("jsonl", path)
    assert len(records) == 1
    assert report.skipped == {"empty_answer": 3, "empty_question": 1}


def test_alpaca_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Explain anemia.", "input": "", "output": "Too few red cells."},
            {
                "instruction": "Summarise.",
                "input": "Aspirin thins blood.",
                "output": "Thins blood.",
            },
        ],
    )
    records, _ = load_table("jsonl", path)
    assert records[0].question == "Explain anemia."
    assert records[1].question == "Summarise.\n\nAspirin thins blood."
    assert records[1].answer == "Thins blood."


def test_chat_rows_in_parquet(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a nurse."},
                {"role": "assistant", "content": "Hello!"},  # before any user turn: ignored
                {"role": "user", "content": "What lowers a fever?"},
                {"role": "assistant", "content": "Paracetamol and fluids."},
                {"role": "user", "content": "Thanks"},
            ]
        },
        {"messages": [{"role": "user", "content": "Unanswered?"}]},
    ]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_table("parquet", path)
    assert len(records) == 1
    assert records[0].question == "What lowers a fever?"
    assert records[0].answer == "Paracetamol and fluids."
    assert records[0].meta == {"system": "You are a nurse."}
    assert records[0].source == "parquet/chats"
    assert report.skipped == {"empty_answer": 1}


def test_parquet_question_answer_with_map(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", None]}), path)
    records, report = load_table("parquet", path, {"question": "prompt", "answer": "response"})
    assert [(r.question, r.answer, r.id) for r in records] == [("p1", "r1", "t-0")]
    assert report.skipped == {"empty_answer": 1}


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"question,answer\nok?,yes\ncaf\xe9?,oui\n")
    with pytest.raises(DataError, match=r"latin\.csv: line 3 .*not valid UTF-8; re-save"):
        load_table("csv", path)


def test_jsonl_is_read_line_by_line_with_its_bom_and_line_separators(tmp_path: Path) -> None:
    """Excel's BOM is tolerated, U+2028 inside a string stays in the answer (JSON lines end at
    newlines only), and a bad byte names its line."""
    path = tmp_path / "faq.jsonl"
    row = json.dumps({"question": "q?", "answer": "one\u2028two"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (row + "\n\n" + row + "\n").encode())
    records, _ = load_table("jsonl", path)
    assert [r.answer for r in records] == ["one\u2028two"] * 2
    path.write_bytes(row.encode() + b"\n" + b'{"question": "caf\xe9?", "answer": "oui"}\n')
    with pytest.raises(DataError, match=r"faq\.jsonl: line 2 .*not valid UTF-8; re-save"):
        load_table("jsonl", path)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_table("jsonl", path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows found"):
        load_table("jsonl", path)


def test_hub_dataset_rows_use_the_same_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake_load(dataset_id: str, split: str) -> datasets.Dataset:
        assert (dataset_id, split) == ("someone/med-qa", "train")
        return datasets.Dataset.from_list([{"Q": "What is a stroke?", "A": "A brain attack."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records, _ = load_hf("someone/med-qa", {"question": "Q", "answer": "A"})
    assert records[0].question == "What is a stroke?"
    assert records[0].source == "hf/someone/med-qa"
    assert records[0].id == "someone/med-qa-0"


def test_unreachable_hub_dataset_is_one_line() -> None:
    # conftest sets HF_DATASETS_OFFLINE=1, so this fails fast without touching the network.
    with pytest.raises(DataError) as info:
        load_hf("nobody/no-such-dataset")
    message = str(info.value)
    assert "\n" not in message
    assert "could not be loaded from the Hub" in message
    assert "jsonl:" in message and "parquet:" in message
