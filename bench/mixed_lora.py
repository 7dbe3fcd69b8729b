"""Mixed-adapter decoding: medlora's stacked LoRA path vs PEFT's mixed-batch path, same run.

    python bench/mixed_lora.py [--adapter NAME=RUN_DIR ...] [--rows 32] [--tokens 64] [--pairs 3]
                               [--threads N]

One server model set (the base and every adapter) runs the same `--rows` requests, adapters and the
base mixed at random (seed 0), `--tokens` greedy tokens each, through the continuous engine: once
with the adapters stacked (serve/stacked_lora.py) and once through PEFT's `_mixed_batch_forward`,
alternating, `--pairs` times. Reports completion tokens/s of each (median) and their ratio, and
checks both paths give the same answers. Writes the `serve-mixed-lora` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402
from _shared import QUESTIONS, SPEC  # noqa: E402
from load_test import default_adapters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", default=None, help="NAME=RUN_DIR")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from medlora.data.format import prompt_ids
    from medlora.serve.adapters import BASE_ADAPTER
    from medlora.serve.engine import Job
    from medlora.serve.loader import build_engine, sampling_for

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = args.adapter or default_adapters()
    served = build_engine(SPEC, adapters, engine="transformers", max_batch=args.rows)
    model_set, engine = served.model_set, served.engine
    assert model_set is not None
    names = [*sorted(model_set.loaded), BASE_ADAPTER]
    entry = served.models[served.default_model]
    rng = random.Random(0)
    plan = [(rng.choice(QUESTIONS), rng.choice(names)) for _ in range(args.rows)]
    sampling = sampling_for(entry, args.tokens)

    def run() -> tuple[float, list[list[int]]]:
        jobs = [
            Job(
                name,
                prompt_ids(entry.tokenizer, q, entry.system_prompt),
                sampling,
                lambda e: None,
                adapter=name,
            )
            for q, name in plan
        ]
        start = time.perf_counter()
        engine.run_batch(jobs)
        seconds = time.perf_counter() - start
        return sum(len(j.completion_ids) for j in jobs) / seconds, [j.completion_ids for j in jobs]

    run()  # warm-up
    speeds: dict[str, list[float]] = {"stacked": [], "peft": []}
    answers: dict[str, list[list[int]]] = {}
    for _ in range(args.pairs):
        for path in ("peft", "stacked"):
            model_set.use_stacking(path == "stacked")
            speed, answers[path] = run()
            speeds[path].append(speed)
            print(path, round(speed, 1), "tok/s", flush=True)
    same = sum(a == b for a, b in zip(answers["stacked"], answers["peft"], strict=True))
    stacked, peft = statistics.median(speeds["stacked"]), statistics.median(speeds["peft"])
    cpu = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    command = "python bench/mixed_lora.py " + " ".join(sys.argv[1:])
    body = f"""## Mixed-adapter decoding: stacked LoRA vs PEFT's mixed batch (CPU)

Command: `{command.strip()}` ({torch.get_num_threads()} torch threads, {platform.machine()} with {cpu},
torch {torch.__version__}). {args.rows} requests, {len(names)} models ({", ".join(n for n in names if n != BASE_ADAPTER)}
and the base) mixed at random, {args.tokens} greedy tokens each with the run's repetition settings,
through the continuous engine; the two paths alternate, {args.pairs} runs each, median.

| LoRA path | completion tokens/s (median) | runs |
|---|---:|---|
| PEFT `_mixed_batch_forward` | {peft:.1f} | {", ".join(f"{s:.1f}" for s in speeds["peft"])} |
| stacked (serve/stacked_lora.py) | {stacked:.1f} | {", ".join(f"{s:.1f}" for s in speeds["stacked"])} |

- stacked ÷ PEFT: **{stacked / peft:.2f}×**
- same greedy answers on both paths: {same}/{args.rows}
"""
    print(body)
    update_section("serve-mixed-lora", body)


if __name__ == "__main__":
    main()
