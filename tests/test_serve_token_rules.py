"""Every serving engine picks tokens with `generate`'s rules (serve/token_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from medlora.serve.engine import Sampling
from medlora.serve.token_rules import TokenRules, token_logprob

VOCAB = 50


def pick(logits: np.ndarray, ids: list[int], **options: float | int) -> int:
    rules = TokenRules(Sampling(max_new_tokens=8, **options))  # type: ignore[arg-type]
    return rules.next_token(logits, ids)[0]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_with_repetition_control_picks_what_transformers_picks(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (12,), generator=generator).tolist()
    ids += ids[3:6]  # a repeated trigram prefix, so no_repeat_ngram_size=4 bans a token
    logits = torch.randn(VOCAB, generator=generator) * 3
    scores = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits[None].clone())
    scores = NoRepeatNGramLogitsProcessor(4)(torch.tensor([ids]), scores)
    expected = int(torch.argmax(scores[0]))
    got = pick(logits.numpy(), ids, repetition_penalty=1.3, no_repeat_ngram_size=4)
    assert got == expected


def test_the_banned_ngram_token_is_never_picked() -> None:
    ids = [1, 2, 3, 4, 9, 1, 2, 3]  # 1 2 3 was followed by 4: with n = 4, 4 is banned now
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[4] = 10.0
    assert pick(logits, ids, no_repeat_ngram_size=4) != 4
    assert pick(logits, ids) == 4


def test_the_callers_logits_are_left_as_they_were() -> None:
    # llama.cpp hands out its own buffer: picking must not write into it.
    logits = np.linspace(-1, 1, VOCAB, dtype=np.float32)
    before = logits.copy()
    pick(logits, [VOCAB - 1, VOCAB - 2], repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert np.array_equal(logits, before)


def test_sampling_repeats_with_a_seed_and_keeps_to_the_top_p_tokens() -> None:
    logits = np.full(VOCAB, -5.0, dtype=np.float32)
    logits[[7, 8]] = [4.0, 3.9]  # together almost all the mass: top_p 0.9 keeps only these two
    picks = [pick(logits, [1], temperature=0.8, top_p=0.9, seed=3) for _ in range(5)]
    assert len(set(picks)) == 1  # same seed, same token
    many = TokenRules(Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=4))
    assert {many.next_token(logits, [1])[0] for _ in range(200)} == {7, 8}


def test_logprobs_are_the_log_softmax_of_the_raw_logits_with_the_likeliest_first() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(VOCAB, generator=generator) * 4
    expected = torch.log_softmax(logits, dim=-1)
    got = token_logprob(logits.numpy(), 11, top=3)
    assert got.token_id == 11 and got.logprob == pytest.approx(float(expected[11]), abs=1e-5)
    values, indices = torch.topk(expected, 3)
    assert [i for i, _ in got.top] == indices.tolist()
    assert [v for _, v in got.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert token_logprob(logits.numpy(), 11, top=0).top == ()  # `logprobs: true` alone
    rules = TokenRules(Sampling(max_new_tokens=8, repetition_penalty=2.0, top_logprobs=2))
    token, reported = rules.next_token(logits.numpy(), [int(torch.argmax(logits))])
    assert reported is not None and reported.token_id == token  # the picked token, after penalty
    assert reported.logprob == pytest.approx(float(expected[token]), abs=1e-5)  # raw logits'
