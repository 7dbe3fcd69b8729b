"""A training step with unlikelihood, fused into the chunked answer head vs on materialised logits.

    python bench/unlikelihood_step.py [--train 96] [--out runs/bench-peer]

The demo recipe trains with `train.unlikelihood_alpha: 1`. Its term needs each answer position's
probabilities of the tokens already written, which the first version took from the whole
(answer tokens x 49k vocabulary) log-softmax, so a step with unlikelihood left the fused head
(`train/kernels/answer_head.py`). Now the term and its gradient are added inside the head's chunks.
Both paths still exist (`answer_loss_sum(fused=False)` is the materialised one), so this bench runs
them in one process, with the fused head without unlikelihood (the term's cost) as a third, taking
turns on the same packed rows of the demo recipe's model (its LoRA on all linear layers,
`train.precision: auto`), and measures each step's time, then in a second pass over a few rows the RSS a step adds above its
start (`PeakSampler`: Linux's exact high-water mark). Writes the `unlikelihood-step` section of
docs/benchmarks.md: median ratios per row, and the two unlikelihood paths' losses.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peer_recipe import THREADS, _examples, _recipe_path, step_bench_data  # noqa: E402

ROW_TOKENS = 1024  # the demo's train.tokens_per_batch
MEMORY_ROWS = 4  # rows whose steps are measured again for their peak RSS


def main() -> None:
    import torch

    from medlora.config import load_recipe
    from medlora.data.pack import collate_packed, pack_rows
    from medlora.machine import cpu_flags
    from medlora.train.arguments import resolve_precision
    from medlora.train.kernels.answer_head import answer_loss_sum
    from medlora.train.loop import build_model
    from medlora.train.memory import PeakSampler, current_rss_bytes

    args, data = step_bench_data(__doc__.splitlines()[0])
    # auto resolved as `medlora train` does, so build_model holds frozen weights as a run would.
    recipe = resolve_precision(
        load_recipe(_recipe_path(), [f"train.tokens_per_batch={ROW_TOKENS}"])
    )
    alpha = recipe.train.unlikelihood_alpha
    model, tokenizer = build_model(recipe, None)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr)
    examples, _ = _examples(data, tokenizer)
    rows = pack_rows(examples, ROW_TOKENS, 0)
    precision = recipe.train.precision
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    paths = {
        "materialised": (False, alpha),
        "fused": (True, alpha),
        "fused, no unlikelihood": (True, 0.0),
    }

    def step(row: dict[str, Any], path: str) -> tuple[float, float]:
        """Seconds and loss per answer token of one forward + backward."""
        fused, weight = paths[path]
        batch = collate_packed([row])
        started = time.perf_counter()
        with autocast:
            loss_sum, count, _ = answer_loss_sum(model, batch, fused, weight, recipe.train.kernels)
        (loss_sum / count).backward()
        optimizer.zero_grad(set_to_none=True)  # no update: every path sees the same weights
        return time.perf_counter() - started, float(loss_sum.detach()) / count

    def added_rss(row: dict[str, Any], path: str) -> float:
        """MiB of RSS one step adds above its start. A separate pass: PeakSampler returns freed
        memory to the system first, and the timed steps must not pay to fault it in again (a
        training step does not)."""
        with PeakSampler("cpu") as peak:
            start = current_rss_bytes()
            step(row, path)
        return (peak.peak - start) / 2**20

    for path in paths:  # warm-up: first-call allocations and kernel selection
        step(rows[0], path)
    time_ratios: list[float] = []
    cost_ratios: list[float] = []
    totals = dict.fromkeys(paths, 0.0)
    gaps: list[float] = []
    tokens = 0
    for index, row in enumerate(rows[1:]):
        order = list(paths)[index % 3 :] + list(paths)[: index % 3]  # each path first in turn
        seconds: dict[str, float] = {}
        losses: dict[str, float] = {}
        for name in order:
            seconds[name], losses[name] = step(row, name)
            totals[name] += seconds[name]
        time_ratios.append(seconds["materialised"] / seconds["fused"])
        cost_ratios.append(seconds["fused"] / seconds["fused, no unlikelihood"])
        gaps.append(abs(losses["fused"] - losses["materialised"]) / losses["materialised"])
        tokens += sum(len(part["input_ids"]) for part in row["parts"])
        print(f"row {index + 1}/{len(rows) - 1}: materialised ÷ fused time {time_ratios[-1]:.2f}")
    rss: dict[str, list[float]] = {path: [] for path in paths}
    for row in rows[1 : 1 + MEMORY_ROWS]:
        for name in paths:
            rss[name].append(added_rss(row, name))
    flags = sorted(f for f in ("avx2", "avx512f", "amx_bf16") if f in cpu_flags())
    ratios = {"time": time_ratios, "cost": cost_ratios}
    write_doc(args, alpha, precision, flags, len(rows) - 1, tokens, ratios, rss, totals, gaps)


def write_doc(
    args: argparse.Namespace,
    alpha: float,
    precision: str,
    flags: list[str],
    n_rows: int,
    tokens: int,
    ratios: dict[str, list[float]],
    rss: dict[str, list[float]],
    totals: dict[str, float],
    gaps: list[float],
) -> None:
    import torch
    from _markdown import update_section

    time_ratios = ratios["time"]
    quartiles = statistics.quantiles(time_ratios, n=4)
    lines = [
        "## Unlikelihood in the fused answer head vs on materialised logits: one training step (CPU)",
        "",
        f"Command: `python bench/unlikelihood_step.py --train {args.train}` ({os.cpu_count()} CPU "
        f"cores, {platform.machine()} with {', '.join(flags) or 'none of avx2/avx512f/amx'}, torch "
        f"{torch.__version__}, {THREADS} threads, {precision}; both paths in one process taking "
        "turns row by row).",
        f"{n_rows} packed rows of ≤{ROW_TOKENS} tokens ({tokens:,} tokens) of MedQuAD examples "
        f"through the demo recipe's model (LoRA r=4 on all linear layers), cross-entropy plus "
        f"unlikelihood at alpha {alpha:g} (the third path: cross-entropy alone), forward and "
        "backward (no optimizer update).",
        "",
        f"| path | seconds | tokens/s | RSS a step adds, median of {len(rss['fused'])} rows (MiB) | max (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in rss:
        lines.append(
            f"| {name} | {totals[name]:.1f} | {tokens / totals[name]:.0f} | "
            f"{statistics.median(rss[name]):.0f} | {max(rss[name]):.0f} |"
        )
    lines += [
        "",
        f"fused ÷ materialised tokens/s: **{statistics.median(time_ratios):.2f}x** (median of the "
        f"per-row ratios; quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}); the step's added RSS "
        f"{statistics.median(rss['fused']) / statistics.median(rss['materialised']):.2f}x "
        f"(medians). Largest relative gap between the two unlikelihood losses on a row: "
        f"{max(gaps):.1e}. The term's own cost, fused with ÷ without: "
        f"{statistics.median(ratios['cost']):.2f}x the time (median per row).",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    update_section("unlikelihood-step", body)


if __name__ == "__main__":
    main()
