"""The model card's next step, "increase the LoRA rank", answered with data on the CPU demo model.

    python bench/sweep_rank.py [--train 160] [--out runs/sweep-r]

Runs `medlora sweep smollm2-135m-cpu --set lora.r=4,8,16,32` on a fixed training sample (same
examples, same seed, same validation split for every rank) and writes the table into the `sweep`
section of docs/benchmarks.md and the plot to docs/sweep-lora-r.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _markdown import DOC, update_section  # noqa: E402

from medlora.cli import BUNDLED_RECIPES  # noqa: E402
from medlora.sweep import markdown, run_sweep, runs_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/sweep-r")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--ranks", default="4,8,16,32")
    args = parser.parse_args()
    fixed = [
        f"data.max_train_examples={args.train}",
        f"data.max_val_examples={args.val}",
        "train.eval_steps=0",
        "train.threads=2",
    ]
    overrides = [f"lora.r={args.ranks}", *fixed]
    result = run_sweep(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml", overrides, args.out)
    losses = [row["val_loss"] for row in result.rows if row.get("val_loss") is not None]
    spread = max(losses) - min(losses)
    plot = DOC.parent / "sweep-lora-r.png"
    shutil.copyfile(Path(args.out) / "sweep.png", plot)
    body = (
        "## LoRA rank sweep on the CPU demo model\n\n"
        f"Command: `python bench/sweep_rank.py --train {args.train} --val {args.val}` "
        f"(= `medlora sweep smollm2-135m-cpu --set lora.r={args.ranks} "
        + " ".join(f"--set {f}" for f in fixed)
        + f" --out {args.out}`). Everything but the rank is the bundled recipe (all linear layers, "
        "alpha 16, lr 5e-4, packed rows); the same examples and validation split for every rank. "
        "Validation loss: token-weighted answer-token loss of the saved adapter.\n\n"
        f"{markdown(runs_table(result))}\n\n"
        f"Spread of validation loss across ranks: {spread:.4f}. Train times vary with the shared "
        "machine's load (every run does the same work but for the adapter size).\n\n"
        f"![validation loss vs LoRA rank]({plot.name})\n"
    )
    print(body)
    update_section("sweep", body)


if __name__ == "__main__":
    main()
