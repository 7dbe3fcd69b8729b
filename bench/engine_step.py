"""Training-step throughput, the peer's way vs medlora's, interleaved on the same examples.

    python bench/engine_step.py [--train 96] [--out runs/bench-peer]

`peer_recipe.py` runs whole trainings one after another; on this shared machine the speed drifts
by 10-25% between runs, which is the size of the effect being measured. Here both engines live in
one process and take turns on the same tokens, so drift hits both alike:

- medlora: one packed row (≤1024 tokens) through `train.loop.build_model`'s model (the recipe's
  attention, dropout and fused answer loss), answer-only loss, backward, clip, AdamW step;
- peer: the examples of that same row one at a time, the way `Trainer` + `DataCollatorForSeq2Seq`
  feeds them at batch 1 (the model's own loss over full logits, stock PEFT LoRA), backward, with
  clip and AdamW every 4 examples.

Both use LoRA r=4 alpha 32 dropout 0.05 on q/v, lr 2e-5, the same MedQuAD examples and SmolLM2
weights as `peer_recipe.py`. The order alternates every row. Writes the `engine-step` section of
docs/benchmarks.md: the median per-row ratio of peer time to medlora time, and the totals.
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

from peer_recipe import (  # noqa: E402
    SAME_AS_PEER,
    SPEC,
    THREADS,
    _examples,
    _recipe_path,
    step_bench_data,
)

ROW_TOKENS = 1024
PEER_ACCUMULATION = 4


def _medlora_model() -> tuple[Any, Any]:
    from medlora.config import load_recipe
    from medlora.train.loop import build_model

    overrides = [*SAME_AS_PEER, "train.packing=true", f"train.tokens_per_batch={ROW_TOKENS}"]
    return build_model(load_recipe(_recipe_path(), overrides), None)


def _peer_model() -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model

    from medlora.models import load_model

    model, tokenizer = load_model(SPEC)
    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config), tokenizer


def _optimizer(model: Any) -> Any:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=2e-5)


def _step(model: Any, optimizer: Any) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def main() -> None:
    import torch

    from medlora.data.pack import collate_packed, pack_rows
    from medlora.train.kernels.answer_head import answer_loss_sum

    args, data = step_bench_data(__doc__.splitlines()[0])

    medlora_model, tokenizer = _medlora_model()
    peer_model, _ = _peer_model()
    medlora_model.train()
    peer_model.train()
    medlora_optimizer, peer_optimizer = _optimizer(medlora_model), _optimizer(peer_model)
    examples, _ = _examples(data, tokenizer)
    rows = pack_rows(examples, ROW_TOKENS, 0)
    by_ids = {tuple(e.input_ids): e for e in examples}

    def run_medlora(row: dict[str, Any]) -> None:
        loss_sum, count, _ = answer_loss_sum(medlora_model, collate_packed([row]))
        (loss_sum / count).backward()
        _step(medlora_model, medlora_optimizer)

    pending = {"examples": 0}

    def run_peer(row: dict[str, Any]) -> None:
        for part in row["parts"]:
            example = by_ids[tuple(part["input_ids"])]
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            out = peer_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            (out.loss / PEER_ACCUMULATION).backward()
            pending["examples"] += 1
            if pending["examples"] % PEER_ACCUMULATION == 0:
                _step(peer_model, peer_optimizer)

    run_medlora(rows[0])  # warm-up: first-call allocations and kernel selection
    run_peer(rows[0])
    ratios: list[float] = []
    totals = {"peer": 0.0, "medlora": 0.0}
    tokens = 0
    for index, row in enumerate(rows[1:]):
        order = [("peer", run_peer), ("medlora", run_medlora)]
        seconds: dict[str, float] = {}
        for name, run in order if index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run(row)
            seconds[name] = time.perf_counter() - started
        ratios.append(seconds["peer"] / seconds["medlora"])
        for name in totals:
            totals[name] += seconds[name]
        tokens += sum(len(part["input_ids"]) for part in row["parts"])
        print(f"row {index + 1}/{len(rows) - 1}: peer ÷ medlora time {ratios[-1]:.2f}", flush=True)
    write_doc(args, len(rows) - 1, tokens, ratios, totals)


def write_doc(
    args: argparse.Namespace,
    n_rows: int,
    tokens: int,
    ratios: list[float],
    totals: dict[str, float],
) -> None:
    import torch
    from _markdown import update_section

    quartiles = statistics.quantiles(ratios, n=4)
    lines = [
        "## Training step, interleaved: the peer's way vs medlora's on the same tokens (CPU)",
        "",
        f"Command: `python bench/engine_step.py --train {args.train}` ({os.cpu_count()} CPU "
        f"cores, {platform.machine()}, torch {torch.__version__}, {THREADS} threads, both "
        "engines in one process taking turns row by row).",
        f"{n_rows} packed rows of ≤{ROW_TOKENS} tokens ({tokens:,} tokens) from the `peer` "
        "section's MedQuAD examples; LoRA r=4 alpha 32 dropout 0.05 on q/v, AdamW lr 2e-5, grad "
        "clip 1.0 for both. Peer: each example alone through the model's own loss (full logits, "
        "stock PEFT), optimizer step every 4 examples. medlora: the row packed, the model "
        "`train()` builds (per-example attention with equal lengths batched, 15-bit dropout "
        "mask, frozen-weight RMSNorm, fused answer-only head and loss), one optimizer step.",
        "",
        "| engine | seconds | tokens/s |",
        "|---|---:|---:|",
        f"| peer | {totals['peer']:.1f} | {tokens / totals['peer']:.0f} |",
        f"| medlora | {totals['medlora']:.1f} | {tokens / totals['medlora']:.0f} |",
        "",
        f"medlora ÷ peer tokens/s: **{statistics.median(ratios):.2f}x** (median of the per-row "
        f"ratios; quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}); totals "
        f"{totals['peer'] / totals['medlora']:.2f}x.",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    update_section("engine-step", body)


if __name__ == "__main__":
    main()
