"""Answer-only scoring: equal to the model's own label loss, token-weighted, base vs adapter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_records, write_prepared

from medlora.data.format import format_records
from medlora.evaluate.heldout import EvalOptions, evaluate_heldout
from medlora.evaluate.loss import score_examples
from medlora.models import load_model


def test_score_matches_transformers_label_loss(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = format_records(tokenizer, tiny_records(1), "Be brief.", 512)
    scores = score_examples(model, examples, tokenizer.pad_token_id, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert scores["answer_tokens"] == count
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert len(scores["per_example_loss"]) == len(examples)


def test_chunked_head_gives_the_same_losses(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answer logits go through the head a few positions at a time (bounded memory), same numbers."""
    from medlora.evaluate import loss as loss_module

    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = format_records(tokenizer, tiny_records(2), "Be brief.", 512)
    whole = score_examples(model, examples, tokenizer.pad_token_id, batch_size=5)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)  # 3 rows
    chunked = score_examples(model, examples, tokenizer.pad_token_id, batch_size=5)
    assert chunked["per_example_loss"] == pytest.approx(whole["per_example_loss"], rel=1e-6)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_eval_with_compare_base_reports_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    from medlora.config import recipe_from_dict
    from medlora.train import train

    records = tiny_records(2)
    prepared = write_prepared(tmp_path / "prepared", records[:5], records[5:7], records[5:10])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            "train.lr=0.01",
            "train.epochs=8",
            "train.grad_accum=1",
            "train.batch_size=5",
            "lora.dropout=0",
        ],
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    options = EvalOptions(
        model=str(tiny_model_dir), data=str(prepared), adapter=tmp_path / "run", compare_base=True
    )
    result = evaluate_heldout(options)
    for key in ("loss", "perplexity", "examples", "answer_tokens", "base_loss", "base_perplexity"):
        assert getattr(result, key) is not None
    assert result.examples == 5 and result.per_example and len(result.per_example) == 5
    assert all(row.base_loss is not None for row in result.per_example)
    # The test questions repeat the training ones here, so the adapter must have learnt them.
    assert result.loss is not None and result.base_loss is not None
    assert result.loss < result.base_loss


def _tiny_transformed_head_model(kind: str) -> Any:
    """A random tiny model whose forward changes the logits after the head (nothing downloaded)."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    sizes = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    if kind == "gemma2":  # tanh soft-capping: logits = cap * tanh(logits / cap)
        config: Any = Gemma2Config(**sizes, head_dim=16, final_logit_softcapping=2.0)
        config._attn_implementation = "eager"
        model: Any = Gemma2ForCausalLM(config)
    elif kind == "granite":  # logits / logits_scaling
        model = GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=4.0))
    else:  # cohere: logits * logit_scale
        model = CohereForCausalLM(CohereConfig(**sizes, logit_scale=0.25))
    for param in model.parameters():  # large weights, so the head's transform matters
        param.data.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_score_keeps_the_models_logit_softcapping_and_scaling(kind: str) -> None:
    """Gemma 2 soft-caps its logits, Granite and Cohere scale them: the answer loss must be the
    model's own (its label loss), not cross-entropy of the bare head's output."""
    from medlora.data.format import Example

    model = _tiny_transformed_head_model(kind)
    generator = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((12, 5), (9, 3), (15, 8)):
        ids = torch.randint(1, 64, (n,), generator=generator).tolist()
        labels = [-100] * prompt + ids[prompt:]
        examples.append(Example(ids, labels, f"r{n}", "test"))
    scores = score_examples(model, examples, pad_token_id=0, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert scores["answer_tokens"] == count
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)


def _tiny_peft(tiny_model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The tiny model with a LoRA adapter whose B is not zero (so it changes the answers)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(str(tiny_model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model.to(dtype), config)
    for param in model.parameters():
        param.requires_grad_(False)  # loaded for evaluation, as load_with_adapter does
    return model.eval(), tokenizer


def test_merged_adapter_scores_like_the_adapter_and_restores_the_base(tiny_model_dir: Path) -> None:
    """The tuned pass runs with the LoRA weights folded in (faster): same losses as the adapter
    applied on the fly, and the base weights are back as they were afterwards."""
    from medlora.evaluate.generate import adapter_merged
    from medlora.evaluate.heldout import score_model

    model, tokenizer = _tiny_peft(tiny_model_dir)
    examples, _ = format_records(tokenizer, tiny_records(2), "Be brief.", 512)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    unmerged = score_examples(model, examples, tokenizer.pad_token_id, 4)
    with adapter_merged(model):
        assert all(m.merged for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    scores = score_model(model, tokenizer, examples, 4, compare_base=True)
    assert scores["loss"] == pytest.approx(unmerged["loss"], rel=1e-5)
    assert scores["per_example_loss"] == pytest.approx(unmerged["per_example_loss"], rel=1e-5)
    assert scores["base_loss"] != pytest.approx(scores["loss"], rel=1e-3)  # the adapter matters
    assert not any(m.merged for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6)


def test_bf16_or_trainable_adapters_are_never_merged(tiny_model_dir: Path) -> None:
    """Unmerging bf16 weights would move the base by a bf16 step; a trained adapter keeps changing."""
    from medlora.evaluate.generate import adapter_merged

    model, _ = _tiny_peft(tiny_model_dir, torch.bfloat16)
    with adapter_merged(model):
        assert not any(m.merged for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    model, _ = _tiny_peft(tiny_model_dir)
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(True)
    with adapter_merged(model):
        assert not any(m.merged for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)


def test_cpu_batches_hold_a_token_budget(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU a scoring batch stops at CPU_BATCH_TOKENS padded tokens; the losses do not move."""
    from medlora.evaluate import loss as loss_module

    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = format_records(tokenizer, tiny_records(3), "Be brief.", 512)
    whole = score_examples(model, examples, tokenizer.pad_token_id, batch_size=64)
    longest = max(len(e.input_ids) for e in examples)
    monkeypatch.setattr(loss_module, "CPU_BATCH_TOKENS", 2 * longest)
    seen: list[int] = []
    forward = loss_module.answer_token_losses
    monkeypatch.setattr(
        loss_module,
        "answer_token_losses",
        lambda m, batch: seen.append(batch["input_ids"].numel()) or forward(m, batch),
    )
    capped = score_examples(model, examples, tokenizer.pad_token_id, batch_size=64)
    assert max(seen) <= 2 * longest and len(seen) >= len(examples) // 2
    assert capped["per_example_loss"] == pytest.approx(whole["per_example_loss"], rel=1e-5)


def test_bf16_scoring_is_close_to_fp32_and_auto_follows_the_machine(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.precision bf16 runs the matmuls in bf16 (faster on AMX CPUs): a different number, close
    to fp32's; auto is fp32 on a CPU without native bf16."""
    from medlora import machine
    from medlora.evaluate.loss import scoring_dtype

    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = format_records(tokenizer, tiny_records(2), "Be brief.", 512)
    fp32 = score_examples(model, examples, tokenizer.pad_token_id, 4)
    bf16 = score_examples(model, examples, tokenizer.pad_token_id, 4, precision="bf16")
    assert bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2)
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    assert scoring_dtype("auto", "cpu") is None
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert scoring_dtype("auto", "cpu") == torch.bfloat16
