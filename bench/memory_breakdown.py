"""Where a CPU training step's memory goes, medlora's model against stock transformers + PEFT.

    python bench/memory_breakdown.py [--precision bf16] [--rows 256,512,1024] [--lora peer|recipe]

Two setups of the same model, LoRA and rows, each in its own process (so each peak RSS is its own):
`stock` is transformers + PEFT as they come (sdpa attention, stock norms and MLP, PEFT dropout,
logits then cross-entropy); `medlora` is `medlora.train.loop.build_model` with the fused answer
head, as `medlora train` runs them. For each: the runtime (RSS after importing torch,
transformers and PEFT), the weights, the floor between steps, what one forward saves for the
backward per token of a packed row (by part of the layer, frozen weights not counted: they are
resident anyway), and the peak RSS of one forward + backward by row length.
`--lora peer` is the model card's LoRA (r 4 on q/v, the setting of `bench/peer_recipe.py`),
`recipe` the demo recipe's (all linear layers). Writes the `memory-breakdown-<precision>` section.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)
from pydantic import BaseModel

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

GIB, KIB = 2**30, 2**10
PEER_LORA = [
    "lora.r=4",
    "lora.alpha=32",
    "lora.dropout=0.05",
    "lora.target_modules=[q_proj,v_proj]",
]


class SetupMemory(BaseModel):
    """One setup's figures (a child process prints it as JSON)."""

    setup: str
    runtime_gb: float  # RSS after importing torch, transformers and PEFT
    weights_gb: float  # parameters, frozen and LoRA
    floor_gb: float  # RSS between steps, after one step and a trim
    saved_kb_per_token: dict[str, float]  # what the forward keeps for the backward, by part
    row_tokens: int  # the row the saved tensors were counted on
    peak_gb_by_row: dict[int, float]  # peak RSS of one forward + backward


class MemoryBreakdown(BaseModel):
    precision: str
    lora: str
    setups: list[SetupMemory]


def _part(module_name: str) -> str:
    """The part of the layer a saved tensor belongs to, from the innermost module running."""
    if "lora_" in module_name:
        return "LoRA (dropout, A, B)"
    if ".mlp" in module_name:
        return "MLP (gate, up, SiLU product)"
    if "self_attn" in module_name:
        return "attention (q, k, v, softmax)"
    if "norm" in module_name:
        return "RMSNorm"
    if ".layers." not in module_name:
        return "head, loss and embeddings"  # the causal LM's own forward, its head, the embedding
    return "other"


def _loss(setup: str, model: Any, batch: dict[str, Any]) -> Any:
    """stock: the model's own loss (logits at every position); medlora: the fused answer head."""
    if setup == "stock":
        return model(**batch).loss
    from medlora.train.kernels.answer_head import answer_loss_sum

    loss, count, _ = answer_loss_sum(model, batch, fused=True)
    return loss / max(count, 1)


