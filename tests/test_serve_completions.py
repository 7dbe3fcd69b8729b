"""OpenAI's generation routes alone: the router on a bare app, over a scripted engine and tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from medlora.serve import completions
from medlora.serve.adapters import ServedModel
from medlora.serve.engine import Event, Job, TokenLogprob
from medlora.serve.http import Limits, ServerState, add_error_handlers
from medlora.serve.loader import Served
from medlora.serve.safety import Safety

ANSWER = ["Rest", " and", " fluids."]


class LetterTokenizer:
    """One token per character, its code point; a chat turn is `<role>content`."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Answers every job with ANSWER, one piece per token, each with its log-probability."""

    name, batching, max_batch, supports_logprobs = "scripted", "static", 4, True

    def run_batch(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            for piece in ANSWER[: job.sampling.max_new_tokens]:
                entry = TokenLogprob(ord(piece[0]), -0.5, ((ord(piece[0]), -0.5), (33, -2.0)))
                job.completion_ids.append(entry.token_id)
                job.logprobs.append(entry)
                job.sink(Event("token", piece, logprobs=[entry]))
            job.text = "".join(ANSWER[: job.sampling.max_new_tokens])
            job.finish("length" if job.sampling.max_new_tokens < len(ANSWER) else "stop")


@pytest.fixture
def client() -> Iterator[TestClient]:
    model = ServedModel("scripted", LetterTokenizer(), None)
    served = Served(ScriptedEngine(), {"scripted": model}, "scripted", "scripted")  # type: ignore[arg-type]
    server = ServerState(served, Limits(api_key="k", max_prompt_tokens=60))
    app = FastAPI()
    app.state.server = server
    add_error_handlers(app)
    app.include_router(completions.router)
    server.scheduler.start()
    try:
        yield TestClient(app, headers={"Authorization": "Bearer k"})
    finally:
        server.scheduler.stop()


def test_completion_is_wrapped_and_its_logprobs_point_into_the_text(client: TestClient) -> None:
    reply = client.post("/v1/completions", json={"prompt": "Flu?", "logprobs": 1}).json()
    choice = reply["choices"][0]
    answer = "".join(ANSWER)
    assert choice["text"] == f"{answer}\n\n{Safety().disclaimer}"
    assert choice["finish_reason"] == "stop" and reply["usage"]["prompt_tokens"] == 4
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["R", " ", " "] and logprobs["token_logprobs"] == [-0.5] * 3
    assert logprobs["top_logprobs"][0] == {"R": -0.5}  # one alternative, as asked
    assert logprobs["text_offset"] == [0, 1, 2]


def test_streamed_chat_pieces_add_up_to_the_answer(client: TestClient) -> None:
    body = {
        "messages": [{"role": "user", "content": "I have crushing chest pain"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 2,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith("⚠️ ") and "Rest and\n\n" in text  # the notice, two pieces, disclaimer
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_refusals_come_before_any_work_is_queued(client: TestClient) -> None:
    def code(path: str, body: dict[str, object], **headers: str) -> tuple[int, str]:
        response = client.post(path, json=body, headers=headers)
        return response.status_code, response.json()["error"]["code"]

    hi = [{"role": "user", "content": "hi"}]
    assert code("/v1/chat/completions", {"messages": hi}, authorization="Bearer no") == (
        401,
        "invalid_api_key",
    )
    assert code("/v1/completions", {"prompt": "x" * 61}) == (400, "context_length_exceeded")
    assert code("/v1/completions", {"prompt": "hi", "stop": "."}) == (400, "unsupported_parameter")
    assert code("/v1/chat/completions", {"messages": hi, "model": "gpt"})[0] == 404
    assert code("/v1/chat/completions", {"messages": hi, "max_tokens": 513}) == (
        400,
        "max_tokens_too_large",
    )
