"""Recipes: one YAML file validated by pydantic, with `--set section.key=value` overrides.

One module per pair of recipe sections (data.py, train.py, evaluation.py); recipe.py holds the
whole `Recipe`, the overrides and the one-line error messages.
"""

from medlora.config.base import DEFAULT_SYSTEM_PROMPT
from medlora.config.data import DataConfig, ModelConfig
from medlora.config.evaluation import EvalConfig, GenerationConfig, OutputConfig
from medlora.config.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from medlora.config.train import PREFERENCE_KINDS, LoraConfig, TrainConfig

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "PREFERENCE_KINDS",
    "DataConfig",
    "EvalConfig",
    "GenerationConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "Recipe",
    "TrainConfig",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
]
