"""Recipes: bundled files validate, overrides apply, bad values give one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medlora.cli import BUNDLED_RECIPES
from medlora.config import Recipe, load_recipe, recipe_from_dict
from medlora.errors import ConfigError


def test_bundled_recipes_validate() -> None:
    names = sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml"))
    assert {"smollm2-135m-cpu", "llama-3.2-3b-medical"} <= set(names)
    for path in BUNDLED_RECIPES.glob("*.yaml"):
        load_recipe(path)


def test_model_card_recipe_matches_the_card() -> None:
    recipe = load_recipe(BUNDLED_RECIPES / "llama-3.2-3b-medical.yaml")
    assert recipe.model.name == "meta-llama/Llama-3.2-3B"
    assert recipe.lora.r == 4
    assert recipe.train.optimizer == "adamw_torch"
    assert recipe.train.precision == "fp16"
    assert (recipe.train.batch_size, recipe.train.grad_accum, recipe.train.epochs) == (1, 4, 1)
    assert recipe.train.lr == pytest.approx(2e-5)
    assert recipe.train.scheduler == "linear"


def test_set_overrides_parse_yaml_values() -> None:
    recipe = recipe_from_dict(
        {},
        [
            "lora.r=16",
            "train.lr=1e-4",
            "lora.target_modules=[q_proj,k_proj]",
            "data.system_prompt=null",
        ],
    )
    assert recipe.lora.r == 16
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.lora.target_modules == ["q_proj", "k_proj"]
    assert recipe.data.system_prompt is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.r=0", "lora.r=0"),
        ("train.lr=-1", "train.lr=-1"),
        ("lora.rank=8", "unknown key 'lora.rank': allowed keys in 'lora' are r, alpha"),
        ("lorra.r=8", "unknown recipe section 'lorra': allowed sections are model, data, lora"),
        ("train.precision=fp8", "'fp32', 'fp16', 'bf16' or 'auto'"),
        ("lora.target_modules=[]", "at least one module"),
    ],
)
def test_bad_values_are_one_line_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        recipe_from_dict({}, [override])
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_override_without_section_is_explained() -> None:
    with pytest.raises(ConfigError, match="name the section"):
        recipe_from_dict({}, ["lr=1"])


def test_recipe_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid value lora.r=0"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(broken)


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = recipe_from_dict({}, ["lora.r=32"])
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert Recipe().lora.r != 32


def test_eva_init_is_for_sft_runs_only() -> None:
    assert recipe_from_dict({}, ["lora.init=eva"]).lora.init == "eva"
    with pytest.raises(ConfigError) as caught:
        recipe_from_dict(
            {}, ["lora.init=eva", "train.method=dpo", "train.preference_data=jsonl:pairs.jsonl"]
        )
    message = str(caught.value)
    assert "lora.init=eva" in message and "train.method=sft" in message and "\n" not in message


def test_a_run_saved_before_an_option_was_removed_still_loads() -> None:
    # Runs saved `train.group_by_length: false` and `train.compile: false` before both went.
    old_run = {"train": {"group_by_length": False, "compile": False, "lr": 1e-4}}
    assert recipe_from_dict(old_run).train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"^train\.compile was removed .*: delete it"):
        recipe_from_dict({"train": {"compile": True}})
