"""A LoRA adapter's rank padded by one zero component, so llama.cpp applies it batch-invariantly.

Why: llama.cpp's CPU backend multiplies a float LoRA A by the activations with its llamafile GEMM
(tinyBLAS) when a decode step holds two or more tokens and with its per-row dot product when it
holds one. The two sum in different orders, so a request decoded beside others can pick another
greedy token than alone (docs/benchmarks.md, "serve-load-llama.cpp"). tinyBLAS takes a float matrix
only when its rows (here the rank) are a multiple of 4 (ggml-cpu/llamafile/sgemm.cpp,
`tinyBLAS::matmul`, llama-cpp-python 0.3.36), so a rank of 4 made 5 keeps every step on the
per-row product: bit-identical logits alone and together.

The padded component is a zero row of A and a zero column of B; llama.cpp scales a LoRA by
alpha / rank, so B is multiplied by (r + 1) / r to keep the update B A x x alpha / r the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_LORA_KEY = re.compile(r"\.lora_([AB])\.weight$")


def padded_rank(r: int) -> int:
    """The rank llama.cpp's float GEMM refuses: r itself unless it is a multiple of 4."""
    return r + 1 if r % 4 == 0 else r


def pad_lora_rank(adapter_dir: Path, dest: Path) -> bool:
    """Write `adapter_dir`'s adapter into `dest` with every rank that is a multiple of 4 padded by
    one zero component (B rescaled, see above). False (nothing written) when no rank needs it."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():  # a .bin adapter: converted as it is
        return False
    tensors = load_file(weights)
    ranks = {key: value.shape[0] for key, value in tensors.items() if key.endswith("lora_A.weight")}
    if all(padded_rank(r) == r for r in ranks.values()):
        return False
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kind = _LORA_KEY.search(key)
        if kind is None:
            out[key] = value
            continue
        r = ranks[_LORA_KEY.sub(".lora_A.weight", key)]
        if padded_rank(r) == r:
            out[key] = value
        elif kind.group(1) == "A":  # [r, in] -> [r + 1, in]
            out[key] = torch.cat([value, value.new_zeros(1, value.shape[1])]).contiguous()
        else:  # [out, r] -> [out, r + 1], scaled: alpha / (r + 1) x B' = alpha / r x B
            scaled = value * ((r + 1) / r)
            out[key] = torch.cat([scaled, value.new_zeros(value.shape[0], 1)], dim=1).contiguous()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["r"] = padded_rank(int(config["r"]))
    patterns = config.get("rank_pattern") or {}
    config["rank_pattern"] = {key: padded_rank(int(r)) for key, r in patterns.items()}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(out, dest / "adapter_model.safetensors")
    return True
