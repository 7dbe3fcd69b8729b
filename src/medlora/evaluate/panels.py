"""The two panels every result shows: base vs tuned on held-out topics of the trained sources (the
test split) and on sources the run never trained on (`eval.unseen_sources`).

A fine-tune usually helps on new questions about what it trained on and transfers poorly to new
sources (arXiv 2411.04118): showing one panel alone hides one side. Both panels are scored the same
way, with the same generation settings: the answer loss of the references, and the generated
answers' metrics (`evaluate.quality`) with paired 95% bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from medlora.config import Recipe
from medlora.data.format import format_records
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.evaluate.heldout import score_model
from medlora.evaluate.quality import evaluate_answers
from medlora.results import PanelScores


def loss_base_vs_tuned(
    model: Any, tokenizer: Any, records: list[Record], recipe: Recipe
) -> dict[str, Any]:
    """Answer-token loss of the references, with the adapter and without it (same examples)."""
    examples, _ = format_records(
        tokenizer, records, recipe.data.system_prompt, recipe.data.max_seq_len
    )
    scores = score_model(
        model, tokenizer, examples, recipe.eval.batch_size, True, recipe.eval.precision
    )
    keys = ("loss", "base_loss", "perplexity", "base_perplexity", "answer_tokens")
    out = {key: scores[key] for key in keys}
    out["examples"] = len(examples)
    out["loss_change_pct"] = (scores["loss"] - scores["base_loss"]) / scores["base_loss"] * 100
    out["examples_better"] = sum(
        t < b
        for t, b in zip(scores["per_example_loss"], scores["base_per_example_loss"], strict=True)
    )
    return out


def score_panel(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    recipe: Recipe,
    panel: Literal["test", "unseen"],
    data: list[str],
    predictions_path: Path | None,
    base_predictions: list[str] | None = None,
) -> PanelScores:
    """Answer loss (adapter on and off) and, with a predictions path, both models' answers scored.

    `base_predictions`: the base's answers to these records under these settings, when already
    generated (they do not depend on the adapter).
    """
    scores = PanelScores(
        panel=panel, data=data, **loss_base_vs_tuned(model, tokenizer, records, recipe)
    )
    if predictions_path is None:
        return scores
    scores.quality = evaluate_answers(
        model,
        tokenizer,
        records,
        recipe.data.system_prompt,
        recipe.eval.metrics,
        recipe.generation,
        recipe.eval.batch_size,
        compare_base=True,
        predictions_path=predictions_path,
        seed=recipe.data.seed,
        base_predictions=base_predictions,
    )
    return scores


def test_panel_records(test_split: list[Record], recipe: Recipe) -> list[Record]:
    """The held-out-topics panel's questions: the test split sampled like the unseen sources."""
    count = recipe.eval.test_examples or recipe.eval.max_examples
    return sample_records(test_split, count, recipe.data.seed)
