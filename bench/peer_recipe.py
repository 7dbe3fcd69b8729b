"""The model card's recipe as users write it by hand, against medlora, on the same data and model.

    python bench/peer_recipe.py [--train 96] [--val 32] [--out runs/bench-peer]

Three training runs, each in its own process (so peak memory is per run), on the same prepared
MedQuAD examples (recipe `smollm2-135m-cpu`'s sources and exclusions), same SmolLM2-135M weights,
same tokenization (chat template, answer-only labels), 2 threads:

1. peer: plain `transformers.Trainer` + `peft` as in the Llama 3.2 3B medical model card: LoRA r=4
   (alpha 32, dropout 0.05) on q_proj/v_proj, `DataCollatorForSeq2Seq`, batch 1 x accumulation 4,
   AdamW lr 2e-5 linear decay, 1 epoch (fp32: the card's fp16 needs a GPU).
2. medlora, the same LoRA and optimizer settings: the engine alone (packing with per-example
   attention, answer-only logits).
3. medlora, the bundled `smollm2-135m-cpu` recipe (its defaults), on the same examples.

Every run scores the same validation examples (token-weighted answer loss, the function
`medlora eval` uses) at fixed steps; evaluation time is excluded from training time. Figures:
tokens/s (all tokens; answer tokens) as a ratio to the peer, and training seconds until each
medlora run first reaches the peer's final validation loss, as a fraction of the peer's time.
Writes the `peer` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
SPEC = "smollm2-135m-instruct"
THREADS = 2


# --- shared by every run -------------------------------------------------------------------------


def _examples(data_dir: Path, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    from medlora.config import load_recipe
    from medlora.data.format import format_records
    from medlora.data.prepare import load_splits

    recipe = load_recipe(_recipe_path())
    splits = load_splits(data_dir)
    d = recipe.data
    train, _ = format_records(tokenizer, splits["train"], d.system_prompt, d.max_seq_len)
    val, _ = format_records(tokenizer, splits["validation"], d.system_prompt, d.max_seq_len)
    return train, val


def _recipe_path() -> Path:
    from medlora.cli import BUNDLED_RECIPES

    return BUNDLED_RECIPES / "smollm2-135m-cpu.yaml"


def _peak_rss_mb() -> float:
    try:  # medlora's probes (tokens_per_batch: auto) reset the high-water mark; this keeps it whole
        from medlora.train.memory import peak_rss_bytes

        return peak_rss_bytes() / 2**20
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- run 1: the peer, written the way the model card's author writes it --------------------------


def run_peer(data_dir: Path, out: Path, eval_every: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from medlora.evaluate.loss import score_examples
    from medlora.models import load_model

    model, tokenizer = load_model(SPEC)  # the same weights a user gets with from_pretrained
    train_examples, val_examples = _examples(data_dir, tokenizer)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in train_examples
    ]
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    curve: list[dict[str, float]] = []
    clock = {"start": 0.0, "eval": 0.0}

    def score(step: int) -> None:
        started = time.perf_counter()
        seconds = started - clock["start"] - clock["eval"]  # training time only
        loss = score_examples(model, val_examples, tokenizer.pad_token_id, 8)["loss"]
        model.train()
        clock["eval"] += time.perf_counter() - started
        curve.append({"step": step, "train_seconds": seconds, "val_loss": loss})

    class Validation(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % eval_every == 0 or state.global_step == state.max_steps:
                score(state.global_step)

    base_loss = score_examples(model, val_examples, tokenizer.pad_token_id, 8)["loss"]
    args = TrainingArguments(
        output_dir=str(out / "peer"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        learning_rate=2e-5,
        lr_scheduler_type="linear",
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[Validation()],
    )
    trainer.train()
    train_seconds = curve[-1]["train_seconds"]
    tokens = sum(len(e.input_ids) for e in train_examples)
    answer_tokens = sum(e.answer_tokens for e in train_examples)
    return {
        "run": "peer",
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "answer_tokens": answer_tokens,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds,
        "answer_tokens_per_s": answer_tokens / train_seconds,
        "base_val_loss": base_loss,
        "curve": curve,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --- runs 2 and 3: medlora train() ---------------------------------------------------------------


def run_medlora(data_dir: Path, out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    from medlora.config import load_recipe
    from medlora.train import train

    recipe = load_recipe(_recipe_path(), overrides)
    result = train(recipe, out / name, prepared_dir=data_dir)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    seconds_at = {row["step"]: row["train_seconds"] for row in rows if "train_seconds" in row}
    curve = [
        {
            "step": row["step"],
            "train_seconds": seconds_at[row["step"]],
            "val_loss": row["eval_loss"],
        }
        for row in rows
        if "eval_loss" in row and row["step"] in seconds_at
    ]
    # Training time at the end of the last optimizer step, the point where the peer's clock is
    # read (its last `on_step_end`); `train()` returns a moment later, after its final logging.
    seconds = seconds_at[max(seconds_at)]
    return {
        "run": name,
        "overrides": overrides,
        "steps": result.steps,
        "tokens": rows_tokens(rows),
        "answer_tokens": result.trained_tokens,
        "train_seconds": seconds,
        "returned_seconds": result.train_seconds,
        "tokens_per_s": rows_tokens(rows) / seconds,
        "answer_tokens_per_s": result.trained_tokens / seconds,
        "curve": curve,
        "peak_rss_mb": _peak_rss_mb(),
    }


def rows_tokens(rows: list[dict[str, Any]]) -> int:
    return max((row.get("tokens_seen", 0) for row in rows), default=0)


# --- orchestration -------------------------------------------------------------------------------

SAME_AS_PEER = [
    "lora.r=4",
    "lora.alpha=32",
    "lora.dropout=0.05",
    "lora.target_modules=[q_proj,v_proj]",
    "train.lr=2e-5",
    "train.warmup_ratio=0.0",
    "train.scheduler=linear",
]


def _medlora_overrides(eval_every: int, extra: list[str]) -> list[str]:
    return [
        *extra,
        "data.max_train_examples=null",
        "data.max_val_examples=null",
        "train.epochs=1",
        "train.max_steps=-1",
        f"train.eval_steps={eval_every}",
        "train.save_steps=0",
        "train.logging_steps=1",
        f"train.threads={THREADS}",
        "eval.during_training_every=0",
        "eval.best_metric=null",
    ]


def _prepare(out: Path, n_train: int, n_val: int) -> Path:
    """The same examples for every run: a seeded sample of the recipe's MedQuAD splits."""
    from medlora.config import load_recipe
    from medlora.data.prepare import load_splits, prepare_data
    from medlora.data.sample import sample_records
    from medlora.io import write_jsonl_atomic

    recipe = load_recipe(_recipe_path())
    full = out / "data-full"
    if not (full / "train.jsonl").exists():
        d = recipe.data
        prepare_data(d.sources, full, exclude=d.exclude, val_fraction=d.val_fraction)
    splits = load_splits(full)
    data = out / "data"
    write_jsonl_atomic(
        data / "train.jsonl", [r.to_dict() for r in sample_records(splits["train"], n_train, 0)]
    )
    for name, count in (("validation", n_val), ("test", n_val)):
        picked = sample_records(splits[name], count, 0)
        write_jsonl_atomic(data / f"{name}.jsonl", [r.to_dict() for r in picked])
    return data


