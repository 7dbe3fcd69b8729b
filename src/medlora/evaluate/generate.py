"""Batched greedy answers with the run's chat template (used by the demo, eval and compare)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medlora.data.format import prompt_ids


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    system_prompt: str | None,
    max_new_tokens: int = 128,
    batch_size: int = 4,
) -> list[str]:
    """Greedy answers, one per question. Prompts are left-padded so generation starts aligned."""
    import torch

    answers: list[str] = []
    pad_id = tokenizer.pad_token_id
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    if im_end is not None:
        eos_ids.add(im_end)
    model.eval()
    for start in range(0, len(questions), batch_size):
        prompts = [
            prompt_ids(tokenizer, q, system_prompt) for q in questions[start : start + batch_size]
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
            )
        for row in output[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
