"""What the serving benchmarks share: the model, the questions and the run they measure."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Like `make`: the datasets beside the repository unless MEDLORA_DATA_DIR names others. Every bench
# script imports this module first, so `python bench/X.py` works without setting anything.
os.environ.setdefault("MEDLORA_DATA_DIR", str(REPO.parent / "shared" / "datasets"))

SPEC = "smollm2-135m-instruct"

# Short consumer-health questions: inference.py compares greedy answers on the first eight,
# load_test.py spreads its concurrent requests over all of them.
QUESTIONS = [
    "What are the symptoms of asthma?",
    "How is high blood pressure treated?",
    "What causes iron deficiency anemia?",
    "How can I prevent the flu?",
    "What are the early signs of Lyme disease?",
    "Who is at risk for osteoporosis?",
    "What is the outlook for people with migraine?",
    "How is strep throat diagnosed?",
    "What are the complications of type 2 diabetes?",
    "How is shingles spread?",
    "What tests diagnose celiac disease?",
    "What are the treatments for gout?",
    "What causes kidney stones?",
    "How is hepatitis C treated?",
    "What are the symptoms of hypothyroidism?",
    "Can psoriasis be cured?",
]


def default_run() -> Path:
    """runs/demo when `make demo` has run, else a short real run (10 steps) made once for the bench."""
    demo = Path("runs/demo")
    if (demo / "adapter_config.json").is_file():
        return demo
    run = Path("runs/bench-inference")
    if not (run / "adapter_config.json").is_file():
        from medlora.cli import BUNDLED_RECIPES
        from medlora.config import load_recipe
        from medlora.train import prepare_run_data, train

        print("no runs/demo: training a 10-step run into runs/bench-inference", flush=True)
        overrides = ["train.max_steps=10", "data.max_train_examples=80", "train.eval_steps=0"]
        recipe = load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml", overrides)
        train(recipe, run, prepared_dir=prepare_run_data(recipe, run / "data"))
    return run
