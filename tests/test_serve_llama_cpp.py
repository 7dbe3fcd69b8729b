"""The fast engine (llama.cpp) on SmolLM2: GGUF export, same greedy answers as transformers, served.

Skipped, with the reason, where llama-cpp-python or llama.cpp's converter is not installed
(`make fast` installs both); the transformers engine is tested everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_records, write_prepared
from serve_support import ServerThread

from medlora.config import recipe_from_dict
from medlora.evaluate.generate import generate_answers
from medlora.export.gguf import llama_cpp_tools_dir
from medlora.export.run import export_run
from medlora.models import SMOLLM2_ALIAS
from medlora.serve.llama_cpp import llama_cpp_available

TOOLS = llama_cpp_tools_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not llama_cpp_available(), reason="llama-cpp-python not installed (make fast)"
    ),
    pytest.mark.skipif(
        not (TOOLS / "convert_hf_to_gguf.py").is_file(),
        reason=f"llama.cpp's converter not in {TOOLS} (make fast)",
    ),
]
QUESTIONS = ["What are the symptoms of asthma?", "How is diabetes treated?"]
NEW_TOKENS = 24


def planned_jobs(tokenizer: Any, plan: list[tuple[str, str, int]], **options: Any) -> list[Any]:
    """Fresh greedy jobs for (question, served model, max_new_tokens), with no system prompt;
    `options`: more Sampling fields (repetition control)."""
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.prompt import conversation_ids

    return [
        Job(m, conversation_ids(tokenizer, [{"role": "user", "content": q}], None),
            Sampling(max_new_tokens=n, **options), sink=lambda event: None)
        for q, m, n in plan
    ]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> dict[str, Any]:
    """A real 4-step SmolLM2 run (its adapter changes the answers) and its f32 GGUF export."""
    from medlora.train import train

    mp = pytest.MonkeyPatch()
    mp.setenv("MEDLORA_CACHE", str(smollm2_cache))
    mp.setenv("MEDLORA_LLAMA_CPP_DIR", str(TOOLS))
    root = tmp_path_factory.mktemp("fast")
    records = tiny_records()
    prepared = write_prepared(root / "prepared", records[:12], records[12:14], records[14:16])
    recipe = recipe_from_dict(
        {"model": {"name": SMOLLM2_ALIAS}},
        [
            "train.max_steps=4",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.lr=0.002",
            "lora.target_modules=all-linear",
            "train.eval_steps=0",
        ],
    )
    train(recipe, root / "run", prepared_dir=prepared)
    export = export_run(root / "run", root / "gguf", fmt="gguf", gguf_type="f32")
    yield {"run": root / "run", "export": export}
    mp.undo()


def test_gguf_export_has_model_and_card(smollm2_run: dict[str, Any]) -> None:
    export = smollm2_run["export"]
    assert export.merged and export.gguf is not None
    assert export.gguf.read_bytes()[:4] == b"GGUF"
    assert (export.out / "README.md").is_file() and (export.out / "config.json").is_file()


def test_llama_cpp_answers_match_transformers(smollm2_run: dict[str, Any]) -> None:
    from medlora.evaluate.heldout import run_recipe
    from medlora.models import load_model
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.prompt import conversation_ids

    export = smollm2_run["export"]
    model, tokenizer = load_model(str(export.out))  # the merged float32 export
    system = run_recipe(smollm2_run["run"]).data.system_prompt
    expected = generate_answers(model, tokenizer, QUESTIONS, system, NEW_TOKENS, batch_size=1)
    engine = LlamaCppEngine({"tuned": export.gguf}, tokenizer)
    got = []
    for question in QUESTIONS:
        ids = conversation_ids(tokenizer, [{"role": "user", "content": question}], system)
        job = Job("tuned", ids, Sampling(max_new_tokens=NEW_TOKENS), sink=lambda event: None)
        engine.run_batch([job])
        got.append(job.text)
    assert got == expected


def test_llama_cpp_logprobs_are_the_models_on_both_engines(smollm2_run: dict[str, Any]) -> None:
    """`logprobs` on llama.cpp: each answer token's log-probability is the float model's (the f32
    GGUF against the merged model's teacher-forced log-softmax), the likeliest alternative first;
    the continuous engine reports the same values as the one-request engine."""
    import torch

    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.models import load_model
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.llama_cpp_continuous import LlamaCppContinuous
    from medlora.serve.prompt import conversation_ids

    export = smollm2_run["export"]
    model, tokenizer = load_model(str(export.out))  # the merged float32 export
    ids = conversation_ids(tokenizer, [{"role": "user", "content": QUESTIONS[0]}], None)

    def job(model_name: str) -> Job:
        sampling = Sampling(max_new_tokens=8, top_logprobs=3)
        return Job(model_name, ids, sampling, sink=lambda event: None)

    alone = job("tuned")
    LlamaCppEngine({"tuned": export.gguf}, tokenizer).run_batch([alone])
    tokens = [entry.token_id for entry in alone.logprobs]
    assert tokens == alone.completion_ids and len(tokens) == 8
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, entry in enumerate(alone.logprobs):
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=0.05)
        assert entry.top[0][0] == entry.token_id  # greedy: the likeliest token is the one taken
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]

    loras = {"tuned": cached_gguf_lora(smollm2_run["run"], SMOLLM2_ALIAS)}
    base = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    single, batched = job("tuned"), job("tuned")
    LlamaCppEngine.with_loras(base, loras, tokenizer, threads=2).run_batch([single])
    LlamaCppContinuous(base, loras, tokenizer, threads=2).run_batch([batched])
    assert batched.logprobs == single.logprobs and single.logprobs


def test_q4_0_export_is_smaller_and_still_answers(
    tmp_path: Path, smollm2_run: dict[str, Any]
) -> None:
    from medlora.models import load_model
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.prompt import conversation_ids

    q4 = export_run(smollm2_run["run"], tmp_path / "q4", fmt="gguf", gguf_type="q4_0")
    assert q4.gguf is not None and q4.gguf.read_bytes()[:4] == b"GGUF"
    assert q4.gguf.stat().st_size < smollm2_run["export"].gguf.stat().st_size / 4  # vs f32
    assert not list(tmp_path.glob("q4/*.tmp"))
    _, tokenizer = load_model(str(q4.out))
    engine = LlamaCppEngine({"q4": q4.gguf}, tokenizer, threads=1)
    ids = conversation_ids(tokenizer, [{"role": "user", "content": QUESTIONS[0]}], None)
    job = Job("q4", ids, Sampling(max_new_tokens=NEW_TOKENS), sink=lambda event: None)
    engine.run_batch([job])
    assert job.text.strip() and job.finish_reason in ("stop", "length")


def test_server_on_llama_cpp_side_by_side(smollm2_run: dict[str, Any]) -> None:
    import httpx

    from medlora.serve.app import create_app
    from medlora.serve.loader import build_engine

    served = build_engine(SMOLLM2_ALIAS, smollm2_run["run"], engine="llama.cpp")
    assert served.engine.name == "llama.cpp" and set(served.models) == {"run", SMOLLM2_ALIAS}
    with ServerThread(create_app(served)) as server:
        answers = {}
        for name in served.models:
            reply = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={
                    "model": name,
                    "messages": [{"role": "user", "content": QUESTIONS[0]}],
                    "max_tokens": 16,
                },
                timeout=120,
            )
            assert reply.status_code == 200
            answers[name] = reply.json()["choices"][0]["message"]["content"]
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "run",
                "messages": [{"role": "user", "content": QUESTIONS[0]}],
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 2,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        content = reply.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 4 and all(len(entry["top_logprobs"]) == 2 for entry in content)
    assert answers["run"] != answers[SMOLLM2_ALIAS]  # base (original Q4_1 GGUF) vs fine-tuned


def test_gguf_answer_loss_equals_the_float_models_and_quantizing_raises_it(
    tmp_path: Path, smollm2_run: dict[str, Any]
) -> None:
    """The f32 GGUF under llama.cpp scores the same answer loss as the merged float32 model under
    torch (same ids, same positions); q4_K_M, a 4-bit type, scores a different (higher) one."""
    from medlora.data.format import format_records
    from medlora.evaluate.gguf_loss import gguf_answer_loss
    from medlora.evaluate.loss import score_examples
    from medlora.models import load_model

    export = smollm2_run["export"]
    model, tokenizer = load_model(str(export.out))
    examples, _ = format_records(tokenizer, tiny_records()[:4], "Answer briefly.", 256)
    torch_loss = score_examples(model, examples, tokenizer.pad_token_id)["loss"]
    f32 = gguf_answer_loss(export.gguf, examples, threads=2)
    assert f32["answer_tokens"] == sum(example.answer_tokens for example in examples)
    assert f32["loss"] == pytest.approx(torch_loss, rel=2e-3)
    q4 = export_run(smollm2_run["run"], tmp_path / "q4k", fmt="gguf", gguf_type="q4_K_M")
    assert q4.gguf is not None
    assert gguf_answer_loss(q4.gguf, examples, threads=2)["loss"] > torch_loss * 1.002


def test_one_base_gguf_with_gguf_loras_answers_like_transformers_per_request(
    smollm2_run: dict[str, Any],
) -> None:
    """The default llama.cpp serving: one f32 base GGUF, the adapter as a GGUF LoRA switched on and
    off per request. Tuned and base greedy answers equal transformers' (merged model, and the base)
    in an interleaved order, so switching leaves nothing behind."""
    from medlora.evaluate.heldout import run_recipe
    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.models import load_model
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.prompt import conversation_ids

    run, export = smollm2_run["run"], smollm2_run["export"]
    tuned_model, tokenizer = load_model(str(export.out))
    base_model, _ = load_model(SMOLLM2_ALIAS)
    system = run_recipe(run).data.system_prompt
    expected = {
        "tuned": generate_answers(tuned_model, tokenizer, QUESTIONS, system, NEW_TOKENS, 1),
        "base": generate_answers(base_model, tokenizer, QUESTIONS, system, NEW_TOKENS, 1),
    }
    assert expected["tuned"] != expected["base"]
    lora = cached_gguf_lora(run, SMOLLM2_ALIAS)
    assert lora.read_bytes()[:4] == b"GGUF" and lora.stat().st_size < 20 * 2**20
    base = base_gguf(SMOLLM2_ALIAS, "f32", shipped=False)
    engine = LlamaCppEngine.with_loras(base, {"tuned": lora, "base": None}, tokenizer, threads=2)
    got: dict[str, list[str]] = {"tuned": [], "base": []}
    for question in QUESTIONS:
        for name in ("tuned", "base"):
            ids = conversation_ids(tokenizer, [{"role": "user", "content": question}], system)
            job = Job(name, ids, Sampling(max_new_tokens=NEW_TOKENS), sink=lambda event: None)
            engine.run_batch([job])
            got[name].append(job.text)
    assert got == expected


def test_hot_load_and_unload_on_llama_cpp_loras(
    tmp_path: Path, smollm2_run: dict[str, Any]
) -> None:
    """vLLM's load/unload routes on the llama.cpp engine: the folder is checked and converted to a
    GGUF LoRA, then switched in between requests; a request in flight finishes with the answer it
    gets alone; each bad folder is a clean 4xx and the server keeps serving."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_support import foreign_adapter, variant_adapter

    from medlora.evaluate.heldout import run_recipe
    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.serve.app import Limits, create_app
    from medlora.serve.engine import Job, Sampling
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.loader import build_engine
    from medlora.serve.prompt import conversation_ids

    run = smollm2_run["run"]
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    second = variant_adapter(run, store / "second", seed=1)
    foreign_adapter(run, store / "foreign")
    variant_adapter(run, outside / "elsewhere", seed=2)
    os.symlink(outside / "elsewhere", store / "sneaky")
    (store / "notes").mkdir()
    (store / "notes" / "readme.txt").write_text("not an adapter")

    # What "second" must answer: an engine that had it from the start (same f32 base GGUF).
    served = build_engine(SMOLLM2_ALIAS, run, engine="llama.cpp", gguf_type="f32")
    tokenizer = served.tokenizer
    system = run_recipe(run).data.system_prompt
    ids = conversation_ids(tokenizer, [{"role": "user", "content": QUESTIONS[1]}], system)
    reference = LlamaCppEngine.with_loras(
        base_gguf(SMOLLM2_ALIAS, "f32", shipped=False),
        {"second": cached_gguf_lora(second, SMOLLM2_ALIAS)},
        tokenizer,
        threads=2,
    )
    expected = Job("second", ids, Sampling(max_new_tokens=NEW_TOKENS), sink=lambda event: None)
    reference.run_batch([expected])

    key = {"Authorization": "Bearer k"}
    limits = Limits(api_key="k", allow_adapter_updates=True, adapter_root=store)

    def ask(model: str, tokens: int = NEW_TOKENS) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[1]}]}
        body["max_tokens"] = tokens
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=key, timeout=300)

    def load(name: str, path: str | Path) -> httpx.Response:
        body = {"lora_name": name, "lora_path": str(path)}
        return httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=key, timeout=300)

    with ServerThread(create_app(served, limits)) as server:
        url = server.url
        alone = ask("run", 64).json()["choices"][0]["message"]["content"]
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(ask, "run", 64)
            loaded = load("second", "second")
            assert loaded.status_code == 200, loaded.text
            assert in_flight.result().json()["choices"][0]["message"]["content"] == alone
        models = httpx.get(f"{url}/v1/models", headers=key).json()["data"]
        assert {m["id"]: m["parent"] for m in models}["second"] == SMOLLM2_ALIAS
        answer = ask("second").json()["choices"][0]["message"]["content"]
        assert answer.startswith(expected.text) and expected.text
        cases = {
            "outside the root": (load("x1", outside / "elsewhere"), 403, "path_not_allowed"),
            "symlink escape": (load("x2", "sneaky"), 403, "path_not_allowed"),
            "missing folder": (load("x3", "no-such-run"), 404, "adapter_not_found"),
            "not an adapter": (load("x4", "notes"), 400, "not_an_adapter"),
            "another base": (load("x5", "foreign"), 400, "incompatible_adapter"),
        }
        for what, (reply, status, code) in cases.items():
            assert reply.status_code == status, (what, reply.text)
            assert reply.json()["error"]["code"] == code, what
        unloaded = httpx.post(
            f"{url}/v1/unload_lora_adapter", json={"lora_name": "second"}, headers=key, timeout=60
        )
        assert unloaded.status_code == 200
        assert ask("second").status_code == 404
        assert ask("run", 64).json()["choices"][0]["message"]["content"] == alone


