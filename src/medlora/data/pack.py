"""Padding-free micro-batches: several examples packed into one row under a token budget.

Each packed row restarts `position_ids` at 0 for every example and carries no attention mask;
transformers then builds a block-diagonal causal mask from the position restarts (masking_utils'
packed-sequence detection, for sdpa and eager attention; flash-attention uses them natively), so
no token attends across an example boundary. The first label of every example is -100: in an
unpacked row that position is never a target either, so packed and unpacked losses are equal.

Why not transformers' `DataCollatorWithFlattening`: it builds the same kind of row (position
restarts, -100 at each boundary) but flattens whatever `batch_size` examples the sampler hands it,
so rows vary in length with the examples drawn. Here rows are filled to a token budget first, which
is what `train.tokens_per_batch` (and `auto` under `train.max_memory_gb`) promises to hold.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from medlora.data.format import IGNORE_INDEX


def pack_lengths(lengths: Sequence[int], budget: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into bins of at most `budget` tokens (first-fit decreasing).

    First-fit decreasing wastes little of each bin; a seeded shuffle of equal-length ties keeps
    the result deterministic without depending on input order alone. An example longer than the
    budget gets a bin of its own (it was already cut to data.max_seq_len).
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = lengths[index]
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(budget - size)
    return bins


def pack_rows(examples: Sequence[Any], budget: int, seed: int = 0) -> list[dict[str, Any]]:
    """Packed dataset rows: each holds the ids/labels of the examples in one bin."""
    lengths = [len(e.input_ids) for e in examples]
    parts = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    return [
        {"parts": [parts[i] for i in members]} for members in pack_lengths(lengths, budget, seed)
    ]


def row_width_multiple(tokens_per_batch: int, widths: int = 8) -> int:
    """The multiple that gives packed rows of `tokens_per_batch` at most `widths` distinct widths.

    CPU bf16 matmuls (oneDNN) keep a compiled kernel for every new matrix shape, so a row width
    never seen before costs memory for the rest of the run: a packed run's RSS climbed step after
    step past `train.max_memory_gb`. Padding to one of 8 widths caps that; packed rows are mostly
    full, so it adds little compute.
    """
    return max(64, -(-tokens_per_batch // widths))


def collate_packed(rows: Sequence[dict[str, Any]], pad_to_multiple: int = 1) -> dict[str, Any]:
    """Flatten packed rows into a (len(rows), width) batch with per-example position_ids.

    Rows of one micro-batch are right-padded to the longest, and the width up to a multiple of
    `pad_to_multiple` (a few row widths instead of one per batch: see `row_width_multiple`);
    padding gets its own position run and label -100, so it is masked like a separate example and
    never trained.
    """
    import torch

    flat: list[tuple[list[int], list[int], list[int]]] = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for part in row["parts"]:
            n = len(part["input_ids"])
            ids.extend(part["input_ids"])
            labels.extend([IGNORE_INDEX, *part["labels"][1:]])
            positions.extend(range(n))
        flat.append((ids, labels, positions))
    width = max(len(ids) for ids, _, _ in flat)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = torch.zeros((len(flat), width), dtype=torch.long)
    label_t = torch.full((len(flat), width), IGNORE_INDEX, dtype=torch.long)
    position_t = torch.zeros((len(flat), width), dtype=torch.long)
    for r, (ids, labels, positions) in enumerate(flat):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        label_t[r, :n] = torch.tensor(labels)
        position_t[r, :n] = torch.tensor(positions)
        position_t[r, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": label_t, "position_ids": position_t}
