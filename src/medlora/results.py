"""Typed results: what `medlora eval`, `bench`, `compare` and `demo` write, and the run files the
report reads (train_summary.json, data/data_card.json, best.json).

Every command writes its result with `write_result` (`model_dump_json`, atomically) and every reader
reads one with `read_result` (`model_validate_json`). A figure a result may lack (no base model was
scored, a file an older version wrote) is an optional field; a file holds exactly the fields its
command set, so the files keep the shape they always had. Unknown keys are kept (`extra="allow"`):
a newer file still reads, and reading then writing loses nothing.

This module sits with data / models / config: it imports only pydantic, the standard library and
medlora.io / medlora.errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medlora.errors import DataError
from medlora.io import write_text_atomic


class Result(BaseModel):
    """Base of every result file: unknown keys kept, NaN written as JSON's NaN (as json.dumps)."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")


R = TypeVar("R", bound=Result)


def write_result(path: str | os.PathLike[str], result: Result) -> Path:
    """`result` as indented JSON at `path` (atomic), with the fields that were set."""
    return write_text_atomic(path, result.model_dump_json(indent=2, exclude_unset=True) + "\n")


def read_result(path: str | os.PathLike[str], kind: type[R]) -> R:
    """One result file; a missing, unreadable or malformed file is a one-line DataError."""
    file = Path(path)
    try:
        return kind.model_validate_json(file.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{file}: file not found") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(
            f"{file}: not a valid {kind.__name__} ({where + ': ' if where else ''}{first['msg']}); "
            "re-create it"
        ) from None


def read_optional(path: str | os.PathLike[str], kind: type[R]) -> R | None:
    """`read_result`, or None when the file does not exist."""
    return read_result(path, kind) if Path(path).is_file() else None


# ---------------------------------------------------------------- shared pieces


class CI(Result):
    """A mean with its 95% bootstrap interval (NaN when there was nothing to average)."""

    mean: float
    low: float
    high: float


class MetricCI(Result):
    """One answer metric: the model's interval; the base's and the paired difference when scored."""

    model: CI
    base: CI | None = None
    diff: CI | None = None


class ScoredAnswer(Result):
    """One generated answer beside its reference: a row of the predictions JSONL. Its metric
    scores are extra fields named as in `QualityResult.metrics` (`rougeL`, …; `base_rougeL`, …)."""

    id: str
    source: str
    question: str
    reference: str
    prediction: str
    base_prediction: str | None = None


class QualityResult(Result):
    """Generated answers scored against the references (`evaluate.quality.evaluate_answers`)."""

    examples: int
    decoding: str
    max_new_tokens: int
    generation: dict[str, Any] = {}
    empty_predictions: int
    metrics: dict[str, MetricCI] = {}
    base_empty_predictions: int | None = None
    predictions: str | None = None
    reference_words: float | None = None  # mean words of the reference answers
    # Every answer, in memory for the caller (the demo lists some); its file is `predictions`.
    answers: list[ScoredAnswer] = Field(default=[], exclude=True)


class PanelScores(Result):
    """Base vs tuned on one set of questions (`evaluate.panels.score_panel`): one of the two panels
    every result shows, held-out topics of the trained sources (`test`) and sources never trained
    on (`unseen`); answer loss and, when generated, the answers' metrics."""

    loss: float
    base_loss: float | None = None
    perplexity: float
    base_perplexity: float | None = None
    answer_tokens: int
    examples: int
    loss_change_pct: float | None = None
    examples_better: int | None = None
    panel: Literal["test", "unseen"] = "unseen"
    data: list[str] = []
    quality: QualityResult | None = None


class ExampleLoss(Result):
    id: str
    source: str
    loss: float
    base_loss: float | None = None


# ---------------------------------------------------------------- eval.json


class EvalResult(Result):
    """`medlora eval --out`: loss and/or answer quality on a held-out split (eval.json)."""

    model: str
    adapter: str | None = None
    data: str | list[str]
    split: str
    loss: float | None = None
    perplexity: float | None = None
    examples: int | None = None
    answer_tokens: int | None = None
    base_loss: float | None = None
    base_perplexity: float | None = None
    loss_change: float | None = None
    loss_change_pct: float | None = None
    examples_better: int | None = None
    dropped_no_answer_tokens: int | None = None
    truncated: int | None = None
    per_example: list[ExampleLoss] | None = None
    example_loss_change: CI | None = None
    quality: QualityResult | None = None
    unseen: PanelScores | None = None  # the second panel: the run's eval.unseen_sources
    judge: JudgeResult | None = None  # `medlora eval --judge`: judged answers (evaluate/judge.py)

    def test_panel(self) -> PanelScores | None:
        """This split's loss and answers as a panel (None without a base to compare with)."""
        if self.loss is None or self.base_loss is None or self.examples is None:
            return None
        change = self.loss_change_pct
        if change is None and self.base_loss:
            change = (self.loss - self.base_loss) / self.base_loss * 100
        better = self.examples_better
        if better is None and self.per_example:
            better = sum(r.base_loss is not None and r.loss < r.base_loss for r in self.per_example)
        return PanelScores(
            panel="test",
            data=[self.data] if isinstance(self.data, str) else self.data,
            loss=self.loss,
            base_loss=self.base_loss,
            perplexity=self.perplexity or 0.0,
            base_perplexity=self.base_perplexity,
            answer_tokens=self.answer_tokens or 0,
            examples=self.examples,
            loss_change_pct=change,
            examples_better=better,
            quality=self.quality,
        )


