"""Does the demo adapter recite its training answers, and did it memorize its canaries?

    python bench/audit.py [--run runs/demo] [--questions 100] [--threads 1] [--doc FILE]

The same as `medlora audit RUN --questions N`: the run's own training questions and as many
held-out (test-split) questions, answered by the tuned model and by its base with the run's
`generation:` settings; each answer's longest verbatim token span shared with its reference; and,
when the run was trained with `data.canaries`, each canary's exposure. Writes RUN/audit.json and
the `audit` section of docs/benchmarks.md (or --doc); every figure there is read from the result.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import DOC, update_section  # noqa: E402

from medlora.evaluate.memorization import AUDIT_FILE, run_audit  # noqa: E402
from medlora.report.audit import audit_markdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--questions", type=int, default=100, help="training and test questions")
    # One thread by default, as bench/quality.py: two torch threads on a shared 2-core machine
    # spin against other processes.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file to update")
    args = parser.parse_args()
    import os

    import torch

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    started = time.perf_counter()
    result = run_audit(run, args.questions)
    elapsed = time.perf_counter() - started
    canaries = (
        f"{len(result.exposure.canaries)} canaries of {result.exposure.digits} digits"
        if result.exposure
        else "no canaries (the run was trained without `data.canaries`)"
    )
    command = " ".join(["python", "bench/audit.py", *sys.argv[1:]])
    body = f"""## Audit: does the fine-tune recite its training answers?

Command: `{command}` (run `{run}`, base `{result.model}`, {os.cpu_count()} CPU cores,
{args.threads} torch thread(s), {platform.machine()}, torch {torch.__version__}); the same as
`medlora audit {run} --questions {args.questions}`. Base and tuned are the same loaded model with the
LoRA adapter switched off and on. Generation: {", ".join(f"{k}={v}" for k, v in result.generation.items())}.
Result: `{run}/{AUDIT_FILE}`; {canaries}.

{chr(10).join(audit_markdown(result))}

Wall time on this machine: {elapsed:.0f} s (answers, spans and canary ranks, base and tuned).
"""
    print(body)
    update_section("audit", body, args.doc)


if __name__ == "__main__":
    main()
