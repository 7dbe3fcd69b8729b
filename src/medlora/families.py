"""The model families medlora trains: exactly the ones the family matrix proves (tests/test_families.py).

For each family here, a tiny random model built from transformers' own config class shows in
`make test` that packed rows train exactly like separate rows (sliding windows and soft-capping
included), that `train.kernels: medlora` trains like `stock`, that evaluation's answer loss is the
model's own `labels=` loss, that a merged export reloads with the adapter's logits, its GGUF
conversion (or the reason it is skipped) and that `medlora serve` answers. Any other family is
refused before training, in one line: a family nobody tested could train differently in silence.
The README's list of families is `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medlora.errors import ModelError


@dataclass(frozen=True)
class Family:
    """One supported family: its transformers `model_type` and the name users know it by."""

    model_type: str
    name: str


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2 / Qwen2.5"),
        Family("qwen3", "Qwen3"),
        Family("phi3", "Phi-3 / Phi-4-mini"),
        Family("gemma2", "Gemma 2"),
        Family("gemma3_text", "Gemma 3 (text)"),
        Family("olmo2", "OLMo 2"),
        Family("granite", "Granite"),
    )
}


def family_of(config: Any) -> Family:
    """The model's family, or a one-line `ModelError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        names = ", ".join(f.name for f in FAMILIES.values())
        raise ModelError(
            f"model family '{model_type}' is not one medlora is tested on ({names}); "
            "pick a model of one of these families"
        )
    return family
