"""`medlora data prepare`: sources → clean → split → `{train,validation,test}.jsonl` + data card.

The text is held once (the JSONL reader streams, clean text is kept as is, splits are written line
by line); tokens are counted a batch per call. Plain lists, not `datasets`: an Arrow copy of the
text and forked `map` workers measured more memory, and no less time, as the tokenizer dominates
(speed and memory at 300,000 pairs: docs/benchmarks.md, `data-prepare-300k`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medlora.data.clean import clean_records
from medlora.data.hygiene import apply_hygiene
from medlora.data.mix import source_group, tag_source_group
from medlora.data.records import Record
from medlora.data.sources import load_source
from medlora.data.split import SPLIT_NAMES, split_by_topic, topic_key
from medlora.errors import DataError
from medlora.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from medlora.progress import progress_bar

MAX_WARNINGS = 50
PERCENTILES = (50, 90, 95, 99)
STEP = 1_000  # records per progress update and per tokenizer call

CountTokens = Callable[[Sequence[Record]], list[int]]


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


@dataclass
class SourcesRead:
    """Every source's records (tagged with their recipe entry) and what reading them skipped."""

    records: list[Record] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)  # recipe entry → records read
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # spec → reason → count
    warnings: list[str] = field(default_factory=list)


def _tracked(records: Iterable[Record], bar: Any, task: Any) -> Iterator[Record]:
    """`records` one by one, advancing a progress task every `STEP` of them."""
    count = 0
    for count, record in enumerate(records, start=1):
        yield record
        if count % STEP == 0:
            bar.advance(task, STEP)
    if count % STEP:
        bar.advance(task, count % STEP)


def _handed_on(records: list[Record]) -> Iterator[Record]:
    """Each record in order, taken out of `records`: a record the next stage replaces is freed
    at once, not kept alive by this list until the stage ends."""
    records.reverse()
    while records:
        yield records.pop()


def read_sources(
    sources: Sequence[str], column_map: dict[str, str] | None, strict: bool, bar: Any
) -> SourcesRead:
    read = SourcesRead()
    task = bar.add_task("reading sources", total=len(sources))
    for spec in sources:
        loaded, report = load_source(spec, column_map=column_map, strict=strict)
        # The recipe entry is the mixing group: weights and per-source counts use its name.
        group = spec.strip()
        tag_source_group(loaded, group)
        read.read[group] = read.read.get(group, 0) + len(loaded)
        read.records.extend(loaded)
        read.skipped[spec] = dict(report.skipped)
        read.warnings.extend(report.warnings)
        bar.advance(task)
    return read


def exclude_sources(
    records: list[Record], patterns: Sequence[str]
) -> tuple[list[Record], int, list[str]]:
    """(records kept, how many were left out, a warning per pattern that matched no source)."""
    if not patterns:
        return records, 0, []
    kept = [r for r in records if not any(fnmatch.fnmatchcase(r.source, p) for p in patterns)]
    names = sorted({r.source for r in records})
    # A typo in an exclude pattern would otherwise silently train on that data.
    warnings = [
        f"exclude pattern '{pattern}' matched no source (sources: {', '.join(names)})"
        for pattern in patterns
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names)
    ]
    return kept, len(records) - len(kept), warnings


def split_counts(
    records: Sequence[Record], splits: dict[str, list[Record]], read: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """The data card's tallies of the kept records: topics, per source, per recipe entry (split
    by split), per qtype (most common first, ties in reading order)."""
    per_source: dict[str, dict[str, int]] = {}
    groups = {
        group: {"read": count, "kept": 0, **dict.fromkeys(SPLIT_NAMES, 0)}
        for group, count in read.items()
    }
    for name in SPLIT_NAMES:
        for record in splits[name]:
            per_source.setdefault(record.source, dict.fromkeys(SPLIT_NAMES, 0))[name] += 1
            group = groups[source_group(record)]
            group["kept"] += 1
            group[name] += 1
    return {
        "topics": {name: len({topic_key(r) for r in splits[name]}) for name in SPLIT_NAMES},
        "per_source": dict(sorted(per_source.items())),
        "source_groups": groups,
        "per_qtype": dict(Counter(r.qtype or "unknown" for r in records).most_common()),
    }


def token_lengths(
    splits: dict[str, list[Record]], count_tokens: CountTokens, bar: Any
) -> dict[str, dict[str, float] | None]:
    """Each split's formatted-length percentiles, counted `STEP` records per call."""
    task = bar.add_task("counting tokens", total=sum(len(part) for part in splits.values()))
    stats = {}
    for name in SPLIT_NAMES:
        lengths: list[int] = []
        for start in range(0, len(splits[name]), STEP):
            chunk = splits[name][start : start + STEP]
            lengths += count_tokens(chunk)
            bar.advance(task, len(chunk))
        stats[name] = _length_stats(lengths)
    return stats


def prepare_data(
    sources: Sequence[str],
    out_dir: Path,
    *,
    column_map: dict[str, str] | None = None,
    exclude: Sequence[str] = (),
    strict: bool = False,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    count_tokens: CountTokens | None = None,
    hygiene: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load, filter, clean and split every source; write the splits and the data card.

    `count_tokens`: records → their formatted lengths (`format.token_counter`), for the card's
    percentiles. `hygiene`: the answer-hygiene rules (`medlora.data.hygiene`); None: all of them
    on MedQuAD records, none on others. Every stage shows its progress on stderr.
    """
    out_dir = Path(out_dir)
    if not sources:
        raise DataError("no data sources given; add --source KIND:PATH or set data.sources")
    with progress_bar() as bar:
        read = read_sources(sources, column_map, strict, bar)
        records, excluded, excluded_warnings = exclude_sources(read.records, exclude)
        read.records = []
        task = bar.add_task("cleaning", total=len(records))
        records, clean_counts = clean_records(_tracked(_handed_on(records), bar, task))
        task = bar.add_task("answer hygiene", total=len(records))
        records, hygiene_counts = apply_hygiene(_tracked(records, bar, task), hygiene)
        if not records:
            raise DataError(
                f"no records left from {', '.join(sources)} after exclude and cleaning; "
                "check data.sources and data.exclude"
            )
        task = bar.add_task("splitting by topic", total=len(records))
        splits = split_by_topic(_tracked(records, bar, task), val_fraction, test_fraction)
        task = bar.add_task("writing splits", total=len(records))
        for name in SPLIT_NAMES:
            rows = (r.to_dict() for r in _tracked(splits[name], bar, task))
            write_jsonl_atomic(out_dir / f"{name}.jsonl", rows)
        lengths = token_lengths(splits, count_tokens, bar) if count_tokens else None
    card: dict[str, Any] = {
        "sources": list(sources),
        "exclude": list(exclude),
        "fractions": {"validation": val_fraction, "test": test_fraction},
        "splits": {name: len(splits[name]) for name in SPLIT_NAMES},
        **split_counts(records, splits, read.read),
        "skipped": {**read.skipped, "cleaning": {"excluded": excluded, **clean_counts}},
        # Per answer-hygiene rule: answers it changed and answers it dropped.
        "hygiene": {
            "rules": "medquad-default" if hygiene is None else list(hygiene),
            **hygiene_counts,
        },
        "warnings": _cap_warnings([*read.warnings, *excluded_warnings]),
        "token_lengths": lengths,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
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
