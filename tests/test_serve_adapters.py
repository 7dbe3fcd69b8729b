"""Many adapters behind one endpoint: names, /v1/models, per-request choice, hot load and unload."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_support import ServerThread, foreign_adapter, train_tiny_run, variant_adapter

from medlora.errors import ConfigError
from medlora.serve.adapters import parse_adapter_option
from medlora.serve.app import Limits, create_app
from medlora.serve.loader import Served, build_engine

KEY = "adapter-key-77"
QUESTION = "What are the symptoms of asthma?"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    run = train_tiny_run(root, tiny_model_dir)
    store = root / "store"  # the --adapter-root of the hot-load tests
    store.mkdir()
    outside = root / "outside"
    outside.mkdir()
    return {
        "run": run,
        "second": variant_adapter(run, root / "second", seed=1),
        "third": variant_adapter(run, root / "third", seed=2),
        "store": store,
        "loadable": variant_adapter(run, store / "fourth", seed=3),
        "foreign": foreign_adapter(run, store / "foreign"),
        "outside": variant_adapter(run, outside / "elsewhere", seed=4),
    }


@pytest.fixture(scope="module")
def served(folders: dict[str, Path], tiny_model_dir: Path) -> Served:
    adapters = [str(folders["run"]), f"second={folders['second']}", f"third={folders['third']}"]
    return build_engine(str(tiny_model_dir), adapters, engine="transformers", max_batch=4)


@pytest.fixture(scope="module")
def server(served: Served, folders: dict[str, Path]) -> Iterator[ServerThread]:
    limits = Limits(api_key=KEY, allow_adapter_updates=True, adapter_root=folders["store"])
    with ServerThread(create_app(served, limits)) as running:
        yield running


def ask(server: ServerThread, model: str, question: str = QUESTION, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 10}
    return httpx.post(
        f"{server.url}/v1/chat/completions", json={**body, **extra}, headers=AUTH, timeout=120
    )


def answer(server: ServerThread, model: str, question: str = QUESTION) -> str:
    reply = ask(server, model, question)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_adapter_option_names() -> None:
    assert parse_adapter_option("cardio=runs/a") == ("cardio", Path("runs/a"))
    assert parse_adapter_option("runs/a") == (None, Path("runs/a"))
    with pytest.raises(ConfigError, match="letters"):
        parse_adapter_option("bad name!=runs/a")


def test_models_lists_the_base_and_every_adapter_with_its_parent(
    server: ServerThread, served: Served, tiny_model_dir: Path
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    rows = {m.id: m.model_extra for m in client.models.list().data}
    base = tiny_model_dir.name
    assert list(rows) == ["run", "second", "third", base]
    assert {rows[name]["parent"] for name in ("run", "second", "third")} == {base}
    assert rows[base]["parent"] is None
    assert served.model_set is not None and served.model_set.loaded == {"run", "second", "third"}


def test_the_model_field_picks_the_adapter_and_unknown_names_list_what_is_served(
    server: ServerThread, tiny_model_dir: Path
) -> None:
    answers = {
        name: answer(server, name) for name in ("run", "second", "third", tiny_model_dir.name)
    }
    assert len(set(answers.values())) == 4  # four models, four different answers
    missing = ask(server, "nope")
    assert missing.status_code == 404
    assert "second" in missing.json()["error"]["message"]


def test_mixed_concurrent_requests_equal_their_single_answers(
    server: ServerThread, tiny_model_dir: Path
) -> None:
    names = ["run", "second", "third", tiny_model_dir.name]
    questions = [QUESTION, "How is diabetes treated?", "What causes anemia?"]
    pairs = [(names[i % 4], questions[i % 3]) for i in range(16)]
    single = {pair: answer(server, *pair) for pair in set(pairs)}
    with ThreadPoolExecutor(len(pairs)) as pool:
        got = list(pool.map(lambda pair: answer(server, *pair), pairs))
    assert got == [single[pair] for pair in pairs]


def load(server: ServerThread, name: str, path: str | Path, key: str = KEY) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def unload(server: ServerThread, name: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH, timeout=60
    )


def test_hot_load_and_unload(server: ServerThread, folders: dict[str, Path]) -> None:
    assert ask(server, "fourth").status_code == 404
    loaded = load(server, "fourth", "fourth")  # relative to --adapter-root
    assert loaded.status_code == 200, loaded.text
    assert "fourth" in {
        m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]
    }
    fourth = answer(server, "fourth")
    assert fourth != answer(server, "run")
    assert load(server, "fourth", "fourth").json()["error"]["code"] == "adapter_exists"
    assert unload(server, "fourth").status_code == 200
    assert ask(server, "fourth").status_code == 404
    assert unload(server, "fourth").status_code == 404
    again = load(server, "fourth-again", folders["loadable"])  # an absolute path under the root
    assert again.status_code == 200 and answer(server, "fourth-again") == fourth
    assert unload(server, "fourth-again").status_code == 200


def test_hot_load_refuses_what_it_must(
    server: ServerThread, folders: dict[str, Path], tiny_model_dir: Path
) -> None:
    store = folders["store"]
    link = store / "sneaky"
    if not link.exists():
        os.symlink(folders["outside"], link)
    (store / "notes").mkdir(exist_ok=True)
    (store / "notes" / "readme.txt").write_text("not an adapter")
    cases = {
        "outside the root": (load(server, "x1", folders["outside"]), 403, "path_not_allowed"),
        "dot-dot escape": (load(server, "x2", "../outside/elsewhere"), 403, "path_not_allowed"),
        "symlink escape": (load(server, "x3", "sneaky"), 403, "path_not_allowed"),
        "missing folder": (load(server, "x4", "no-such-run"), 404, "adapter_not_found"),
        "not an adapter": (load(server, "x5", "notes"), 400, "not_an_adapter"),
        "another base": (load(server, "x6", "foreign"), 400, "incompatible_adapter"),
        "wrong key": (load(server, "x7", "fourth", key="wrong"), 401, "invalid_api_key"),
        "bad name": (load(server, "no spaces", "fourth"), 400, "invalid_adapter"),
    }
    for what, (reply, status, code) in cases.items():
        assert reply.status_code == status, (what, reply.text)
        assert reply.json()["error"]["code"] == code, what
    assert unload(server, tiny_model_dir.name).status_code == 400  # the base stays
    ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert not ids & {"x1", "x2", "x3", "x4", "x5", "x6", "x7"}
    assert answer(server, "run")  # still serving


def test_requests_in_flight_are_unaffected_by_loads(
    server: ServerThread, folders: dict[str, Path]
) -> None:
    single = answer(server, "second", "What causes anemia?")
    streamed: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {
            "model": "second",
            "messages": [{"role": "user", "content": "What causes anemia?"}],
            "max_tokens": 10,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    streamed.append(delta.get("content") or "")

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(60)
    assert load(server, "fifth", "fourth").status_code == 200  # while "second" is generating
    assert load(server, "sixth", "foreign").status_code == 400
    assert unload(server, "fifth").status_code == 200
    worker.join(120)
    assert "".join(streamed) == single


def test_updates_are_refused_unless_allowed(served: Served, folders: dict[str, Path]) -> None:
    with ServerThread(create_app(served, Limits(api_key=KEY))) as locked:
        reply = load(locked, "fourth", folders["loadable"])
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "adapter_updates_disabled"


def test_rank_over_the_limit_is_refused(folders: dict[str, Path], tiny_model_dir: Path) -> None:
    from medlora.serve.adapters import AdapterError, check_adapter_dir

    with pytest.raises(AdapterError, match="max-lora-rank 4") as refused:
        check_adapter_dir(folders["loadable"], max_rank=4)  # the tiny runs have r = 8
    assert refused.value.code == "rank_too_large"
    with pytest.raises(ConfigError, match="max-lora-rank"):  # at start-up: one line, no load
        build_engine(
            str(tiny_model_dir), [str(folders["run"])], engine="transformers", max_lora_rank=4
        )
