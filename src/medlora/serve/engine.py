"""Generation jobs and the always-available engine: `transformers` with a KV cache, batched.

A `Job` is one answer to produce: prompt token ids in, text pieces out through `sink` (called from
the engine's thread). `StaticEngine` runs a list of jobs that share a model and sampling settings as
one `generate` call (a short request waits for the batch's longest); the continuous engine
(serve/continuous.py) lets jobs join and leave between decode steps. Rows of a batch are kept apart
(per-row stop, per-row length limit), so concurrent requests never mix.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from medlora.evaluate.generate import left_padded, stop_token_ids
from medlora.serve.adapters import BASE_ADAPTER, ModelSet

_ids = itertools.count(1)


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy, the default for a medical answer server."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # From the run's `generation:` section (the same settings eval and the demo used).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # Log-probabilities of the chosen tokens (and this many alternatives); None: not asked for.
    top_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs batch together only when they decode the same way (the length may differ)."""
        return (
            self.greedy,
            self.temperature,
            self.top_p,
            self.seed,
            self.repetition_penalty,
            self.no_repeat_ngram_size,
            self.top_logprobs,
        )


MAX_TOP_LOGPROBS = 20  # alternatives per token at most: OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model (before repetition control,
    as vLLM reports it) and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    kind: str  # "token" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens behind this piece


@dataclass
class Job:
    model: str  # the served name the request asked for
    prompt_ids: list[int]
    sampling: Sampling
    sink: Callable[[Event], None]
    adapter: str = BASE_ADAPTER  # the PEFT adapter that name stands for
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when sampling.top_logprobs is set
    text: str = ""  # the whole answer, decoded once at the end (stripped, like generate_answers)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)

    def batch_key(self) -> tuple[Any, ...]:
        # No model in it: a batch may mix adapters (each row names its own, PEFT's adapter_names).
        return self.sampling.batch_key()

    def cancel(self) -> None:
        self.cancelled.set()

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.sink(Event("done", finish_reason=reason))

    def fail(self, message: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.sink(Event("error", text=message))


class Engine(Protocol):
    name: str  # "transformers" | "llama.cpp"
    batching: str  # "static" | "continuous" | "single"
    max_batch: int
    supports_logprobs: bool

    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Generate every job to its end, calling each job's sink; jobs share `batch_key()`."""


class Detokenizer:
    """Turns a growing list of token ids into text pieces; holds back half a UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character is emitted as decoded)."""
        text = self.final()
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def final(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()


class RowTracker:
    """Per-row bookkeeping shared by the engines: emit pieces, stop at an end token or the limit."""

    def __init__(self, job: Job, tokenizer: Any, stops: set[int]) -> None:
        self.job = job
        self.stops = stops
        self.detok = Detokenizer(tokenizer)
        self.done = False
        self.unsent: list[TokenLogprob] = []  # log-probabilities of tokens not yet in a piece

    def push(self, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """Take one generated token; True when this row is finished."""
        if self.done:
            return True
        if self.job.cancelled.is_set():
            return self._end("cancelled")
        if token_id in self.stops:
            return self._end("stop")
        self.job.completion_ids.append(token_id)
        if logprob is not None:
            self.job.logprobs.append(logprob)
            self.unsent.append(logprob)
        piece = self.detok.add(token_id)
        if piece:
            self.job.sink(Event("token", text=piece, logprobs=self._take_unsent()))
        if len(self.job.completion_ids) >= self.job.sampling.max_new_tokens:
            return self._end("length")
        return False

    def finish(self, reason: str) -> bool:
        return self._end(reason)

    def _end(self, reason: str) -> bool:
        if not self.done:
            self.done = True
            rest = self.detok.flush()
            if rest or self.unsent:
                self.job.sink(Event("token", text=rest, logprobs=self._take_unsent()))
            self.job.text = self.detok.final()
            self.job.finish(reason)
        return True

    def _take_unsent(self) -> list[TokenLogprob]:
        taken, self.unsent = self.unsent, []
        return taken


class StaticEngine:
    """Plain `transformers` generate with a KV cache; one left-padded batch per call, so a short
    request waits for the longest of its batch. Kept as the baseline the continuous engine is
    measured against (`--batching static`)."""

    name = "transformers"
    batching = "static"
    supports_logprobs = False

    def __init__(self, models: ModelSet, tokenizer: Any, max_batch: int = 8) -> None:
        self.model_set = models
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stops = set(stop_token_ids(tokenizer))  # end of sequence and end of turn

    def run_batch(self, jobs: Sequence[Job]) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        model = self.model_set.model
        sampling = jobs[0].sampling
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention = left_padded([job.prompt_ids for job in jobs], pad_id)
        rows = [RowTracker(job, self.tokenizer, self.stops) for job in jobs]

        class PerRow(StoppingCriteria):
            # Called after every step with the new tokens appended: stream them, stop rows one by one.
            def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
                last = ids[:, -1].tolist()
                done = [row.push(token) for row, token in zip(rows, last, strict=True)]
                return torch.tensor(done, dtype=torch.bool, device=ids.device)

        config = GenerationConfig(
            max_new_tokens=max(job.sampling.max_new_tokens for job in jobs),
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=None,
            repetition_penalty=sampling.repetition_penalty,
            no_repeat_ngram_size=sampling.no_repeat_ngram_size,
            pad_token_id=pad_id,
            eos_token_id=sorted(self.stops) or None,
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        device = next(model.parameters()).device
        with torch.inference_mode(), self.model_set.rows([job.adapter for job in jobs]):
            model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([PerRow()]),
            )
        for row in rows:  # a row still open here ran into the batch's overall length limit
            row.finish("length")
