"""The real server on 127.0.0.1 with a tiny trained run: OpenAI client, limits, safety, concurrency."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_support import ServerThread, train_tiny_run

from medlora.config import DEFAULT_SYSTEM_PROMPT
from medlora.evaluate.generate import generate_answers
from medlora.serve.app import Limits, create_app, health_router
from medlora.serve.engine import Job
from medlora.serve.http import ServerState
from medlora.serve.loader import Served, build_engine
from medlora.serve.safety import DEFAULT_DISCLAIMER, EMERGENCY_NOTICE

KEY = "test-key-123"
QUESTIONS = [
    "What are the symptoms of asthma?",
    "How is diabetes treated?",
    "What causes anemia?",
    "Is hypertension inherited?",
    "What is the outlook for people with migraine?",
    "What causes asthma and diabetes?",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve"), tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tiny_run: Path) -> Served:
    return build_engine(str(tiny_model_dir), tiny_run, engine="transformers", max_batch=4)


@pytest.fixture(scope="module")
def reference(served: Served) -> dict[str, str]:
    """Each question answered alone through the evaluation code path (greedy, same weights)."""
    assert served.model_set is not None and served.tuned is not None
    model = served.model_set.model  # the base with the run's adapter active
    tokenizer = served.tokenizer
    answers = {}
    for question in QUESTIONS:
        answers[question] = generate_answers(
            model,
            tokenizer,
            [question],
            served.models[served.tuned].system_prompt,
            max_new_tokens=MAX_TOKENS,
            batch_size=1,
        )[0]
    return answers


@pytest.fixture(scope="module")
def server(served: Served) -> Iterator[ServerThread]:
    with ServerThread(create_app(served, Limits(api_key=KEY, max_body_kb=20))) as running:
        yield running


def client(server: ServerThread, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def wrapped(answer: str) -> str:
    return f"{answer}\n\n{DEFAULT_DISCLAIMER}"


def test_models_lists_tuned_and_base(server: ServerThread, served: Served) -> None:
    ids = {m.id for m in client(server).models.list().data}
    assert ids == {served.tuned, served.base}
    assert served.tuned == "run"  # named after the run directory
    assert served.models["run"].system_prompt == DEFAULT_SYSTEM_PROMPT  # the run's recipe prompt


def test_openai_client_plain_and_streaming(
    server: ServerThread, served: Served, reference: dict[str, str]
) -> None:
    question = QUESTIONS[0]
    messages: Any = [{"role": "user", "content": question}]
    plain = client(server).chat.completions.create(
        model=served.tuned, messages=messages, max_tokens=MAX_TOKENS
    )
    assert plain.choices[0].message.content == wrapped(reference[question])
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= MAX_TOKENS
    stream = client(server).chat.completions.create(
        model=served.tuned, messages=messages, max_tokens=MAX_TOKENS, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 3  # the answer arrived in several pieces
    assert "".join(pieces).strip() == plain.choices[0].message.content.strip()


def test_base_and_tuned_answer_differently(server: ServerThread, served: Served) -> None:
    messages: Any = [{"role": "user", "content": QUESTIONS[1]}]
    answers = {
        name: client(server)
        .chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS)
        .choices[0]
        .message.content
        for name in (served.tuned, served.base)
    }
    assert answers[served.tuned] != answers[served.base]


def test_concurrent_requests_get_their_own_answers(
    server: ServerThread, served: Served, reference: dict[str, str]
) -> None:
    def ask(question: str) -> str:
        reply = client(server).chat.completions.create(
            model=served.tuned,
            messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS,
        )
        return reply.choices[0].message.content or ""

    order = QUESTIONS * 2
    with ThreadPoolExecutor(len(order)) as pool:
        got = list(pool.map(ask, order))
    assert got == [wrapped(reference[q]) for q in order]


def test_api_key_is_required(server: ServerThread) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert response.status_code == 401
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


def test_bad_requests_are_refused_with_clear_codes(server: ServerThread, served: Served) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    huge = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    assert httpx.post(url, json=huge, headers=headers).status_code == 413
    no_messages = httpx.post(url, json={"model": served.tuned}, headers=headers)
    assert no_messages.status_code == 422 and "messages" in no_messages.json()["error"]["message"]
    bad_role = {"messages": [{"role": "wizard", "content": "hi"}]}
    assert httpx.post(url, json=bad_role, headers=headers).status_code == 422
    assert httpx.post(url, content=b"{not json", headers=headers).status_code == 422
    too_many = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}
    answer = httpx.post(url, json=too_many, headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "max_tokens_too_large"
    unknown = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=unknown, headers=headers).status_code == 404
    with pytest.raises(openai.UnprocessableEntityError):
        client(server).chat.completions.create(model=served.tuned, messages=[], max_tokens=4)


def test_every_error_is_in_openais_error_shape(server: ServerThread, served: Served) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    refused = [
        httpx.post(url, content=b'{"messages": "\xff\xfe"}', headers=headers),  # not UTF-8
        httpx.post(url, content=b"{not json", headers=headers),
        httpx.post(url, json={"messages": []}, headers=headers),
        httpx.post(
            url,
            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        ),  # fmt: skip
        httpx.get(url, headers=headers),  # wrong method
        httpx.get(f"{server.url}/v1/no-such-route", headers=headers),
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}),
    ]
    for answer in refused:
        assert answer.status_code >= 400
        body = answer.json()
        assert set(body) == {"error"}, (answer.request.url, body)
        error = body["error"]
        assert error["message"] and error["type"] and "code" in error and "param" in error


def test_health_router_alone_needs_no_key(served: Served) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    bare = FastAPI()
    bare.state.server = ServerState(served, Limits(api_key=KEY, max_queue=3))
    bare.include_router(health_router)
    health = TestClient(bare).get("/health").json()
    assert health["status"] == "ok" and health["engine"] == "transformers"
    assert set(health["models"]) == {served.tuned, served.base}
    assert (health["queued"], health["max_queue"]) == (0, 3)


def test_long_prompt_is_refused(served: Served) -> None:
    with ServerThread(create_app(served, Limits(max_prompt_tokens=30))) as small:
        response = httpx.post(
            f"{small.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "What causes anemia? " * 20}]},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


class GatedEngine:
    """Wraps the real engine; batches wait at a gate, so the queue fills deterministically."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.max_batch = inner.name, 1
        self.batching, self.supports_logprobs = "static", False
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run_batch(self, jobs: Sequence[Job]) -> None:
        self.entered.set()
        self.gate.wait(timeout=60)
        self.inner.run_batch(jobs)


