"""The `eval:`, `generation:` and `output:` sections of a recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from medlora.config.base import _Section


class EvalConfig(_Section):
    split: Literal["test", "validation", "train", "all"] = Field(
        "test", description="Split scored by `medlora eval` and the demo."
    )
    max_examples: int | None = Field(64, ge=1, description="Score at most this many examples.")
    test_examples: int | None = Field(
        None,
        ge=1,
        description="Questions of the demo's held-out-topics panel (test split); null: "
        "max_examples (which the unseen-sources panel uses).",
    )
    batch_size: int = Field(
        8, ge=1, description="Examples per forward pass when scoring, questions per generate call."
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="Matmuls of the answer-loss scoring: bf16 autocast scores faster where the "
        "CPU (AMX / AVX512-BF16) or GPU runs bf16 natively (docs/benchmarks.md, demo-eval); "
        "auto = bf16 there, fp32 elsewhere. Generated answers always use model.dtype.",
    )
    unseen_sources: list[str] = Field(
        default_factory=list,
        description="KIND:PATH sources never trained on: the demo's headline scores base vs tuned "
        "on them (e.g. medquad:7_SeniorHealth_QA, relative to the MedQuAD folder).",
    )
    metrics: list[Literal["rouge", "f1", "similarity", "repetition", "echo", "length"]] = Field(
        default_factory=lambda: ["rouge", "f1", "similarity", "repetition", "echo", "length"],
        description="Answer metrics the demo reports (with paired bootstrap CIs); length: words.",
    )
    num_answers: int = Field(
        3, ge=0, description="Base-vs-tuned answers shown in the demo summary."
    )
    # Quality during training (medlora.train.quality_callback); off unless during_training_every > 0.
    during_training_every: int = Field(
        0,
        ge=0,
        description="Score generated answers (and a benchmark sample) every N steps; 0: off.",
    )
    during_training_examples: int = Field(
        8, ge=1, description="Fixed validation questions answered at each during-training check."
    )
    during_training_metrics: list[Literal["rouge", "f1", "similarity"]] = Field(
        default_factory=lambda: ["rouge", "f1"],
        description="Answer scores logged during training as quality_<name>.",
    )
    during_training_max_new_tokens: int = Field(
        64, ge=1, description="Longest answer generated during training checks."
    )
    during_training_benchmark: str | None = Field(
        None, description="Multiple-choice task scored during training (pubmedqa, mmlu_medical, …)."
    )
    during_training_benchmark_data: str | None = Field(
        None, description="KIND:PATH of that task's file (null: under $MEDLORA_DATA_DIR)."
    )
    during_training_benchmark_limit: int = Field(
        32, ge=1, description="Fixed benchmark questions scored at each check."
    )
    best_metric: str | None = Field(
        None,
        description="Logged metric that picks the saved adapter (eval_loss, quality_rougeL, "
        "bench_pubmedqa_acc, …); null: the last step.",
    )
    best_metric_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="auto: lower is better for *loss*/*perplexity*, higher otherwise."
    )


class GenerationConfig(_Section):
    """How every command generates: demo, eval, compare, chat, serve and the exported model."""

    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer.")
    do_sample: bool = Field(False, description="Sample (true) or greedy decoding (false).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="Divide the logits of tokens already present (1.0: off)."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Never repeat a word-piece n-gram of this size (0: off)."
    )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (every field is one; sampling knobs only when
        sampling)."""
        return self.model_dump(exclude=None if self.do_sample else {"temperature", "top_p"})


class OutputConfig(_Section):
    dir: str = Field("runs/demo", description="Run directory (adapter, metrics, charts).")
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="Metric sinks; jsonl is always written."
    )
