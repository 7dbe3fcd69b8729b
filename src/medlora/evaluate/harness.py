"""The lm-evaluation-harness adapter: our multiple-choice items become harness tasks.

Scoring is lm-evaluation-harness itself (`lm_eval.evaluator.evaluate` with its `HFLM` wrapper around
the in-memory model): each option is scored by the log-likelihood of " <option>" after the prompt;
`acc` picks the highest log-likelihood, `acc_norm` the highest log-likelihood per character of the
option. The prompts are the harness's own task templates. The harness's dataset download is replaced
by our loaders (`custom_dataset`, evaluate/multiple_choice_sets.py), so nothing is fetched; each subject
becomes one harness task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from medlora.errors import DataError
from medlora.evaluate.multiple_choice_sets import LETTERS, Benchmark, MCItem

# The harness's doc_to_text per task family; {letters} is "A. <option>\n" per option.
PROMPTS = {
    "pubmedqa": "Abstract: {context}\nQuestion: {question}\nAnswer:",
    "mmlu": "{stripped}\n{letters}Answer:",
    "mmlu_continuation": "Question: {stripped}\nAnswer:",
    "medmcqa": "Question: {question}\nChoices:\n{letters}Answer:",
    "medqa": "Question: {question}\n{letters}Answer:",
}


def _doc(kind: str, item: MCItem) -> dict[str, Any]:
    """One harness doc: the prompt, and what is scored after it (the option text or its letter)."""
    letters = "".join(f"{LETTERS[i]}. {option}\n" for i, option in enumerate(item.options))
    question = item.question
    text = PROMPTS[kind].format(
        question=question, stripped=question.strip(), context=item.context, letters=letters
    )
    cloze = kind in ("pubmedqa", "mmlu_continuation")
    return {
        "id": item.id,
        "subject": item.subject,
        "text": text,
        "choices": list(item.options) if cloze else list(LETTERS[: len(item.options)]),
        "answer": item.answer_index,
    }


def harness_task(
    name: str,
    kind: str,
    items: Sequence[MCItem],
    shots_pool: Sequence[MCItem],
    shots: int,
    description: str = "",
) -> Any:
    """One lm-eval `ConfigurableTask` over in-memory docs (no download, no dataset cache)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    docs = [_doc(kind, item) for item in items]
    pool = [_doc(kind, item) for item in shots_pool]

    def dataset(**_: Any) -> dict[str, Any]:
        splits = {"test": datasets.Dataset.from_list(docs)}
        if pool:
            splits["dev"] = datasets.Dataset.from_list(pool)
        return splits

    config: dict[str, Any] = {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "text",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "description": description,
        "num_fewshot": shots,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    if shots:
        config["fewshot_split"] = "dev"
        config["fewshot_config"] = {"sampler": "first_n"}  # the harness's MMLU setting
    with _quiet_harness():
        return ConfigurableTask(config=config)


@contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs a warning per custom task and per wrapped model: keep them off the terminal."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "lm_eval.api.task", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def task_units(bench: Benchmark, items: list[MCItem], shots: int) -> dict[str, Any]:
    """One harness task per subject (MMLU's own split); the other benchmarks are one task each."""
    if bench.kind != "mmlu":
        if bench.shots_pool is bench.items:
            # Exemplars from the evaluated file itself (PubMedQA): the first k items, never scored.
            exemplars = bench.items[:shots]
            items = [item for item in items if item not in exemplars]
        else:
            exemplars = bench.shots_pool
        if shots > len(exemplars):
            raise DataError(
                f"{bench.report.source}: {len(exemplars)} exemplars, fewer than --shots {shots}"
            )
        return {bench.task: harness_task(bench.task, bench.kind, items, exemplars, shots)}
    units = {}
    for subject in sorted({item.subject for item in items}):
        mine = [item for item in items if item.subject == subject]
        pool = [item for item in bench.shots_pool if item.subject == subject]
        if shots > len(pool):
            raise DataError(
                f"{bench.report.source}: {subject} has {len(pool)} dev exemplars, fewer than --shots {shots}"
            )
        about = subject.replace("_", " ")
        cloze = bench.task.endswith("_continuation")
        units[f"{bench.task}:{subject}"] = harness_task(
            f"{bench.task}:{subject}",
            "mmlu_continuation" if cloze else bench.kind,
            mine,
            pool,
            shots,
            f"The following are {'' if cloze else 'multiple choice '}questions (with answers) "
            f"about {about}.\n\n",
        )
    return units


def score_items(
    model: Any,
    tokenizer: Any,
    units: dict[str, Any],
    batch_size: int = 8,
    chat: bool = False,
    system_prompt: str | None = None,
    keep_prompts: bool = False,
) -> list[dict[str, Any]]:
    """Run the harness on prepared tasks; one row per item with its option log-likelihoods."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    model.eval()
    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        result = evaluate(
            lm=lm,
            task_dict=units,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
            apply_chat_template=chat,
            system_instruction=system_prompt if chat else None,
        )
    if was_training:
        model.train()
    assert result is not None
    rows = []
    for name, samples in result["samples"].items():
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            rows.append(
                {
                    "task": name.split(":")[0],
                    "id": sample["doc"]["id"],
                    "subject": sample["doc"]["subject"],
                    "n_options": len(sample["doc"]["choices"]),
                    "answer": sample["doc"]["answer"],
                    "loglikelihoods": [float(r[0]) for r in sample["filtered_resps"]],
                    "acc": float(sample["acc"]),
                    "acc_norm": float(sample["acc_norm"]),
                }
                | ({"prompt": sample["arguments"][0][0]} if keep_prompts else {})
            )
    return rows
