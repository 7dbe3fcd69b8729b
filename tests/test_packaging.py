"""What pyproject.toml promises: dependency floors the code runs on."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The libraries whose behaviour the code relies on (transformers 5 arguments, peft's LoRA layers,
# TRL's trainers, accelerate's process state, huggingface_hub's ModelCard).
RELIED_ON = ("transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub")


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = (Requirement(spec) for spec in project["dependencies"])
    return {req.name.lower().replace("-", "_"): req for req in found}


def test_floors_admit_no_older_major_version_than_the_one_tested() -> None:
    requirements = _requirements()
    for name in RELIED_ON:
        installed = Version(version(name))
        spec = requirements[name].specifier
        assert spec.contains(installed), f"{name} {installed} is outside {spec}"
        older = (
            Version(f"{installed.major}.{max(installed.minor - 1, 0)}")
            if installed.major == 0
            else Version(f"{installed.major - 1}.99")
        )
        assert not spec.contains(older), (
            f"{name}{spec} admits {older}, which the suite never ran on"
        )
