"""The training loss: answer tokens only, and the fused head+loss path gives the same loss and the
same gradients as materialising the logits, with LoRA or full weights, in one chunk or many."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import lora_on_q_v, tiny_records

from medlora.data.format import format_records
from medlora.data.pack import collate_packed, pack_rows
from medlora.models import load_model
from medlora.train.kernels import answer_head
from medlora.train.kernels.answer_head import answer_loss_sum, output_head


def _packed_batch(tokenizer: Any) -> dict[str, Any]:
    examples, _ = format_records(tokenizer, tiny_records(2), None, 128)
    return collate_packed(pack_rows(examples, budget=4096))


def _loss_and_grads(
    model: Any, batch: dict[str, Any], fused: bool, unlikelihood: float = 0.0
) -> tuple[float, dict[str, Any]]:
    model.zero_grad()
    total, _, _ = answer_loss_sum(model, batch, fused=fused, unlikelihood=unlikelihood)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), grads


@pytest.mark.parametrize("unlikelihood", [0.0, 0.7])
@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_fused_head_loss_equals_materialised_logits(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    adapter: str,
    chunk_rows: int | None,
    unlikelihood: float,
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the LoRA A gradients are not all zero
                param.data.normal_(0, 0.1)
    if chunk_rows is not None:  # several chunks, some of them holding no answer token at all
        monkeypatch.setattr(answer_head, "CHUNK_ELEMENTS", chunk_rows * model.config.vocab_size)
    model.train()  # the tiny Llama has no dropout: both passes see the same function
    batch = _packed_batch(tokenizer)
    assert output_head(model) is not None

    plain_loss, plain_grads = _loss_and_grads(model, batch, False, unlikelihood)
    fused_loss, fused_grads = _loss_and_grads(model, batch, True, unlikelihood)
    if unlikelihood:  # the answers repeat tokens: the term is there, on both paths
        assert plain_loss > _loss_and_grads(model, batch, False)[0] + 1.0

    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    if adapter == "full":  # the tied embedding/head weight gets the head's gradient too
        assert any("embed_tokens" in name for name in fused_grads)
    for name, grad in plain_grads.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5 * scale)


def test_the_head_is_back_after_the_fused_call(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    model.train()
    batch = _packed_batch(tokenizer)
    head = model.get_output_embeddings()
    _, _, outputs = answer_loss_sum(model, batch)  # training: fused by default
    assert outputs.logits.shape[-1] == model.config.hidden_size
    assert model.get_output_embeddings() is head
    logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_heads_that_cannot_be_fused_keep_the_logits_path(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    model.config.model_type = "granite"  # divides its logits after the head: not allow-listed
    assert output_head(model) is None
    model.config.model_type = "llama"
    assert output_head(torch.compile(model)) is None  # compiled graphs keep their modules
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert output_head(model) is None
    model.train()
    _, _, outputs = answer_loss_sum(model, _packed_batch(tokenizer))
    assert outputs.logits.shape[-1] == model.config.vocab_size


def test_fused_head_loss_under_bf16_autocast(tiny_model_dir: Path) -> None:
    """The mixed-precision path GPUs take (bf16 matmuls, float32 softmax), here on CPU."""
    model, tokenizer = load_model(str(tiny_model_dir))
    model = lora_on_q_v(model)
    model.train()
    batch = _packed_batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = _loss_and_grads(model, batch, fused=False)
        fused_loss, fused_grads = _loss_and_grads(model, batch, fused=True)
    assert fused_loss == pytest.approx(plain_loss, rel=2e-2)
    for name, grad in plain_grads.items():
        cosine = torch.nn.functional.cosine_similarity(
            grad.flatten(), fused_grads[name].flatten(), 0
        )
        assert float(cosine) > 0.99, name


@pytest.mark.parametrize("unlikelihood", [0.0, 0.7])
def test_fused_head_with_bf16_weights_on_cpu_equals_float32(
    tiny_model_dir: Path, unlikelihood: float
) -> None:
    """CPU bf16 training holds the frozen head in bf16; the head pads the answer count to a
    multiple of 64 (fewer matmul shapes): same loss, and gradients for the real rows only."""
    model, _ = load_model(str(tiny_model_dir))
    weight = model.get_output_embeddings().weight.detach()
    torch.manual_seed(0)
    hidden = torch.randn(37, weight.shape[1])  # not a multiple of 64
    targets = torch.randint(0, 12, (37,))  # few distinct tokens: unlikelihood has candidates
    targets[::5] = -100
    ids, mask = answer_head.unlikelihood_candidates(targets[None], torch.arange(37))
    assert int(mask.sum()) > 10
    fused = answer_head._head_cross_entropy()
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.clone().requires_grad_()
        loss = fused.apply(h, weight.to(dtype), targets, ids, mask, unlikelihood)
        loss.backward()
        results.append((float(loss.detach()), h.grad))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert grad16.shape == grad32.shape
    assert (
        float(torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), 0)) > 0.99
    )


# --- unlikelihood -------------------------------------------------------------------------------


def test_unlikelihood_penalises_tokens_the_same_answer_already_wrote() -> None:
    import math

    from medlora.train.kernels.answer_head import unlikelihood_sum

    # One packed row: answer A at positions 3-5 (tokens 1 2 1), a prompt, answer B at 9-10 (1 3).
    keep = torch.tensor([3, 4, 5, 9, 10])
    targets = torch.tensor([[1, 2, 1, 1, 3]])
    logits = torch.zeros(1, 5, 10, requires_grad=True)  # uniform: every p = 0.1
    total = unlikelihood_sum(torch.log_softmax(logits, dim=-1), targets, keep)
    # Candidates: A's 2nd token {1}; A's 3rd token {2} (1 is its own target); B's 1st token none
    # (A's tokens belong to another answer); B's 2nd token {1}.
    assert float(total) == pytest.approx(-3 * math.log(0.9), rel=1e-5)
    total.backward()
    assert logits.grad is not None
    grad = logits.grad[0]
    assert grad[1, 1] > 0 and grad[2, 2] > 0 and grad[4, 1] > 0  # pushed down
    assert torch.all(grad[0] == 0) and torch.all(grad[3] == 0)  # nothing earlier to repeat
    # A row position that is not an answer in this row (-100) takes no part.
    masked = torch.tensor([[1, 2, -100, 1, 3]])
    assert float(unlikelihood_sum(torch.log_softmax(logits, -1), masked, keep)) == pytest.approx(
        -2 * math.log(0.9)
    )


def test_unlikelihood_adds_to_the_answer_loss(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    batch = _packed_batch(tokenizer)
    plain, count, _ = answer_loss_sum(model, batch, fused=False)
    tiny, _, _ = answer_loss_sum(model, batch, unlikelihood=1e-9)
    with_ul, same_count, _ = answer_loss_sum(model, batch, unlikelihood=0.5)
    assert float(tiny) == pytest.approx(float(plain), rel=1e-5)  # the same cross-entropy
    assert same_count == count and float(with_ul) > float(plain)


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_training_loss_keeps_the_models_logit_softcapping_and_scaling(kind: str) -> None:
    """The training objective (fused head or not) is the model's own label loss for models whose
    forward soft-caps or scales the logits: such heads are never fused."""
    from test_evaluate_loss import _tiny_transformed_head_model

    model = _tiny_transformed_head_model(kind)
    ids = torch.randint(1, 64, (1, 14), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert output_head(model) is None
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=labels).loss)
        for fused in (None, True, False):
            loss_sum, count, _ = answer_loss_sum(model, batch, fused=fused)
            assert float(loss_sum) / count == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_scratch_stays_at_256_rows_for_any_number_of_answer_tokens(
    dtype: torch.dtype,
) -> None:
    # The float32 logits scratch is kept between steps: with 682-row chunks it held 128 MiB on
    # SmolLM2's vocabulary; 256-row chunks hold 48 MiB and ran faster in bf16.
    torch.manual_seed(0)
    answer_head._CPU_BUFFER.clear()
    weight = (torch.randn(500, 32) * 0.3).to(dtype)
    hidden = torch.randn(600, 32).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (600,))
    targets[::7] = -100
    total = answer_head._head_cross_entropy().apply(hidden, weight, targets)
    total.backward()
    expected_hidden = hidden.detach().float().requires_grad_()
    expected = torch.nn.functional.cross_entropy(
        expected_hidden @ weight.float().t(), targets, ignore_index=-100, reduction="sum"
    )
    expected.backward()
    assert answer_head._CPU_BUFFER["logits"].shape[0] <= answer_head.CPU_CHUNK_ROWS == 256
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(total.float(), expected.detach(), **tolerance)
    torch.testing.assert_close(hidden.grad.float(), expected_hidden.grad, **tolerance)
