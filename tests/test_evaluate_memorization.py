"""The memorization audit: longest verbatim spans, exact secret ranks (checked against scoring
every candidate on its own), exposure arithmetic, and a tiny run whose canary trained 30 times is
exposed while its never-trained control is not."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from canary_support import CANARY_REPEATS, canary_run
from conftest import build_tiny_llama
from families import WINDOW, build_tiny_family

from medlora.data.canaries import TRAINED_IDS_FILE, read_trained_ids
from medlora.data.format import IGNORE_INDEX, format_record
from medlora.data.records import Record
from medlora.evaluate import exposure as exposure_module
from medlora.evaluate.exposure import (
    answer_candidates,
    chance_share,
    continuation_log_likelihoods,
    exposure,
    secret_rank,
)
from medlora.evaluate.heldout import run_recipe
from medlora.evaluate.memorization import (
    answer_spans,
    longest_shared_span,
    run_audit,
    span_stats,
    trained_records,
)
from medlora.families import FAMILIES
from medlora.report.audit import audit_markdown, audit_reading
from medlora.results import (
    CI,
    AuditResult,
    CanaryExposure,
    ExposureAudit,
    RecitationAudit,
    SpanStats,
    read_result,
)

# ---------------------------------------------------------------- recitation on hand-made input


def test_longest_shared_span_is_the_longest_common_run() -> None:
    assert longest_shared_span([1, 2, 3, 4, 5], [9, 2, 3, 4, 8]) == (3, 1)
    assert longest_shared_span([1, 2, 3], [4, 5, 6]) == (0, 0)
    # autojunk off: a token repeated in a long reference still matches (difflib's heuristic
    # would drop tokens that make up more than 1% of a 200+ token reference).
    reference = [7] * 300
    assert longest_shared_span([7] * 60, reference) == (60, 0)


def test_answer_spans_count_tokenizer_tokens(tiny_tokenizer: object) -> None:
    reference = "Wheezing, coughing, chest tightness and shortness of breath."
    ids = tiny_tokenizer(reference, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    spans = answer_spans(
        tiny_tokenizer,
        [reference, "Diet, exercise and insulin.", f"Asthma: {reference}"],
        [reference, reference, reference],
    )
    assert spans[0] == (len(ids), 0)
    assert spans[1][0] < 4  # a word or two in common, not a sentence
    assert len(ids) - 1 <= spans[2][0] <= len(ids)  # the first word may tokenize differently


def test_span_stats_share_spread_and_buckets() -> None:
    stats = span_stats([0, 5, 12, 49, 50, 120], threshold=50)
    assert stats.answers == 6 and stats.reciting == 2 and stats.max == 120
    assert stats.reciting_share.mean == pytest.approx(2 / 6)
    assert stats.median == pytest.approx(30.5)
    assert stats.histogram == {"0–9": 2, "10–19": 1, "20–49": 1, "50–99": 1, "≥100": 1}


def test_the_reading_says_what_the_figures_mean() -> None:
    def stats(spans: list[int]) -> SpanStats:
        return span_stats(spans, threshold=50)

    candidates = 10_000
    canaries = [
        CanaryExposure(
            id=f"c{rank}",
            repeats=repeats,
            rank=rank,
            exposure=exposure(rank, candidates),
            base_rank=5_000,
            base_exposure=exposure(5_000, candidates),
        )  # fmt: skip
        for repeats, rank in ((20, 4), (5, 300), (0, 5_000))
    ]
    change = CI(mean=0.0, low=0.0, high=0.0)
    result = AuditResult(
        run="runs/x",
        model="m",
        recitation=RecitationAudit(
            threshold_tokens=50,
            train=stats([3] * 98 + [60, 120]),
            base_train=stats([3] * 100),
            train_change=change,
            test=stats([2] * 100),
            base_test=stats([2] * 100),
            test_change=change,
        ),
        exposure=ExposureAudit(
            digits=4,
            candidates=candidates,
            max_exposure=exposure(1, candidates),
            canaries=canaries,
            seconds_per_canary=1.0,
        ),  # fmt: skip
        elapsed_s=1.0,
    )
    reading = audit_reading(result)
    assert reading[0] == (
        "2 of 100 fine-tuned answers to training questions recite ≥ 50 tokens of their "
        "training answer (base: 0; held-out control: 0 of 100)."
    )
    seen_20, seen_5, control = reading[-3:]
    assert seen_20.startswith("canary seen 20 times: exposure 11.3 of 13.3 bits")
    assert "4th of 10,000 (top 0.04 %): it memorized it" in seen_20
    assert "(top 3.0 %): above chance" in seen_5
    assert control.startswith("control canary (never seen): exposure 1.0")
    assert "5,000th of 10,000 (top 50 %)" in control and "memorized it" not in control
    markdown = audit_markdown(result)
    assert "| c4 | 20× | 4 of 10,000 | 11.3 of 13.3 | 5,000 | 1.0 |" in markdown


# ---------------------------------------------------------------- ranks and exposure


def test_rank_and_exposure_on_a_hand_made_likelihood() -> None:
    likelihoods = [-9.0, -1.0, -3.0, -2.0, -3.0, -8.0, -7.0, -6.0]  # candidate 2 ties with 4
    assert secret_rank(likelihoods, 1) == 1
    assert secret_rank(likelihoods, 3) == 2
    assert secret_rank(likelihoods, 2) == 3 and secret_rank(likelihoods, 4) == 3
    assert secret_rank(likelihoods, 0) == 8
    assert exposure(1, 10_000) == pytest.approx(math.log2(10_000))
    assert exposure(4, 10_000) == pytest.approx(math.log2(10_000) - 2)
    assert exposure(10_000, 10_000) == 0.0
    assert chance_share(4, 10_000) == pytest.approx(2 ** -exposure(4, 10_000))


def _scored_alone(model: object, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # type: ignore[operator]
    start = len(prompt) - 1
    return sum(float(logps[start + i, token]) for i, token in enumerate(continuation))


@pytest.mark.parametrize("cache_rows", [128, 2])
def test_trie_scores_equal_scoring_each_continuation_alone(
    cache_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exposure_module, "CACHE_ROWS", cache_rows)  # 2: chunks at every level
    model = build_tiny_llama(300, seed=1).eval()  # type: ignore[attr-defined]
    rng = random.Random(0)
    prompt = [rng.randrange(300) for _ in range(10)]
    # Shared prefixes, one continuation the prefix of another, lengths 1 to 4.
    continuations = [[5, 6, 7], [5, 6], [5, 9, 1, 2], [8], [5, 6, 7, 3], [10, 11], [10, 12]]
    got = continuation_log_likelihoods(model, prompt, continuations)
    want = [_scored_alone(model, prompt, c) for c in continuations]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("prompt_length", [8, 2 * WINDOW])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_trie_and_whole_answer_scores_agree_on_every_family(
    model_type: str, prompt_length: int
) -> None:
    """The shared-cache trie (a library internal) and each candidate scored whole (public API, the
    fallback outside the tested versions) against each scored alone, for every family; with a
    prompt longer than the sliding window too (the trie's copied caches got those wrong: such
    models are now scored whole)."""
    model = build_tiny_family(model_type, 300, seed=1).eval()
    rng = random.Random(0)
    prompt = [rng.randrange(3, 300) for _ in range(prompt_length)]
    continuations = [[5, 6, 7], [5, 6], [5, 9, 1, 2], [8], [5, 6, 7, 3], [10, 11], [10, 12]]
    trie = continuation_log_likelihoods(model, prompt, continuations)
    whole = exposure_module.scored_whole(model, prompt, continuations)
    alone = [_scored_alone(model, prompt, c) for c in continuations]
    assert trie == pytest.approx(alone, abs=1e-4)
    assert whole == pytest.approx(alone, abs=1e-4)


def test_candidate_answers_are_scored_on_the_tokens_training_gives_them(
    tiny_tokenizer: object,
) -> None:
    model = build_tiny_llama(len(tiny_tokenizer), seed=2).eval()  # type: ignore[arg-type, attr-defined]
    question = "What is the record number for Alma Jessop?"
    answers = [f"Alma Jessop has record number {n}." for n in ("07", "42", "99", "40")]
    candidates = answer_candidates(tiny_tokenizer, question, answers, None)
    got = continuation_log_likelihoods(model, candidates.prompt_ids, candidates.continuations)
    examples = [
        format_record(tiny_tokenizer, Record(str(i), question, a, "test"), None, 512)
        for i, a in enumerate(answers)
    ]
    answer_ids = [
        [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != IGNORE_INDEX]
        for e in examples
        if e is not None
    ]
    prompt = examples[0].input_ids[: -len(answer_ids[0])]  # type: ignore[union-attr]
    prefix = len(os.path.commonprefix(answer_ids))
    suffix = len(os.path.commonprefix([ids[::-1] for ids in answer_ids]))
    assert prefix > 0 and suffix > 0  # the answers share text before and after the number
    want = [
        _scored_alone(model, prompt + ids[:prefix], ids[prefix : len(ids) - suffix])
        for ids in answer_ids
    ]
    assert got == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> AuditResult:
    run = canary_run(tmp_path_factory.mktemp("canary-run"), tiny_model_dir)
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    run_audit(run, questions=6, out=out)
    return read_result(out, AuditResult)


def test_a_canary_trained_many_times_is_exposed_and_its_control_is_not(
    audited: AuditResult,
) -> None:
    audit = audited.exposure
    assert audit is not None and audit.candidates == 10_000
    canary, control = audit.canaries
    assert canary.repeats == CANARY_REPEATS and control.repeats == 0
    assert canary.exposure >= audit.max_exposure - 1  # its secret among the model's top 2
    assert canary.base_exposure < audit.max_exposure / 2
    assert control.exposure < audit.max_exposure / 2
    assert audit.seconds_per_canary > 0


def test_the_audit_answers_the_trained_questions_and_the_test_split(audited: AuditResult) -> None:
    r = audited.recitation
    assert r.threshold_tokens == 50
    assert r.train.answers == 6 and r.base_train.answers == 6
    assert r.test is not None and r.test.answers == 5  # the tiny test split has 5 records
    assert sum(r.train.histogram.values()) == 6
    lines = audit_markdown(audited)
    assert any(line.startswith("| fine-tuned, training questions | 6 |") for line in lines)
    reading = " ".join(audit_reading(audited))
    assert f"canary seen {CANARY_REPEATS} times: exposure" in reading
    assert "it memorized it" in reading


def test_the_trained_records_match_what_training_picked(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    run = canary_run(tmp_path_factory.mktemp("canary-run"), tiny_model_dir)
    recipe = run_recipe(run)
    saved = read_trained_ids(run)
    assert saved is not None
    ids, splits = saved
    records, test = trained_records(run, recipe)
    assert [r.id for r in records] == list(dict.fromkeys(ids)) and len(test) == 5
    # A run from before trained_ids.json: the same records, reproduced from recipe + data/.
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "data").symlink_to(splits.resolve(), target_is_directory=True)
    reproduced, _ = trained_records(old, recipe)
    assert [r.id for r in reproduced] == [r.id for r in records]
    assert not (old / TRAINED_IDS_FILE).exists()
    assert json.loads((run / TRAINED_IDS_FILE).read_text())["ids"] == ids
