"""Seeded sub-sampling that keeps input order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def sample_records(records: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """At most `limit` items, the same ones for the same seed, in their original order."""
    if limit is None or limit >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]
