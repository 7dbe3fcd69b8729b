"""Multi-GPU launch files: accelerate configs that accelerate itself accepts, and `python -m medlora`."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from medlora.cli import BUNDLED_RECIPES

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = BUNDLED_RECIPES / "accelerate"
CONFIGS = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize(("name", "kind"), sorted(CONFIGS.items()))
def test_accelerate_config_is_valid(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    path = ACCELERATE / name
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in DistributedType.__members__
    assert data["distributed_type"] == kind
    # accelerate's own loader refuses unknown top-level keys.
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == DistributedType[kind]
    # Nested plugin keys are what `accelerate launch` accepts as --<key> options.
    options = _launch_options()
    for section in ("fsdp_config", "deepspeed_config"):
        for key in data.get(section) or {}:
            assert key in options, f"{name}: {section}.{key} is not an accelerate option"


def test_fsdp_wraps_llama_layers_and_keeps_orig_params_for_lora() -> None:
    from transformers.models.llama import modeling_llama

    fsdp = yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert hasattr(modeling_llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])


def test_deepspeed_json_is_zero2_and_found_from_the_repo_root() -> None:
    config = yaml.safe_load((ACCELERATE / "deepspeed_zero2.yaml").read_text())
    ds_path = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it from the recipe


def test_launch_files_ship_with_the_package() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["medlora"]
    for path in ACCELERATE.iterdir():
        relative = str(path.relative_to(BUNDLED_RECIPES.parent))
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative


def test_python_dash_m_medlora_is_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medlora", "sweep", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sweep axis" in done.stdout
