"""`medlora data prepare`: sources → clean → split → `{train,validation,test}.jsonl` + data card."""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medlora.data.clean import clean_records
from medlora.data.hygiene import apply_hygiene
from medlora.data.mix import group_counts, source_group, tag_source_group
from medlora.data.records import Record
from medlora.data.sources import load_source
from medlora.data.split import SPLIT_NAMES, split_by_topic, topic_key
from medlora.errors import DataError
from medlora.io import read_jsonl, write_json_atomic, write_jsonl_atomic

MAX_WARNINGS = 50
PERCENTILES = (50, 90, 95, 99)


def _length_stats(lengths: list[int]) -> dict[str, float] | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    # Nearest-rank percentiles: always a length that really occurs.
    stats: dict[str, float] = {
        f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES
    }
    stats["max"] = ordered[-1]
    stats["mean"] = round(sum(ordered) / len(ordered), 1)
    return stats


def _cap_warnings(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    kept = warnings[: MAX_WARNINGS - 1]
    return [*kept, f"... and {len(warnings) - len(kept)} more warnings"]


def prepare_data(
    sources: Sequence[str],
    out_dir: Path,
    *,
    column_map: dict[str, str] | None = None,
    exclude: Sequence[str] = (),
    strict: bool = False,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    count_tokens: Callable[[Record], int] | None = None,
    hygiene: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load, filter, clean and split every source; write the splits and the data card.

    `hygiene`: the answer-hygiene rules (`medlora.data.hygiene`); None: all of them on MedQuAD
    records, none on others.
    """
    out_dir = Path(out_dir)
    if not sources:
        raise DataError("no data sources given; add --source KIND:PATH or set data.sources")
    records: list[Record] = []
    skipped: dict[str, dict[str, int]] = {}
    warnings: list[str] = []
    read: dict[str, int] = {}
    for spec in sources:
        loaded, report = load_source(spec, column_map=column_map, strict=strict)
        # The recipe entry is the mixing group: weights and per-source counts use its name.
        group = spec.strip()
        tag_source_group(loaded, group)
        read[group] = read.get(group, 0) + len(loaded)
        records.extend(loaded)
        skipped[spec] = dict(report.skipped)
        warnings.extend(report.warnings)

    excluded = 0
    if exclude:
        kept = [r for r in records if not any(fnmatch.fnmatchcase(r.source, p) for p in exclude)]
        excluded = len(records) - len(kept)
        names = sorted({r.source for r in records})
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                # A typo in an exclude pattern would otherwise silently train on that data.
                warnings.append(
                    f"exclude pattern '{pattern}' matched no source (sources: {', '.join(names)})"
                )
        records = kept

    records, clean_counts = clean_records(records)
    skipped["cleaning"] = {"excluded": excluded, **clean_counts}
    try:
        records, hygiene_counts = apply_hygiene(records, hygiene)
    except ValueError as err:
        raise DataError(f"data.clean: {err}") from None
    if not records:
        raise DataError(
            f"no records left from {', '.join(sources)} after exclude and cleaning; "
            "check data.sources and data.exclude"
        )
    splits = split_by_topic(records, val_fraction, test_fraction)

    per_source: dict[str, dict[str, int]] = {}
    for name in SPLIT_NAMES:
        for record in splits[name]:
            counts = per_source.setdefault(record.source, dict.fromkeys(SPLIT_NAMES, 0))
            counts[name] += 1
    per_qtype = Counter(r.qtype or "unknown" for r in records)
    kept_per_group = group_counts(records)
    source_groups: dict[str, dict[str, int]] = {
        group: {
            "read": count,
            "kept": kept_per_group.get(group, 0),
            **dict.fromkeys(SPLIT_NAMES, 0),
        }
        for group, count in read.items()
    }
    for name in SPLIT_NAMES:
        for record in splits[name]:
            source_groups[source_group(record)][name] += 1
    card: dict[str, Any] = {
        "sources": list(sources),
        "exclude": list(exclude),
        "fractions": {"validation": val_fraction, "test": test_fraction},
        "splits": {name: len(splits[name]) for name in SPLIT_NAMES},
        "topics": {name: len({topic_key(r) for r in splits[name]}) for name in SPLIT_NAMES},
        "per_source": dict(sorted(per_source.items())),
        "source_groups": source_groups,
        "per_qtype": dict(per_qtype.most_common()),
        "skipped": skipped,
        # Per answer-hygiene rule: answers it changed and answers it dropped.
        "hygiene": {
            "rules": "medquad-default" if hygiene is None else list(hygiene),
            **hygiene_counts,
        },
        "warnings": _cap_warnings(warnings),
        "token_lengths": (
            {name: _length_stats([count_tokens(r) for r in splits[name]]) for name in SPLIT_NAMES}
            if count_tokens is not None
            else None
        ),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for name in SPLIT_NAMES:
        write_jsonl_atomic(out_dir / f"{name}.jsonl", (r.to_dict() for r in splits[name]))
    # The card is written last: its presence means the splits beside it are complete.
    write_json_atomic(out_dir / "data_card.json", card)
    return card


def load_splits(prepared_dir: Path) -> dict[str, list[Record]]:
    """The three splits written by `prepare_data`."""
    prepared_dir = Path(prepared_dir)
    splits: dict[str, list[Record]] = {}
    for name in SPLIT_NAMES:
        path = prepared_dir / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(
                f"{path} not found; run `medlora data prepare --out {prepared_dir}` first"
            )
        try:
            splits[name] = [Record.from_dict(row) for row in read_jsonl(path)]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise DataError(
                f"{path} is damaged ({err}); re-run `medlora data prepare --out {prepared_dir}`"
            ) from err
    return splits