def step_bench_data(description: str) -> tuple[argparse.Namespace, Path]:
    """The one-step benches' shared start (engine_step, unlikelihood_step): --out/--train/--val,
    the torch threads and seed, and the prepared sample."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="runs/bench-peer")
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--val", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return args, _prepare(Path(args.out), args.train, args.val)


def _gemm_gflops() -> float:
    """The CPU's matrix-multiply ceiling here: a large fp32 GEMM with the same threads."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    return 2 * 2048**3 * 10 / (time.perf_counter() - started) / 1e9


def _time_to(curve: list[dict[str, float]], target: float) -> float | None:
    for point in curve:
        if point["val_loss"] <= target:
            return point["train_seconds"]
    return None


def _resolved_precision(out: Path) -> str:
    """What `train.precision: auto` became in medlora-same's run (its recipe.yaml)."""
    text = (out / "medlora-same" / "recipe.yaml").read_text()
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if "precision:" in line)


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(THREADS)
    out, data = Path(args.out), Path(args.out) / "data"
    if args.child == "peer":
        result = run_peer(data, out, args.peer_eval_every)
    elif args.child == "medlora-same":
        # One packed row of ~1024 tokens ≈ the peer's 4 examples per optimizer step.
        engine = [*SAME_AS_PEER, "train.packing=true", "train.tokens_per_batch=1024"]
        if args.at_peer_memory:
            # The budget is the peak the peer just reached (the run before this one, same pair).
            peer_peak = json.loads((out / "peer.json").read_text())["peak_rss_mb"]
            engine += ["train.tokens_per_batch=auto", f"train.max_memory_gb={peer_peak / 1024:.3f}"]
        engine += ["train.grad_accum=1", f"train.precision={args.precision}"]
        steps = max(1, args.peer_eval_every)
        result = run_medlora(data, out, "medlora-same", _medlora_overrides(steps, engine))
    else:
        result = run_medlora(data, out, "medlora-recipe", _medlora_overrides(1, []))
    (out / f"{args.child}.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-peer")
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--peer-eval-every", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=1, help="peer/medlora-same repeats")
    parser.add_argument("--child", choices=["peer", "medlora-same", "medlora-recipe"])
    parser.add_argument(
        "--at-peer-memory",
        action="store_true",
        help="medlora-same gets the peer's peak RSS as train.max_memory_gb (tokens_per_batch: "
        "auto); writes the section peer-at-peer-memory",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="medlora-same's train.precision (the peer runs fp32: the card's fp16 AMP needs a "
        "GPU); auto = bf16 on AMX / AVX512-BF16 CPUs; writes the section with a -PRECISION suffix",
    )
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, args.train, args.val)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TQDM_DISABLE="1")
    gflops_before = _gemm_gflops()
    results: dict[str, Any] = {}
    pair_ratios: list[float] = []
    # Alternating peer / medlora-same pairs: the shared machine drifts, so a ratio is taken within
    # each pair and the median of the pairs is reported.
    order = [*(["peer", "medlora-same"] * args.pairs), "medlora-recipe"]
    for name in order:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--out",
                str(out),
                "--peer-eval-every",
                str(args.peer_eval_every),
                *(["--at-peer-memory"] if args.at_peer_memory else []),
                "--precision",
                args.precision,
            ],
            env=env,
            check=True,
        )
        results[name] = json.loads((out / f"{name}.json").read_text())
        results[name]["process_wall_s"] = time.perf_counter() - started
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "curve"}))
        if name == "medlora-same":
            pair_ratios.append(results[name]["tokens_per_s"] / results["peer"]["tokens_per_s"])
    gflops_after = _gemm_gflops()
    (out / "results.json").write_text(json.dumps({**results, "pair_ratios": pair_ratios}, indent=2))
    write_doc(results, args, (gflops_before + gflops_after) / 2, pair_ratios)