def test_full_queue_answers_429_and_recovers(served: Served, reference: dict[str, str]) -> None:
    gated = GatedEngine(served.engine)
    app = create_app(dataclasses.replace(served, engine=gated), Limits(max_queue=1))
    body = {"model": served.tuned, "max_tokens": MAX_TOKENS}
    with ServerThread(app) as running, ThreadPoolExecutor(2) as pool:
        url = f"{running.url}/v1/chat/completions"

        def post(question: str) -> httpx.Response:
            return httpx.post(
                url, json={**body, "messages": [{"role": "user", "content": question}]}, timeout=60
            )

        first = pool.submit(post, QUESTIONS[0])  # taken by the worker, held at the gate
        assert gated.entered.wait(timeout=30)
        second = pool.submit(post, QUESTIONS[1])  # waits in the queue (size 1)
        for _ in range(200):
            if app.state.server.scheduler.queued == 1:
                break
            threading.Event().wait(0.02)
        refused = post(QUESTIONS[2])
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(
                base_url=f"{running.url}/v1", api_key="x", max_retries=0
            ).chat.completions.create(
                model=served.tuned, messages=[{"role": "user", "content": "hi"}]
            )
        gated.gate.set()
        for future, question in ((first, QUESTIONS[0]), (second, QUESTIONS[1])):
            reply = future.result(timeout=60)
            assert reply.status_code == 200
            assert reply.json()["choices"][0]["message"]["content"] == wrapped(reference[question])
        assert post(QUESTIONS[3]).status_code == 200  # the server is still alive and serving


