"""The next token from one row's logits by `generate`'s rules: the one place every serving engine
picks tokens (the continuous transformers engine and both llama.cpp engines; the static engine
calls `generate` itself, as evaluation does).

The rules are transformers' own logits processors, built as `generate` builds them and in its
order: repetition penalty over the prompt and the whole answer (`RepetitionPenaltyLogitsProcessor`),
`no_repeat_ngram_size`, then greedy, or temperature before top-p and a draw from the request's
seeded generator. llama.cpp's own sampler chain is not used: it penalizes only the last 64
generated tokens, has no `no_repeat_ngram_size` and applies the temperature after top-p, so the
same settings would give other answers than the run's evaluation measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medlora.serve.engine import MAX_TOP_LOGPROBS, Sampling, TokenLogprob


def logits_processors(sampling: Sampling) -> Any:
    """The logits processors `generate` would build for these settings, in its order."""
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def token_logprob(logits: Any, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under one row's raw `logits` (before repetition control, as vLLM
    reports it) and the `top` likeliest tokens with theirs."""
    log_probs = torch.log_softmax(torch.as_tensor(logits).float(), dim=-1)
    values, indices = torch.topk(log_probs, max(1, min(top, MAX_TOP_LOGPROBS)))
    alternatives = tuple((int(i), float(v)) for i, v in zip(indices, values, strict=True))
    return TokenLogprob(token, float(log_probs[token]), alternatives[:top])


@dataclass
class TokenRules:
    """One request's rules: its processors and, when it samples, its own seeded generator (a
    request's draws do not depend on who else is in the batch)."""

    sampling: Sampling
    processors: Any = field(init=False)
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.processors = logits_processors(self.sampling)

    def _draw(self, scores: torch.Tensor) -> int:
        if self.generator is None:  # made on the logits' device at the first draw
            seed = self.sampling.seed
            self.generator = torch.Generator(device=scores.device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def next_token(self, logits: Any, ids: list[int]) -> tuple[int, TokenLogprob | None]:
        """The next token after `ids` (prompt + answer so far) from one row's raw `logits` (a
        torch or numpy vector) and, when the request asked for `logprobs`, its log-probability."""
        raw = logits if torch.is_tensor(logits) else torch.from_numpy(np.asarray(logits))
        scores = raw.detach().float().clone()[None]  # a copy: llama.cpp reuses its logits buffer
        if self.processors:
            scores = self.processors(torch.tensor([ids], device=scores.device), scores)
        token = int(torch.argmax(scores[0])) if self.sampling.greedy else self._draw(scores[0])
        top = self.sampling.top_logprobs
        return token, None if top is None else token_logprob(raw, token, top)