def write_doc(
    results: dict[str, Any], args: argparse.Namespace, gemm_gflops: float, pair_ratios: list[float]
) -> None:
    import torch
    from _markdown import update_section

    peer = results["peer"]
    target = peer["curve"][-1]["val_loss"]
    # Frozen base: forward 2N + input-gradient backward 2N FLOPs per token (no weight gradients).
    n_params = 134.5e6
    lines = [
        "## Training engine: the model card's recipe by hand vs medlora (CPU)"
        + (", medlora at the peer's memory" if args.at_peer_memory else ""),
        "",
        f"Command: `python bench/peer_recipe.py --train {args.train} --val {args.val} "
        f"--pairs {args.pairs}{' --at-peer-memory' if args.at_peer_memory else ''}"
        f"{'' if args.precision == 'fp32' else ' --precision ' + args.precision}` "
        f"({os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
        f"{THREADS} threads per run, runs one after another in separate processes).",
        f"Data: {args.train} training / {args.val} validation examples of MedQuAD "
        "(recipe `smollm2-135m-cpu`: chat template, answer-only labels, ≤256 tokens), the same for "
        "all runs; model SmolLM2-135M-Instruct (float32 weights; medlora-same holds its frozen "
        "weights in bf16 when its precision is bf16).",
        "",
        "| run | setup | optimizer steps | tokens/s | answer tokens/s | tokens/s ÷ peer "
        "| ≈ GFLOP/s | final val loss | train s to peer's final val loss | ÷ peer's time "
        "| peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    setups = {
        "peer": "Trainer + peft, r=4 q/v, batch 1 × 4, lr 2e-5, DataCollatorForSeq2Seq",
        "medlora-same": "medlora train(), same LoRA/lr; "
        + (
            "packed rows of `tokens_per_batch: auto` under `max_memory_gb` = the peer's peak RSS"
            if args.at_peer_memory
            else "packed 1024 tokens"
        )
        + f", train.precision {args.precision}"
        + (f" ({_resolved_precision(Path(args.out))})" if args.precision == "auto" else "")
        + ", per-example "
        "attention (equal lengths batched), 15-bit dropout mask, frozen-weight RMSNorm, fused "
        "answer-only head and loss",
        "medlora-recipe": "medlora train(), bundled `smollm2-135m-cpu` recipe, packed",
    }
    for name, run in results.items():
        reached = _time_to(run["curve"], target)
        ratio = f"{reached / peer['train_seconds']:.2f}" if reached is not None else "not reached"
        lines.append(
            f"| {name} | {setups[name]} | {run['steps']} | {run['tokens_per_s']:.0f} | "
            f"{run['answer_tokens_per_s']:.0f} | {run['tokens_per_s'] / peer['tokens_per_s']:.2f} | "
            f"{run['tokens_per_s'] * 4 * n_params / 1e9:.0f} | {run['curve'][-1]['val_loss']:.4f} | "
            f"{reached:.0f} | {ratio} | {run['peak_rss_mb']:.0f} |"
            if reached is not None
            else f"| {name} | {setups[name]} | {run['steps']} | {run['tokens_per_s']:.0f} | "
            f"{run['answer_tokens_per_s']:.0f} | {run['tokens_per_s'] / peer['tokens_per_s']:.2f} | "
            f"{run['tokens_per_s'] * 4 * n_params / 1e9:.0f} | {run['curve'][-1]['val_loss']:.4f} | "
            f"– | {ratio} | {run['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Paired repeats (peer, then medlora-same, alternating; the table shows the last pair): "
        f"medlora-same ÷ peer tokens/s = {', '.join(f'{r:.2f}' for r in pair_ratios)}; "
        f"median {statistics.median(pair_ratios):.2f}.",
        "",
        "Training seconds are read for every run at the end of its last optimizer step, with the "
        "validation passes taken out; tokens/s = all prompt and answer tokens trained / those "
        "seconds.",
        f"Base model validation loss {peer['base_val_loss']:.4f}; the peer ends at {target:.4f} "
        f"after {peer['train_seconds']:.0f} s of training.",
        f"FLOP ceiling: a 2048³ fp32 GEMM runs at {gemm_gflops:.0f} GFLOP/s with {THREADS} threads "
        "in this run (theoretical AVX-512 peak ≈ 358); '≈ GFLOP/s' counts 4 × 134.5 M FLOPs per "
        "token (forward plus input-gradient backward through the frozen base).",
        "Validation curves (train seconds, val loss): "
        + "; ".join(
            f"{name}: "
            + ", ".join(f"({p['train_seconds']:.0f}, {p['val_loss']:.3f})" for p in run["curve"])
            for name, run in results.items()
        ),
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    section = "peer-at-peer-memory" if args.at_peer_memory else "peer"
    update_section(section if args.precision == "fp32" else f"{section}-{args.precision}", body)


if __name__ == "__main__":
    main()
