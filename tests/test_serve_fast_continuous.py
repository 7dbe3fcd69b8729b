"""The llama.cpp continuous engine's token rules equal transformers' logits processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from medlora.serve.engine import Job, Sampling
from medlora.serve.fast_continuous import TILED_ATTENTION_ROWS, Sequence, pick_token, prefill_chunks

VOCAB = 50


def row(ids: list[int], **sampling: float | int) -> Sequence:
    job = Job("m", ids, Sampling(max_new_tokens=8, **sampling), sink=lambda event: None)  # type: ignore[arg-type]
    made = Sequence(job, None, None, 0, list(ids), 0)  # type: ignore[arg-type]
    if not job.sampling.greedy:
        made.rng = np.random.default_rng(job.sampling.seed)
    return made


@pytest.mark.parametrize("seed", range(20))
def test_greedy_with_repetition_control_picks_what_transformers_picks(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (12,), generator=generator).tolist()
    ids += ids[3:6]  # a repeated trigram prefix, so no_repeat_ngram_size=4 bans a token
    logits = torch.randn(VOCAB, generator=generator) * 3
    scores = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits[None].clone())
    scores = NoRepeatNGramLogitsProcessor(4)(torch.tensor([ids]), scores)
    expected = int(torch.argmax(scores[0]))
    got = pick_token(logits.numpy(), row(ids, repetition_penalty=1.3, no_repeat_ngram_size=4))
    assert got == expected


def test_the_banned_ngram_token_is_never_picked() -> None:
    ids = [1, 2, 3, 4, 9, 1, 2, 3]  # 1 2 3 was followed by 4: with n = 4, 4 is banned now
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[4] = 10.0
    assert pick_token(logits, row(ids, no_repeat_ngram_size=4)) != 4
    assert pick_token(logits, row(ids)) == 4


def test_sampling_repeats_with_a_seed_and_keeps_to_the_top_p_tokens() -> None:
    logits = np.full(VOCAB, -5.0, dtype=np.float32)
    logits[[7, 8]] = [4.0, 3.9]  # together almost all the mass: top_p 0.9 keeps only these two
    picks = [pick_token(logits, row([1], temperature=0.8, top_p=0.9, seed=3)) for _ in range(5)]
    assert len(set(picks)) == 1  # same seed, same token
    many = row([1], temperature=0.8, top_p=0.9, seed=4)
    assert {pick_token(logits, many) for _ in range(200)} == {7, 8}


@pytest.mark.parametrize("n", [1, 2, 62, 63, 64, 65, 126, 127, 200, 1000])
def test_prompts_are_prefilled_in_pieces_the_plain_attention_kernel_takes(n: int) -> None:
    """Under 64 tokens (llama.cpp tiles 64+ query rows) and never one token of a longer prompt
    (one query row over 512+ cells takes the split kernel): both sum unlike the plain kernel."""
    pieces = prefill_chunks(n)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))  # contiguous
    assert all(end - start < TILED_ATTENTION_ROWS for start, end in pieces)
    assert n == 1 or all(end - start >= 2 for start, end in pieces)
    assert len(pieces) == -(
        -n // (TILED_ATTENTION_ROWS - 1)
    )  # no more llama_decode calls than needed
