"""What a run will train with: library versions, CPU features, GPU, the patches on or skipped, the
attention path and precision (`medlora env`, and `env.json` in every run directory).

A silent difference in training is the worst defect a fine-tuning tool can have, so these facts
are written down before the first step: a run trained with a patch skipped, another precision or
another attention path says so in its own folder.
"""

from __future__ import annotations

import platform
from typing import Any

from pydantic import BaseModel

from medlora import patches
from medlora.config import Recipe
from medlora.families import family_of
from medlora.machine import cpu_flags
from medlora.models import local_folder
from medlora.patches import PatchState
from medlora.train.arguments import resolve_precision
from medlora.train.kernels import planned_kernels
from medlora.train.kernels.packed_attention import NAME as PACKED_NAME

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "llama-cpp-python",
    "liger-kernel",
    "vllm",
)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


class RunPlan(BaseModel):
    """What one recipe's run will use on this machine."""

    model: str
    family: str
    kernels: str
    precision: str
    packing: bool
    attention: str
    patches: list[str]  # "name: on" / "name: skipped (reason)" for the patches the run asks for


class Environment(BaseModel):
    python: str
    libraries: dict[str, str]
    cpu: str
    cpu_features: list[str]
    gpu: str | None
    patches: list[PatchState]
    run: RunPlan | None = None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def attention_path(
    kernels: str, packing: bool, cuda: bool, implementation: str | None, config: Any
) -> str:
    """One line: how a training row's attention is computed."""
    window = getattr(config, "sliding_window", None)
    softcap = getattr(config, "attn_logit_softcapping", None)
    options = []
    if window:
        options.append(f"sliding window {window}")
    if softcap:
        options.append(f"soft-capping {softcap}")
    own = f" ({', '.join(options)})" if options else ""
    if not packing:
        return f"transformers {implementation}{own}, padded batches"
    if implementation == "sdpa" and kernels == "medlora" and not cuda:
        exact = " and transformers' masked sdpa on layers whose window an example exceeds"
        return (
            f"packed rows: medlora per-example causal SDPA{exact if window else ''}{own}; "
            "no example attends to another"
        )
    return (
        f"packed rows: transformers {implementation} with the block-diagonal mask it builds from "
        f"the position restarts{own}; no example attends to another"
    )


def run_plan(recipe: Recipe, model: Any = None) -> RunPlan:
    """What `recipe` will train with here: from the built `model` (its kernels as applied), else
    from the model's config (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = resolve_precision(recipe)
    t, m = recipe.train, recipe.model
    if model is not None:
        config = model.config
        implementation = config._attn_implementation
        if implementation == PACKED_NAME:  # what the packed kernel stands in for
            implementation = "sdpa"
    else:
        config = AutoConfig.from_pretrained(
            local_folder(m.name), revision=m.revision, trust_remote_code=m.trust_remote_code
        )
        with torch.device("meta"):  # the attention implementation transformers picks, no memory
            implementation = AutoModelForCausalLM.from_config(config).config._attn_implementation
    family = family_of(config)
    cuda = torch.cuda.is_available()
    plan = planned_kernels(
        t.kernels,
        packed_attention=t.packing or t.precision == "bf16",
        cuda=cuda,
        attention=implementation,
    )
    applied = getattr(model, "medlora_kernels", None)
    states = []
    for name in plan:
        on, reason = patches.status(name) if name in patches.PATCHES else (True, "")
        if on and applied is not None and not any(a.startswith(name) for a in applied):
            on, reason = False, "nothing in this model to apply it to"
        states.append(f"{name}: on" if on else f"{name}: skipped ({reason})")
    return RunPlan(
        model=m.name,
        family=family.name,
        kernels=t.kernels,
        precision=t.precision,
        packing=t.packing,
        attention=attention_path(t.kernels, t.packing, cuda, implementation, config),
        patches=states,
    )


def environment(recipe: Recipe | None = None, model: Any = None) -> Environment:
    import torch

    flags = cpu_flags()
    names = None
    if model is not None and recipe is not None:
        # A run's env.json: the training patches it could use. Checking TRL's (importing trl)
        # costs ~2 s, so only preference runs do; `medlora env` lists every patch.
        names = [
            p.name
            for p in patches.PATCHES.values()
            if p.stage == "train" and (p.name != "trl_preference" or recipe.train.method != "sft")
        ]
    return Environment(
        python=platform.python_version(),
        libraries={name: patches.installed_version(name) or "not installed" for name in LIBRARIES},
        cpu=_cpu_name(),
        cpu_features=[f for f in CPU_FEATURES if f in flags],
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        patches=patches.report(names),
        run=run_plan(recipe, model) if recipe is not None else None,
    )
