"""Topic-grouped, deterministic splits (real-MedQuAD fractions are checked in test_data_medquad)."""

from __future__ import annotations

import random

import pytest

from medlora.data.records import Record
from medlora.data.split import split_by_topic, topic_key
from medlora.errors import DataError


def make_records(topics: int, per_topic: int = 3, prefix: str = "topic") -> list[Record]:
    return [
        Record(
            id=f"{prefix}{t}-{i}",
            question=f"Question {i} about {prefix} {t}?",
            answer="An answer.",
            source="synthetic",
            topic=f"{prefix} {t}",
        )
        for t in range(topics)
        for i in range(per_topic)
    ]


def ids(splits: dict[str, list[Record]]) -> dict[str, list[str]]:
    return {name: [r.id for r in part] for name, part in splits.items()}


def test_no_topic_is_in_two_splits() -> None:
    records = make_records(600)
    splits = split_by_topic(records, 0.1, 0.1)
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(v) for v in splits.values()) == len(records)
    seen: dict[str, str] = {}
    for name, part in splits.items():
        for record in part:
            assert seen.setdefault(topic_key(record), name) == name
    for name in ("validation", "test"):
        assert 0.05 < len(splits[name]) / len(records) < 0.15


def test_same_split_every_call_and_input_order_kept() -> None:
    records = make_records(200)
    first = split_by_topic(records, 0.1, 0.1)
    assert ids(first) == ids(split_by_topic(records, 0.1, 0.1))
    position = {r.id: i for i, r in enumerate(records)}
    for part in first.values():
        assert [position[r.id] for r in part] == sorted(position[r.id] for r in part)


def test_adding_data_never_moves_a_topic() -> None:
    old = make_records(200)
    before = {r.id: name for name, part in split_by_topic(old, 0.1, 0.1).items() for r in part}
    grown = old + make_records(300, prefix="new")
    random.Random(0).shuffle(grown)
    after = {r.id: name for name, part in split_by_topic(grown, 0.1, 0.1).items() for r in part}
    assert all(after[key] == value for key, value in before.items())


def test_case_and_spacing_variants_share_a_split_and_empty_topic_uses_question() -> None:
    variants = [
        Record(id=str(i), question="q", answer="a", source="s", topic=t)
        for i, t in enumerate(["Heart Disease", "heart  disease", " HEART DISEASE"])
    ]
    splits = split_by_topic(variants, 0.3, 0.3)
    assert sorted(len(part) for part in splits.values()) == [0, 0, 3]
    no_topic = Record(id="x", question="What Is Gout?", answer="a", source="s")
    assert topic_key(no_topic) == "what is gout?"


def test_salt_reshuffles_and_zero_fractions_train_on_all() -> None:
    records = make_records(200)
    assert ids(split_by_topic(records, 0.2, 0.2, salt="a")) != ids(
        split_by_topic(records, 0.2, 0.2, salt="b")
    )
    everything = split_by_topic(records, 0.0, 0.0)
    assert len(everything["train"]) == len(records)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.6, 0.5), (0.1, 1.0)])
def test_impossible_fractions_are_errors(val: float, test: float) -> None:
    with pytest.raises(DataError, match="fraction"):
        split_by_topic(make_records(3), val, test)
