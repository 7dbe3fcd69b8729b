"""`medlora audit RUN`: did the fine-tune learn its training answers, or learn to recite them?

Two measures, each with a control:
- Recitation: the run's own training questions answered by the tuned model and by its base (the
  same weights, adapter off), with the run's chat template and `generation:` settings. For each
  answer, the longest span of tokenizer tokens it shares verbatim with the trained answer; the
  share of answers with a span of RECITATION_TOKENS or more, and the spans' spread. Control: the
  same on held-out-topic questions (the run's test split) against their references, which no
  model saw, so what shows there is phrasing any answer shares, not memory.
- Canaries (`data.canaries`, RUN/canaries.json): each made-up secret's exposure
  (medlora.evaluate.exposure), tuned and base, per number of times it was trained on; the
  control canaries were never trained on.

The training questions are the exact records the run trained on (RUN/trained_ids.json; runs from
before it are reproduced from recipe.yaml + RUN/data as training picks them).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.data.canaries import CANARIES_FILE, Canary, read_canaries, read_trained_ids
from medlora.data.hygiene import drop_repetitive
from medlora.data.mix import training_records
from medlora.data.prepare import load_splits
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.errors import ConfigError, DataError
from medlora.evaluate.exposure import Candidates, canary_candidates, canary_rank, exposure
from medlora.evaluate.generate import (
    adapter_disabled,
    adapter_merged,
    generate_answers,
    recipe_generation,
)
from medlora.evaluate.heldout import load_eval_model, run_recipe
from medlora.evaluate.quality import bootstrap_ci, paired_bootstrap_ci
from medlora.progress import progress_bar
from medlora.results import (
    AuditResult,
    CanaryExposure,
    ExposureAudit,
    RecitationAudit,
    RecitedSpan,
    SpanStats,
    write_result,
)

RECITATION_TOKENS = 50  # a span this long is recitation, not shared medical phrasing
AUDIT_FILE = "audit.json"


# ---------------------------------------------------------------- recitation


def longest_shared_span(answer: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """(length, start in `answer`) of the longest run of tokens `answer` shares with `reference`."""
    matcher = SequenceMatcher(None, answer, reference, autojunk=False)
    match = matcher.find_longest_match(0, len(answer), 0, len(reference))
    return match.size, match.a


def span_histogram(spans: Sequence[int], threshold: int) -> dict[str, int]:
    """Answers per bucket of span length; the buckets start at 0, a fifth and two fifths of the
    threshold, the threshold and twice it (0–9, 10–19, 20–49, 50–99, ≥100 for 50 tokens)."""
    edges = sorted({0, threshold // 5, 2 * threshold // 5, threshold, 2 * threshold})
    names = [f"{low}–{high - 1}" for low, high in itertools.pairwise(edges)] + [f"≥{edges[-1]}"]
    counts = dict.fromkeys(names, 0)
    for span in spans:
        counts[names[bisect.bisect_right(edges, span) - 1]] += 1
    return counts


def span_stats(spans: Sequence[int], threshold: int, seed: int = 0) -> SpanStats:
    """How long the longest shared spans of one set of answers are, and how many recite."""
    import numpy as np

    values = np.asarray(spans, dtype=float)
    reciting = [float(span >= threshold) for span in spans]
    return SpanStats(
        answers=len(spans),
        reciting=int(sum(reciting)),
        reciting_share=bootstrap_ci(reciting, seed=seed),
        mean=bootstrap_ci(spans, seed=seed),
        median=float(np.median(values)) if len(spans) else float("nan"),
        p90=float(np.percentile(values, 90)) if len(spans) else float("nan"),
        max=int(values.max()) if len(spans) else 0,
        histogram=span_histogram(spans, threshold),
    )


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def answer_spans(
    tokenizer: Any, answers: Sequence[str], references: Sequence[str]
) -> list[tuple[int, int]]:
    """(span length, start) of each answer's longest verbatim span shared with its reference."""
    pairs = zip(_token_ids(tokenizer, answers), _token_ids(tokenizer, references), strict=True)
    return [longest_shared_span(answer, reference) for answer, reference in pairs]


def trained_records(run_dir: Path, recipe: Recipe) -> tuple[list[Record], list[Record]]:
    """(the real records the run trained on, each once, in training order; the test split)."""
    saved = read_trained_ids(run_dir)
    splits_dir = saved[1] if saved else run_dir / "data"
    if saved is None and not (splits_dir / "train.jsonl").is_file():
        raise DataError(
            f"{run_dir} has no trained_ids.json and no data/ splits: train it again with this "
            "medlora (or give the run its prepared data/ folder)"
        )
    splits = load_splits(splits_dir)
    if saved is not None:
        by_id = {record.id: record for record in splits["train"]}
        missing = [i for i in saved[0] if i not in by_id]
        if missing:
            raise DataError(
                f"{splits_dir}: training record {missing[0]!r} is not in train.jsonl any more "
                f"({len(missing)} missing); audit the run with the splits it trained on"
            )
        records = [by_id[i] for i in dict.fromkeys(saved[0])]
    else:  # a run from before trained_ids.json: pick them as train.run_files does
        d = recipe.data
        pool, _ = drop_repetitive(splits["train"], d.max_answer_repetition)
        picked, _ = training_records(pool, d.weights, d.max_train_examples, d.seed, d.mix_by)
        records = list({record.id: record for record in picked}.values())
    return records, splits["test"]


