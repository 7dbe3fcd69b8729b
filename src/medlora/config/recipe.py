"""Recipes: one YAML file validated by pydantic, with `--set section.key=value` overrides.

Every field has a type, a default and a one-line description; the descriptions feed `--help`
and the error messages, so a bad recipe is explained in one line that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from medlora.config.base import _Section
from medlora.config.data import DataConfig, ModelConfig
from medlora.config.evaluation import EvalConfig, GenerationConfig, OutputConfig
from medlora.config.train import LoraConfig, TrainConfig
from medlora.errors import ConfigError


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Runs written before the `generation` section kept the answer length in `eval`."""
        if isinstance(data, dict) and isinstance(data.get("eval"), dict):
            if "max_new_tokens" in data["eval"]:
                evaluation = dict(data["eval"])
                generation = dict(data.get("generation") or {})
                generation.setdefault("max_new_tokens", evaluation.pop("max_new_tokens"))
                data = {**data, "eval": evaluation, "generation": generation}
        return data

    @model_validator(mode="after")
    def _sft_only(self) -> Recipe:
        if self.lora.init == "eva" and self.train.method != "sft":
            raise ValueError(
                f"lora.init=eva: measured for train.method=sft only, not {self.train.method}; "
                "use lora.init=default (or start from an SFT run with train.init_adapter)"
            )
        if self.data.canaries is not None and self.train.method != "sft":
            raise ValueError(
                f"data.canaries: put into supervised training only (train.method=sft), not "
                f"{self.train.method}; drop it (--set data.canaries=null)"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


SECTIONS = tuple(Recipe.model_fields)


def _section_class(annotation: Any) -> type[_Section] | None:
    """The section a field holds (`CanaryConfig | None` → CanaryConfig), or None for a value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, _Section):
            return candidate
    return None


def _fields_along(loc: list[str]) -> tuple[list[tuple[str, Any]], type[_Section] | None]:
    """(key, field) for each recipe key named by `loc`, nested sections (data.canaries.digits)
    included, stopping at the first part that is not a key; and the section the last one holds."""
    found: list[tuple[str, Any]] = []
    owner: type[_Section] | None = Recipe
    for part in loc:
        field = owner.model_fields.get(part) if owner is not None else None
        if field is None:
            break
        found.append((part, field))
        owner = _section_class(field.annotation)
    return found, owner


def _explain(error: ValidationError) -> str:
    """Turn pydantic's first error into one line naming the key, the value and what is allowed."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown recipe section '{loc[0]}': allowed sections are {', '.join(SECTIONS)}"
        sections, holder = _fields_along(loc[:-1])
        section = ".".join(loc[: len(sections)])
        allowed = ", ".join(holder.model_fields) if holder else ""
        return f"unknown key '{key}': allowed keys in '{section}' are {allowed}"
    message = first["msg"].replace("Value error, ", "")
    if not loc and first["type"] == "value_error":  # a check across sections names its keys
        return f"invalid recipe: {message}"
    if len(loc) == 1 and loc[0] in SECTIONS and first["type"] == "value_error":
        # A whole-section check (e.g. data.sources entries): its message names the key itself.
        if message.startswith(f"{loc[0]}."):
            return f"invalid value {message}"
        return f"invalid {loc[0]} section: {message}"
    value = first.get("input")
    description = ""
    named, _ = _fields_along(loc)
    if len(named) >= 2:  # the innermost key: data.canaries.digits describes digits
        name, field = named[-1]
        if field.description:
            description = f" ({name}: {field.description})"
    return f"invalid value {key}={value!r}: {message}{description}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like section.key=value, e.g. lora.r=16")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2:
        raise ConfigError(
            f"--set '{item}': name the section too, e.g. train.{key}=...; sections: {', '.join(SECTIONS)}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML: numbers, lists, null, bools)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


# Options removed from the recipe, with the value every run saved before (a run's recipe.yaml still
# loads: the key is dropped) and why (any other value is refused in one line: it asked for
# something medlora no longer does).
REMOVED = {
    ("train", "group_by_length"): (False, "no recipe, test or bench used it"),
    ("train", "compile"): (False, "it silently turned off the fused answer head"),
}


def _drop_removed(data: dict[str, Any]) -> dict[str, Any]:
    for (section, key), (saved, why) in REMOVED.items():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            if node[key] != saved:
                raise ConfigError(f"{section}.{key} was removed ({why}): delete it from the recipe")
            data[section] = {k: v for k, v in node.items() if k != key}
    return data


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    data = _drop_removed(apply_overrides(dict(data or {}), list(overrides or [])))
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None


def load_recipe(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        recipe_path = Path(path)
        if not recipe_path.is_file():
            raise ConfigError(f"recipe file not found: {recipe_path} (see recipes/ for examples)")
        try:
            loaded = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{recipe_path}{where}: not valid YAML ({error.__class__.__name__})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{recipe_path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})"
            )
        data = loaded or {}
    try:
        return recipe_from_dict(data, overrides)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None