@pytest.mark.parametrize(
    "repetition",
    [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}],
    ids=["greedy", "greedy-with-repetition-control"],
)
def test_continuous_llama_cpp_mixes_adapters_and_answers_as_the_one_request_engine(
    smollm2_run: dict[str, Any], repetition: dict[str, Any]
) -> None:
    """Continuous batching on llama.cpp: tuned and base requests join and leave one running batch
    (each model its own context on the one base); a short request finishes while long ones still
    run. Every greedy answer equals the one-request engine's: q8_0's integer dot products, the GGUF
    LoRA's padded rank (export/lora_pad.py) and a finished row's cells kept until its context is
    idle (serve/llama_cpp_continuous.py) keep each row's logits the same as alone. With a run's
    repetition settings too: both engines pick by transformers' rules (serve/token_rules.py), where
    the one-request engine once used llama.cpp's sampler and answered otherwise."""
    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.models import load_tokenizer
    from medlora.serve.engine import Job
    from medlora.serve.llama_cpp import LlamaCppEngine
    from medlora.serve.llama_cpp_continuous import LlamaCppContinuous

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    loras = {"tuned": cached_gguf_lora(smollm2_run["run"], SMOLLM2_ALIAS), "base": None}
    base = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    questions = [*QUESTIONS, "What causes anemia?"]
    plan = [(q, m, 4 if i == 2 else NEW_TOKENS) for i, (q, m) in
            enumerate((q, m) for q in questions for m in ("tuned", "base"))]  # fmt: skip

    def jobs() -> list[Job]:
        return planned_jobs(tokenizer, plan, **repetition)

    single = LlamaCppEngine.with_loras(base, loras, tokenizer, threads=2)
    expected = []
    for job in jobs():
        single.run_batch([job])
        expected.append(job.completion_ids)
    engine = LlamaCppContinuous(base, loras, tokenizer, threads=2, max_batch=4)
    running = jobs()
    for job in running[:3]:
        engine.admit(job)
    engine.step()
    for job in running[3:]:  # they join while the first ones run
        engine.admit(job)
    short = running[2]
    while short.finish_reason is None:
        engine.step()
    assert any(job.finish_reason is None for job in running)  # long ones still running
    while engine.active:
        engine.step()
    for job, alone in zip(running, expected, strict=True):
        assert job.finish_reason in ("stop", "length") and job.text
        assert job.completion_ids == alone
    assert expected[0] != expected[1]  # the adapter changes the answer


