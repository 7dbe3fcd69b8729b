"""Normalisation and de-duplication as seen in the cleaned records and their counts."""

from __future__ import annotations

from medlora.data.clean import clean_records, normalize_text
from medlora.data.records import Record


def rec(question: str, answer: str, id: str = "", topic: str = "") -> Record:
    return Record(id=id or question, question=question, answer=answer, source="t", topic=topic)


def test_entities_and_odd_spaces_become_plain_text() -> None:
    assert normalize_text("  Tom &amp; Jerry&nbsp;&nbsp;say\u00a0hi\t\there  ") == (
        "Tom & Jerry say hi here"
    )
    assert normalize_text("zero\u200bwidth") == "zerowidth"


def test_list_lines_and_paragraphs_are_kept() -> None:
    text = "Key points\r\n   - one  \n   - two\n\n\n   \n Next   paragraph.\n"
    assert normalize_text(text) == "Key points\n- one\n- two\n\nNext paragraph."


def test_empty_after_normalization_is_dropped_and_counted() -> None:
    kept, counts = clean_records([rec("Q?", "&nbsp; "), rec(" \n", "A."), rec("Ok?", "Yes.")])
    assert [r.question for r in kept] == ["Ok?"]
    assert counts["empty_after_normalization"] == 2


def test_exact_and_normalized_duplicates_keep_the_first() -> None:
    records = [
        rec("What is gout?", "A kind of arthritis.", id="1"),
        rec("What  is gout?", "A kind of  arthritis. ", id="2"),  # same after spacing
        rec("what is GOUT", "A kind of arthritis", id="3"),  # same without case/punctuation
        rec("What is gout?", "Painful joints from uric acid.", id="4"),  # new answer: kept
        rec("What is lupus?", "An autoimmune disease.", id="5"),
    ]
    kept, counts = clean_records(records)
    assert [r.id for r in kept] == ["1", "4", "5"]
    assert counts == {
        "empty_after_normalization": 0,
        "duplicate_exact": 1,
        "duplicate_normalized": 1,
    }


def test_cleaning_returns_copies_and_normalizes_topic() -> None:
    original = rec("Q&amp;A?", "Yes.", topic="  Heart\u00a0disease ")
    kept, _ = clean_records([original])
    assert kept[0].question == "Q&A?"
    assert kept[0].topic == "Heart disease"
    assert original.question == "Q&amp;A?"  # the caller's records are left alone
