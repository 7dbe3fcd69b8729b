"""The demo as a benchmark: training tokens/s and held-out answer loss before and after LoRA.

    python bench/demo_bench.py [--out runs/bench-demo]
    python bench/demo_bench.py --from-run runs/quality --section demo-2400

Writes the `demo` section (or `--section`) of docs/benchmarks.md; a run made with `--set` overrides
shows them in the command (read from the run's recipe.yaml). The baseline for the loss is the base model scored
on the same held-out examples in the same run; the baseline for speed is the same model's forward-only
(scoring) throughput on those examples, also measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.cli import BUNDLED_RECIPES  # noqa: E402
from medlora.config import load_recipe  # noqa: E402
from medlora.demo import run_demo  # noqa: E402
from medlora.report.panels import panels_markdown, transfer_sentence  # noqa: E402
from medlora.results import DemoSummary, read_result  # noqa: E402


def _yaml_value(value: object) -> str:
    """A value as `--set` reads it (JSON is YAML: `["a", "b"]`, `false`), not Python's repr."""
    return value if isinstance(value, str) else json.dumps(value)


def _overrides(run: Path) -> list[str]:
    """`section.key=value` where the run's recipe differs from the bundled demo recipe (a value
    the bundled recipe leaves to `auto` is what the run resolved it to, not an override)."""
    demo = load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml").model_dump()
    used = load_recipe(run / "recipe.yaml").model_dump()
    return [
        shlex.quote(f"{section}.{key}={_yaml_value(value)}")
        for section, values in used.items()
        for key, value in values.items()
        if section != "output" and demo[section].get(key) not in (value, "auto")
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-demo")
    parser.add_argument(
        "--from-run",
        help="Write the section from a finished `medlora demo --out RUN` (its demo.json) "
        "instead of running the demo again.",
    )
    parser.add_argument("--section", default="demo", help="docs/benchmarks.md section to write")
    args = parser.parse_args()
    if args.from_run:
        run = Path(args.from_run)
        summary = read_result(run / "demo.json", DemoSummary)
        wall = summary.elapsed_s
        sets = "".join(f" --set {item}" for item in _overrides(run))
        command = f"medlora demo{sets} --out {run}` then `python {' '.join(sys.argv)}"
    else:
        sets = ""
        recipe = load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml")
        started = time.perf_counter()
        summary = run_demo(recipe, args.out)
        wall = time.perf_counter() - started
        command = f"python {' '.join(sys.argv)}"
    train, unseen, test = summary.train, summary.unseen, summary.test
    title = f"Demo with `{sets.strip()}`" if sets else "Demo"
    body = f"""## {title}: SmolLM2-135M-Instruct + LoRA on MedQuAD (CPU)

Command: `{command}` (recipe `smollm2-135m-cpu`, {os.cpu_count()} CPU cores,
{platform.processor() or platform.machine()}, torch {__import__("torch").__version__}).

| what | value |
|---|---:|
| training examples / optimizer steps | {train.train_examples} / {train.steps} |
| training throughput (prompt + answer tokens/s) | {train.tokens_per_s:.0f} |
| unseen-source questions (answer tokens) | {unseen.examples} ({unseen.answer_tokens}) |
| unseen sources: base → tuned answer loss | {unseen.base_loss:.4f} → {unseen.loss:.4f} ({unseen.loss_change_pct:+.1f} %) |
| test split: base → tuned answer loss | {test.base_loss:.4f} → {test.loss:.4f} ({test.loss_change_pct:+.1f} %) |
| demo wall time (s) | {wall:.0f} |

The two panels (paired 95% bootstrap intervals; test = held-out topics of the trained sources,
unseen = sources never trained on):

{chr(10).join(panels_markdown([test, unseen]))}

{transfer_sentence(test, unseen)}
"""
    print(body)
    update_section(args.section, body)


if __name__ == "__main__":
    main()
