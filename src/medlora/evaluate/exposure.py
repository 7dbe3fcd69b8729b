"""Exposure of a canary's secret (Carlini et al. 2019, "The Secret Sharer"), computed exactly.

exposure = log2 |R| − log2 rank, where R is every secret of the canary's length (10^4 numbers
for 4 digits) and rank is the true secret's place when R is sorted by the model's likelihood of
the canary answer holding it, given the canary's question (the run's chat template). A model that
never saw the secret ranks it anywhere (about 1.4 bits on average); one that memorized it ranks it
first: log2 |R| bits, 13.3 for 4 digits. Under no memorization the rank is uniform, so an exposure
of e bits happens by chance with probability 2^-e (`chance_share`).

Every candidate answer differs from the others only in the secret's tokens: the prompt and the
answer text before the secret are scored once, and the secrets' tokens as a trie that shares each
prefix, one token per node with the key/value cache of its parent. With one token per digit
(SmolLM2, Llama 3) 4 digits are 1,110 one-token positions in all, instead of 10^4 answers. What
follows the secret in the answer (". " and the end of turn) is the same text for every candidate
and is not scored.

Library internals (patch `exposure_shared_cache`, medlora/patches.py; transformers 5.24-5.25
tested): the trie copies a parent's rows out of a `DynamicCache` (iterating its layers as
(keys, values, ...) and rebuilding one with `ddp_cache_data`). Outside the tested versions every
candidate is scored whole (prompt + candidate, `CACHE_ROWS` at a time): the same figures, slower.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medlora import patches
from medlora.data.canaries import Canary, secret_candidates
from medlora.data.format import split_prompt_answer

# Rows of one batched forward pass: each holds the prompt's cache, so this bounds memory
# (SmolLM2-135M: ~46 kB per cached token, ~0.5 GB for 128 rows of a 90-token prompt).
CACHE_ROWS = 128


def _shared_ends(sequences: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Lengths of the token prefix and suffix every sequence shares (not overlapping)."""
    prefix = len(os.path.commonprefix([list(row) for row in sequences]))
    suffix = len(os.path.commonprefix([list(row)[::-1] for row in sequences]))
    return prefix, min(suffix, min(map(len, sequences)) - prefix)


def continuation_log_likelihoods(
    model: Any, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[float]:
    """log P(continuation | prompt) for each continuation, summed over its tokens (nats).

    The prompt is run once; the continuations' tokens as a trie, level by level, each node one
    token on its parent's cached keys and values (at most CACHE_ROWS rows per forward pass).
    """
    longest = len(prompt_ids) + max((len(c) for c in continuations), default=0)
    if _window_binds(model, longest) or not patches.allowed("exposure_shared_cache"):
        return scored_whole(model, prompt_ids, continuations)
    import torch
    from transformers import DynamicCache

    # The trie: each node is a token prefix of the continuations, () the prompt.
    children: dict[tuple[int, ...], dict[int, None]] = {(): {}}  # node → next tokens, in order
    for tokens in continuations:
        children.setdefault(tuple(tokens), {})
        for depth, token in enumerate(tokens):
            children.setdefault(tuple(tokens[:depth]), {})[token] = None
    logprob: dict[tuple[int, ...], float] = {}  # node → log P(its last token | the ones before)
    device = next(model.parameters()).device
    model.eval()

    def score(nodes: list[tuple[int, ...]], logits: Any) -> None:
        """Children of each node get their token's log-probability from the node's logits."""
        logps = torch.log_softmax(logits.float(), dim=-1)
        pairs = [(row, token) for row, node in enumerate(nodes) for token in children[node]]
        values = logps[[row for row, _ in pairs], [token for _, token in pairs]].tolist()
        for (row, token), value in zip(pairs, values, strict=True):
            logprob[(*nodes[row], token)] = value

    def expand(cache: Any, nodes: list[tuple[int, ...]]) -> None:
        """`cache` holds one row per node of `nodes` (same depth); score their subtrees."""
        inner = [(*n, t) for n in nodes for t in children[n] if children[(*n, t)]]
        row_of = {node: row for row, node in enumerate(nodes)}
        for start in range(0, len(inner), CACHE_ROWS):
            chunk = inner[start : start + CACHE_ROWS]
            rows = torch.tensor([row_of[c[:-1]] for c in chunk], device=device)
            # Each child starts from its parent's row: only the rows taken are copied.
            sub = DynamicCache(
                ddp_cache_data=[(keys[rows], values[rows]) for keys, values, *_ in cache],
                config=model.config,
            )
            tokens = torch.tensor([[c[-1]] for c in chunk], device=device)
            out = model(input_ids=tokens, cache=sub, use_cache=True)
            score(chunk, out.logits[:, -1])
            expand(sub, chunk)

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([list(prompt_ids)], device=device)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        score([()], out.logits[:, -1])
        expand(cache, [()])
    # Summed from the last token back, so the figures stay bit-identical to earlier audits.
    return [sum(logprob[tuple(c[:end])] for end in range(len(c), 0, -1)) for c in continuations]


def _window_binds(model: Any, length: int) -> bool:
    """Whether a sliding-window attention layer would drop keys of a `length`-token sequence:
    the trie's copied caches then differ from a whole forward pass (measured on tiny Mistral and
    Gemma2, tests/test_evaluate_memorization.py), so such models are scored whole."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    window = getattr(config or model.config, "sliding_window", None)
    return window is not None and window < length


def scored_whole(
    model: Any, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[float]:
    """`continuation_log_likelihoods` without a shared cache: each continuation after the whole
    prompt, `CACHE_ROWS` right-padded rows per forward pass (public API only, slower)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    device = next(model.parameters()).device
    model.eval()
    totals: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(continuations), CACHE_ROWS):
            chunk = [list(prompt_ids) + list(c) for c in continuations[start : start + CACHE_ROWS]]
            rows = [torch.tensor(tokens) for tokens in chunk]
            ids = pad_sequence(rows, batch_first=True).to(device)
            mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True).to(device)
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for row, tokens in enumerate(chunk):
                positions = range(len(prompt_ids) - 1, len(tokens) - 1)
                totals.append(sum(float(logps[row, p, tokens[p + 1]]) for p in positions))
    return totals