def test_continuous_llama_cpp_answers_long_requests_as_alone(smollm2_run: dict[str, Any]) -> None:
    """Prompts of 64+ tokens prefilled beside other rows' cells, and rows whose prompt + answer
    pass 256 cells, left alone or beside retired cells: llama.cpp's attention would take its tiled
    or split kernels, which sum unlike the plain one. Each greedy answer, and the logits of each of
    its tokens bit for bit (read through the engine's `_take`), equals the same request's alone."""
    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.models import load_tokenizer
    from medlora.serve.engine import Job
    from medlora.serve.llama_cpp_continuous import SPLIT_ATTENTION_CELLS, LlamaCppContinuous

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    loras = {"tuned": cached_gguf_lora(smollm2_run["run"], SMOLLM2_ALIAS), "base": None}
    base = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    case = (
        "A 67-year-old woman has had swollen ankles, shortness of breath when lying flat and a "
        "dry cough at night for three weeks. She takes medicine for high blood pressure and type 2 "
        "diabetes, and she gained four pounds this week. "
    )
    long_question = case * 4 + "What could cause this, and which tests would a doctor order?"
    plan = [  # (question, model, max_new_tokens): short ones first, so long prompts join them
        (QUESTIONS[0], "tuned", 4), (QUESTIONS[1], "base", NEW_TOKENS),
        (long_question, "tuned", 64), (long_question, "base", 64), (QUESTIONS[0], "tuned", 48),
    ]  # fmt: skip

    def jobs() -> list[Job]:
        return planned_jobs(tokenizer, plan)

    engine = LlamaCppContinuous(base, loras, tokenizer, threads=2, max_batch=4)
    logits: dict[int, list[np.ndarray]] = {}  # per job, the logits each of its tokens came from
    take = engine._take

    def recording_take(row: Any, row_logits: np.ndarray) -> bool:
        logits.setdefault(id(row.job), []).append(np.array(row_logits))
        return take(row, row_logits)

    engine._take = recording_take  # type: ignore[method-assign]
    alone = jobs()
    for job in alone:
        engine.run_batch([job])
    for long in alone[2:4]:  # several prefill pieces; alone past 256 cells (the split kernel's)
        assert len(long.prompt_ids) > 3 * 63
        assert len(long.prompt_ids) + len(long.completion_ids) > SPLIT_ATTENTION_CELLS
    running = jobs()
    for job in running[:2]:
        engine.admit(job)
    engine.step()
    for job in running[2:]:  # prefilled beside the running rows' cells
        engine.admit(job)
    while engine.active:
        engine.step()
    for job, single in zip(running, alone, strict=True):
        assert job.finish_reason in ("stop", "length") and job.text
        assert job.completion_ids == single.completion_ids
        # bit for bit: a kernel that sums in another order shows here before it flips a token
        together, by_itself = logits[id(job)], logits[id(single)]
        assert len(together) == len(by_itself)
        assert all(np.array_equal(a, b) for a, b in zip(together, by_itself, strict=True))