# ---------------------------------------------------------------- bench.json


class SubjectScores(Result):
    """Accuracy on one subject's questions (and the base's, when scored)."""

    acc: float
    acc_norm: float
    n: int
    chance: float
    base_acc: float | None = None
    base_acc_norm: float | None = None


class TaskScores(SubjectScores):
    """One multiple-choice task (`evaluate.multiple_choice.summarize`, plus where its data came from):
    its subjects' scores over all its questions, with intervals and macro averages."""

    acc_ci: CI
    acc_norm_ci: CI
    macro_acc: float
    macro_acc_norm: float
    subjects: dict[str, SubjectScores] = {}
    base_acc_ci: CI | None = None
    base_macro_acc: float | None = None
    diff_acc: CI | None = None
    diff_acc_norm: CI | None = None
    data: str | None = None
    skipped: dict[str, int] = {}
    notes: list[str] = []


class BenchItem(Result):
    """One scored question: each option's log-likelihood and whether the model picked the answer."""

    task: str
    id: str
    subject: str
    n_options: int
    answer: int
    loglikelihoods: list[float]
    acc: float
    acc_norm: float
    base_acc: float | None = None
    base_acc_norm: float | None = None
    base_loglikelihoods: list[float] | None = None


class BenchResult(Result):
    """`medlora bench --out`: multiple-choice accuracy per task (bench.json)."""

    model: str | None = None
    adapter: str | None = None
    shots: int
    limit: int | dict[str, int | None] | None = None
    engine: str
    tasks: dict[str, TaskScores] = {}
    items: dict[str, list[BenchItem]] = {}


# ---------------------------------------------------------------- compare.json

SCORE_NAMES = ("rougeL", "f1", "similarity", "repetition", "echo")


class CompareRow(Result):
    """One question, both answers, and each answer's scores when there is a reference."""

    id: str
    question: str
    reference: str = ""
    base: str
    tuned: str
    tuned_rougeL: float | None = None
    base_rougeL: float | None = None
    tuned_f1: float | None = None
    base_f1: float | None = None
    tuned_similarity: float | None = None
    base_similarity: float | None = None
    tuned_repetition: float | None = None
    base_repetition: float | None = None
    tuned_echo: float | None = None
    base_echo: float | None = None

    def scores(self, side: str) -> dict[str, float]:
        """{metric: score} of the "base" or "tuned" answer, for the metrics it was scored on."""
        found = {name: getattr(self, f"{side}_{name}") for name in SCORE_NAMES}
        return {name: value for name, value in found.items() if value is not None}


class CompareResult(Result):
    """`medlora compare`: base and fine-tuned answers side by side (compare.json)."""

    model: str | None = None
    adapter: str | None = None
    questions_from: str | None = None
    n: int
    scored: int
    max_new_tokens: int
    decoding: str
    generation: dict[str, Any] = {}
    rows: list[CompareRow] = []
    metrics: dict[str, MetricCI] = {}
    files: dict[str, str] = {}  # what was written; never in compare.json itself


# ---------------------------------------------------------------- train_summary.json, demo.json


class TrainSummary(Result):
    """A finished run: what `medlora.train.train` returns and writes as train_summary.json (SFT
    and preference runs alike); every field optional for older runs."""

    run_dir: str | None = None
    train_examples: int | None = None
    val_examples: int | None = None
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    runtime_s: float | None = None
    tokens_per_s: float | None = None
    trained_tokens: int | None = None
    train_seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_memory_mb: float | None = None
    row_choice: dict[str, Any] | None = None  # tokens_per_batch: auto, what was measured


class DemoAnswer(Result):
    question: str
    reference: str
    base: str
    tuned: str


class DemoSummary(Result):
    """`medlora demo`: the two panels (held-out topics, unseen sources), training, answers (demo.json)."""

    model: str
    adapter: str
    unseen: PanelScores
    test: PanelScores
    train: TrainSummary
    answers: list[DemoAnswer] = []
    elapsed_s: float


# ---------------------------------------------------------------- data_card.json, best.json (read)


class GroupUse(Result):
    """What one source group contributed to training (data_card.json → used.per_group)."""

    examples: int = 0
    tokens: int | None = None
    answer_tokens: int | None = None
    token_share: float = 0.0
    answer_token_share: float | None = None
    weight: float | None = None
    upsampled: bool | None = None
    drawn_per_record: int | float | None = None


