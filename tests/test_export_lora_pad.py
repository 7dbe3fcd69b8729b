"""The GGUF LoRA's padded rank: the same update in PEFT, and batch-invariant logits in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlora.export.lora_pad import pad_lora_rank, padded_rank


def _adapter(folder: Path, base: object, r: int, seed: int = 0) -> object:
    """A LoRA on every linear layer of `base` with random A and B (B = 0 would hide a wrong pad)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    return model


def test_padded_rank_leaves_ranks_off_multiples_of_4_alone() -> None:
    assert [padded_rank(r) for r in (1, 2, 3, 4, 5, 8, 16, 64)] == [1, 2, 3, 5, 5, 9, 17, 65]


def test_a_padded_adapter_gives_the_same_logits_with_rank_r_plus_1(
    tmp_path: Path, tiny_tokenizer: object
) -> None:
    import torch
    from conftest import build_tiny_llama
    from peft import PeftModel

    tuned = _adapter(tmp_path / "r8", build_tiny_llama(len(tiny_tokenizer)), r=8)  # type: ignore[arg-type]
    assert pad_lora_rank(tmp_path / "r8", tmp_path / "padded")
    assert json.loads((tmp_path / "padded" / "adapter_config.json").read_text())["r"] == 9
    padded = PeftModel.from_pretrained(
        build_tiny_llama(len(tiny_tokenizer)),  # type: ignore[arg-type]
        tmp_path / "padded",
    )
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))  # type: ignore[arg-type]
    with torch.no_grad():
        want, got = tuned(input_ids=ids).logits, padded(input_ids=ids).logits  # type: ignore[operator]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the adapter does change the model: equal logits are not trivially so
        plain = build_tiny_llama(len(tiny_tokenizer))(input_ids=ids).logits  # type: ignore[arg-type, operator]
    assert not torch.allclose(plain, got, atol=1e-3)


def test_a_rank_that_needs_no_pad_is_left_as_it_is(tmp_path: Path, tiny_tokenizer: object) -> None:
    from conftest import build_tiny_llama

    _adapter(tmp_path / "r3", build_tiny_llama(len(tiny_tokenizer)), r=3)  # type: ignore[arg-type]
    assert not pad_lora_rank(tmp_path / "r3", tmp_path / "padded")
    assert not (tmp_path / "padded").exists()


@pytest.mark.slow
def test_llama_cpp_gives_a_row_the_same_logits_alone_and_beside_others(
    tmp_path: Path, smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Teacher-forced decoding of 8 prompts on a q8_0 base with the adapter as a GGUF LoRA: each
    row's logits, decoded alone and in one batch of 8, are bit-identical with the padded rank;
    the unpadded rank-4 GGUF of the same adapter is the control that differs (llama.cpp's float
    GEMM for batches, its dot product for one row)."""
    from medlora.export import gguf as gguf_module
    from medlora.export.gguf import base_gguf, convert_lora_to_gguf, llama_cpp_tools_dir
    from medlora.models import SMOLLM2_ALIAS, load_model, local_folder
    from medlora.serve.llama_cpp import llama_cpp_available

    tools = llama_cpp_tools_dir()
    if not llama_cpp_available() or not (tools / "convert_lora_to_gguf.py").is_file():
        pytest.skip("llama-cpp-python or llama.cpp's converter not installed (make fast)")
    monkeypatch.setenv("MEDLORA_LLAMA_CPP_DIR", str(tools))  # before the cache moves
    monkeypatch.setenv("MEDLORA_CACHE", str(smollm2_cache))
    base, tokenizer = load_model(SMOLLM2_ALIAS)
    _adapter(tmp_path / "adapter", base, r=4)
    folder = Path(local_folder(SMOLLM2_ALIAS))
    padded = convert_lora_to_gguf(tmp_path / "adapter", folder, tmp_path / "padded.gguf")
    monkeypatch.setattr(gguf_module, "pad_lora_rank", lambda *_: False)  # the control
    plain = convert_lora_to_gguf(tmp_path / "adapter", folder, tmp_path / "plain.gguf")
    gguf = base_gguf(SMOLLM2_ALIAS, "q8_0", shipped=False)
    questions = ["What causes anemia?", "How is asthma treated?", "What is a stroke?",
                 "Who gets gout?", "What are the signs of sepsis?", "Is flu contagious?",
                 "How is diabetes diagnosed?", "What does the liver do?"]  # fmt: skip
    prompts = [tokenizer.encode(q) for q in questions]
    assert _rows_differing(gguf, padded, prompts) == 0
    assert _rows_differing(gguf, plain, prompts) > 0


def _rows_differing(base: Path, lora: Path, prompts: list[list[int]], steps: int = 24) -> int:
    """How many rows' logits differ bitwise between decoding alone and decoding together."""
    import llama_cpp
    import numpy as np

    from medlora.serve.llama_cpp import load_lora, set_lora

    model = llama_cpp.llama_model_load_from_file(
        str(base).encode(), llama_cpp.llama_model_default_params()
    )
    adapter = load_lora(model, lora)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def context() -> object:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 2048, 512, 512
        params.n_seq_max = params.n_outputs_max = len(prompts)
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type, params.kv_unified = 1, True
        ctx = llama_cpp.llama_init_from_model(model, params)
        set_lora(ctx, adapter)
        return ctx

    def decode(ctx: object, items: list[tuple[int, int, int]], last_only: bool) -> list[np.ndarray]:
        batch.n_tokens = len(items)
        for i, (token, position, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = not last_only or i == len(items) - 1
        assert llama_cpp.llama_decode(ctx, batch) == 0
        rows = [len(items) - 1] if last_only else range(len(items))
        return [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
            for i in rows
        ]

    try:
        alone = []  # (greedy tokens, logits per step) of each prompt decoded by itself
        for prompt in prompts:
            ctx = context()
            logits = decode(ctx, [(t, i, 0) for i, t in enumerate(prompt)], True)
            tokens = []
            for step in range(steps):
                tokens.append(int(np.argmax(logits[-1])))
                logits += decode(ctx, [(tokens[-1], len(prompt) + step, 0)], True)
            alone.append((tokens, logits))
            llama_cpp.llama_free(ctx)
        ctx = context()
        together = [decode(ctx, [(t, i, k) for i, t in enumerate(p)], True) for k, p in
                    enumerate(prompts)]  # fmt: skip
        for step in range(steps):
            items = [(alone[k][0][step], len(p) + step, k) for k, p in enumerate(prompts)]
            for k, logits in enumerate(decode(ctx, items, False)):
                together[k].append(logits)
        llama_cpp.llama_free(ctx)
        return sum(
            any(not np.array_equal(a, b) for a, b in zip(alone[k][1], together[k], strict=True))
            for k in range(len(prompts))
        )
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_model_free(model)
