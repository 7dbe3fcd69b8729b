"""Continuous batching: requests join and leave between decode steps, each answer as if alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_support import train_tiny_run, variant_adapter

from medlora.data.format import prompt_ids
from medlora.serve.adapters import BASE_ADAPTER
from medlora.serve.continuous import ContinuousEngine
from medlora.serve.engine import Event, Job, Sampling, StaticEngine
from medlora.serve.loader import Served, build_engine

QUESTIONS = [
    "What are the symptoms of asthma?",
    "How is diabetes treated?",
    "What causes anemia?",
    "Is hypertension inherited?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Served:
    root = tmp_path_factory.mktemp("continuous")
    run = train_tiny_run(root, tiny_model_dir)
    other = variant_adapter(run, root / "other", seed=1)
    return build_engine(str(tiny_model_dir), [f"a={run}", f"b={other}"], engine="transformers")


def job(served: Served, question: str, adapter: str, tokens: int, **sampling: Any) -> Job:
    events: list[Event] = []
    entry = served.models[served.default_model]
    made = Job(
        adapter,
        prompt_ids(entry.tokenizer, question, entry.system_prompt),
        Sampling(max_new_tokens=tokens, repetition_penalty=1.1, **sampling),
        sink=events.append,
        adapter=adapter,
    )
    made.events = events  # type: ignore[attr-defined]
    return made


def alone(engine: ContinuousEngine, made: Job) -> list[int]:
    copy = Job(
        made.model, made.prompt_ids, made.sampling, sink=lambda e: None, adapter=made.adapter
    )
    engine.run_batch([copy])
    return copy.completion_ids


def test_a_short_request_joins_a_running_batch_and_leaves_first(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = served.engine
    assert isinstance(engine, ContinuousEngine)
    monkeypatch.setattr(engine, "stops", set())  # rows end at their length only: exact timing
    long = job(served, QUESTIONS[0], "a", 30)
    short = job(served, QUESTIONS[1], "b", 3)
    engine.admit(long)
    for _ in range(5):
        engine.step()
    engine.admit(short)  # joins while the long one is running
    assert engine.active == 2
    steps = 0
    while short.finish_reason is None:
        engine.step()
        steps += 1
    assert steps == 2 and long.finish_reason is None  # 1 token from prefill + 2 steps
    assert engine.active == 1  # the short row left the batch at once
    while engine.active:
        engine.step()
    assert long.finish_reason == short.finish_reason == "length"
    # Joining and leaving did not change either answer: each equals the request run alone.
    assert long.completion_ids == alone(engine, long)
    assert short.completion_ids == alone(engine, short)


def test_mixed_adapters_in_one_batch_answer_as_alone(served: Served) -> None:
    engine = served.engine
    assert isinstance(engine, ContinuousEngine)
    adapters = ["a", "b", BASE_ADAPTER, "a", "b", BASE_ADAPTER, "b", "a"]
    jobs = [job(served, q, a, 12) for q, a in zip(QUESTIONS * 2, adapters, strict=True)]
    for index, made in enumerate(jobs):  # staggered joins, as requests arrive
        engine.admit(made)
        if index % 2:
            engine.step()
    while engine.active:
        engine.step()
    answers = [made.completion_ids for made in jobs]
    assert answers == [alone(engine, made) for made in jobs]
    by_adapter = {made.adapter: made.completion_ids for made in jobs[:3]}
    assert len({tuple(ids) for ids in by_adapter.values()}) == 3  # each adapter answers its way


def test_static_and_continuous_give_the_same_greedy_answers(served: Served) -> None:
    static = StaticEngine(served.model_set, served.tokenizer)  # type: ignore[arg-type]
    jobs = [job(served, q, "a", 10) for q in QUESTIONS]
    static.run_batch(jobs)
    assert [made.completion_ids for made in jobs] == [alone(served.engine, made) for made in jobs]  # type: ignore[arg-type]


def test_sampling_with_a_seed_repeats_and_logprobs_are_the_models(served: Served) -> None:
    import torch

    engine = served.engine
    assert isinstance(engine, ContinuousEngine)
    first = job(served, QUESTIONS[2], "a", 8, temperature=0.9, seed=7, top_logprobs=3)
    second = job(served, QUESTIONS[2], "a", 8, temperature=0.9, seed=7, top_logprobs=3)
    engine.admit(first)
    engine.step()
    engine.admit(second)  # a different batch position and moment: same seed, same answer
    while engine.active:
        engine.step()
    assert first.completion_ids == second.completion_ids
    assert len(first.logprobs) == len(first.completion_ids)
    entry = first.logprobs[0]
    assert entry.token_id == first.completion_ids[0] and len(entry.top) == 3
    model_set = served.model_set
    assert model_set is not None
    with torch.inference_mode(), model_set.rows(["a"]):
        logits = model_set.model(input_ids=torch.tensor([first.prompt_ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)
    best = int(torch.argmax(expected))
    assert entry.top[0][0] == best and entry.top[0][1] == pytest.approx(
        float(expected[best]), abs=1e-4
    )
