"""Mixing several sources by weight: which recipe entry a record came from, and seeded mixing.

A *source group* is the recipe's source entry as written (`medquad`, `pubmedqa`,
`jsonl:mine.jsonl`), stored in `Record.meta["source_group"]` by `prepare_data`, so weights,
data-card counts and (later) per-source validation loss all use the same name.

`data.mix_by: source` mixes by the record's own source instead (a MedQuAD collection such as
`medquad/2_GARD_QA`): with no weights every collection gets an equal share, so two large
templated collections no longer make up most of a small training sample.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from medlora.data.format import Example
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.errors import DataError

GROUP_KEY = "source_group"


def source_group(record: Record) -> str:
    """The recipe source entry `record` came from (e.g. `medquad`, `jsonl:mine.jsonl`).

    Splits prepared before groups were recorded fall back to the record's source name, with
    MedQuAD collections folded into `medquad` (the recipe lists MedQuAD as one entry).
    """
    group = record.meta.get(GROUP_KEY)
    if isinstance(group, str) and group:
        return group
    head = record.source.split("/", 1)[0]
    return head if head in ("medquad", "pubmedqa") else record.source


def tag_source_group(records: Iterable[Record], group: str) -> None:
    """Record in each record's meta which source entry it came from (in place)."""
    for record in records:
        record.meta[GROUP_KEY] = group


MixBy = Literal["entry", "source"]


def mix_key(by: MixBy) -> Callable[[Record], str]:
    """The name a record is mixed under: its recipe entry, or its own source (collection)."""
    if by == "source":
        return lambda record: record.source
    return source_group


def _quotas(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, each within one of `total * weight / sum(weights)`."""
    weight_sum = sum(weights.values())
    exact = {group: total * weight / weight_sum for group, weight in weights.items()}
    quotas = {group: int(value) for group, value in exact.items()}
    # Largest remainder first; ties go to the group listed first, so the result is stable.
    order = sorted(exact, key=lambda g: -(exact[g] - quotas[g]))
    for group in order[: total - sum(quotas.values())]:
        quotas[group] += 1
    return quotas


def _draw(records: Sequence[Record], count: int, rng: random.Random) -> list[Record]:
    """`count` records: a sample without repeats, or every record repeated (upsampling)."""
    repeats, rest = divmod(count, len(records))
    drawn = list(records) * repeats
    drawn += [records[i] for i in sorted(rng.sample(range(len(records)), rest))]
    return drawn


def training_records(
    records: Sequence[Record],
    weights: Mapping[str, float],
    total: int | None,
    seed: int,
    by: MixBy = "entry",
) -> tuple[list[Record], dict[str, Any] | None]:
    """The records a run trains on, and the mixing stats (None when nothing was mixed).

    Without weights (and `by` "entry") nothing is mixed: a seeded sample of at most `total`
    records in split order. Otherwise `total` records (None: as many as there are) are drawn so
    each group gets its weight's share; `by` names the groups: recipe entries (`medquad`) or
    record sources (`medquad/2_GARD_QA`, each weighing 1 unless weighted). `weights` maps groups
    to weights > 0; a group present in `records` but not in `weights` weighs 1. A group whose
    share exceeds its size is repeated (upsampled) and the stats say so. The result is shuffled
    with `seed` (a group-by-group order would train on one source after the other).
    """
    if not weights and by == "entry":
        return sample_records(records, total, seed), None
    weights = {group.strip(): weight for group, weight in weights.items()}  # as prepare names them
    key = mix_key(by)
    by_group: dict[str, list[Record]] = {}
    for record in records:
        by_group.setdefault(key(record), []).append(record)
    missing = [group for group in weights if group not in by_group]
    if missing:
        present = ", ".join(by_group) or "none"
        what = "record sources" if by == "source" else "source groups"
        raise DataError(
            f"data.weights names '{missing[0]}' but no training record came from it "
            f"({what} in the training split: {present}); weight the sources the "
            "splits were prepared from, or prepare them again"
        )
    effective = {group: float(weights.get(group, 1.0)) for group in by_group}
    total = len(records) if total is None else total
    quotas = _quotas(effective, total)
    mixed: list[Record] = []
    groups: dict[str, dict[str, Any]] = {}
    weight_sum = sum(effective.values())
    for group, members in by_group.items():
        # One RNG per group: a group's draw does not change when another source is added.
        drawn = _draw(members, quotas[group], random.Random(f"{seed}:{group}"))
        mixed.extend(drawn)
        groups[group] = {
            "weight": effective[group],
            "target_share": round(effective[group] / weight_sum, 4),
            "available": len(members),
            "drawn": len(drawn),
            "upsampled": len(drawn) > len(members),
            "drawn_per_record": round(len(drawn) / len(members), 2),
        }
    random.Random(seed).shuffle(mixed)
    # Shaped as data_card.json's `used.mix`, plus the per-group draws.
    stats = {
        "by": by,
        "weights": effective,
        "seed": seed,
        "total": total,
        "upsampled": [group for group, g in groups.items() if g["upsampled"]],
        "groups": groups,
    }
    return mixed, stats


def used_by_group(
    records: Sequence[Record],
    examples: Sequence[Example],
    mix: Mapping[str, Any] | None = None,
    validation: Sequence[Record] = (),
) -> dict[str, Any]:
    """What training used, per source group, for `data_card.json` under `used`.

    `examples` are `format_records(records)`: same order, minus the records that were dropped
    (no answer token left after truncation), so token shares are those actually trained on.
    Returns {"per_group": {group: {examples, tokens, token_share, …, mixing stats}}, "mix": …,
    "validation_per_group": {group: records}} (validation is never reweighted).
    """
    key = mix_key(mix["by"] if mix else "entry")
    groups: dict[str, dict[str, Any]] = {}
    position = 0
    for record in records:
        group = groups.setdefault(key(record), {"examples": 0, "tokens": 0, "answer_tokens": 0})
        if position < len(examples) and examples[position].record_id == record.id:
            example = examples[position]
            group["examples"] += 1
            group["tokens"] += len(example.input_ids)
            group["answer_tokens"] += example.answer_tokens
            position += 1
    total_tokens = sum(g["tokens"] for g in groups.values()) or 1
    total_answer = sum(g["answer_tokens"] for g in groups.values()) or 1
    drawn = mix["groups"] if mix else {}
    for name, group in groups.items():
        group["token_share"] = round(group["tokens"] / total_tokens, 4)
        group["answer_token_share"] = round(group["answer_tokens"] / total_answer, 4)
        group.update(drawn.get(name, {}))
    return {
        "per_group": groups,
        "mix": {k: v for k, v in mix.items() if k != "groups"} if mix else None,
        "validation_per_group": dict(Counter(key(r) for r in validation)),
    }
