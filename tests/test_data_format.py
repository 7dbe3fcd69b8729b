"""Chat-template formatting: loss on answer tokens only, truncation that drops empty examples."""

from __future__ import annotations

from typing import Any

import torch

from medlora.data.format import (
    IGNORE_INDEX,
    Example,
    format_record,
    format_records,
    pad_batch,
    preview,
    prompt_ids,
    split_prompt_answer,
    token_counter,
    trains_end_of_turn,
)
from medlora.data.records import Record

QUESTION = "What causes anemia?"
ANSWER = "Low iron, vitamin B12 deficiency, blood loss or chronic disease."


def record(question: str = QUESTION, answer: str = ANSWER, rid: str = "r1") -> Record:
    return Record(id=rid, question=question, answer=answer, source="test/x", topic="anemia")


def test_prompt_tokens_are_masked_and_answer_tokens_are_trained(tiny_tokenizer: Any) -> None:
    example = format_record(tiny_tokenizer, record(), "Be careful.", max_seq_len=512)
    assert example is not None
    prompt = prompt_ids(tiny_tokenizer, QUESTION, "Be careful.")
    assert (
        example.input_ids[: len(prompt)] == prompt
    )  # the model sees at training what it sees at inference
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    trained = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert example.labels[len(prompt) :] == example.input_ids[len(prompt) :]
    decoded = tiny_tokenizer.decode(trained)
    assert decoded.startswith(ANSWER)
    assert "<|im_end|>" in decoded  # the model learns to stop
    assert "user" not in decoded and QUESTION not in decoded


def test_system_prompt_is_in_the_prompt_not_the_labels(tiny_tokenizer: Any) -> None:
    with_system = format_record(tiny_tokenizer, record(), "You are a nurse.", 512)
    without = format_record(tiny_tokenizer, record(), None, 512)
    assert with_system is not None and without is not None
    assert len(with_system.input_ids) > len(without.input_ids)
    assert with_system.answer_tokens == without.answer_tokens


def test_truncation_cuts_the_answer_and_drops_examples_left_without_one(
    tiny_tokenizer: Any,
) -> None:
    long_question = "What is the outlook for people with migraine? " * 20
    records = [record(), record(question=long_question, rid="too-long")]
    prompt_len = len(prompt_ids(tiny_tokenizer, QUESTION, None))
    examples, stats = format_records(tiny_tokenizer, records, None, max_seq_len=prompt_len + 3)
    assert [e.record_id for e in examples] == ["r1"]
    assert examples[0].answer_tokens == 3
    assert examples[0].truncated
    assert stats.dropped_no_answer_tokens == 1
    assert stats.dropped_ids == ["too-long"]
    assert stats.truncated == 1


