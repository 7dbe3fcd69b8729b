"""What keeping llama.cpp's attention on its plain kernel costs one request alone on the continuous
engine (serve/llama_cpp_continuous.py): a long prompt prefilled in pieces under 64 tokens against one
piece, and a lone row past 256 cells decoded with the throwaway spare token against without.
Under load nothing changes (many rows never take the tiled or split kernels).

    python bench/llama_cpp_plain_attention.py --run runs/demo [--repeats 5] [--threads 2]

Both variants run in one engine, alternating, so machine load hits them alike; medians are
reported. The "without" variants switch the engine's module constants (`prefill_chunks`,
`SPLIT_ATTENTION_CELLS`) back to llama.cpp's defaults for the measurement only. Writes the
`llama-cpp-plain-attention` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)
from _markdown import update_section

import medlora.serve.llama_cpp_continuous as continuous
from medlora.export.gguf import base_gguf, cached_gguf_lora
from medlora.models import SMOLLM2_ALIAS, load_tokenizer
from medlora.serve.engine import Job, Sampling
from medlora.serve.prompt import conversation_ids

CASE = (
    "A 67-year-old woman has had swollen ankles, shortness of breath when lying flat and a "
    "dry cough at night for three weeks. She takes medicine for high blood pressure and type 2 "
    "diabetes, and she gained four pounds this week. "
)
QUESTION = CASE * 4 + "What could cause this, and which tests would a doctor order?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    loras = {"tuned": cached_gguf_lora(args.run, SMOLLM2_ALIAS), "base": None}
    base = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    ids = conversation_ids(tokenizer, [{"role": "user", "content": QUESTION}], None)
    engine = continuous.LlamaCppContinuous(base, loras, tokenizer, threads=args.threads)
    pieces, spare_cells = continuous.prefill_chunks, continuous.SPLIT_ATTENTION_CELLS

    def seconds(model: str, new_tokens: int) -> tuple[float, int]:
        job = Job(model, ids, Sampling(max_new_tokens=new_tokens), sink=lambda event: None)
        start = time.perf_counter()
        engine.run_batch([job])
        return time.perf_counter() - start, len(job.completion_ids)

    first: dict[str, list[float]] = {"pieces under 64 tokens (shipped)": [], "one piece": []}
    for _ in range(args.repeats):
        for name, chunks in zip(first, (pieces, lambda n: [(0, n)]), strict=True):
            continuous.prefill_chunks = chunks
            first[name].append(seconds("tuned", 1)[0])
    continuous.prefill_chunks = pieces
    decode: dict[str, list[float]] = {"spare token (shipped)": [], "no spare token": []}
    tokens = 0
    for _ in range(args.repeats):
        for name, cells in zip(decode, (spare_cells, 10**9), strict=True):
            continuous.SPLIT_ATTENTION_CELLS = cells
            total, tokens = seconds("base", args.new_tokens)  # the base answers at length
            decode[name].append((tokens - 1) / (total - seconds("base", 1)[0]))
    continuous.SPLIT_ATTENTION_CELLS = spare_cells
    engine.close()

    first_ms = {name: statistics.median(v) * 1000 for name, v in first.items()}
    rates = {name: statistics.median(v) for name, v in decode.items()}
    (a, b), (c, d) = first_ms.values(), rates.values()
    body = f"""## llama.cpp continuous engine, one request alone: the cost of answering as alone (CPU)

Command: `python bench/llama_cpp_plain_attention.py --run {args.run} --repeats {args.repeats}` ({args.threads} threads,
{platform.machine()}, SmolLM2-135M q8_0 + the run's GGUF LoRA; medians of {args.repeats} alternating runs in one engine).
Prompt of {len(ids)} tokens; decode: the base model's answer to it, {tokens} tokens from cell {len(ids)} on
(the spare token joins a lone row from 256 cells).

| what | shipped | llama.cpp's default path | shipped ÷ default |
|---|---:|---:|---:|
| first token (ms) | {a:.0f} | {b:.0f} | {a / b:.2f}× |
| decode past 256 cells (tokens/s) | {c:.1f} | {d:.1f} | {c / d:.2f}× |
"""
    print(body)
    update_section("llama-cpp-plain-attention", body)


if __name__ == "__main__":
    main()
