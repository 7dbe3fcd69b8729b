"""The demo recipe's training speed and peak memory: `train.kernels: medlora` vs `stock`.

    python bench/kernels_stock.py [--steps 12] [--repeats 2] [--out runs/bench-kernels]

`stock` is transformers + PEFT + the Trainer with no medlora patch and the model's own loss (the
reference of tests/test_families.py); `medlora` is the default with its kernels. Each run is
`medlora train smollm2-135m-cpu --set train.max_steps=STEPS` in a process of its own (peak RSS is
per process), the two alternating so the machine's drift hits both alike. tokens/s is answer
tokens trained per training second (evaluation excluded), from train_summary.json. Writes the
`kernels-stock` section of docs/benchmarks.md: medians and the ratios medlora / stock.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)
from _markdown import update_section

RECIPE = "smollm2-135m-cpu"
KERNELS = ("medlora", "stock")


def _cpu() -> str:
    from medlora.machine import cpu_flags

    flags = cpu_flags()
    kind = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2 only"
    name = platform.processor() or "CPU"
    try:
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{name}, {kind}"


def _run(kernels: str, steps: int, out: Path) -> dict[str, float]:
    command = [
        sys.executable, "-m", "medlora", "train", RECIPE, "--out", str(out),
        "--set", f"train.max_steps={steps}", "--set", f"train.kernels={kernels}",
        "--set", "train.eval_steps=0", "--set", "data.max_val_examples=8",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "train_summary.json").read_text())
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "train_loss": summary["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-kernels"))
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in KERNELS}
    for repeat in range(args.repeats):
        order = KERNELS if repeat % 2 == 0 else KERNELS[::-1]
        for kernels in order:
            row = _run(kernels, args.steps, args.out / f"{kernels}-{repeat}")
            results[kernels].append(row)
            print(kernels, repeat, row, flush=True)

    def median(kernels: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kernels])

    lines = [
        "## Training kernels: `train.kernels: medlora` vs `stock` on the demo recipe (CPU)",
        "",
        f"`python bench/kernels_stock.py --steps {args.steps} --repeats {args.repeats}` on "
        f"{_cpu()}, 2 threads: `medlora train {RECIPE} --set train.max_steps={args.steps}`, "
        "each run in its own process, the two alternating. `stock` = transformers + PEFT + the "
        "Trainer, no medlora patch, the model's own loss (unlikelihood on materialised logits).",
        "",
        "| kernels | answer tokens/s (median) | peak RSS MB (median) | train loss (runs) |",
        "|---|---|---|---|",
    ]
    for kernels in KERNELS:
        losses = ", ".join(f"{r['train_loss']:.4f}" for r in results[kernels])
        lines.append(
            f"| {kernels} | {median(kernels, 'tokens_per_s'):.1f} | "
            f"{median(kernels, 'peak_rss_mb'):.0f} | {losses} |"
        )
    speed = median("medlora", "tokens_per_s") / median("stock", "tokens_per_s")
    memory = median("medlora", "peak_rss_mb") / median("stock", "peak_rss_mb")
    loss_gap = median("medlora", "train_loss") / median("stock", "train_loss") - 1
    lines += [
        "",
        f"medlora / stock: **{speed:.2f}x** the tokens/s at **{memory:.2f}x** the peak RSS; mean "
        f"training loss {loss_gap:+.1e} relative.",
    ]
    update_section("kernels-stock", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
