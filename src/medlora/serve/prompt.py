"""Chat messages → prompt token ids with the run's own chat template and system prompt.

A single question goes through `medlora.data.format.prompt_ids`, the exact function training and
evaluation use; a longer conversation goes through the same tokenizer's `apply_chat_template`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medlora.data.format import prompt_ids


def conversation_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], system_prompt: str | None
) -> list[int]:
    """Token ids for `messages` plus the assistant header; the run's system prompt when none given."""
    has_system = any(m["role"] == "system" for m in messages)
    turns = [m for m in messages if m["role"] != "system"]
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if not has_system:
        system = system_prompt
    if len(turns) == 1 and turns[0]["role"] == "user":
        return prompt_ids(tokenizer, turns[0]["content"], system)
    full = ([{"role": "system", "content": system}] if system else []) + list(turns)
    text = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def last_user_text(messages: Sequence[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
