"""`prepare_data` end to end: split files, the data card's numbers, exclude, and reading back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medlora.data.prepare import load_splits, prepare_data
from medlora.data.records import Record
from medlora.errors import DataError
from medlora.io import read_jsonl

SPLITS = ("train", "validation", "test")


@pytest.fixture
def faq(tmp_path: Path) -> str:
    """A JSONL source with one exact duplicate, one loose duplicate and one empty answer."""
    rows: list[dict[str, Any]] = [
        {
            "question": f"What is condition {i}?",
            "answer": f"Condition {i} is rare.",
            "topic": f"c{i}",
        }
        for i in range(40)
    ]
    rows += [
        {"question": "What is condition 0?", "answer": "Condition 0 is rare."},
        {"question": "what is condition 1", "answer": "condition 1 is rare"},
        {"question": "Empty?", "answer": ""},
    ]
    path = tmp_path / "faq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f"jsonl:{path}"


def test_prepare_writes_splits_and_a_card_that_adds_up(
    data_dir: Path, tmp_path: Path, faq: str
) -> None:
    cdc = f"medquad:{data_dir / 'medquad' / '9_CDC_QA'}"
    out = tmp_path / "prepared"
    card = prepare_data(
        [cdc, faq], out, count_tokens=lambda rs: [len(r.answer.split()) for r in rs]
    )

    rows = {name: read_jsonl(out / f"{name}.jsonl") for name in SPLITS}
    assert card == json.loads((out / "data_card.json").read_text(encoding="utf-8"))
    assert card["sources"] == [cdc, faq]
    assert card["splits"] == {name: len(rows[name]) for name in SPLITS}
    # CDC pairs + FAQ after dedup, less what answer hygiene dropped (MedQuAD only, counted per rule).
    hygiene_dropped = sum(c["dropped"] for k, c in card["hygiene"].items() if k != "rules")
    assert sum(card["splits"].values()) == 270 + 40 - hygiene_dropped
    assert card["per_source"]["medquad/9_CDC_QA"] == {
        name: sum(r["source"] == "medquad/9_CDC_QA" for r in rows[name]) for name in SPLITS
    }
    assert sum(card["per_source"]["jsonl/faq"].values()) == 40
    assert card["per_qtype"]["unknown"] == 40  # the FAQ has no qtype column
    assert sum(card["per_qtype"].values()) == 310 - hygiene_dropped
    assert card["skipped"][faq] == {"empty_answer": 1}
    assert card["skipped"]["cleaning"] == {
        "excluded": 0,
        "empty_after_normalization": 0,
        "duplicate_exact": 1,
        "duplicate_normalized": 1,
    }
    assert set(card["topics"]) == set(SPLITS) and card["topics"]["train"] > 0
    stats = card["token_lengths"]["train"]
    assert stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert "T" in card["created"]
    assert not list(out.glob("*.tmp"))  # atomic writes leave no scratch files


def test_prepare_without_token_counter_has_no_lengths(tmp_path: Path, faq: str) -> None:
    card = prepare_data([faq], tmp_path / "out")
    assert card["token_lengths"] is None


def test_exclude_drops_matching_sources(tmp_path: Path, data_dir: Path, faq: str) -> None:
    cdc = f"medquad:{data_dir / 'medquad' / '9_CDC_QA'}"
    card = prepare_data([cdc, faq], tmp_path / "out", exclude=["medquad/*", "csv/typo"])
    assert card["skipped"]["cleaning"]["excluded"] == 270
    assert list(card["per_source"]) == ["jsonl/faq"]
    assert any("'csv/typo' matched no source" in w for w in card["warnings"])


def test_excluding_everything_is_an_error(tmp_path: Path, faq: str) -> None:
    with pytest.raises(DataError, match="no records left"):
        prepare_data([faq], tmp_path / "out", exclude=["jsonl/*"])


def test_load_splits_reads_back_what_prepare_wrote(tmp_path: Path, faq: str) -> None:
    out = tmp_path / "out"
    card = prepare_data([faq], out, val_fraction=0.2, test_fraction=0.2)
    splits = load_splits(out)
    assert {name: len(part) for name, part in splits.items()} == card["splits"]
    assert all(isinstance(r, Record) for part in splits.values() for r in part)
    assert splits["train"][0].to_dict() == read_jsonl(out / "train.jsonl")[0]


def test_load_splits_without_prepare_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `medlora data prepare"):
        load_splits(tmp_path)


def test_prepare_shows_the_progress_of_every_stage(
    tmp_path: Path, faq: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare_data([faq], tmp_path / "out", count_tokens=lambda records: [1] * len(records))
    shown = capsys.readouterr().err
    for stage in ("reading sources", "cleaning", "answer hygiene", "splitting by topic"):
        assert f"{stage}: " in shown
    assert "writing splits: 40/40" in shown and "counting tokens: 40/40" in shown
