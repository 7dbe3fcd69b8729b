"""Chat-template formatting with the loss on answer tokens only.

The prompt (system + question + the template's assistant header) and the answer are tokenized
separately: at inference the model sees exactly the prompt tokens and generates the answer tokens,
so training on the same split keeps the two identical. Prompt positions get label -100.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medlora.data.records import Record
from medlora.errors import DataError

IGNORE_INDEX = -100


def build_messages(
    question: str, system_prompt: str | None, answer: str | None = None
) -> list[dict[str, str]]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def prompt_text(tokenizer: Any, question: str, system_prompt: str | None) -> str:
    """The text the model is given before it answers (ends with the assistant header)."""
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt), tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer: Any, question: str, system_prompt: str | None) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question, system_prompt), add_special_tokens=False)[
        "input_ids"
    ]


def split_prompt_answer(
    tokenizer: Any, question: str, answer: str, system_prompt: str | None
) -> tuple[str, str]:
    """Render the conversation and cut it into (prompt, answer-with-end-of-turn) text."""
    prompt = prompt_text(tokenizer, question, system_prompt)
    full = tokenizer.apply_chat_template(
        build_messages(question, system_prompt, answer), tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template renders the prompt differently with and without the "
            "answer, so answer tokens cannot be found; give the model a standard chat template"
        )
    return prompt, full[len(prompt) :]


@dataclass
class Example:
    """One tokenized training example: ids, labels (-100 on the prompt) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    record_id: str
    source: str
    truncated: bool = False

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _end_of_turn_text(tokenizer: Any, question: str, system_prompt: str | None) -> str:
    """What the chat template puts after an answer's text (SmolLM2: '<|im_end|>\\n')."""
    marker = "medlora-answer-end"  # no whitespace, no template markup: templates render it as is
    _, answer = split_prompt_answer(tokenizer, question, marker, system_prompt)
    return answer[answer.index(marker) + len(marker) :]


def _sentence_fit(
    tokenizer: Any,
    record: Record,
    system_prompt: str | None,
    budget: int,
    end_of_turn: bool = True,
) -> list[int] | None:
    """The answer's ids cut after its last whole sentence that fits, the end of turn after it
    only when `end_of_turn` (without it the model is not taught to stop where the answer went on)."""
    ends = [m.start() for m in _SENTENCE_END.finditer(record.answer)]
    suffix = "" if end_of_turn else _end_of_turn_text(tokenizer, record.question, system_prompt)
    for end in reversed(ends):
        _, answer = split_prompt_answer(
            tokenizer, record.question, record.answer[:end], system_prompt
        )
        if suffix and answer.endswith(suffix):
            answer = answer[: -len(suffix)]
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return ids
    return None


def format_record(
    tokenizer: Any,
    record: Record,
    system_prompt: str | None,
    max_seq_len: int,
    truncation: str = "token",
    end_of_turn_loss: bool = True,
) -> Example | None:
    """Tokenize one record; None when truncation leaves no answer token to learn from.

    `end_of_turn_loss=False` keeps the end-of-turn tokens in the input but takes them out of the
    loss: the tuned model then stops where its (instruct) base would, instead of learning the stop
    rate of these answers (`data.end_of_turn_loss`).

    An example longer than `max_seq_len` is cut: `token` cuts at the limit (the end-of-turn token
    is lost), `sentence` keeps the answer's whole sentences that fit and then the end of turn, so
    the model still learns where an answer stops, `sentence_open` keeps the whole sentences
    without it (the reference went on: no stop is taught there). Both fall back to `token` when no
    sentence fits.
    """
    prompt, answer = split_prompt_answer(tokenizer, record.question, record.answer, system_prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    truncated = len(p_ids) + len(a_ids) > max_seq_len
    if truncated and truncation in ("sentence", "sentence_open"):
        budget = max_seq_len - len(p_ids)
        fitted = _sentence_fit(tokenizer, record, system_prompt, budget, truncation == "sentence")
        a_ids = a_ids if fitted is None else fitted  # no whole sentence fits: cut at the limit
    ids = (p_ids + a_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + a_ids)[:max_seq_len]
    if not end_of_turn_loss:
        labels = _without_end_of_turn(tokenizer, record, system_prompt, labels)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels, record.id, record.source, truncated=truncated)


def _without_end_of_turn(
    tokenizer: Any, record: Record, system_prompt: str | None, labels: list[int]
) -> list[int]:
    """`labels` with the template's end-of-turn tokens (when the labels end with them) ignored."""
    suffix = _end_of_turn_text(tokenizer, record.question, system_prompt)
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if ids and labels[-len(ids) :] == ids:
        return labels[: -len(ids)] + [IGNORE_INDEX] * len(ids)
    return labels


@dataclass
class FormatStats:
    kept: int = 0
    truncated: int = 0
    dropped_no_answer_tokens: int = 0
    answer_tokens: int = 0
    prompt_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["dropped_ids"] = self.dropped_ids[:20]
        return data


def trains_end_of_turn(record_id: str, share: float, seed: int = 0) -> bool:
    """Whether this record's end of turn is trained when a `share` of answers keep it.

    Chosen by a hash of (seed, record id), so the same records keep it whatever the order or the
    other records, and a resumed or repeated run trains the same stops."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def format_records(
    tokenizer: Any,
    records: Sequence[Record],
    system_prompt: str | None,
    max_seq_len: int,
    truncation: str = "token",
    end_of_turn_loss: float = 1.0,
    seed: int = 0,
) -> tuple[list[Example], FormatStats]:
    """Tokenize records; `end_of_turn_loss` is the share whose end of turn is trained
    (`trains_end_of_turn`), 1 for all."""
    stats = FormatStats()
    examples = []
    for record in records:
        example = format_record(
            tokenizer,
            record,
            system_prompt,
            max_seq_len,
            truncation,
            trains_end_of_turn(record.id, end_of_turn_loss, seed),
        )
        if example is None:
            stats.dropped_no_answer_tokens += 1
            stats.dropped_ids.append(record.id)
            continue
        stats.kept += 1
        stats.truncated += int(example.truncated)
        stats.answer_tokens += example.answer_tokens
        stats.prompt_tokens += len(example.input_ids) - example.answer_tokens
        examples.append(example)
    return examples, stats


def token_counter(
    tokenizer: Any, system_prompt: str | None
) -> Callable[[Sequence[Record]], list[int]]:
    """Records → their full formatted lengths (the data card's percentiles), a batch at a time:
    one template render and one batched tokenizer call per batch."""

    def count(records: Sequence[Record]) -> list[int]:
        if not records:
            return []
        conversations = [build_messages(r.question, system_prompt, r.answer) for r in records]
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def pad_batch(examples: Sequence[Example | dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a micro-batch: ids with the pad token, labels with -100, attention mask 0."""
    import torch

    rows = [
        e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels}
        for e in examples
    ]
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def preview(tokenizer: Any, example: Example) -> Any:
    """A rich Text of one example: trained (answer) tokens highlighted, prompt tokens dimmed."""
    from rich.text import Text

    text = Text()
    for token_id, label in zip(example.input_ids, example.labels, strict=True):
        piece = tokenizer.decode([token_id])
        if label == IGNORE_INDEX:
            text.append(piece, style="dim")
        else:
            text.append(piece, style="bold black on green")
    return text
