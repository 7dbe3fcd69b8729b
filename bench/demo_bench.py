"""The demo as a benchmark: training tokens/s and held-out answer loss before and after LoRA.

    python bench/demo_bench.py [--out runs/bench-demo]

Writes the `demo` section of docs/benchmarks.md. The baseline for the loss is the base model scored
on the same held-out examples in the same run; the baseline for speed is the same model's forward-only
(scoring) throughput on those examples, also measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.cli import BUNDLED_RECIPES  # noqa: E402
from medlora.config import load_recipe  # noqa: E402
from medlora.demo import metric_table, run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-demo")
    parser.add_argument(
        "--from-run",
        help="Write the section from a finished `medlora demo --out RUN` (its demo.json) "
        "instead of running the demo again.",
    )
    args = parser.parse_args()
    if args.from_run:
        summary = json.loads((Path(args.from_run) / "demo.json").read_text(encoding="utf-8"))
        wall = summary["elapsed_s"]
        command = f"medlora demo --out {args.from_run}` then `python bench/demo_bench.py --from-run {args.from_run}"
    else:
        recipe = load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml")
        started = time.perf_counter()
        summary = run_demo(recipe, args.out)
        wall = time.perf_counter() - started
        command = "python bench/demo_bench.py"
    train = summary["train"]
    unseen, test = summary["unseen"], summary["test"]
    body = f"""## Demo: SmolLM2-135M-Instruct + LoRA on MedQuAD (CPU)

Command: `{command}` (recipe `smollm2-135m-cpu`, {os.cpu_count()} CPU cores,
{platform.processor() or platform.machine()}, torch {__import__("torch").__version__}).

| what | value |
|---|---:|
| training examples / optimizer steps | {train["train_examples"]} / {train["steps"]} |
| training throughput (prompt + answer tokens/s) | {train["tokens_per_s"]:.0f} |
| unseen-source questions (answer tokens) | {unseen["examples"]} ({unseen["answer_tokens"]}) |
| unseen sources: base → tuned answer loss | {unseen["base_loss"]:.4f} → {unseen["loss"]:.4f} ({unseen["loss_change_pct"]:+.1f} %) |
| test split: base → tuned answer loss | {test["base_loss"]:.4f} → {test["loss"]:.4f} ({test["loss_change_pct"]:+.1f} %) |
| demo wall time (s) | {wall:.0f} |

Answer metrics on the unseen sources (paired 95% bootstrap intervals):

{chr(10).join(metric_table(unseen["quality"]))}
"""
    print(body)
    update_section("demo", body)


if __name__ == "__main__":
    main()
