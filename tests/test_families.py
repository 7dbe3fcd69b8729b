"""The family matrix: every family medlora trains (medlora.families, the README's list) is proven on a
tiny random model of its own architecture (tests/families.py; sliding windows shorter than the
examples, Gemma 2's soft-capping, Granite's scalings):
(a) a packed row's loss and LoRA gradients equal the same examples as separate rows, under the
    medlora and the stock kernels;
(b) through `medlora train`: four examples packed in one row give the first step's loss of the same
    four as one padded batch, and medlora vs stock kernels give the same losses over three steps;
(c) evaluation's answer loss is the model's own `labels=` loss;
(d) merge -> save -> reload gives the adapter model's logits;
(e) GGUF export and a llama.cpp forward close to the float model (or the reason it cannot run);
(f) `medlora serve` answers a chat request.
A family outside the list is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from families import WINDOW, build_tiny_family
from helpers import tiny_records, write_prepared

from medlora.config import recipe_from_dict
from medlora.data.format import format_records, pad_batch
from medlora.data.pack import collate_packed, pack_rows
from medlora.errors import ModelError
from medlora.evaluate.loss import score_examples
from medlora.families import FAMILIES, family_of
from medlora.models import load_model, load_with_adapter
from medlora.train import train
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.loop import build_model

FAMILY_TYPES = list(FAMILIES)
LORA = ["lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=all-linear"]
STEPS = [
    *LORA,
    "train.lr=0.01",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.warmup_ratio=0.0",
    "train.shuffle=false",
    "train.logging_steps=1",
    "data.max_val_examples=4",
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    """A save_pretrained folder (tiny model + tokenizer) per family: a valid `model.name`."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for model_type in FAMILY_TYPES:
        folder = root / model_type
        build_tiny_family(model_type, len(tiny_tokenizer)).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders[model_type] = folder
    return folders


def long_examples(tokenizer: Any) -> list[Any]:
    examples, _ = format_records(tokenizer, tiny_records(1), None, 128)
    assert min(len(e.input_ids) for e in examples) > WINDOW  # every example crosses the window
    return examples[:4]


