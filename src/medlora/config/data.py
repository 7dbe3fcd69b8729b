"""The `model:` and `data:` sections of a recipe."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, Strict, TypeAdapter, ValidationError, model_validator

from medlora.config.base import DEFAULT_SYSTEM_PROMPT, _Section


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Model spec: Hub id, local save_pretrained dir, .gguf file, or alias.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the base weights are loaded in."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the Hub.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base quantized with bitsandbytes (QLoRA): 4bit = NF4 with "
        "double quantization, computing in model.dtype (bfloat16 unless float16); needs CUDA.",
    )


class CanaryConfig(_Section):
    """`data.canaries`: made-up secret records put into training, for `medlora audit`."""

    repeats: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5, 20],
        min_length=1,
        max_length=50,
        description="One canary per entry, put into the training records that many times (each "
        ">= 1); as many control canaries are made and never trained on.",
    )
    digits: int = Field(
        4,
        ge=1,
        le=5,
        description="Digits of each canary's secret record number; the audit ranks the secret "
        "among all 10^digits numbers (at most digits * log2(10) bits of exposure; each digit "
        "more costs the audit 10x the scoring time).",
    )
    seed: int = Field(0, description="Seed for the canaries' names, dates, secrets and places.")


Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a source's mixing weight
_WEIGHT = TypeAdapter(Annotated[Weight, Strict()])  # in an entry: a number (not true or "2")


class DataConfig(_Section):
    sources: list[str] = Field(
        default_factory=lambda: ["medquad"],
        min_length=1,
        description="Data sources as KIND:PATH (medquad, pubmedqa, jsonl, json, csv, parquet, hf); "
        "an entry may be {source: KIND:PATH, weight: W} to mix sources by weight.",
    )
    weights: dict[str, Weight] = Field(
        default_factory=dict,
        description="Mixing weight per source entry: its share of the training examples "
        "(entries without one weigh 1; empty: no mixing, the split as prepared).",
    )
    mix_by: Literal["entry", "source"] = Field(
        "entry",
        description="What data.weights name: 'entry' = a recipe source entry (medquad); "
        "'source' = a record's own source (medquad/2_GARD_QA), every one weighing 1 unless "
        "weighted, so each MedQuAD collection gets an equal share of the training examples.",
    )
    map: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping for tabular sources, e.g. {question: Q, answer: A}.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns on record source names to leave out, e.g. medquad/9_CDC_QA.",
    )
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT, description="System message put before every question (null: none)."
    )
    max_seq_len: int = Field(
        512, ge=16, description="Longest tokenized example; longer ones are cut."
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of topics for validation.")
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of topics for test.")
    max_train_examples: int | None = Field(
        None, ge=1, description="Use at most this many training examples (seeded sample)."
    )
    max_val_examples: int | None = Field(
        None, ge=1, description="Use at most this many validation examples during training."
    )
    seed: int = Field(0, description="Seed for sampling examples.")
    strict: bool = Field(
        False, description="Fail on a malformed source file instead of skipping it."
    )
    clean: (
        list[
            Literal[
                "question_echo",
                "hpo_table",
                "pointer_answer",
                "source_boilerplate",
                "templated_duplicate",
            ]
        ]
        | None
    ) = Field(
        None,
        description="Answer-hygiene rules (medlora.data.hygiene) for every source; null: all rules "
        "on MedQuAD, none elsewhere; []: none.",
    )
    max_answer_repetition: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Train only on answers whose share of repeated word 4-grams is at most this "
        "(the repetition metric); null: all. Evaluation keeps every reference.",
    )
    end_of_turn_loss: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of answers whose end-of-turn token is trained (true = 1: every answer; "
        "false = 0: none, the stop is left to the instruct base); the rest keep it in the input "
        "without loss, chosen by record id and data.seed. Below 1 the model stops less often than "
        "these answers do; 0 is refused with train.unlikelihood_alpha > 0 (the model learned never "
        "to stop).",
    )
    truncation: Literal["sentence", "sentence_open", "token"] = Field(
        "sentence",
        description="An answer longer than max_seq_len: 'sentence' keeps whole sentences and the "
        "end of turn (the model learns to stop); 'sentence_open' keeps whole sentences without "
        "it (the answer went on); 'token' cuts mid-sentence.",
    )
    canaries: CanaryConfig | None = Field(
        None,
        description="Memorization canaries (Carlini et al. 2019): {repeats: [1, 5, 20], digits: 4, "
        "seed: 0} puts made-up secret records into training for `medlora audit`; null: none.",
    )

    @model_validator(mode="before")
    @classmethod
    def _weighted_entries(cls, data: Any) -> Any:
        """Move `{source, weight}` entries into `weights`, so `sources` stays a list of strings.

        Everything that reads `data.sources` (prepare, eval, the CLI) keeps working unchanged,
        and the resolved recipe.yaml round-trips as `sources` + `weights`.
        """
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
            return data
        entries = data["sources"]
        if not any(isinstance(entry, dict) for entry in entries):
            return data
        given = data.get("weights") or {}
        weights = dict(given) if isinstance(given, dict) else given
        sources: list[Any] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                sources.append(entry)
                continue
            key = f"data.sources[{index}]"
            unknown = [k for k in entry if k not in ("source", "weight")]
            if unknown:
                raise ValueError(
                    f"{key}.{unknown[0]}: unknown key; a weighted entry is "
                    "{source: KIND:PATH, weight: W}"
                )
            spec = entry.get("source")
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"{key}.source is missing: write {{source: KIND:PATH, weight: W}}")
            if "weight" in entry:
                try:
                    weight = _WEIGHT.validate_python(entry["weight"])
                except ValidationError as err:
                    message = err.errors()[0]["msg"]
                    raise ValueError(f"{key}.weight={entry['weight']!r}: {message}") from None
                if isinstance(weights, dict):
                    if spec in weights and weights[spec] != weight:
                        raise ValueError(
                            f"{key}.weight: '{spec}' also has a weight in data.weights; "
                            "give it in one place"
                        )
                    weights[spec] = weight
            sources.append(spec)
        return {**data, "sources": sources, "weights": weights}

    @model_validator(mode="after")
    def _weights_name_sources(self) -> DataConfig:
        if self.mix_by == "source":  # record sources (medquad/2_GARD_QA): checked at mixing
            return self
        for spec in self.weights:
            if spec not in self.sources:
                raise ValueError(
                    f"data.weights['{spec}']: not one of data.sources "
                    f"({', '.join(self.sources)}); use the source text exactly as listed, "
                    "or drop it (--set data.weights={})"
                )
        return self
