#!/usr/bin/env bash
# GPU training check on a lent machine (one H100/H200, no internet): the model card's plain HF
# recipe vs medlora's train() on a random-init Llama-3.2-3B, same synthetic examples: unconstrained,
# at the peer's peak memory, the same with train.kernels: liger, and QLoRA. About 5 minutes.
#
#   make gpu-wheels              # here, once: pydantic wheels into .gpu_wheels/ (the GPU image lacks it)
#   bash bench/gpu_check.sh      # there, from the repository root, with .gpu_wheels carried along
#
# Results: $OUT/gpu_check.md, $OUT/gpu_check.json, $OUT/medlora_metrics.jsonl, $OUT/gpu_check.log
# (OUT defaults to runs/gpu-check). Extra arguments go to bench/gpu_train.py (e.g. --budget-s 60).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" - <<'PYEOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda)
PYEOF

# medlora runs from the carried tree (src/ on the path); pydantic comes from carried wheels.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if [ ! -d .gpu_wheels ]; then
        echo "pydantic is missing and .gpu_wheels/ was not carried: run 'make gpu-wheels' here and carry .gpu_wheels" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-compile --no-cache-dir --target /tmp/gpu-site \
        --find-links .gpu_wheels pydantic
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
    "$PY" -c "import pydantic; print('pydantic', pydantic.VERSION, 'from .gpu_wheels')"
fi

# liger-kernel for the `train.kernels: liger` row, from the carried wheels when it is missing.
if ! "$PY" -c "import liger_kernel" 2>/dev/null && ls .gpu_wheels/liger_kernel-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site \
        .gpu_wheels/liger_kernel-*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
fi
"$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
    2>/dev/null || echo "liger-kernel missing: its row is skipped"

export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1   # step bars would bury the table in the output tail
echo "== training"
"$PY" bench/gpu_train.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
