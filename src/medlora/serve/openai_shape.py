"""Engine results in OpenAI's response shapes: usage, chat and legacy-completion log-probabilities.

A token's text is the tokenizer's decoding of that one token (as vLLM reports it), so a token that
is part of a multi-byte character shows as the replacement character (and `bytes`, the UTF-8 of that
text, as its bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medlora.serve.engine import Job, TokenLogprob


def usage(job: Job) -> dict[str, int]:
    p, c = len(job.prompt_ids), len(job.completion_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def _token(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(
    tokenizer: Any, entries: Sequence[TokenLogprob], top: int | None
) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion: one entry per generated token."""
    content = []
    for entry in entries:
        text = _token(tokenizer, entry.token_id)
        content.append(
            {
                "token": text,
                "logprob": entry.logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (alt := _token(tokenizer, token_id)),
                        "logprob": logprob,
                        "bytes": list(alt.encode("utf-8")),
                    }
                    for token_id, logprob in entry.top[: top or 0]
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokenizer: Any, entries: Sequence[TokenLogprob], top: int, offset: int = 0
) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion: parallel lists, `text_offset` into the text."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _token(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(entry.logprob)
        tops.append({_token(tokenizer, t): lp for t, lp in entry.top[:top]} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
