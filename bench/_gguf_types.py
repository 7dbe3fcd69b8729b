"""bench/inference.py's GGUF-type table: each type's answer-token loss on the run's test answers
against the float model, next to its speed, merged and as base + GGUF LoRA, and the type
`--gguf-type` should default to (the fastest within 2 % of the float model's loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def heldout_examples(run: Path, tokenizer: Any, limit: int) -> list[Any]:
    """`limit` test-split answers of the run (its prepared data, else its recipe's sources),
    tokenized as the run trained: the examples every GGUF type is scored on."""
    from medlora.data.format import format_records
    from medlora.evaluate.heldout import run_recipe, sampled_eval_records

    recipe = run_recipe(run)
    prepared = run / "data"
    data = str(prepared) if (prepared / "test.jsonl").is_file() else recipe.data.sources[0]
    records = sampled_eval_records(data, "test", recipe, limit=limit)
    d = recipe.data
    return format_records(tokenizer, records, d.system_prompt, d.max_seq_len, d.truncation)[0]


# Decode speeds within 5 % of each other are a tie (repeat runs of one type differ by that much
# on this shared machine); a tie goes to the lower loss, so noise never buys fidelity.
SPEED_TIE = 0.05


def fastest_within(losses: dict[str, float], tps: dict[str, float], tolerance: float) -> str:
    """The key of `tps` with the highest decode tokens/s whose answer loss is within `tolerance`
    (relative) of the float model's; among those within SPEED_TIE of the fastest, the lowest loss."""
    floor = losses["float32"]
    fits = [t for t in tps if losses[t] <= floor * (1 + tolerance)]
    if not fits:
        return ""
    fastest = max(tps[t] for t in fits)
    return min((t for t in fits if tps[t] >= fastest * (1 - SPEED_TIE)), key=lambda t: losses[t])


def gguf_type_table(
    rows: dict[str, dict[str, float]], losses: dict[str, float], snippet_tps: float, n: int
) -> str:
    """Per GGUF type: answer loss and speed, merged and as base + GGUF LoRA (serving's default),
    and the type `--gguf-type` should default to."""
    types = [t for t in losses if t != "float32" and not t.endswith(" + LoRA")]
    merged = {t: rows[f"medlora llama.cpp (merged {t} GGUF)"] for t in types}
    lora = {t: rows[f"medlora llama.cpp ({t} base + GGUF LoRA)"] for t in types}
    lora_losses = {"float32": losses["float32"]} | {t: losses[f"{t} + LoRA"] for t in types}
    chosen = fastest_within(lora_losses, {t: lora[t]["tps"] for t in types}, 0.02)
    float_loss = losses["float32"]

    def change(loss: float) -> str:
        return f"{100 * (loss / float_loss - 1):+.2f} %"

    lines = [
        "",
        f"GGUF types: answer-token loss of {n} test answers of the run under llama.cpp, against the",
        f"float32 model under transformers on the same token ids ({float_loss:.4f}); decode speed",
        "from the table above. Merged = the adapter folded into the GGUF; LoRA = the base in that",
        "type plus the adapter as an f32 GGUF LoRA (`--llama-cpp-adapters lora`, serving's default).",
        "",
        "| type | merged: loss vs float32 | merged tok/s | LoRA: loss vs float32 | LoRA tok/s "
        "| LoRA ÷ merged tok/s | LoRA × snippet tok/s | LoRA first token (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in types:
        mark = " **(fastest within 2 %)**" if t == chosen else ""
        lines.append(
            f"| {t}{mark} | {change(losses[t])} | {merged[t]['tps']:.1f} | "
            f"{change(losses[t + ' + LoRA'])} | {lora[t]['tps']:.1f} | "
            f"{lora[t]['tps'] / merged[t]['tps']:.2f} | {lora[t]['tps'] / snippet_tps:.2f} | "
            f"{lora[t]['ttft']:.3f} |"
        )
    from medlora.export.common import DEFAULT_GGUF_TYPE

    lines += [
        "",
        f"Fastest type (base + LoRA) within 2 % of the float model's loss, decode speeds within "
        f"{SPEED_TIE:.0%} counted as a tie that goes to the lower loss: **{chosen or 'none'}**. "
        f"`--gguf-type`'s default is {DEFAULT_GGUF_TYPE} (`medlora.export.common.DEFAULT_GGUF_TYPE`"
        "): it answers alike alone and in llama.cpp's continuous batches (the "
        "K-quants do not); give the fastest one for one-user serving.",
        "",
    ]
    return "\n".join(lines)