def test_pad_batch_pads_labels_with_ignore_index(tiny_tokenizer: Any) -> None:
    short = format_record(tiny_tokenizer, record(answer="Iron."), None, 512)
    long = format_record(tiny_tokenizer, record(), None, 512)
    assert short is not None and long is not None
    batch = pad_batch([short, long], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape
    pad_positions = batch["attention_mask"] == 0
    assert pad_positions.any()
    assert torch.all(batch["labels"][pad_positions] == IGNORE_INDEX)


def test_preview_highlights_only_answer_tokens(tiny_tokenizer: Any) -> None:
    example = format_record(tiny_tokenizer, record(), None, 512)
    assert example is not None
    text = preview(tiny_tokenizer, example)
    highlighted = "".join(
        text.plain[span.start : span.end] for span in text.spans if "green" in str(span.style)
    )
    assert highlighted.startswith(ANSWER)
    assert QUESTION not in highlighted


LONG_ANSWER = "Asthma narrows the airways. It causes wheezing and coughing. " * 6


def _cut_in_half(tokenizer: Any, truncation: str) -> tuple[Example, str]:
    """LONG_ANSWER formatted with room for half its tokens: the example and its answer text."""
    prompt_len = len(prompt_ids(tokenizer, QUESTION, None))
    full = format_record(tokenizer, record(answer=LONG_ANSWER), None, 10_000)
    assert full is not None
    limit = prompt_len + full.answer_tokens // 2
    cut = format_record(tokenizer, record(answer=LONG_ANSWER), None, limit, truncation)
    assert cut is not None and cut.truncated and len(cut.input_ids) <= limit
    return cut, tokenizer.decode(cut.input_ids[prompt_len:])


def test_sentence_truncation_keeps_whole_sentences_and_the_end_of_turn(
    tiny_tokenizer: Any,
) -> None:
    _, token_text = _cut_in_half(tiny_tokenizer, "token")
    _, sentence_text = _cut_in_half(tiny_tokenizer, "sentence")
    assert "<|im_end|>" not in token_text  # cut mid-answer: the model never sees it stop
    assert sentence_text.rstrip().endswith("<|im_end|>")
    assert sentence_text.split("<|im_end|>")[0].rstrip().endswith(".")
    # An answer that fits is not touched.
    short = format_record(tiny_tokenizer, record(), None, 512, "sentence")
    assert short == format_record(tiny_tokenizer, record(), None, 512, "token")


def test_sentence_open_truncation_keeps_whole_sentences_without_teaching_a_stop(
    tiny_tokenizer: Any,
) -> None:
    """A cut answer went on in the source: `sentence_open` must not label an end of turn there."""
    _, open_text = _cut_in_half(tiny_tokenizer, "sentence_open")
    _, stop_text = _cut_in_half(tiny_tokenizer, "sentence")
    assert "<|im_end|>" not in open_text
    assert open_text.rstrip().endswith(".")
    # Here the same sentences as `sentence` fit; only the end of turn is gone.
    assert open_text.strip() == stop_text.split("<|im_end|>")[0].strip()
    # An answer that fits keeps its end of turn.
    short = format_record(tiny_tokenizer, record(), None, 512, "sentence_open")
    assert short is not None
    assert short == format_record(tiny_tokenizer, record(), None, 512, "token")
    assert tiny_tokenizer.decode(short.input_ids).rstrip().endswith("<|im_end|>")


def test_end_of_turn_stays_in_the_input_but_leaves_the_loss_when_asked(
    tiny_tokenizer: Any,
) -> None:
    """`data.end_of_turn_loss: false`: the same ids, the end of turn (and what the template puts
    after it) labelled -100, every answer token before it still trained."""
    trained = format_record(tiny_tokenizer, record(), None, 512)
    kept_out = format_record(tiny_tokenizer, record(), None, 512, "token", False)
    assert trained is not None and kept_out is not None
    assert kept_out.input_ids == trained.input_ids
    differ = [
        i for i, (a, b) in enumerate(zip(trained.labels, kept_out.labels, strict=True)) if a != b
    ]
    assert differ and all(kept_out.labels[i] == -100 for i in differ)
    assert differ == list(range(differ[0], len(trained.labels)))  # only the tail
    tail = tiny_tokenizer.decode(trained.input_ids[differ[0] :])
    assert tail.startswith("<|im_end|>") and ANSWER not in tail
    assert kept_out.answer_tokens == trained.answer_tokens - len(differ)
    # A cut answer (`sentence`) loses its taught stop too; `sentence_open` had none to lose.
    stop, _ = _cut_in_half(tiny_tokenizer, "sentence")
    limit = len(stop.input_ids)
    cut = format_record(tiny_tokenizer, record(answer=LONG_ANSWER), None, limit, "sentence", False)
    assert cut is not None and cut.truncated and cut.input_ids == stop.input_ids
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in cut.input_ids and end not in cut.labels


def test_a_share_of_end_of_turn_loss_trains_the_stop_of_that_share_of_answers(
    tiny_tokenizer: Any,
) -> None:
    """`data.end_of_turn_loss: 0.6`: about 60 % of the answers teach the stop, chosen by record id
    and seed (the same records whatever their order), the rest keep the end of turn untrained."""
    records = [record(rid=f"r{i}") for i in range(400)]
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def stopping(share: float, seed: int, rows: list[Record]) -> set[str]:
        examples, _ = format_records(tiny_tokenizer, rows, None, 512, "token", share, seed)
        assert all(end in e.input_ids for e in examples)  # the input never changes
        return {e.record_id for e in examples if end in e.labels}

    taught = stopping(0.6, 0, records)
    assert 0.5 < len(taught) / len(records) < 0.7
    assert stopping(0.6, 0, list(reversed(records))) == taught
    assert stopping(0.6, 1, records) != taught
    assert stopping(1.0, 0, records) == {r.id for r in records}
    assert stopping(0.0, 0, records) == set()
    assert taught <= stopping(0.8, 0, records)  # a larger share keeps these stops and adds more
    assert trains_end_of_turn("r1", True) and not trains_end_of_turn("r1", False)


def test_token_counter_counts_each_whole_formatted_conversation(tiny_tokenizer: Any) -> None:
    """The data card's lengths: prompt and answer as training formats them, a batch per call."""
    records = [record(), record(answer="Iron.", rid="r2")]
    count = token_counter(tiny_tokenizer, "Be careful.")
    expected = []
    for r in records:
        prompt, answer = split_prompt_answer(tiny_tokenizer, r.question, r.answer, "Be careful.")
        expected.append(len(tiny_tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]))
    assert count(records) == expected and count([]) == []
