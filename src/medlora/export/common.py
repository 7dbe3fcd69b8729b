"""What every export step shares: the file lists, the error and the result type."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.errors import MedloraError

logger = logging.getLogger(__name__)

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
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Copied into the export's top folder; an older run kept its data card at RUN/data_card.json.
PROVENANCE = (
    "recipe.yaml",
    "train_summary.json",
    "eval.json",
    "data/data_card.json",
    "data_card.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class ExportError(MedloraError):
    """A run cannot be exported as asked."""


@dataclass
class ExportResult:
    out: Path
    merged: bool
    format: str
    files: list[str] = field(default_factory=list)
    gguf: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "merged": self.merged,
            "format": self.format,
            "files": self.files,
            "gguf": str(self.gguf) if self.gguf else None,
        }
