"""Which `generation:` settings should a run ship? Measured on its validation split, not by taste.

    python bench/generation_settings.py [--run runs/demo] [--questions 48] [--batch-size 24]

Answers the run's validation questions (topics never trained on, sources that were) with the
fine-tuned model under each candidate setting, scores them against the references (ROUGE-L, token
F1, MiniLM similarity) and for their own defects (repeated 4-grams, question echo), and gives each
candidate's paired difference from plain greedy decoding with a 95% bootstrap interval. The
recommended setting is the one with the highest mean MiniLM similarity among those whose
repetition is no higher than greedy's. Writes the `generation` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.config import GenerationConfig  # noqa: E402
from medlora.data.prepare import load_splits  # noqa: E402
from medlora.data.sample import sample_records  # noqa: E402
from medlora.evaluate.generate import generate_answers  # noqa: E402
from medlora.evaluate.heldout import run_recipe  # noqa: E402
from medlora.evaluate.quality import (  # noqa: E402
    aggregate,
    bootstrap_ci,
    paired_bootstrap_ci,
    score_answers,
)
from medlora.models import load_with_adapter  # noqa: E402
from medlora.report.html import fmt_ci  # noqa: E402

CANDIDATES = {
    "greedy": {},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2},
    "no_repeat_ngram_size 4": {"no_repeat_ngram_size": 4},
    "penalty 1.1 + no-repeat 4": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
}
SHOWN = ("similarity", "rougeL", "f1", "repetition", "echo")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--questions", type=int, default=48)
    # Larger batches decode faster on CPU (the weights are read once per step for every row).
    parser.add_argument("--batch-size", type=int, default=24)
    args = parser.parse_args()
    import torch

    run = Path(args.run)
    recipe = run_recipe(run)
    records = sample_records(
        load_splits(run / "data")["validation"], args.questions, recipe.data.seed
    )
    model, tokenizer = load_with_adapter(recipe.model.name, run, recipe.model.dtype)
    questions = [r.question for r in records]
    references = [r.answer for r in records]
    scores: dict[str, dict[str, list[float]]] = {}
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

    greedy = scores["greedy"]
    allowed = [
        n for n in CANDIDATES
        if bootstrap_ci(scores[n]["repetition"])["mean"]
        <= bootstrap_ci(greedy["repetition"])["mean"]
    ]  # fmt: skip
    best = max(allowed, key=lambda n: bootstrap_ci(scores[n]["similarity"])["mean"])
    lines = [
        "| setting | " + " | ".join(SHOWN) + " | similarity − greedy (paired) | s |",
        "|---|" + "---|" * len(SHOWN) + "---|---:|",
    ]
    for name in CANDIDATES:
        means = aggregate({k: scores[name][k] for k in SHOWN})
        diff = paired_bootstrap_ci(scores[name]["similarity"], greedy["similarity"])
        cells = " | ".join(fmt_ci(means[k]["model"]) for k in SHOWN)
        mark = " **(chosen)**" if name == best else ""
        lines.append(
            f"| {name}{mark} | {cells} | {fmt_ci(diff, signed=True)} | {seconds[name]:.0f} |"
        )
    command = " ".join(["python", "bench/generation_settings.py", *sys.argv[1:]])
    body = f"""## Generation settings, chosen on the validation split

Command: `{command}` (run `{run}`, {len(records)} validation questions, at most
{recipe.generation.max_new_tokens} new tokens, fine-tuned model, {os.cpu_count()} CPU cores,
{platform.machine()}, torch {torch.__version__}). Mean [95% bootstrap CI] per answer; repetition
(share of repeated word 4-grams) and echo (answer restates the question) are lower-is-better.
Rule: the highest MiniLM similarity among settings whose repetition is no higher than greedy's.

{chr(10).join(lines)}

Chosen: **{best}**, written into the shipped recipe's `generation:` section.
"""
    print(body)
    update_section("generation", body)


if __name__ == "__main__":
    main()
