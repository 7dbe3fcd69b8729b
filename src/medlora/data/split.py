"""Deterministic train/validation/test split by topic, so no disease is in two splits.

Each topic goes to a split by a hash of (salt, topic) alone: the same topic lands in the same split
on every machine and run, and adding records or sources never moves an existing topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from medlora.data.records import Record
from medlora.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")


def topic_key(record: Record) -> str:
    """The group a record is split with: its topic, else its question (case and spacing ignored)."""
    return " ".join((record.topic or record.question).casefold().split())


def assign_split(key: str, val_fraction: float, test_fraction: float, salt: str = "medlora") -> str:
    """The split of one group key."""
    digest = hashlib.sha1(f"{salt}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def split_by_topic(
    records: Iterable[Record], val_fraction: float, test_fraction: float, salt: str = "medlora"
) -> dict[str, list[Record]]:
    """{"train", "validation", "test"} → records, in input order within each split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"data.{name}={value} must be in [0, 1); e.g. 0.05 for 5% of topics")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
            "training data; keep their sum below 1"
        )
    splits: dict[str, list[Record]] = {name: [] for name in SPLIT_NAMES}
    cache: dict[str, str] = {}  # hash each topic once
    for record in records:
        key = topic_key(record)
        if key not in cache:
            cache[key] = assign_split(key, val_fraction, test_fraction, salt)
        splits[cache[key]].append(record)
    return splits
