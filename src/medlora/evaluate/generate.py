"""Batched answers with the run's chat template and the recipe's `generation:` settings.

Every command that generates (demo, eval, compare, chat's `generate`, the during-training check)
goes through `generate_answers`, so the answers a user reads are made the same way everywhere;
the server and the exported `generation_config.json` take the same `GenerationConfig`.

The generation helpers live here too, one copy each for every caller (eval, compare, bench, chat,
serve, export): `stop_token_ids` (end of sequence and end of turn), `left_padded` (prompts aligned
at the right so generation starts at the same column), `adapter_disabled` (the base model) and
`adapter_merged` (the fine-tuned model at the base model's speed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from medlora.config import GenerationConfig, Recipe, load_recipe
from medlora.data.format import prompt_ids
from medlora.progress import progress_bar


def run_recipe(run_dir: str | Path | None) -> Recipe:
    """The recipe a run was trained with (its prompt and lengths), or the defaults without a run."""
    if run_dir is not None and (Path(run_dir) / "recipe.yaml").is_file():
        return load_recipe(Path(run_dir) / "recipe.yaml")
    return Recipe()


def run_generation_settings(run_dir: str | Path | None) -> GenerationConfig:
    """The `generation:` section of a run's recipe.yaml (the defaults without a run)."""
    return run_recipe(run_dir).generation


def recipe_generation(recipe: Recipe, max_new_tokens: int | None = None) -> GenerationConfig:
    """The recipe's settings, with the answer length overridden when a command is given one."""
    if max_new_tokens is None:
        return recipe.generation
    return recipe.generation.model_copy(update={"max_new_tokens": max_new_tokens})


def generate_arguments(settings: GenerationConfig) -> str:
    """The settings as `generate` keyword arguments, for the usage snippets of model cards."""
    return ", ".join(f"{key}={value!r}" for key, value in settings.generate_kwargs().items())


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End of sequence plus the chat template's end of turn (SmolLM2/ChatML `<|im_end|>`)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(ids)


def adapter_disabled(model: Any) -> AbstractContextManager[Any]:
    """Context manager: the base model (PEFT adapter switched off); a no-op without an adapter."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else nullcontext()


def _mergeable(model: Any) -> bool:
    """Whether folding the LoRA weights in and out again leaves the base weights as they were to
    float32 rounding: a PEFT model whose adapted layers are all plain float32 `nn.Linear`
    (not bf16/fp16, where unmerging would move the base weights by a bf16 step; not 4-/8-bit)."""
    import torch

    if not hasattr(model, "merge_adapter") or getattr(model, "disable_adapter", None) is None:
        return False
    if any(p.requires_grad for p in model.parameters()):
        return False  # an adapter being trained: its weights change under the merged copy
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    return bool(adapted) and all(
        type(m.base_layer) is torch.nn.Linear and m.base_layer.weight.dtype == torch.float32
        for m in adapted
    )


@contextmanager
def adapter_merged(model: Any) -> Iterator[Any]:
    """The fine-tuned model with its LoRA weights folded into the base weights, unfolded on exit.

    Each adapted layer then costs one matmul instead of three, token for token the same answers
    (`python bench/demo_eval.py` measures the demo's whole evaluation, docs/benchmarks.md
    "demo-eval"). Unfolding leaves the base weights within float32 rounding of where they were
    (tests/test_evaluate_loss.py checks it), so callers run the base model first.
    A no-op for a model without an adapter or with weights that do not merge exactly (bf16, 4-bit).
    """
    if not _mergeable(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of the prompts left-padded to the longest, as CPU tensors."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    system_prompt: str | None,
    settings: GenerationConfig | int | None = None,
    batch_size: int = 8,
    description: str = "generating",
    show_progress: bool = True,
    max_new_tokens: int | None = None,
) -> list[str]:
    """One answer per question. Prompts are left-padded so generation starts aligned.

    `settings`: the run's `generation:` section; a bare int is a length with greedy defaults.
    """
    import torch

    if settings is None or isinstance(settings, int):
        settings = GenerationConfig(**({"max_new_tokens": settings} if settings else {}))
    if max_new_tokens is not None:
        settings = settings.model_copy(update={"max_new_tokens": max_new_tokens})
    answers: list[str] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    model.eval()
    with progress_bar(show_progress and len(questions) > 0) as progress:
        task = progress.add_task(description, total=len(questions))
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            prompts = [prompt_ids(tokenizer, q, system_prompt) for q in batch]
            input_ids, attention = left_padded(prompts, pad_id)
            width = input_ids.shape[1]
            device = next(model.parameters()).device
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    pad_token_id=pad_id,
                    eos_token_id=stops or None,
                    **settings.generate_kwargs(),
                )
            for row in output[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            progress.advance(task, len(batch))
    return answers
