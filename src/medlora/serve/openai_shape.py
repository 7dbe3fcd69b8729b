"""Engine results in OpenAI's response shapes: chat and legacy completions, whole or as stream
chunks, with usage and log-probabilities.

A token's text is the tokenizer's decoding of that one token (as vLLM reports it), so a token that
is part of a multi-byte character shows as the replacement character (and `bytes`, the UTF-8 of that
text, as its bytes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medlora.serve.engine import Job, TokenLogprob


@dataclass(frozen=True)
class Reply:
    """What every piece of one response names: its id and model, and the log-probabilities asked."""

    id: str
    model: str
    tokenizer: Any
    top: int | None  # alternatives per token; None: no log-probabilities asked


def _response(reply: Reply, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": reply.id,
        "object": kind,
        "created": int(time.time()),
        "model": reply.model,
        "choices": [choice],
    }


def usage(job: Job) -> dict[str, int]:
    p, c = len(job.prompt_ids), len(job.completion_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def _token(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_token(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = _token(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    tokenizer: Any, entries: Sequence[TokenLogprob], top: int | None
) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion: one entry per generated token."""
    content = [
        {
            **_chat_token(tokenizer, entry.token_id, entry.logprob),
            "top_logprobs": [_chat_token(tokenizer, t, lp) for t, lp in entry.top[: top or 0]],
        }
        for entry in entries
    ]
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


def chat_completion(reply: Reply, content: str, job: Job) -> dict[str, Any]:
    """A whole chat answer (`stream: false`)."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": finish_reason(job),
    }
    if reply.top is not None:
        choice["logprobs"] = chat_logprobs(reply.tokenizer, job.logprobs, reply.top)
    return {**_response(reply, "chat.completion", choice), "usage": usage(job)}


def chat_chunk(
    reply: Reply, text: str | None, entries: list[TokenLogprob], finish: str | None, offset: int
) -> dict[str, Any]:
    """One streamed chat piece: the first ("") names the role, the last (None) the finish reason."""
    delta: dict[str, Any] = {} if text is None else {"content": text}
    if text == "" and not entries:
        delta["role"] = "assistant"
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    if reply.top is not None and entries:
        choice["logprobs"] = chat_logprobs(reply.tokenizer, entries, reply.top)
    return _response(reply, "chat.completion.chunk", choice)


def completion_chunk(
    reply: Reply, text: str | None, entries: list[TokenLogprob], finish: str | None, offset: int
) -> dict[str, Any]:
    """One streamed legacy-completion piece; `offset`: the characters sent before it."""
    logprobs = None
    if reply.top is not None:
        logprobs = completion_logprobs(reply.tokenizer, entries, reply.top, offset)
    choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return _response(reply, "text_completion", choice)


def text_completion(reply: Reply, text: str, job: Job, offset: int) -> dict[str, Any]:
    """A whole legacy completion; `offset`: where the model's text starts (after the notice)."""
    whole = completion_chunk(reply, text, job.logprobs, finish_reason(job), offset)
    return {**whole, "usage": usage(job)}
