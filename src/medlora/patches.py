"""Every place medlora relies on a library's private internals, in one registry, each guarded.

A patch here is code that replaces or reaches into something a library does not promise to keep
(a class's forward, a module's attributes, a private handle). Each entry says what it touches, why
it is kept (the measurement, by docs/benchmarks.md section), the library versions it was tested
with, and a cheap precondition (the thing it replaces still looks as expected). `allowed(name)` is
asked before the patch is applied: outside the tested range, or when the precondition fails, the
patch is skipped with one warning line and the stock path runs. `train.kernels: stock` applies no
training patch at all (the reference every other setting is measured against).

The ranges are [floor, ceiling): the floor is the oldest version tested, the ceiling the first
untested minor release. `constraints.txt` holds the tested set; `make test-latest` runs the family
matrix on the newest versions pyproject.toml admits.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

logger = logging.getLogger("medlora.patches")


@dataclass(frozen=True)
class Patch:
    """One use of a library's internals."""

    name: str
    library: str  # the distribution whose version decides (importlib.metadata name)
    tested: tuple[str, str]  # [floor, ceiling)
    touches: str
    why: str
    fallback: str  # what runs when the patch is skipped
    stage: str  # "train" (skipped by train.kernels: stock), "eval" or "serve"
    precondition: Callable[[], bool] | None = None


def _has(module: str, *names: str) -> bool:
    try:
        target = importlib.import_module(module)
    except ImportError:
        return False
    for name in names:
        if not hasattr(target, name):
            return False
        target = getattr(target, name)
    return True


def _params(module: str, attribute: str) -> set[str]:
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return set(inspect.signature(target).parameters)