@dataclass
class Candidates:
    """Candidate answers as token ids: the prompt with the answer tokens every candidate shares,
    and each candidate's own tokens (where they differ), tokenized exactly as training does."""

    prompt_ids: list[int]
    continuations: list[list[int]]


def answer_candidates(
    tokenizer: Any, question: str, answers: Sequence[str], system_prompt: str | None
) -> Candidates:
    """`answers` to `question` as training tokenizes them (prompt and answer-with-end-of-turn
    apart), split into what they share and what each adds."""
    prompt, first = split_prompt_answer(tokenizer, question, answers[0], system_prompt)
    if answers[0] in first:  # one template render: the others are the first with their words
        head, tail = first.split(answers[0], 1)
        texts = [head + answer + tail for answer in answers]
    else:  # a template that rewrites the answer's text: render each
        texts = [split_prompt_answer(tokenizer, question, a, system_prompt)[1] for a in answers]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix, suffix = _shared_ends(ids)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + ids[0][:prefix]
    return Candidates(prompt_ids, [row[prefix : len(row) - suffix] for row in ids])


def canary_candidates(tokenizer: Any, canary: Canary, system_prompt: str | None) -> Candidates:
    """The canary's answer with every secret of its length, in `secret_candidates` order."""
    answers = [canary.answer(secret) for secret in secret_candidates(len(canary.secret))]
    return answer_candidates(tokenizer, canary.question, answers, system_prompt)


def secret_rank(log_likelihoods: Sequence[float], index: int) -> int:
    """1 + how many candidates the model finds strictly likelier than candidate `index`."""
    mine = log_likelihoods[index]
    return 1 + sum(1 for value in log_likelihoods if value > mine)


def exposure(rank: int, candidates: int) -> float:
    """log2 |R| − log2 rank (bits): 0 for the least likely candidate, log2 |R| for the first."""
    return math.log2(candidates) - math.log2(rank)


def chance_share(rank: int, candidates: int) -> float:
    """rank / |R| = 2^-exposure: how often a secret the model never saw ranks this high."""
    return rank / candidates


def canary_rank(model: Any, canary: Canary, candidates: Candidates) -> int:
    """The rank of `canary`'s secret among every secret of its length (`canary_candidates`), by
    the model's likelihood of the canary's answer holding it."""
    # The candidates' own tokens rank the whole answers: what follows them is the same for all.
    scores = continuation_log_likelihoods(model, candidates.prompt_ids, candidates.continuations)
    return secret_rank(scores, int(canary.secret))
