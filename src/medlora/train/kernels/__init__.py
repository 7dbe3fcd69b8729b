"""Which training kernels a run gets (`train.kernels`), in one place for SFT and preference tuning.

- `stock`: none. transformers + PEFT + the Trainer as a hand-written script would run them, the
  model's own `labels=` loss: the reference every other setting is measured against.
- `medlora` (default): on a CPU the packed-row attention, the frozen-weight RMSNorm, the SiLU-gated
  MLP and the LoRA-dropout rewrite; everywhere the fused answer head (answer_head.py). Each is a
  patch of medlora.patches: outside its tested library versions it is skipped with one warning.
- `liger`: liger-kernel's RMSNorm, RoPE and SwiGLU and its fused head, on a CUDA GPU.
"""

from __future__ import annotations

from typing import Any


def use_kernels_before_lora(model: Any, kernels: str, *, packed_attention: bool) -> list[str]:
    """Kernels that go on the base model (before PEFT wraps it); returns the names applied."""
    import torch

    applied = []
    if kernels == "liger":
        from medlora.train.kernels.liger import use_liger_kernels

        use_liger_kernels(model, "cuda")  # RMSNorm, RoPE, SwiGLU; the head in answer_head
        applied.append("liger")
    if kernels == "medlora" and packed_attention and not torch.cuda.is_available():
        # CPU: per-example causal SDPA beats sdpa's row-wide block mask. On GPUs the masked kernel
        # measured faster (many small per-example launches; docs/benchmarks.md `gpu`). CPU bf16:
        # its attention backward runs in float32 (packed_attention._needs_float32).
        from medlora.train.kernels.packed_attention import use_packed_attention

        if use_packed_attention(model):
            applied.append("packed_attention")
    return applied


def use_kernels_after_lora(model: Any, kernels: str, *, lora_dropout: bool) -> list[str]:
    """CPU kernels that go on the PEFT model; returns the names applied (with a module count)."""
    import torch

    if kernels != "medlora" or torch.cuda.is_available():
        return []
    from medlora.train.kernels.lora_dropout import use_fast_lora_dropout
    from medlora.train.kernels.rms_norm import use_fast_rms_norm
    from medlora.train.kernels.swiglu import use_silu_mul

    counts = {}
    if lora_dropout:  # CPU: torch's per-element Bernoulli draws are the slow part
        counts["lora_dropout"] = use_fast_lora_dropout(model)
    counts["rms_norm"] = use_fast_rms_norm(model)  # a frozen-weight norm in 3 + 4 passes, not ~18
    counts["silu_mul"] = use_silu_mul(model)  # the gated MLP saves 2 of its 3 wide tensors
    return [f"{name} ({count} modules)" for name, count in counts.items() if count]
