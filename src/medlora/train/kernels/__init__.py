"""Which training kernels a run gets (`train.kernels`), in one place for SFT and preference tuning.

- `stock`: none. transformers + PEFT + the Trainer as a hand-written script would run them, the
  model's own `labels=` loss: the reference every other setting is measured against.
- `medlora` (default): on a CPU the packed-row attention, the frozen-weight RMSNorm, the SiLU-gated
  MLP; everywhere the fused answer head (answer_head.py). Each is a
  patch of medlora.patches: outside its tested library versions it is skipped with one warning.
- `liger`: liger-kernel's RMSNorm, RoPE and SwiGLU and its fused head, on a CUDA GPU.

`planned_kernels` is the rule; `medlora env` reports it and the two `use_kernels_*` apply it.
"""

from __future__ import annotations

from typing import Any

BEFORE_LORA = ("packed_attention",)


def planned_kernels(
    kernels: str, *, packed_attention: bool, cuda: bool, attention: str | None
) -> list[str]:
    """The patches (medlora.patches names) a run with these settings asks for, in order.

    `packed_attention`: the run packs rows or trains in bf16 on a CPU; `attention`: the model's
    attention implementation (the packed kernel replaces sdpa only: eager and flash stay).
    """
    if kernels == "liger":
        return ["liger"]
    if kernels != "medlora":
        return []
    names = ["fused_answer_head"]
    if cuda:
        # On GPUs the masked kernel measured faster than per-example SDPA (docs/benchmarks.md `gpu`).
        return names
    if packed_attention and attention == "sdpa":
        names.append("packed_attention")  # per-example causal SDPA beats a row-wide block mask
    return [*names, "rms_norm", "silu_mul"]  # a cheaper norm; the gated MLP saves 2 of 3 tensors


def use_kernels_before_lora(model: Any, plan: list[str]) -> list[str]:
    """Apply the plan's kernels that go on the base model (before PEFT wraps it)."""
    applied = []
    if "liger" in plan:
        from medlora.train.kernels.liger import use_liger_kernels

        use_liger_kernels(model, "cuda")  # RMSNorm, RoPE, SwiGLU; the head in answer_head
        applied.append("liger")
    if "packed_attention" in plan:
        from medlora.train.kernels.packed_attention import use_packed_attention

        if use_packed_attention(model):
            applied.append("packed_attention")
    return applied


def use_kernels_after_lora(model: Any, plan: list[str]) -> list[str]:
    """Apply the plan's CPU kernels that go on the PEFT model; returns 'name (N modules)' each."""
    from medlora.train.kernels.rms_norm import use_fast_rms_norm
    from medlora.train.kernels.swiglu import use_silu_mul

    apply = {"rms_norm": use_fast_rms_norm, "silu_mul": use_silu_mul}
    counts = {name: apply[name](model) for name in plan if name in apply}
    return [f"{name} ({count} modules)" for name, count in counts.items() if count]


def run_kernels(recipe: Any, model: Any) -> list[str]:
    """`planned_kernels` for this recipe and (base) model."""
    import torch

    t = recipe.train
    return planned_kernels(
        t.kernels,
        packed_attention=getattr(t, "packing", False) or t.precision == "bf16",
        cuda=torch.cuda.is_available(),
        attention=getattr(model.config, "_attn_implementation", None),
    )