def recitation_audit(
    model: Any,
    tokenizer: Any,
    train: Sequence[Record],
    test: Sequence[Record],
    recipe: Recipe,
    threshold: int = RECITATION_TOKENS,
) -> RecitationAudit:
    """Longest verbatim spans of tuned and base answers: training questions against their trained
    answers, test questions against their references (the control)."""
    records = [*train, *test]
    questions, references = [r.question for r in records], [r.answer for r in records]
    generation = (recipe.data.system_prompt, recipe_generation(recipe), recipe.eval.batch_size)
    with adapter_disabled(model):  # the base first, on the untouched weights
        base = generate_answers(model, tokenizer, questions, *generation, "base answers")
    with adapter_merged(model):
        tuned = generate_answers(model, tokenizer, questions, *generation, "fine-tuned answers")
    tuned_spans = answer_spans(tokenizer, tuned, references)
    base_spans = [span for span, _ in answer_spans(tokenizer, base, references)]
    spans = [span for span, _ in tuned_spans]
    n, seed = len(train), recipe.data.seed

    longest = None
    if n and max(spans[:n]) > 0:
        best = max(range(n), key=spans.__getitem__)
        size, start = tuned_spans[best]
        ids = _token_ids(tokenizer, [tuned[best]])[0][start : start + size]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        longest = RecitedSpan(question=records[best].question, tokens=size, text=text)
    return RecitationAudit(
        threshold_tokens=threshold,
        train=span_stats(spans[:n], threshold, seed),
        base_train=span_stats(base_spans[:n], threshold, seed),
        train_change=paired_bootstrap_ci(spans[:n], base_spans[:n], seed=seed),
        test=span_stats(spans[n:], threshold, seed) if test else None,
        base_test=span_stats(base_spans[n:], threshold, seed) if test else None,
        test_change=paired_bootstrap_ci(spans[n:], base_spans[n:], seed=seed) if test else None,
        longest=longest,
    )


# ---------------------------------------------------------------- canaries


def _ranks(
    model: Any, canaries: Sequence[Canary], candidates: Sequence[Candidates], label: str
) -> list[int]:
    ranks = []
    with progress_bar(len(canaries) > 0) as progress:
        task = progress.add_task(f"canary secrets ranked ({label})", total=len(canaries))
        for canary, candidate_set in zip(canaries, candidates, strict=True):
            ranks.append(canary_rank(model, canary, candidate_set))
            progress.advance(task, 1)
    return ranks


def exposure_audit(
    model: Any, tokenizer: Any, canaries: Sequence[Canary], system_prompt: str | None
) -> ExposureAudit:
    """Each canary's secret ranked by the base (adapter off), then by the tuned model."""
    digits = len(canaries[0].secret)
    candidates = 10**digits
    started = time.perf_counter()
    # Tokenized once, scored by both models.
    answers = [canary_candidates(tokenizer, canary, system_prompt) for canary in canaries]
    with adapter_disabled(model):
        base = _ranks(model, canaries, answers, "base")
    with adapter_merged(model):
        tuned = _ranks(model, canaries, answers, "fine-tuned")
    seconds = (time.perf_counter() - started) / (2 * len(canaries))
    return ExposureAudit(
        digits=digits,
        candidates=candidates,
        max_exposure=exposure(1, candidates),
        canaries=[
            CanaryExposure(
                id=canary.id,
                repeats=canary.repeats,
                rank=rank,
                exposure=exposure(rank, candidates),
                base_rank=base_rank,
                base_exposure=exposure(base_rank, candidates),
            )
            for canary, rank, base_rank in zip(canaries, tuned, base, strict=True)
        ],
        seconds_per_canary=round(seconds, 2),
    )


# ---------------------------------------------------------------- the audit


def run_audit(
    run_dir: str | Path,
    questions: int = 100,
    out: str | Path | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> AuditResult:
    """`medlora audit RUN`: recitation on `questions` training and test questions, and canary
    exposure when the run has canaries; written to `out` (default RUN/audit.json)."""
    started = time.perf_counter()
    run = Path(run_dir)
    if not (run / "recipe.yaml").is_file():
        raise DataError(f"{run} holds no recipe.yaml: audit a run directory `medlora train` wrote")
    if questions < 1:
        raise ConfigError(f"--questions {questions}: ask at least 1 question")
    recipe = run_recipe(run)
    train, test = trained_records(run, recipe)
    seed = recipe.data.seed
    train, test = sample_records(train, questions, seed), sample_records(test, questions, seed)
    model, tokenizer = load_eval_model(recipe.model.name, run, recipe, model_and_tokenizer)
    recitation = recitation_audit(model, tokenizer, train, test, recipe)
    canaries = read_canaries(run / CANARIES_FILE) if (run / CANARIES_FILE).is_file() else []
    prompt = recipe.data.system_prompt
    exposed = exposure_audit(model, tokenizer, canaries, prompt) if canaries else None
    result = AuditResult(
        run=str(run),
        model=recipe.model.name,
        generation=recipe_generation(recipe).model_dump(),
        recitation=recitation,
        exposure=exposed,
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    write_result(Path(out) if out else run / AUDIT_FILE, result)
    return result