def _saved_by_part(
    setup: str, model: Any, batch: dict[str, Any], autocast: bool
) -> dict[str, float]:
    """KB per token that one forward saves for the backward, by part; parameters excluded."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    tally: collections.Counter[str] = collections.Counter()
    running: list[str] = [""]
    names = {module: name for name, module in model.named_modules()}

    def enter(module: Any, *_: Any) -> None:
        running.append(names.get(module, "?"))

    def leave(module: Any, *_: Any) -> None:
        running.pop()

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in weights and key not in seen:
            seen.add(key)
            tally[_part(running[-1])] += storage.nbytes()
        return tensor

    hooks = [m.register_forward_pre_hook(enter) for m in names if m is not model]
    hooks += [m.register_forward_hook(leave) for m in names if m is not model]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(setup, model, batch)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    tokens = batch["input_ids"].shape[1]
    return {part: round(size / tokens / KIB, 1) for part, size in tally.most_common()}


def _stock_model(recipe: Any) -> tuple[Any, Any]:
    from peft import get_peft_model

    from medlora.models import load_recipe_model
    from medlora.train.arguments import hold_frozen_weights_in_bf16, lora_config

    model, tokenizer = load_recipe_model(recipe)
    return get_peft_model(
        hold_frozen_weights_in_bf16(model, recipe), lora_config(recipe)
    ), tokenizer


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from medlora.train.memory import PeakSampler, current_rss_bytes, release_free_memory

    release_free_memory()
    runtime = current_rss_bytes()
    from medlora.config import load_recipe
    from medlora.data.format import format_records
    from medlora.data.pack import pack_rows
    from medlora.data.prepare import load_splits
    from medlora.train.loop import build_model, packed_collator

    lora = PEER_LORA if args.lora == "peer" else []
    recipe = load_recipe(
        _recipe_path(), [f"train.precision={args.precision}", "train.packing=true", *lora]
    )
    model, tokenizer = _stock_model(recipe) if args.child == "stock" else build_model(recipe, None)
    model.train()
    examples, _ = format_records(
        tokenizer, load_splits(Path(args.data))["train"], recipe.data.system_prompt,
        recipe.data.max_seq_len,
    )  # fmt: skip
    autocast = recipe.train.precision == "bf16"

    def row(tokens: int) -> dict[str, Any]:
        rows = pack_rows(examples, tokens, 0)
        fullest = max(rows, key=lambda r: sum(len(p["input_ids"]) for p in r["parts"]))
        return packed_collator(recipe, tokens)([fullest])

    def step(batch: dict[str, Any]) -> int:
        with PeakSampler("cpu") as peak:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(args.child, model, batch)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return peak.peak

    rows = [int(r) for r in args.rows.split(",")]
    step(row(rows[0]))  # thread pools, kernels, the head's scratch: one-time allocations
    release_free_memory()
    floor = current_rss_bytes()
    peaks = {tokens: round(step(row(tokens)) / GIB, 3) for tokens in rows}
    counted = rows[len(rows) // 2]
    saved = _saved_by_part(args.child, model, row(counted), autocast)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = SetupMemory(
        setup=args.child,
        runtime_gb=round(runtime / GIB, 3),
        weights_gb=round(weights / GIB, 3),
        floor_gb=round(floor / GIB, 3),
        saved_kb_per_token=saved,
        row_tokens=counted,
        peak_gb_by_row=peaks,
    )
    print("RESULT " + result.model_dump_json(), flush=True)


def _recipe_path() -> Path:
    from medlora.cli import BUNDLED_RECIPES

    return BUNDLED_RECIPES / "smollm2-135m-cpu.yaml"


def _run_child(setup: str, args: argparse.Namespace) -> SetupMemory:
    command = [
        sys.executable, __file__, "--child", setup, "--precision", args.precision,
        "--rows", args.rows, "--lora", args.lora, "--data", args.data,
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return SetupMemory.model_validate_json(line.removeprefix("RESULT "))


def _ensure_data(data: Path) -> None:
    if (data / "train.jsonl").is_file():
        return
    from medlora.config import load_recipe
    from medlora.data.prepare import prepare_data

    d = load_recipe(_recipe_path()).data
    print(f"preparing the recipe's MedQuAD splits into {data}", flush=True)
    prepare_data(d.sources, data, exclude=d.exclude, val_fraction=d.val_fraction)


def write_doc(result: MemoryBreakdown, args: argparse.Namespace) -> str:
    import torch
    from _markdown import update_section

    stock, medlora = result.setups
    parts = list(dict.fromkeys([*stock.saved_kb_per_token, *medlora.saved_kb_per_token]))
    lines = [
        f"## Where a CPU training step's memory goes ({args.precision}, {args.lora} LoRA)",
        "",
        f"Command: `python bench/memory_breakdown.py --precision {args.precision} --rows "
        f"{args.rows} --lora {args.lora}` ({os.cpu_count()} CPU cores, {platform.machine()}, "
        f"torch {torch.__version__}; each setup in its own process, one after the other).",
        "`stock`: transformers + PEFT as they come (sdpa attention, stock norms and MLP, PEFT "
        "dropout, logits then cross-entropy), frozen weights in the same dtype; `medlora`: "
        "`build_model` and the fused answer head, as `medlora train` runs them. Packed rows of "
        "the recipe's MedQuAD training split (the fullest row of each length).",
        "",
        "| | stock | medlora | medlora ÷ stock |",
        "|---|---:|---:|---:|",
        f"| runtime (torch, transformers, PEFT imported), GB | {stock.runtime_gb:.2f} | "
        f"{medlora.runtime_gb:.2f} | |",
        f"| weights, GB | {stock.weights_gb:.2f} | {medlora.weights_gb:.2f} | |",
        f"| floor between steps, GB | {stock.floor_gb:.2f} | {medlora.floor_gb:.2f} | "
        f"{medlora.floor_gb / stock.floor_gb:.2f} |",
    ]
    for part in parts:
        a, b = stock.saved_kb_per_token.get(part, 0.0), medlora.saved_kb_per_token.get(part, 0.0)
        ratio = f"{b / a:.2f}" if a else ""
        lines.append(f"| saved for backward: {part}, KB/token | {a:.0f} | {b:.0f} | {ratio} |")
    a, b = sum(stock.saved_kb_per_token.values()), sum(medlora.saved_kb_per_token.values())
    lines.append(
        f"| saved for backward, all ({medlora.row_tokens}-token row), KB/token | {a:.0f} | "
        f"{b:.0f} | {b / a:.2f} |"
    )
    for tokens in medlora.peak_gb_by_row:
        a, b = stock.peak_gb_by_row[tokens], medlora.peak_gb_by_row[tokens]
        lines.append(f"| peak RSS, {tokens}-token row, GB | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    body = "\n".join(lines) + "\n"
    update_section(f"memory-breakdown-{args.precision}", body)
    return body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rows", default="256,512,1024", help="row lengths, shortest first")
    parser.add_argument("--lora", choices=["peer", "recipe"], default="peer")
    parser.add_argument("--data", default="runs/bench-memory/data")
    parser.add_argument("--child", choices=["stock", "medlora"])
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    _ensure_data(Path(args.data))
    setups = [_run_child(setup, args) for setup in ("stock", "medlora")]
    result = MemoryBreakdown(precision=args.precision, lora=args.lora, setups=setups)
    print(json.dumps(result.model_dump(), indent=1))
    print(write_doc(result, args))


if __name__ == "__main__":
    main()