def randomize_lora_b(model: Any) -> None:
    """LoRA B starts at 0, which leaves every A without a gradient: make both matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))


# --- (a) packing never crosses examples ---------------------------------------------------------


@pytest.mark.parametrize("kernels", ["medlora", "stock"])
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_packed_row_trains_exactly_like_separate_rows(
    model_type: str, kernels: str, family_dirs: dict[str, Path]
) -> None:
    spec = str(family_dirs[model_type])
    recipe = recipe_from_dict(
        {"model": {"name": spec}}, [*LORA, "train.packing=true", f"train.kernels={kernels}"]
    )
    model, tokenizer = build_model(recipe, load_model(spec))
    randomize_lora_b(model)
    model.train()  # the training kernels (dropout is 0: both passes see the same function)
    examples = long_examples(tokenizer)
    rows = pack_rows(examples, budget=4096)
    assert len(rows) == 1 and len(rows[0]["parts"]) == len(examples)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    packed, count, _ = answer_loss_sum(model, collate_packed(rows), kernels=kernels)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad()
    singles = [
        answer_loss_sum(model, pad_batch([e], tokenizer.pad_token_id), kernels=kernels)
        for e in examples
    ]
    separate = sum(s for s, _, _ in singles)
    separate.backward()

    assert count == sum(n for _, n, _ in singles)
    assert float(packed) == pytest.approx(float(separate), rel=1e-5)
    for name, param in lora.items():
        scale = float(param.grad.abs().max()) + 1e-12
        torch.testing.assert_close(
            packed_grads[name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=name
        )


# --- (b) through `medlora train` ----------------------------------------------------------------


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def family_runs(
    tmp_path_factory: pytest.TempPathFactory, family_dirs: dict[str, Path]
) -> dict[str, dict[str, Path]]:
    """Per family: 3 unpacked steps of 4 examples under medlora and stock kernels, and the first
    4 examples packed in one row (1 step) under each."""
    root = tmp_path_factory.mktemp("family-runs")
    records = tiny_records(3)
    twelve = write_prepared(root / "twelve", records[:12], records[12:15], records[12:15])
    four = write_prepared(root / "four", records[:4], records[12:15], records[12:15])
    runs: dict[str, dict[str, Path]] = {}
    for model_type, folder in family_dirs.items():
        runs[model_type] = {}
        for name, data, extra in (
            ("medlora", twelve, ["train.max_steps=3"]),
            ("stock", twelve, ["train.max_steps=3", "train.kernels=stock"]),
            ("packed", four, ["train.packing=true", "train.tokens_per_batch=4096"]),
            ("stock-packed", four, ["train.packing=true", "train.kernels=stock"]),
        ):
            out = root / model_type / name
            recipe = recipe_from_dict({"model": {"name": str(folder)}}, [*STEPS, *extra])
            train(recipe, out, prepared_dir=data)
            runs[model_type][name] = out
    return runs


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_train_packed_first_step_and_stock_kernels_give_the_same_losses(
    model_type: str, family_runs: dict[str, dict[str, Path]]
) -> None:
    runs = family_runs[model_type]
    medlora, stock = _losses(runs["medlora"]), _losses(runs["stock"])
    packed, stock_packed = _losses(runs["packed"]), _losses(runs["stock-packed"])
    assert len(medlora) == len(stock) == 3 and len(packed) == len(stock_packed) == 1
    # The first padded batch is the first four records (shuffle off): the packed row's four.
    assert packed[0] == pytest.approx(medlora[0], rel=1e-5)
    assert stock_packed[0] == pytest.approx(medlora[0], rel=1e-5)
    assert medlora == pytest.approx(stock, rel=1e-3)
    assert medlora[-1] < medlora[0]  # it trained


# --- (c) evaluation's loss ----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_evaluation_answer_loss_is_the_models_own_labels_loss(
    model_type: str, family_dirs: dict[str, Path], family_runs: dict[str, dict[str, Path]]
) -> None:
    model, tokenizer = load_with_adapter(
        str(family_dirs[model_type]), family_runs[model_type]["medlora"]
    )
    examples, _ = format_records(tokenizer, tiny_records(1), None, 128)
    scored = score_examples(model, examples, tokenizer.pad_token_id, batch_size=3)
    total = tokens = 0.0
    with torch.no_grad():
        for example in examples:
            batch = pad_batch([example], tokenizer.pad_token_id)
            loss = model(**batch).loss  # transformers' own shifted, -100-masked mean
            total += float(loss) * example.answer_tokens
            tokens += example.answer_tokens
    assert scored["answer_tokens"] == tokens
    assert scored["loss"] == pytest.approx(total / tokens, rel=1e-5)


# --- (d) merged export --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_merged_export_reloads_with_the_adapter_models_logits(
    model_type: str,
    family_dirs: dict[str, Path],
    family_runs: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from medlora.export.run import export_run

    run = family_runs[model_type]["medlora"]
    out = export_run(run, tmp_path / "merged", merge=True).out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, tokenizer = load_with_adapter(str(family_dirs[model_type]), run)
    base, _ = load_model(str(family_dirs[model_type]))
    ids = tokenizer("What causes anemia? Low iron or blood loss.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = adapted(ids).logits, merged(ids).logits
        untouched = base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untouched, expected, atol=1e-3)  # the adapter changes the logits


# --- (e) GGUF and llama.cpp ---------------------------------------------------------------------

# What llama.cpp's converter says when only the test model's tokenizer is the obstacle: a family
# whose vocabulary it reads from its own SentencePiece tokenizer.model, or a BPE tokenizer whose
# pre-tokenizer it does not know (transformers 5 rebuilds SmolLM2's as the family's own class).
TOKENIZER_KIND = ("tokenizer.model", "BPE pre-tokenizer was not recognized")


@pytest.fixture(scope="module")
def bpe_tokenizer(smollm2_cache: Path) -> Any:
    """SmolLM2's tokenizer: a BPE whose pre-tokenizer llama.cpp's converter recognises."""
    from medlora.models import SMOLLM2_ALIAS, load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLORA_CACHE", str(smollm2_cache))
        return load_tokenizer(SMOLLM2_ALIAS)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_gguf_export_runs_in_llama_cpp_like_the_float_model(
    model_type: str, bpe_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from medlora.export.common import ExportError
    from medlora.export.gguf import llama_cpp_tools_dir
    from medlora.export.run import export_run
    from medlora.serve.llama_cpp import llama_cpp_available

    tools = llama_cpp_tools_dir()
    if not llama_cpp_available() or not (tools / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama-cpp-python or llama.cpp's converter not installed (make fast)")
    monkeypatch.setenv("MEDLORA_LLAMA_CPP_DIR", str(tools))
    base = tmp_path / "base"
    build_tiny_family(model_type, len(bpe_tokenizer)).save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    records = tiny_records()
    prepared = write_prepared(tmp_path / "data", records[:8], records[8:10], records[8:10])
    recipe = recipe_from_dict(
        {"model": {"name": str(base)}}, [*STEPS, "train.max_steps=2", "data.max_val_examples=2"]
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    try:
        export = export_run(tmp_path / "run", tmp_path / "gguf", fmt="gguf", gguf_type="f32")
    except ExportError as error:
        if not any(kind in str(error) for kind in TOKENIZER_KIND):
            raise
        pytest.skip(
            f"{FAMILIES[model_type].name}: llama.cpp's converter wants the family's own tokenizer "
            f"kind, which the tiny test model lacks ({str(error).rsplit(': ', 1)[-1]}); the "
            "family is not refused for it"
        )
    assert export.gguf is not None and export.gguf.read_bytes()[:4] == b"GGUF"

    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    ids = bpe_tokenizer("What causes anemia? Low iron or blood loss.").input_ids
    merged = AutoModelForCausalLM.from_pretrained(export.out).eval()
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(str(export.gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) < 2e-3 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


# --- (f) serving --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_serve_answers_a_chat_request(
    model_type: str, family_dirs: dict[str, Path], family_runs: dict[str, dict[str, Path]]
) -> None:
    import httpx
    from serve_support import ServerThread

    from medlora.serve.app import create_app
    from medlora.serve.loader import build_engine

    served = build_engine(
        str(family_dirs[model_type]), family_runs[model_type]["medlora"], engine="transformers"
    )
    with ServerThread(create_app(served)) as server:
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": served.tuned,
                "messages": [{"role": "user", "content": "What causes anemia?"}],
                "max_tokens": 6,
                "temperature": 0,
            },
            timeout=60,
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["message"]["content"]


# --- a family outside the matrix ----------------------------------------------------------------


def test_a_family_outside_the_matrix_is_refused_in_one_line(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    from transformers import GPT2Config

    with pytest.raises(ModelError) as refused:
        family_of(GPT2Config())
    message = str(refused.value)
    assert "\n" not in message and "gpt2" in message
    assert all(family.name in message for family in FAMILIES.values())


def test_the_readme_lists_exactly_the_tested_families() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Model families", 1)[1].split("\n## ", 1)[0]
    listed = [line for line in section.splitlines() if line.startswith("| `")]
    assert sorted(line.split("`")[1] for line in listed) == sorted(FAMILIES)
