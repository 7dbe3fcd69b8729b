"""What every export step shares: the formats and GGUF types, the error and the result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medlora.errors import MedloraError

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_K", "q5_K_M", "q5_0", "q4_K_M", "q4_0")
# What llama.cpp's converter writes itself; the others are quantized from its f16 output by
# llama.cpp's quantizer. What each costs in answer loss and gains in speed on the demo model:
# `python bench/inference.py` (docs/benchmarks.md, "inference").
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# `--gguf-type`'s default for export, serve and chat. q8_0: the float model's answer loss nearly
# kept, and batch-invariant under llama.cpp's continuous batching (serve/llama_cpp_continuous.py; the
# K-quants are not). q4_K_M decodes faster alone at a higher loss (docs/benchmarks.md,
# "inference"): give it for one-user serving.
DEFAULT_GGUF_TYPE = "q8_0"
GGUF_TYPE_HELP = (
    f"GGUF weights: {' | '.join(GGUF_TYPES)}; the default q8_0 nearly keeps the float model's "
    "answer loss and answers the same in continuous batches; q4_K_M is faster alone "
    "(docs/benchmarks.md, inference)."
)


class ExportError(MedloraError):
    """A run cannot be exported as asked."""


@dataclass
class ExportResult:
    """What `export_run` wrote: the folder, whether the model was merged, its files, the GGUF."""

    out: Path
    merged: bool
    files: list[str] = field(default_factory=list)
    gguf: Path | None = None
