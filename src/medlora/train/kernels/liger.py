"""`train.kernels: liger`: liger-kernel's Triton kernels on CUDA, in place of medlora's own.

liger-kernel (LinkedIn, `pip install liger-kernel`) ships fused RMSNorm, RoPE and SwiGLU kernels
and a fused linear cross-entropy. With `train.kernels: liger` a CUDA run:
- patches the base model before LoRA is added, through liger's public per-family functions
  (`apply_liger_kernel_to_llama(model=...)` and its Mistral / Qwen2 / Qwen3 siblings) with
  `rope`, `rms_norm` and `swiglu` on and both of liger's loss patches off: medlora computes the
  answer-only loss itself (train/kernels/answer_head.py), so the model's own forward loss is
  never used;
- computes that loss with liger's `LigerFusedLinearCrossEntropyLoss` on the answer positions in
  place of medlora's chunked head (`_head_cross_entropy`).

Liger's RoPE patch replaces `apply_rotary_pos_emb` in the family's transformers module, so it holds
for every model of that family in the process (a training process holds one). Liger's kernels are
Triton on CUDA only: on a CPU the run stops with one line before loading anything heavy.
`bench/gpu_check.sh` measures liger against medlora's own head (the `medlora-liger` row).
Tested with liger-kernel 0.8.5 and Triton 3.9 on a CPU (tests/test_liger.py, opt-in): its patch
takes these keywords and swaps the modules' code; its kernels themselves need a GPU and have
not run here (no GPU was lent).
"""

from __future__ import annotations

import functools
from typing import Any

from medlora.errors import ConfigError

# transformers model_type -> liger's public patch function for that family.
LIGER_FAMILIES = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def check_liger(device_type: str) -> Any:
    """liger-kernel's `transformers` module, or a one-line ConfigError saying what to change."""
    if device_type != "cuda":
        raise ConfigError(
            "train.kernels: liger runs liger-kernel's Triton kernels on CUDA GPUs only; on this "
            "machine use train.kernels: medlora (the default)"
        )
    try:
        import liger_kernel.transformers as liger
    except ImportError as err:
        raise ConfigError(
            f"train.kernels: liger needs liger-kernel ({err}): pip install liger-kernel, or set "
            "train.kernels: medlora"
        ) from None
    return liger


def use_liger_kernels(model: Any, device_type: str) -> Any:
    """Patch `model` (a transformers causal LM, before PEFT wraps it) with liger's RMSNorm, RoPE
    and SwiGLU; returns it. Its loss patches stay off (medlora computes the answer loss)."""
    liger = check_liger(device_type)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LIGER_FAMILIES:
        raise ConfigError(
            f"train.kernels: liger has no kernels here for model type {model_type!r} (medlora "
            f"wires {', '.join(sorted(LIGER_FAMILIES))}); set train.kernels: medlora"
        )
    apply = getattr(liger, LIGER_FAMILIES[model_type])
    apply(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    return model


@functools.cache
def _liger_loss() -> Any:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from medlora.data.format import IGNORE_INDEX

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def liger_head_loss_sum(hidden: Any, weight: Any, targets: Any) -> Any:
    """sum_t CE(hidden_t @ weight.T, target_t) over targets != -100, by liger's fused kernel."""
    return _liger_loss()(weight, hidden, targets)
