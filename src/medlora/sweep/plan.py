"""The sweep's plan: the one axis picked out of the `--set` overrides, every run's validated
recipe, and the result rows' container."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.config import Recipe, load_recipe
from medlora.errors import ConfigError

# A sweep over one of these re-splits the data per run; any other key shares one prepared split.
PER_RUN_DATA_KEYS = frozenset(
    f"data.{k}"
    for k in ("sources", "map", "exclude", "strict", "val_fraction", "test_fraction", "clean")
)
LOSS_NOTE = (
    "validation loss = token-weighted answer-token cross-entropy of the saved adapter on the "
    "validation split (medlora.evaluate.loss.score_examples)"
)


@dataclass
class SweepPlan:
    """The axis, its values and the validated recipe of every run, before anything is trained."""

    key: str
    fixed: list[str]
    raw_values: list[str]
    recipes: list[Recipe]
    values: list[Any]  # each recipe's value of `key`, as JSON would hold it


@dataclass
class SweepResult:
    key: str
    out_dir: Path
    fixed: list[str]  # the fixed overrides, every run's
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    command: str = ""  # the `medlora sweep` call that made it, for whoever reads the table later

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.key,
            "command": self.command,
            "validation_loss": LOSS_NOTE,
            "rows": self.rows,
            "files": self.files,
            "fixed_overrides": self.fixed,
        }


def split_axis(overrides: list[str]) -> tuple[str, list[str], list[str]]:
    """Pick the one `key=a,b,c` override out of `overrides`: (key, raw values, fixed overrides)."""
    axes: list[tuple[str, list[str]]] = []
    fixed: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        # A bare comma list (`4,8,16`) is the axis; `[a,b]`, `{a: b}` and quoted text are one value.
        if sep and "," in raw and raw.strip()[:1] not in "[{\"'":
            values = [v.strip() for v in raw.split(",")]
            if any(not v for v in values):
                raise ConfigError(f"--set '{item}': empty value in the sweep list")
            axes.append((key.strip(), values))
        else:
            fixed.append(item)
    if not axes:
        raise ConfigError(
            "a sweep needs one --set with comma-separated values, e.g. --set lora.r=4,8,16,32"
        )
    if len(axes) > 1:
        names = ", ".join(k for k, _ in axes)
        raise ConfigError(
            f"a sweep has exactly one axis, got {len(axes)} ({names}); keep one comma list and "
            "quote the others' values if they are text with commas, e.g. --set 'key=\"a, b\"'"
        )
    key, values = axes[0]
    if len(set(values)) != len(values):
        raise ConfigError(f"--set {key}=…: a value is repeated in the sweep list")
    return key, values, fixed


def recipe_value(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def plan_sweep(recipe_path: str | Path | None, overrides: list[str]) -> SweepPlan:
    """Validate every run's recipe up front, so a bad value fails before hours of training."""
    key, raw_values, fixed = split_axis(overrides)
    recipes = []
    for raw in raw_values:
        try:
            recipes.append(load_recipe(recipe_path, [*fixed, f"{key}={raw}"]))
        except ConfigError as error:
            raise ConfigError(
                f"sweep axis {key}={raw}: {error} (a comma list in --set is the sweep axis; "
                "write [a,b] for one list value)"
            ) from None
    values = [recipe_value(r, key) for r in recipes]
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(f"sweep axis {key}: two values mean the same thing ({raw_values})")
    return SweepPlan(key, fixed, raw_values, recipes, values)


def run_dir_name(key: str, raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{key}={raw}")
