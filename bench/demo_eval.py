"""The demo's evaluation stage, the previous way against today's, on one finished demo run.

    python bench/demo_eval.py [--run runs/demo] [--rounds 1]

After training, `medlora demo` scores the reference answers of 100 unseen-source questions (base
and tuned) and generates both models' answers. This script times those two jobs, alternating in
one process on the same loaded model after a warm-up, so every ratio has its baseline from the
same run:

- answer loss, base + tuned: `previous` = 24 examples per forward, adapter applied on the fly,
  fp32 (the demo until 2026-11-30); `merged` = the adapter folded into the weights for the tuned
  pass and CPU batches capped at `CPU_BATCH_TOKENS`, fp32; `merged bf16` = the same with
  `eval.precision: bf16` (bf16 autocast: the demo's `auto` on an AMX / AVX512-BF16 CPU);
- answers, base + tuned, greedy with the recipe's generation settings: `previous` = 24 questions
  per `generate` call, adapter on the fly; `merged` = 50 per call, adapter folded in.

It also checks what must not change: the merged losses against the previous ones, the answers
token for token, and the base weights after the adapter is unfolded again. Writes the `demo-eval`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


class Timing(BaseModel):
    job: str  # "answer loss" or "answers"
    way: str  # "previous", "merged", "merged bf16"
    seconds: list[float]  # one per round
    base: float  # base loss, or the base answers' total tokens
    tuned: float


class DemoEval(BaseModel):
    run: str
    cpu: str
    questions: int
    timings: list[Timing]
    same_answers: int  # previous vs merged, tuned and base together (of 2 x questions)
    base_weight_drift: float  # max |w - w0| over the base weights after all the merging


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def measure(run: Path, rounds: int) -> DemoEval:
    import torch

    import medlora.evaluate.loss as loss_module
    from medlora.config import load_recipe
    from medlora.data.format import format_records
    from medlora.evaluate.generate import adapter_disabled, generate_answers
    from medlora.evaluate.heldout import score_model
    from medlora.evaluate.unseen import unseen_records
    from medlora.machine import cpu_flags
    from medlora.models import load_with_adapter

    recipe = load_recipe(run / "recipe.yaml")
    model, tokenizer = load_with_adapter(recipe.model.name, run, recipe.model.dtype)
    records, _ = unseen_records(recipe)
    examples, _ = format_records(
        tokenizer, records, recipe.data.system_prompt, recipe.data.max_seq_len
    )
    questions = [r.question for r in records]
    pad = tokenizer.pad_token_id
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    def previous_loss() -> tuple[float, float]:
        saved, loss_module.CPU_BATCH_TOKENS = loss_module.CPU_BATCH_TOKENS, None
        try:
            tuned = loss_module.score_examples(model, examples, pad, 24)
            with adapter_disabled(model):
                base = loss_module.score_examples(model, examples, pad, 24)
        finally:
            loss_module.CPU_BATCH_TOKENS = saved
        return base["loss"], tuned["loss"]

    def merged_loss(precision: str) -> tuple[float, float]:
        scores = score_model(model, tokenizer, examples, 50, True, precision)
        return scores["base_loss"], scores["loss"]

    answers: dict[str, tuple[list[str], list[str]]] = {}

    def answer(way: str) -> tuple[float, float]:
        from medlora.evaluate.generate import adapter_merged

        settings, prompt = recipe.generation, recipe.data.system_prompt
        size = 24 if way == "previous" else 50
        with adapter_disabled(model):
            base = generate_answers(model, tokenizer, questions, prompt, settings, size, way)
        with adapter_merged(model) if way == "merged" else nullcontext():
            tuned = generate_answers(model, tokenizer, questions, prompt, settings, size, way)
        answers[way] = (base, tuned)

        def tokens(texts: list[str]) -> float:
            return float(sum(len(tokenizer(t).input_ids) for t in texts))

        return tokens(base), tokens(tuned)

    jobs: list[tuple[str, str, Any]] = [
        ("answer loss", "previous", previous_loss),
        ("answer loss", "merged", lambda: merged_loss("fp32")),
        ("answer loss", "merged bf16", lambda: merged_loss("bf16")),
        ("answers", "previous", lambda: answer("previous")),
        ("answers", "merged", lambda: answer("merged")),
    ]
    # One-time costs (first forward and first generate in the process) stay out of the timings.
    loss_module.score_examples(model, examples[:4], pad, 4)
    generate_answers(model, tokenizer, questions[:2], recipe.data.system_prompt, 8, 2, "warm-up")
    timings = {
        (job, way): Timing(job=job, way=way, seconds=[], base=0, tuned=0) for job, way, _ in jobs
    }
    for round_index in range(rounds):
        for job, way, fn in jobs:
            start = time.perf_counter()
            base, tuned = fn()
            seconds = time.perf_counter() - start
            timing = timings[(job, way)]
            timing.seconds.append(round(seconds, 1))
            timing.base, timing.tuned = base, tuned
            print(f"round {round_index + 1}: {job}, {way}: {seconds:.1f} s", flush=True)
    same = sum(
        a == b
        for pair in zip(answers["previous"], answers["merged"], strict=True)
        for a, b in zip(*pair, strict=True)
    )
    drift = max(
        float((p.detach() - weights0[n]).abs().max())
        for n, p in model.named_parameters()
        if n in weights0
    )
    flags = cpu_flags()
    isa = "AMX-BF16" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return DemoEval(
        run=str(run),
        cpu=f"{cpu_name()} ({isa}), {torch.get_num_threads()} threads, torch {torch.__version__}",
        questions=len(questions),
        timings=list(timings.values()),
        same_answers=same,
        base_weight_drift=drift,
    )


def markdown(result: DemoEval, command: str) -> str:
    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    lines = [
        "## The demo's evaluation: the previous way against today's (CPU)",
        "",
        f"Command: `{command}` on `{result.run}`, {result.cpu}; each job alternates the ways in one "
        "process on the same loaded model, and each ratio is against `previous` in the same run.",
        "",
        f"{result.questions} unseen-source questions (7_SeniorHealth_QA, 9_CDC_QA).",
        "",
        "| job | way | seconds (per round) | × previous | base | tuned |",
        "|---|---|---:|---:|---:|---:|",
    ]
    previous = {t.job: median(t.seconds) for t in result.timings if t.way == "previous"}
    for t in result.timings:
        unit = "{:.5f}" if t.job == "answer loss" else "{:.0f} tokens"
        lines.append(
            f"| {t.job} | {t.way} | {', '.join(f'{s:.1f}' for s in t.seconds)} | "
            f"{median(t.seconds) / previous[t.job]:.2f} | {unit.format(t.base)} | "
            f"{unit.format(t.tuned)} |"
        )
    lines += [
        "",
        f"Answers equal token for token, previous vs merged: {result.same_answers} of "
        f"{2 * result.questions}. Largest change of a base weight after the merges and unmerges: "
        f"{result.base_weight_drift:g}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `medlora demo` run")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    result = measure(Path(args.run), args.rounds)
    from _markdown import update_section

    command = "python bench/demo_eval.py" + (f" --rounds {args.rounds}" if args.rounds > 1 else "")
    body = markdown(result, command)
    print(body)
    update_section("demo-eval", body)
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "demo_eval.json").write_text(result.model_dump_json(indent=2))


if __name__ == "__main__":
    main()
