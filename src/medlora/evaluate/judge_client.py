"""The judge's side of `medlora eval --judge` (evaluate/judge.py): the OpenAI-compatible endpoint,
one-letter chat requests with log-probabilities, and the on-disk cache of its replies.

Uses the `openai` client (already a dependency: its timeout, retries and typed responses) rather
than inspect-ai; evaluate/judge.py says why. Every failure of the endpoint (a bad URL, a closed port,
an unknown model, a refused key, a timeout) becomes one `medlora.errors` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from medlora.errors import ConfigError, MedloraError, ModelError
from medlora.evaluate.judge_prompts import MAX_FACT_ITEMS, read_rubric
from medlora.evaluate.quality import METRICS
from medlora.io import append_jsonl
from medlora.progress import progress_bar

if TYPE_CHECKING:
    import openai

CACHE_NAME = "judge_cache.jsonl"
# Every request's settings; part of the cache key, so changing one asks again.
REQUEST: dict[str, Any] = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}
TIMEOUT_S = 60.0
MAX_RETRIES = 2

Chat = list[dict[str, str]]  # the messages of one request
Reply = tuple[list[tuple[str, float]], str]  # the first token's top log-probabilities, the text
Ask = Callable[[Chat], Reply]


class JudgeOptions(BaseModel):
    """Which judge, how to reach it, and what to ask (the `--judge*` options)."""

    url: str  # the API: http://HOST:PORT (then /v1 is added) or the full base URL
    model: str
    key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never an option
    rubric: Path | None = None  # JSONL: {"question": ..., "items": [{"text": ..., "points": 5}]}
    max_statements: int = MAX_FACT_ITEMS  # reference statements per question (0: no fact check)
    cache: Path | None = None  # default: judge_cache.jsonl beside the predictions
    workers: int = 4  # requests in flight at once


class CachedReply(BaseModel):
    """One line of the cache file: the request's `cache_key` and its reply."""

    key: str
    top: list[tuple[str, float]]
    text: str


# ---------------------------------------------------------------- the endpoint


def api_base(url: str) -> str:
    """The client's base URL: `http://host:port` gets `/v1` (vLLM, `medlora serve`); a URL with a
    path (a hosted API's) is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--judge {url}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") or "/v1", "", ""))


def _one_line(text: object, limit: int = 300) -> str:
    return textwrap.shorten(str(text), limit, placeholder=" …")


def judge_error(err: Exception, options: JudgeOptions) -> MedloraError:
    """An `openai` exception as one line naming the URL, model or key variable at fault."""
    import openai

    url = api_base(options.url)
    if isinstance(err, openai.APITimeoutError):
        return ConfigError(
            f"--judge {url}: no answer within {TIMEOUT_S:g} s ({MAX_RETRIES} retries); "
            "is the server overloaded?"
        )
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err
        return ConfigError(f"--judge {url}: cannot connect ({_one_line(cause, 120)}); is it up?")
    if not isinstance(err, openai.APIStatusError):
        return ConfigError(f"--judge {url}: {_one_line(err)}")
    body = err.body if isinstance(err.body, dict) else {}  # the server's "error" object
    said = _one_line(body.get("message") or err.message)
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        state = "is not set" if not os.environ.get(options.key_env) else "was refused"
        return ConfigError(f"--judge {url}: the key in ${options.key_env} {state} ({said})")
    if isinstance(err, openai.NotFoundError):
        return ModelError(f"--judge-model {options.model} at {url}: not found ({said})")
    return ConfigError(f"--judge {url} answered {err.status_code}: {said}")


def _client(options: JudgeOptions) -> openai.OpenAI:
    import openai

    return openai.OpenAI(
        base_url=api_base(options.url),
        api_key=os.environ.get(options.key_env) or "EMPTY",  # local servers take any key
        timeout=TIMEOUT_S,
        max_retries=MAX_RETRIES,
    )


def openai_ask(options: JudgeOptions) -> Ask:
    """One chat request → (top log-probabilities of the first token, the text)."""
    import openai

    client = _client(options)

    def ask(chat: Chat) -> Reply:
        try:
            response = client.chat.completions.create(model=options.model, messages=chat, **REQUEST)
        except openai.OpenAIError as err:
            raise judge_error(err, options) from None
        if not response.choices:
            return [], ""
        choice = response.choices[0]
        first = choice.logprobs.content[0] if choice.logprobs and choice.logprobs.content else None
        top = [] if first is None else first.top_logprobs or [first]
        return [(alt.token, alt.logprob) for alt in top], choice.message.content or ""

    return ask


def check_judge(options: JudgeOptions, metrics: Sequence[str] | None = None) -> None:
    """Before answers are generated: the eval makes answers to judge, the rubric reads, and the
    server answers GET /models with the judge among its models (one cheap request)."""
    import openai

    if metrics is not None and not any(m in METRICS for m in metrics):
        raise ConfigError("--judge judges generated answers: add --metrics rouge (or f1, …)")
    if options.rubric is not None:
        read_rubric(options.rubric)
    try:
        listed = [model.id for model in _client(options).models.list()]
    except openai.NotFoundError:
        return  # this server lists no models; the first verdict request tells
    except openai.OpenAIError as err:
        raise judge_error(err, options) from None
    if listed and options.model not in listed:
        raise ModelError(
            f"--judge-model {options.model}: not served at {api_base(options.url)}; "
            f"it serves {', '.join(listed[:8])}"
        )


# ---------------------------------------------------------------- cached requests


def cache_key(options: JudgeOptions, chat: Chat) -> str:
    request = {"url": api_base(options.url), "model": options.model, "messages": chat, **REQUEST}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode("utf-8")).hexdigest()


def read_cache(path: Path) -> dict[str, Reply]:
    """The cached replies; a line a killed run left half-written is skipped."""
    cache: dict[str, Reply] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = CachedReply.model_validate_json(line)
        except ValidationError:
            continue
        cache[row.key] = (row.top, row.text)
    return cache


def ask_all(
    chats: Sequence[Chat], options: JudgeOptions, ask: Ask, cache_path: Path
) -> tuple[list[Reply], int]:
    """Every chat's reply (cached ones from `cache_path`) and how many requests were sent (each
    distinct request once).

    The first uncached request goes alone: a dead or misconfigured judge then fails in one line
    before any progress is drawn or requests pile up."""
    keys = [cache_key(options, chat) for chat in chats]
    cache = read_cache(cache_path)
    missing = {key: chat for key, chat in zip(keys, chats, strict=True) if key not in cache}
    if missing:
        cache_path.parent.mkdir(parents=True, exist_ok=True)

        def keep(key: str, reply: Reply) -> None:
            cache[key] = reply
            append_jsonl(cache_path, {"key": key, "top": reply[0], "text": reply[1]})

        first, *rest = missing
        keep(first, ask(missing[first]))
        with progress_bar(True) as bar:
            task = bar.add_task(f"judging with {options.model}", total=len(missing))
            bar.advance(task)
            pool = ThreadPoolExecutor(max(options.workers, 1))
            try:
                futures = {pool.submit(ask, missing[key]): key for key in rest}
                for future in as_completed(futures):
                    keep(futures[future], future.result())
                    bar.advance(task)
            finally:  # on an error, do not wait for the queued requests
                pool.shutdown(wait=True, cancel_futures=True)
    return [cache[key] for key in keys], len(missing)