def test_request_timeout_is_504(served: Served) -> None:
    gated = GatedEngine(served.engine)
    app = create_app(
        dataclasses.replace(served, engine=gated),
        Limits(timeout_s=0.5),
    )
    with ServerThread(app) as running:
        response = httpx.post(
            f"{running.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        gated.gate.set()
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_emergency_notice_comes_first(server: ServerThread, served: Served) -> None:
    reply = client(server).chat.completions.create(
        model=served.tuned,
        messages=[{"role": "user", "content": "My father has crushing chest pain and is sweating"}],
        max_tokens=4,
    )
    content = reply.choices[0].message.content or ""
    assert content.startswith("⚠️ " + EMERGENCY_NOTICE)
    assert content.endswith(DEFAULT_DISCLAIMER)


def test_disclaimer_is_configurable_and_prompts_are_not_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "my rash is purple and itchy"
    limits = Limits(disclaimer="Not advice.", emergency_notices=False)
    with (
        caplog.at_level(logging.INFO, logger="medlora.serve"),
        ServerThread(create_app(served, limits)) as running,
    ):
        reply = httpx.post(
            f"{running.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": secret}], "max_tokens": 4},
        ).json()
    assert reply["choices"][0]["message"]["content"].endswith("\n\nNot advice.")
    assert "request" in caplog.text and secret not in caplog.text
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="medlora.serve"),
        ServerThread(create_app(served, Limits(log_prompts=True))) as running,
    ):
        httpx.post(
            f"{running.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": secret}]},
        )
    assert secret in caplog.text


def test_page_and_stream_usage(server: ServerThread, served: Served) -> None:
    page = httpx.get(server.url + "/")
    assert (
        page.status_code == 200
        and "medlora chat" in page.text
        and "/v1/chat/completions" in page.text
    )
    lines = []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "messages": [{"role": "user", "content": QUESTIONS[2]}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0


def test_plain_completions_with_logprobs_and_streaming(
    server: ServerThread, served: Served
) -> None:
    prompt = "Asthma is a condition that"
    reply = client(server).completions.create(
        model=served.tuned, prompt=prompt, max_tokens=8, logprobs=2
    )
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.text.endswith(DEFAULT_DISCLAIMER)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(served.tokenizer(prompt)["input_ids"])
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.tokens) == reply.usage.completion_tokens
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    stream = client(server).completions.create(
        model=served.tuned, prompt=prompt, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text
    chat = client(server).chat.completions.create(
        model=served.tuned, messages=[{"role": "user", "content": prompt}], max_tokens=8
    )
    assert chat.choices[0].message.content != choice.text  # no chat template on this route


def test_chat_logprobs_follow_openais_shape(server: ServerThread, served: Served) -> None:
    reply = client(server).chat.completions.create(
        model=served.tuned,
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=MAX_TOKENS,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    streamed = client(server).chat.completions.create(
        model=served.tuned,
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=MAX_TOKENS,
        logprobs=True,
        stream=True,
    )
    entries = [
        e
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content])


def test_unsupported_options_are_refused_not_dropped(served: Served, server: ServerThread) -> None:
    url = f"{server.url}/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    echo = httpx.post(url, json={"prompt": "hi", "echo": True}, headers=headers)
    assert echo.status_code == 400 and echo.json()["error"]["code"] == "unsupported_parameter"
    two = httpx.post(url, json={"prompt": ["a", "b"]}, headers=headers)
    assert two.status_code == 422
    static = dataclasses.replace(served, engine=GatedEngine(served.engine))
    static.engine.gate.set()  # type: ignore[attr-defined]
    with ServerThread(create_app(static)) as running:
        reply = httpx.post(
            f"{running.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        )
    assert reply.status_code == 400 and "logprobs" in reply.json()["error"]["message"]
