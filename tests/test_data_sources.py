"""`KIND:PATH` specs: parsing, expansion, dispatch and the errors for a wrong spec or path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medlora.data.sources import load_source, parse_source
from medlora.errors import DataError


def test_parse_kinds_and_bare_medquad() -> None:
    assert parse_source("medquad") == ("medquad", None)
    assert parse_source("jsonl:data/qa.jsonl") == ("jsonl", "data/qa.jsonl")
    assert parse_source("parquet:/x/y.parquet") == ("parquet", "/x/y.parquet")
    assert parse_source("hf:someone/med-qa") == ("hf", "someone/med-qa")


def test_parse_expands_home_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    monkeypatch.setenv("QA_DIR", "/srv/qa")
    assert parse_source("csv:~/qa.csv") == ("csv", "/home/tester/qa.csv")
    assert parse_source("jsonl:$QA_DIR/train.jsonl") == ("jsonl", "/srv/qa/train.jsonl")


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(DataError) as info:
        parse_source("xlsx:qa.xlsx")
    assert "medquad, pubmedqa, jsonl, json, csv, parquet, hf" in str(info.value)


def test_plain_path_suggests_the_kind() -> None:
    with pytest.raises(DataError, match=r"e\.g\. jsonl:data/qa\.jsonl"):
        parse_source("data/qa.jsonl")


def test_kind_without_path_says_what_is_missing() -> None:
    with pytest.raises(DataError, match="write jsonl:PATH"):
        parse_source("jsonl:")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"file not found: {missing}"):
        load_source(f"jsonl:{missing}")


def test_missing_medquad_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"folder not found: {tmp_path / 'nope'}"):
        load_source(f"medquad:{tmp_path / 'nope'}")


def test_folder_given_for_a_file_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder"):
        load_source(f"csv:{tmp_path}")


def test_table_source_with_map(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"Q": "What is gout?", "A": "A kind of arthritis."}) + "\n")
    spec = f"jsonl:{path}"
    records, report = load_source(spec, column_map={"question": "Q", "answer": "A"})
    assert records[0].answer == "A kind of arthritis."
    assert report.source == spec  # the card reports sources as the user wrote them


def test_medquad_path_and_bare_medquad(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, report = load_source(f"medquad:{data_dir / 'medquad' / '9_CDC_QA'}")
    assert len(records) == 270 and report.source == f"medquad:{data_dir / 'medquad' / '9_CDC_QA'}"
    # Bare `medquad` reads $MEDLORA_DATA_DIR/medquad, so no download happens here.
    shutil.copytree(data_dir / "medquad" / "7_SeniorHealth_QA", tmp_path / "medquad" / "7_SH")
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(tmp_path))
    records, report = load_source("medquad")
    assert len(records) == 769
    assert report.source == "medquad"
