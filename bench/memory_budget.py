"""Speed at a memory budget: the demo recipe with its fixed 1,024-token rows against
`train.tokens_per_batch: auto` under `train.max_memory_gb` budgets, same data, same steps.

    python bench/memory_budget.py [--budgets 3,2.5] [--steps 12] [--data runs/demo/data]

Each run is its own `medlora train` process (so its peak RSS is its own), one after another; the
fixed-row run is the baseline of the same invocation. Figures: training tokens/s (evaluation
excluded), the ratio to the baseline, the logged peak RSS, and what `auto` measured and chose.
Writes the `memory-budget` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _markdown import update_section  # noqa: E402


def run(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / name
    command = [
        sys.executable, "-m", "medlora", "train", "smollm2-135m-cpu", "--out", str(run_dir),
        "--data", args.data, "--set", f"train.max_steps={args.steps}", "--set", "train.eval_steps=0",
    ]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="3,2.5", help="GB, comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data", default="runs/demo/data", help="prepared splits")
    parser.add_argument("--out", default="runs/bench-memory")
    args = parser.parse_args()
    rows = [("fixed 1,024-token rows (the recipe)", run("fixed", [], args))]
    for budget in args.budgets.split(","):
        summary = run(
            f"auto-{budget}",
            [f"train.max_memory_gb={budget}", "train.tokens_per_batch=auto"],
            args,
        )
        rows.append((f"auto, max_memory_gb {budget}", summary))
    base = rows[0][1]
    lines = [
        "| run | tokens per row | tokens/s | ÷ fixed | peak RSS (MiB) | ÷ fixed | probes (tokens, GB) "
        "| predicted peak (GB) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in rows:
        choice = s.get("row_choice") or {}
        lines.append(
            f"| {name} | {choice.get('tokens_per_batch', 1024)} | {s['tokens_per_s']:.0f} | "
            f"{s['tokens_per_s'] / base['tokens_per_s']:.2f} | {s['peak_rss_mb']:.0f} | "
            f"{s['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
            f"{', '.join(f'({t}, {g})' for t, g in choice.get('probes', [])) or '–'} | "
            f"{choice.get('predicted_peak_gb', '–')} |"
        )
    command = f"python bench/memory_budget.py --budgets {args.budgets} --steps {args.steps}"
    section = f"""## Speed at a memory budget: fixed rows vs `tokens_per_batch: auto` (CPU)

Command: `{command}` ({os.cpu_count()} CPU cores, {platform.machine()}, one run after another, each in
its own `medlora train` process). Recipe `smollm2-135m-cpu` (SmolLM2-135M-Instruct, LoRA r 4, unlikelihood
on), {args.steps} optimizer steps, evaluation only at the end; peak RSS is the process's whole life
(model load, data, training, the final validation pass).

{chr(10).join(lines)}
"""
    print(section)
    update_section("memory-budget", section)


if __name__ == "__main__":
    main()