def _sdpa_entry_points() -> bool:
    return (
        _has("transformers", "AttentionInterface", "register")
        and _has("transformers.masking_utils", "AttentionMaskInterface", "register")
        and _has("transformers.masking_utils", "sdpa_mask")
        and {"module", "query", "key", "value", "attention_mask"}
        <= _params("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    )


def _peft_lora_layer() -> bool:
    from peft.tuners.lora import LoraLayer

    names = set(LoraLayer.adapter_layer_names) | set(LoraLayer.other_param_names)
    return {"lora_A", "lora_B", "lora_dropout", "scaling"} <= names


def _logits_to_keep() -> bool:
    return "logits_to_keep" in _params(
        "transformers.models.llama.modeling_llama", "LlamaForCausalLM.forward"
    )


def _dynamic_cache_layers() -> bool:
    from transformers import DynamicCache

    return isinstance(getattr(DynamicCache(), "layers", None), list)


def _dynamic_cache_data() -> bool:
    return "ddp_cache_data" in _params("transformers", "DynamicCache.__init__")


def _trl_trainers() -> bool:
    return _has("trl", "DPOTrainer") and _has("trl.experimental.orpo", "ORPOTrainer")


def _peft_mixed_batch() -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return hasattr(LoraLayer, "_mixed_batch_forward")


def _llama_cpp_lora_api() -> bool:
    return _has("llama_cpp", "llama_adapter_lora_init") and _has(
        "llama_cpp", "llama_set_adapters_lora"
    )


TRANSFORMERS = ("5.24", "5.26")
PEFT = ("0.21", "0.22")

PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch(
            "packed_attention",
            "transformers",
            TRANSFORMERS,
            "registers an attention function with AttentionInterface that attends each example of a "
            "packed row on its own (integrations.sdpa_attention.sdpa_attention_forward for the rest); "
            "reads config._attn_implementation to pick sdpa models (also medlora env)",
            "CPU packed rows without the row-wide block mask; CPU bf16 attention backward in float32 "
            "(docs/benchmarks.md 'peer', 'memory-breakdown-bf16')",
            "transformers' sdpa with its block-diagonal packed mask (exact, slower)",
            "train",
            _sdpa_entry_points,
        ),
        Patch(
            "rms_norm",
            "transformers",
            TRANSFORMERS,
            "swaps the class of Llama/Mistral/Qwen2/Qwen3/Phi-3 RMSNorm modules (by class name) for a "
            "frozen-weight autograd function; checked against the stock forward once per class",
            "a faster CPU step, half the norm's saved activations (docs/benchmarks.md "
            "'engine-step', 'memory-breakdown-bf16')",
            "the model's own RMSNorm",
            "train",
            lambda: _has("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ),
        Patch(
            "silu_mul",
            "transformers",
            TRANSFORMERS,
            "swaps the class of Llama/Mistral/Qwen2/Qwen3 MLPs (by class name; gate_proj, up_proj, "
            "down_proj, act_fn) for one that saves gate and up only; checked once per class",
            "less MLP activation memory on CPU (docs/benchmarks.md 'memory-breakdown-bf16')",
            "the model's own MLP",
            "train",
            lambda: _has("transformers.models.llama.modeling_llama", "LlamaMLP"),
        ),
        Patch(
            "fused_answer_head",
            "transformers",
            TRANSFORMERS,
            "passes a tensor of positions as logits_to_keep and bypasses the output layer "
            "(get_output_embeddings) to fuse it with the loss; torch.compile's _orig_mod",
            "the answer tokens' logits never held at once (docs/training-engine.md)",
            "the model's logits at the answer positions and a plain cross-entropy",
            "train",
            _logits_to_keep,
        ),
        Patch(
            "continuous_batching",
            "transformers",
            TRANSFORMERS,
            "reads and writes DynamicCache.layers[i].keys / .values (serve/continuous.py)",
            "more tokens/s than static batching (docs/benchmarks.md 'serve-load')",
            "static batching",
            "serve",
            _dynamic_cache_layers,
        ),
        Patch(
            "exposure_shared_cache",
            "transformers",
            TRANSFORMERS,
            "iterates a DynamicCache's layers as (keys, values, ...) and builds one from "
            "ddp_cache_data (evaluate/exposure.py)",
            "canary exposure scores 1,110 one-token positions instead of 10^4 whole answers "
            "(docs/benchmarks.md 'audit')",
            "every candidate answer scored whole (the same ranks, slower)",
            "eval",
            _dynamic_cache_data,
        ),
        Patch(
            "stacked_lora",
            "peft",
            PEFT,
            "LoraLayer.lora_A / lora_B / scaling / lora_variant / _disable_adapters "
            "(serve/stacked_lora.py)",
            "several adapters in one batch, faster than PEFT's (docs/benchmarks.md "
            "'serve-mixed-lora')",
            "peft's adapter_names path",
            "serve",
            _peft_lora_layer,
        ),
        Patch(
            "trl_preference",
            "trl",
            ("1.16", "1.17"),
            "DPOTrainer's 'ref' copy of the adapter (deleted before saving) and the experimental "
            "trl.experimental.orpo API (train/preference.py)",
            "train.method dpo / orpo (docs/benchmarks.md 'preference')",
            "train.method dpo / orpo refused in one line (sft trains as usual)",
            "train",
            _trl_trainers,
        ),
        Patch(
            "peft_adapter_names",
            "peft",
            PEFT,
            "passes adapter_names to each LoRA layer's forward from a pre-forward hook "
            "(serve/adapters.py), instead of PeftModel's per-call hook walk",
            "a cheaper decode step than PeftModel's hook walk (serve/adapters.py)",
            "only one adapter (or the base) served per server",
            "serve",
            _peft_mixed_batch,
        ),
        Patch(
            "llama_cpp_lora_switch",
            "llama-cpp-python",
            ("0.3.36", "0.3.37"),
            "llama_adapter_lora_init / llama_set_adapters_lora and llama_get_logits_ith on Llama's "
            "private _model / _ctx handles (serve/llama_cpp.py)",
            "the llama.cpp engine, faster than transformers (docs/benchmarks.md 'inference')",
            "the transformers engine",
            "serve",
            _llama_cpp_lora_api,
        ),
        Patch(
            "llama_cpp_continuous",
            "llama-cpp-python",
            ("0.3.36", "0.3.37"),
            "ggml's kernel-choice thresholds: prefill pieces of 2-63 tokens, a spare token past 256 "
            "cells (serve/llama_cpp_continuous.py) and the GGUF LoRA's rank padded off tinyBLAS "
            "(export/lora_pad.py), so rows decoded together answer as alone",
            "more tokens/s than the one-request engine (docs/benchmarks.md 'serve-load-llama.cpp')",
            "the one-request llama.cpp engine",
            "serve",
            _llama_cpp_lora_api,
        ),
    )
}


def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: str, tested: tuple[str, str]) -> bool:
    from packaging.version import Version

    release = Version(Version(version).base_version)  # 2.13.0+cpu -> 2.13.0
    return Version(tested[0]) <= release < Version(tested[1])


def status(name: str) -> tuple[bool, str]:
    """(on, reason): whether `name` may be applied here, and why not when it may not."""
    patch = PATCHES[name]
    version = installed_version(patch.library)
    if version is None:
        return False, f"{patch.library} is not installed"
    if not _in_range(version, patch.tested):
        return False, (
            f"{patch.library} {version} is outside the tested range "
            f">={patch.tested[0]},<{patch.tested[1]}"
        )
    try:
        ok = patch.precondition is None or patch.precondition()
    except Exception as error:  # a precondition that cannot even run has failed
        ok, detail = False, f": {type(error).__name__}: {error}"
    else:
        detail = ""
    if not ok:
        return False, f"{patch.library} {version}: what it touches has changed{detail}"
    return True, ""


@functools.cache
def _warn_once(name: str, reason: str) -> None:
    logger.warning(
        "medlora patch '%s' skipped (%s); using %s", name, reason, PATCHES[name].fallback
    )


def allowed(name: str) -> bool:
    """Whether to apply patch `name`; when not, one warning line (once per reason) names why."""
    on, reason = status(name)
    if not on:
        _warn_once(name, reason)
    return on


class PatchState(BaseModel):
    """One patch as `medlora env` and a run's env.json show it."""

    name: str
    stage: str
    library: str
    version: str
    tested: str
    state: str  # on | skipped
    reason: str
    touches: str
    fallback: str


def report(names: list[str] | None = None) -> list[PatchState]:
    """Every patch (or those `names`) with its state, for `medlora env` and a run's env.json."""
    rows = []
    for patch in (PATCHES[name] for name in names or PATCHES):
        on, reason = status(patch.name)
        rows.append(
            PatchState(
                name=patch.name,
                stage=patch.stage,
                library=patch.library,
                version=installed_version(patch.library) or "not installed",
                tested=f">={patch.tested[0]},<{patch.tested[1]}",
                state="on" if on else "skipped",
                reason=reason,
                touches=patch.touches,
                fallback=patch.fallback,
            )
        )
    return rows
