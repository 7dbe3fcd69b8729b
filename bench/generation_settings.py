"""Which `generation:` settings should a run ship? Measured on its validation split, not by taste.

    python bench/generation_settings.py [--run runs/demo] [--questions 48] [--batch-size 24]

Answers the run's validation questions (topics never trained on, sources that were) with the
fine-tuned model and with the base (adapter switched off) under each candidate setting, scores them
against the references (ROUGE-L, token F1, MiniLM similarity) and for their own defects (repeated
4-grams, question echo), and gives paired 95% bootstrap intervals.

Rule: a setting qualifies when none of the fine-tuned model's overlap metrics (ROUGE-L, F1, MiniLM
similarity) drops significantly against plain greedy decoding (the paired interval of the difference
is not wholly below 0); the qualifying setting with the fewest repeated 4-grams is chosen (ties:
the earlier, milder candidate). Repetition control must not buy shorter loops with worse content.
Writes the `generation` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.config import GenerationConfig  # noqa: E402
from medlora.data.prepare import load_splits  # noqa: E402
from medlora.data.sample import sample_records  # noqa: E402
from medlora.evaluate.generate import adapter_disabled, generate_answers  # noqa: E402
from medlora.evaluate.heldout import run_recipe  # noqa: E402
from medlora.evaluate.quality import (  # noqa: E402
    aggregate,
    bootstrap_ci,
    paired_bootstrap_ci,
    score_answers,
)
from medlora.models import load_with_adapter  # noqa: E402
from medlora.report.format import fmt_ci  # noqa: E402

CANDIDATES = {
    "greedy": {},
    "repetition_penalty 1.05": {"repetition_penalty": 1.05},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1},
    "no_repeat_ngram_size 8": {"no_repeat_ngram_size": 8},
    "no_repeat_ngram_size 6": {"no_repeat_ngram_size": 6},
    "no_repeat_ngram_size 4": {"no_repeat_ngram_size": 4},
}
SHOWN = ("similarity", "rougeL", "f1", "repetition", "echo")
OVERLAP = ("similarity", "rougeL", "f1")


def choose(scores: dict[str, dict[str, list[float]]]) -> str:
    """The rule in the module docstring, on the fine-tuned model's per-question scores."""
    greedy = scores["greedy"]
    allowed = [
        name
        for name in scores
        if all(paired_bootstrap_ci(scores[name][m], greedy[m])["high"] >= 0 for m in OVERLAP)
    ]
    return min(allowed, key=lambda n: bootstrap_ci(scores[n]["repetition"])["mean"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--data", default=None, help="prepared splits (default: RUN/data)")
    parser.add_argument("--questions", type=int, default=48)
    # Larger batches decode faster on CPU (the weights are read once per step for every row).
    parser.add_argument("--batch-size", type=int, default=24)
    args = parser.parse_args()
    import torch

    run = Path(args.run)
    recipe = run_recipe(run)
    records = sample_records(
        load_splits(Path(args.data) if args.data else run / "data")["validation"],
        args.questions,
        recipe.data.seed,
    )
    model, tokenizer = load_with_adapter(recipe.model.name, run, recipe.model.dtype)
    questions = [r.question for r in records]
    references = [r.answer for r in records]
    scores: dict[str, dict[str, list[float]]] = {}
    base: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    for name, change in CANDIDATES.items():
        settings = GenerationConfig(
            max_new_tokens=recipe.generation.max_new_tokens, do_sample=False, **change
        )
        started = time.perf_counter()
        answers = generate_answers(
            model, tokenizer, questions, recipe.data.system_prompt, settings,
            args.batch_size, description=name,
        )  # fmt: skip
        seconds[name] = time.perf_counter() - started
        scores[name] = score_answers(answers, references, questions=questions)
        with adapter_disabled(model):
            base_answers = generate_answers(
                model, tokenizer, questions, recipe.data.system_prompt, settings,
                args.batch_size, description=f"{name} (base)",
            )  # fmt: skip
        base[name] = score_answers(base_answers, references, questions=questions)

    greedy = scores["greedy"]
    best = choose(scores)
    lines = [
        "| setting | " + " | ".join(SHOWN) + " | "
        + " | ".join(f"{m} − greedy" for m in OVERLAP) + " | s |",
        "|---|" + "---|" * (len(SHOWN) + len(OVERLAP)) + "---:|",
    ]  # fmt: skip
    versus = [
        "| setting | " + " | ".join(f"{m}: tuned − base" for m in SHOWN) + " |",
        "|---|" + "---|" * len(SHOWN),
    ]
    for name in CANDIDATES:
        means = aggregate({k: scores[name][k] for k in SHOWN})
        diffs = " | ".join(
            fmt_ci(paired_bootstrap_ci(scores[name][m], greedy[m]), signed=True) for m in OVERLAP
        )
        cells = " | ".join(fmt_ci(means[k]["model"]) for k in SHOWN)
        mark = " **(chosen)**" if name == best else ""
        lines.append(f"| {name}{mark} | {cells} | {diffs} | {seconds[name]:.0f} |")
        paired = " | ".join(
            fmt_ci(paired_bootstrap_ci(scores[name][m], base[name][m]), signed=True) for m in SHOWN
        )
        versus.append(f"| {name} | {paired} |")
    command = " ".join(["python", "bench/generation_settings.py", *sys.argv[1:]])
    body = f"""## Generation settings, chosen on the validation split

Command: `{command}` (run `{run}`, {len(records)} validation questions, at most
{recipe.generation.max_new_tokens} new tokens, {os.cpu_count()} CPU cores, {platform.machine()},
torch {torch.__version__}). Mean [95% bootstrap CI] per answer of the fine-tuned model; repetition
(share of repeated word 4-grams) and echo (answer restates the question) are lower-is-better.
Rule: among settings where no overlap metric (MiniLM similarity, ROUGE-L, F1) drops significantly
against greedy (paired CI not wholly below 0), the fewest repeated 4-grams.

{chr(10).join(lines)}

Fine-tuned minus base (adapter switched off) under the same setting, paired 95% CI:

{chr(10).join(versus)}

Chosen: **{best}**, written into the shipped recipe's `generation:` section.
"""
    print(body)
    update_section("generation", body)


if __name__ == "__main__":
    main()
