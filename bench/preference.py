"""SFT alone vs SFT then preference tuning (DPO or ORPO), on sources neither run trained on.

    python bench/preference.py --sft runs/demo [--method dpo] [--pairs 128] [--lr 1e-4] [--beta 0.1]
    python bench/preference.py --sft runs/demo --pairs 256 --rejected-repetition-penalty 1.0 \
        --min-rejected-repetition 0.1 --out runs/demo-dpo-loops --section preference-loops

Continues the SFT run's adapter (`train.init_adapter`) with `train.method` on self-generated pairs
(`train.preference_data: self`: chosen = the reference answer, rejected = the SFT model's own greedy
answer, which is where its repetition shows), then scores the base, SFT and SFT+preference on the
recipe's `eval.unseen_sources` in one process: answer loss and the generated answers (the run's
`generation:` settings), with paired 95% bootstrap intervals against the base and between the two
fine-tunes. Writes the `preference` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.config import load_recipe  # noqa: E402
from medlora.evaluate.quality import LOWER_IS_BETTER, paired_bootstrap_ci  # noqa: E402
from medlora.evaluate.unseen import score_run_unseen  # noqa: E402
from medlora.io import read_jsonl, write_json_atomic  # noqa: E402
from medlora.models import load_recipe_model  # noqa: E402
from medlora.report.format import fmt_ci, verdict  # noqa: E402
from medlora.train import train  # noqa: E402

SHOWN = {
    "rougeL": "ROUGE-L",
    "f1": "token F1",
    "similarity": "MiniLM similarity",
    "repetition": "repeated 4-grams ↓",
    "echo": "echo ↓",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", default="runs/demo", help="the SFT run to continue")
    parser.add_argument("--method", choices=["dpo", "orpo"], default="dpo")
    parser.add_argument("--pairs", type=int, default=128, help="training questions made into pairs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--rejected-repetition-penalty",
        type=float,
        default=None,
        help="repetition_penalty for generating the rejected answers (default: the run's; 1.0 "
        "shows the model's loops); the scores always use the SFT run's generation settings",
    )
    parser.add_argument(
        "--min-rejected-repetition",
        type=float,
        default=0.0,
        help="train.self_pairs_min_repetition: keep only pairs whose rejected answer loops",
    )
    parser.add_argument("--out", default=None, help="default: SFT_RUN-METHOD")
    parser.add_argument("--section", default="preference", help="docs/benchmarks.md section")
    args = parser.parse_args()
    import torch

    sft = Path(args.sft)
    out = Path(args.out or f"{sft}-{args.method}")
    scoring = load_recipe(sft / "recipe.yaml")
    pair_generation = (
        []
        if args.rejected_repetition_penalty is None
        else [f"train.self_pairs_repetition_penalty={args.rejected_repetition_penalty}"]
    )
    recipe = load_recipe(
        sft / "recipe.yaml",
        [
            *pair_generation,
            f"train.self_pairs_min_repetition={args.min_rejected_repetition}",
            f"train.method={args.method}",
            "train.preference_data=self",
            f"train.init_adapter={sft}",
            f"train.lr={args.lr}",
            f"train.beta={args.beta}",
            f"data.max_train_examples={args.pairs}",
            "train.packing=false",
            "train.batch_size=4",
            "train.grad_accum=1",
            f"output.dir={out}",
        ],
    )
    started = time.perf_counter()
    trained = train(recipe, out, prepared_dir=sft / "data")
    train_s = time.perf_counter() - started
    gc.collect()

    base_answers: dict[str, list[str]] = {}
    scored = {}
    for name, run in (("SFT", sft), (f"SFT + {args.method.upper()}", out)):
        base = load_recipe_model(scoring, training=False)
        scored[name] = score_run_unseen(scoring, run, base, base_answers)
        del base
        gc.collect()
    write_json_atomic(out / "preference_bench.json", {"runs": scored, "train_s": train_s})

    names = list(scored)
    first = scored[names[0]]
    rows = {n: list(read_jsonl(s["predictions"])) for n, s in scored.items()}
    lines = [
        "| metric | base | "
        + " | ".join(f"{n} (− base)" for n in names)
        + f" | {names[1]} − SFT |",
        "|---|---|" + "---|" * len(names) + "---|",
        f"| answer loss | {first['base_loss']:.4f} | "
        + " | ".join(f"{s['loss']:.4f} ({s['loss_change_pct']:+.1f} %)" for s in scored.values())
        + " | |",
    ]
    for metric, label in SHOWN.items():
        if metric not in first["metrics"]:
            continue
        cells = [
            f"{s['metrics'][metric]['model']['mean']:.3f} "
            f"({fmt_ci(s['metrics'][metric]['diff'], signed=True)})"
            for s in scored.values()
        ]
        second_minus_first = paired_bootstrap_ci(
            [r[metric] for r in rows[names[1]]], [r[metric] for r in rows[names[0]]]
        )
        better = verdict(second_minus_first, metric not in LOWER_IS_BETTER)
        lines.append(
            f"| {label} | {first['metrics'][metric]['base']['mean']:.3f} | "
            + " | ".join(cells)
            + f" | {fmt_ci(second_minus_first, signed=True)} {better} |"
        )
    g = first["generation"]
    card = json.loads((out / "data" / "data_card.json").read_text(encoding="utf-8"))["preference"]
    rejected_how = "greedy" + (
        ""
        if args.rejected_repetition_penalty is None
        else f", repetition_penalty {args.rejected_repetition_penalty}"
    )
    kept = (
        f"; kept the {card['pairs']} of {card['records']} whose rejected answer repeats ≥ "
        f"{args.min_rejected_repetition} of its word 4-grams"
        if args.min_rejected_repetition
        else ""
    )
    command = " ".join(["python", "bench/preference.py", *sys.argv[1:]])
    aimed = ", pairs aimed at the loops" if args.min_rejected_repetition else ""
    body = f"""## SFT vs SFT + preference tuning{aimed}, on sources never trained on

Command: `{command}` ({os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}).
`{out}` continues `{sft}` with `train.method: {args.method}` on {trained.train_examples}
self-generated pairs (chosen = reference answer, rejected = the SFT model's answer, {rejected_how}{kept}), lr
{args.lr}, beta {args.beta}, {trained.steps} steps, {train_s:.0f} s including pair generation.
Scored on {", ".join(Path(d).name for d in first["data"])} ({first["examples"]} questions, never
trained on by either run), answers {"sampled" if g["do_sample"] else "greedy"}, at most
{g["max_new_tokens"]} new tokens, repetition_penalty {g["repetition_penalty"]},
no_repeat_ngram_size {g["no_repeat_ngram_size"]}; tuned mean (paired 95% CI of tuned − base), and
the paired difference between the two fine-tunes.

{chr(10).join(lines)}
"""
    print(body)
    update_section(args.section, body)
    print(json.dumps({n: s["loss_change_pct"] for n, s in scored.items()}))


if __name__ == "__main__":
    main()