class DataUse(Result):
    """data_card.json → used: counts of what training used, and the per-group breakdown."""

    train: int | None = None
    validation: int | None = None
    per_group: dict[str, GroupUse] = {}
    mix: dict[str, Any] | None = None
    validation_per_group: dict[str, int] = {}
    repetitive_dropped: int | None = None
    packed_rows: int | None = None

    def counts(self) -> dict[str, int | float]:
        """The numeric entries (train, validation, …) in file order."""
        values = self.model_dump(exclude_unset=True)
        return {k: v for k, v in values.items() if isinstance(v, int | float)}


class DataCard(Result):
    """The parts of a run's data/data_card.json a report shows: written by `prepare_data`, then
    completed by training (`used`, `format`, `attention`)."""

    splits: dict[str, int] | None = None
    used: DataUse | None = None
    skipped: dict[str, dict[str, Any]] | None = None
    token_lengths: dict[str, dict[str, int | float]] | None = None


class BestCheckpoint(Result):
    """best.json: the step training chose by `train.best_metric` (written by medlora.train)."""

    metric: str
    mode: str | None = None
    value: float
    step: int
    path: str


# ---------------------------------------------------------------- judged answers (evaluate/judge.py)


class PairwiseJudgment(Result):
    """Tuned vs base, each pair judged in both orders (a disagreement is a tie); rates over the
    pairs whose two verdicts both parsed."""

    pairs: int  # pairs asked
    unparseable: int  # pairs left out: a verdict in either order was not an allowed letter
    win: CI  # tuned judged better in both orders
    tie: CI
    loss: CI
    win_minus_loss: CI  # paired: the same pairs resampled together
    consistent: int  # pairs whose two orders gave the same preference
    position_consistency: float  # consistent / parsed pairs (NaN when none parsed)


class FactCheck(Result):
    """Reference statements marked covered / contradicted / absent in each model's answers;
    per-question shares, `model` = tuned, `diff` = tuned − base (paired)."""

    questions: int
    statements: int  # reference statements per model (at most max_statements per question)
    max_statements: int
    unparseable: int  # statement verdicts left out (both models together)
    recall: MetricCI  # share of statements covered
    contradiction: MetricCI  # share of statements contradicted


class RubricScores(Result):
    """A user rubric scored the HealthBench way: per question, points of the items met / positive
    points possible, clipped to [0, 1]; `model` = tuned, `diff` = tuned − base (paired)."""

    file: str
    questions: int  # rubric questions found among the predictions
    unmatched: int  # rubric questions with no prediction row
    unparseable: int  # item verdicts that were not an allowed letter
    excluded: int  # question scores left out because one of their item verdicts was unparseable
    score: MetricCI


class JudgeResult(Result):
    """`medlora eval --judge`: answers judged by a model behind an OpenAI-compatible API."""

    judge_model: str
    judge_url: str
    predictions: str
    examples: int
    requests: int  # sent to the judge in this run (0: every verdict came from the cache)
    cached: int  # verdicts read from the cache
    cache: str
    pairwise: PairwiseJudgment | None = None  # None when the rows have no base answers
    facts: FactCheck | None = None
    rubric: RubricScores | None = None


EvalResult.model_rebuild()


# ---------------------------------------------------------------- audit.json (medlora audit)


class SpanStats(Result):
    """The longest verbatim span (tokenizer tokens) each answer shares with its reference, over
    one set of answers (`evaluate.memorization`)."""

    answers: int
    reciting: int  # answers whose longest shared span is at least the audit's threshold
    reciting_share: CI
    mean: CI
    median: float
    p90: float
    max: int
    histogram: dict[str, int] = {}  # span bucket ("20–49 tokens") → answers


class RecitedSpan(Result):
    """The longest span a tuned answer shares with its training answer, as text."""

    question: str
    tokens: int
    text: str


class RecitationAudit(Result):
    """Training questions answered by tuned and base, against held-out (test-split) questions."""

    threshold_tokens: int
    train: SpanStats  # tuned answers to training questions vs the trained answers
    base_train: SpanStats
    train_change: CI  # paired: tuned − base longest span, same training questions
    test: SpanStats | None = None  # tuned answers to test questions vs their references
    base_test: SpanStats | None = None
    test_change: CI | None = None
    longest: RecitedSpan | None = None


class CanaryExposure(Result):
    """One canary's secret ranked among every secret of its length, tuned and base."""

    id: str
    repeats: int  # times trained on; 0: a control canary, never trained on
    rank: int
    exposure: float
    base_rank: int
    base_exposure: float


class ExposureAudit(Result):
    """Exposure (Carlini et al. 2019) of the run's canaries (RUN/canaries.json); no secrets."""

    digits: int
    candidates: int  # |R| = 10^digits
    max_exposure: float  # log2 |R|
    canaries: list[CanaryExposure] = []
    seconds_per_canary: float  # one model ranking one canary's secret


class AuditResult(Result):
    """`medlora audit RUN` (audit.json): recitation of training answers and canary exposure."""

    run: str
    model: str
    generation: dict[str, Any] = {}
    recitation: RecitationAudit
    exposure: ExposureAudit | None = None  # None: the run was trained without data.canaries
    elapsed_s: float
