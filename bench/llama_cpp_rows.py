"""What one llama.cpp decode step costs by the number of rows (requests) it carries: the ceiling of
continuous batching on llama.cpp (serve/llama_cpp_continuous.py) on this CPU.

    python bench/llama_cpp_rows.py --run runs/demo [--rounds 3] [--steps 8] [--threads 2]

One context of the continuous engine per model (the base alone, and the run's GGUF LoRA on the q8_0
base), as serving makes them. For each row count, every row first gets a 40-token prompt, then
`--steps` decode steps of one token per row are timed; the median step is kept, and the median over
`--rounds` rounds (row counts interleaved, so machine load hits them alike). The continuous engine
runs one such step per served model in use, so under mixed traffic each call carries the rows of
one model only. Writes the `llama-cpp-rows` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)
from _markdown import update_section

from medlora.export.gguf import base_gguf, cached_gguf_lora
from medlora.models import SMOLLM2_ALIAS, load_tokenizer
from medlora.serve.llama_cpp_continuous import LlamaCppContinuous

PROMPT_TOKENS = 40
ROWS = (1, 2, 4, 8, 16, 32)


def step_seconds(engine: LlamaCppContinuous, model: str, rows: int, steps: int) -> float:
    """Median seconds of one decode step over `rows` sequences of `model`'s context."""
    import llama_cpp

    context = engine._context(model)
    llama_cpp.llama_memory_seq_rm(context.memory, -1, -1, -1)
    prompt = list(range(100, 100 + PROMPT_TOKENS))  # any ids: the cost does not depend on them
    for seq in range(rows):
        engine._decode(context, [(t, i, seq, False) for i, t in enumerate(prompt)])
    times = []
    for step in range(steps):
        start = time.perf_counter()
        engine._decode(context, [(200, PROMPT_TOKENS + step, seq, True) for seq in range(rows)])
        times.append(time.perf_counter() - start)
    llama_cpp.llama_memory_seq_rm(context.memory, -1, -1, -1)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    loras = {"tuned": cached_gguf_lora(args.run, SMOLLM2_ALIAS), "base": None}
    base = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    engine = LlamaCppContinuous(base, loras, tokenizer, threads=args.threads, max_batch=max(ROWS))
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for rows in ROWS:
            for model in loras:
                took = step_seconds(engine, model, rows, args.steps)
                seconds.setdefault((model, rows), []).append(took)
    engine.close()

    median = {key: statistics.median(values) for key, values in seconds.items()}
    lines = []
    for rows in ROWS:
        tuned, plain = median[("tuned", rows)], median[("base", rows)]
        lines.append(
            f"| {rows} | {tuned * 1000:.1f} | {rows / tuned:.0f} | "
            f"{(rows / tuned) / (1 / median[('tuned', 1)]):.2f}× | "
            f"{plain * 1000:.1f} | {rows / plain:.0f} |"
        )
    table = "\n".join(lines)
    body = f"""## llama.cpp decode step by rows: the ceiling of continuous batching (CPU)

Command: `python bench/llama_cpp_rows.py --run {args.run} --rounds {args.rounds} --steps {args.steps}` ({args.threads} threads,
{platform.machine()}, SmolLM2-135M q8_0 base in one continuous-engine context per model; each row a
{PROMPT_TOKENS}-token prompt, then one token per row per step; median step of {args.steps}, median of
{args.rounds} interleaved rounds).

| rows per step | with the run's GGUF LoRA: ms per step | tokens/s | × 1 row's tokens/s | base alone: ms per step | tokens/s |
|---:|---:|---:|---:|---:|---:|
{table}
"""
    print(body)
    update_section("llama-cpp-rows", body)


if __name__ == "__main__":
    main()
