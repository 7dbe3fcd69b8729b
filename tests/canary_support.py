"""Shared by the canary and memorization tests: a tiny run trained with one canary repeated many
times (and its never-trained control), made once per session and model."""

from __future__ import annotations

from pathlib import Path

from helpers import tiny_records, write_prepared

from medlora.config import recipe_from_dict
from medlora.train import train

CANARY_REPEATS = 30
# A high learning rate and several epochs: the tiny random model must memorize a 4-digit secret.
CANARY_RECIPE = [
    "train.lr=0.03",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.epochs=4",
    "train.warmup_ratio=0.0",
    "train.eval_steps=0",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=all-linear",
    "generation.max_new_tokens=24",
    f"data.canaries={{repeats: [{CANARY_REPEATS}], digits: 4, seed: 3}}",
]

_TRAINED: dict[str, Path] = {}


def canary_run(root: Path, model_dir: Path) -> Path:
    """The run directory (trained once per session and model); read it, do not change it."""
    key = str(model_dir)
    if key not in _TRAINED:
        records = tiny_records()
        prepared = write_prepared(root / "prepared", records[:15], records[15:20], records[15:20])
        recipe = recipe_from_dict({"model": {"name": str(model_dir)}}, CANARY_RECIPE)
        train(recipe, root / "run", prepared_dir=prepared)
        _TRAINED[key] = root / "run"
    return _TRAINED[key]
