"""Why do tuned answers stop earlier than the base's? Where each model stops, and the stop rate the
training targets teach.

    python bench/answer_length.py --runs RUN [RUN ...] [--references 40]

For each finished demo run (its `predictions_unseen.jsonl`, and `predictions_test.jsonl` when
there): the generated answers' mean length and the share under 60 words, base and tuned. Then the
learned stop hazard: the unseen-source references teacher-forced through each model, the mean
probability of the end-of-turn token at sentence ends where the reference goes on, and how often
it is the most likely token there (greedy decoding then stops an answer the reference continues).
Last, the targets' own stop rate per variant of the run's data settings: taught stops per sentence
end of the trained answer text (`data.truncation`, `data.end_of_turn_loss`).

Writes the `answer-length` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402

from medlora.config import Recipe, load_recipe  # noqa: E402
from medlora.data.format import (  # noqa: E402
    IGNORE_INDEX,
    format_record,
    prompt_ids,
    trains_end_of_turn,
)
from medlora.data.prepare import load_splits  # noqa: E402
from medlora.evaluate.generate import adapter_disabled, stop_token_ids  # noqa: E402
from medlora.io import read_jsonl  # noqa: E402
from medlora.models import load_with_adapter  # noqa: E402
from medlora.train.run_files import sample_training_records  # noqa: E402

SENTENCE_END = re.compile(r"[.!?]\s*$")


def lengths(run: Path) -> list[str]:
    rows = []
    for name in ("predictions_test.jsonl", "predictions_unseen.jsonl"):
        path = run / name
        if not path.is_file():
            continue
        found = list(read_jsonl(path))
        cells = [name.removeprefix("predictions_").removesuffix(".jsonl"), str(len(found))]
        for side in ("base_prediction", "prediction", "reference"):
            words = [len(r[side].split()) for r in found]
            short = sum(w < 60 for w in words) / len(words)
            cells.append(f"{statistics.mean(words):.1f} ({short:.0%} < 60)")
        rows.append("| " + " | ".join([f"`{run}`", *cells]) + " |")
    return rows


def stop_hazard(run: Path, recipe: Recipe, references: int) -> list[str]:
    """Teacher-forced P(end of turn) at continuing sentence ends of unseen references."""
    import torch

    model, tokenizer = load_with_adapter(recipe.model.name, run, recipe.model.dtype)
    model.eval()
    ends = stop_token_ids(tokenizer)
    rows = list(read_jsonl(run / "predictions_unseen.jsonl"))[:references]
    out = []
    for side in ("base", "tuned"):
        probs, argmax = [], 0
        for row in rows:
            prompt = prompt_ids(tokenizer, row["question"], recipe.data.system_prompt)
            answer = tokenizer(row["reference"], add_special_tokens=False)["input_ids"][:200]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                if side == "base":
                    with adapter_disabled(model):
                        logits = model(ids).logits[0]
                else:
                    logits = model(ids).logits[0]
            p = logits.float().softmax(-1)
            for j in range(len(answer) - 1):
                if SENTENCE_END.search(tokenizer.decode(answer[: j + 1])):
                    at = len(prompt) + j  # predicts answer token j + 1: the reference goes on
                    probs.append(p[at, ends].sum().item())
                    argmax += int(p[at].argmax().item() in ends)
        out.append(
            f"| `{run}` | {side} | {len(probs)} | {statistics.mean(probs):.3f} | "
            f"{argmax / len(probs):.1%} |"
        )
    return out


def taught_stops(run: Path, recipe: Recipe, shares: Sequence[tuple[str, float]] = ()) -> list[str]:
    """Taught stops per sentence end of the trained text, for the run's records and variants."""
    from medlora.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name)
    splits = load_splits(run / "data")
    records, _, _ = sample_training_records(splits["train"], recipe)
    d = recipe.data
    end = set(stop_token_ids(tokenizer))
    out = []
    variants = [("sentence", 1.0), ("sentence_open", 1.0), ("sentence", 0.0)]
    variants = list(dict.fromkeys([*variants, *shares]))
    for truncation, share in variants:
        stops = sentence_ends = cut = 0
        for record in records:
            eot_loss = trains_end_of_turn(record.id, share, d.seed)
            ex = format_record(
                tokenizer, record, d.system_prompt, d.max_seq_len, truncation, eot_loss
            )
            if ex is None:
                continue
            trained = [t for t in ex.labels if t != IGNORE_INDEX]
            text = tokenizer.decode([t for t in trained if t not in end])
            sentence_ends += len(re.findall(r"[.!?](\s|$)", text))
            if any(t in end for t in trained):
                stops += 1
                cut += int(ex.truncated)
        out.append(
            f"| {truncation} | {share:g} | {len(records)} | {stops} ({cut} where "
            f"the answer was cut) | {sentence_ends} | {stops / sentence_ends:.3f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--references", type=int, default=40)
    args = parser.parse_args()
    recipes = {run: load_recipe(run / "recipe.yaml") for run in args.runs}
    length_rows = [row for run in args.runs for row in lengths(run)]
    hazard_rows = [
        row for run in args.runs for row in stop_hazard(run, recipes[run], args.references)
    ]
    first = args.runs[0]
    taught = taught_stops(
        first,
        recipes[first],
        [(r.data.truncation, r.data.end_of_turn_loss) for r in recipes.values()],
    )
    settings = ", ".join(
        f"`{run}`: truncation {r.data.truncation}, end_of_turn_loss {r.data.end_of_turn_loss:g}"
        for run, r in recipes.items()
    )
    body = f"""## Answer length: where base and tuned stop (CPU)

Command: `python {" ".join(sys.argv)}` ({os.cpu_count()} CPU cores, {platform.machine()},
torch {__import__("torch").__version__}). Runs: {settings}.

Generated answers (the runs' `generation:` settings; words, and the share under 60 words):

| run | panel | questions | base | fine-tuned | reference |
|---|---|---:|---|---|---|
{chr(10).join(length_rows)}

The stop each model learned: the first {args.references} unseen-source references teacher-forced,
at every sentence end where the reference goes on, the probability of the end-of-turn token and
the share of those ends where it is the most likely token (greedy decoding would stop there):

| run | model | sentence ends | mean P(end of turn) | end of turn is the argmax |
|---|---|---:|---:|---:|
{chr(10).join(hazard_rows)}

What the training targets of `{first}` teach (its {recipes[first].data.max_train_examples}
sampled records, `max_seq_len` {recipes[first].data.max_seq_len}): answers that end with a trained
end-of-turn token per sentence end of trained answer text.

| truncation | end_of_turn_loss | records | taught stops | sentence ends | stops per sentence end |
|---|---|---:|---:|---:|---:|
{chr(10).join(taught)}
"""
    print(body)
    update_section("answer-length", body)


if __name__ == "__main__":
    main()
