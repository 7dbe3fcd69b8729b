"""The recipe as TrainingArguments (medlora/train/arguments.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from medlora.config import recipe_from_dict
from medlora.train.arguments import supported_arguments, training_arguments, training_kwargs


@dataclasses.dataclass
class OlderArguments:  # what an older transformers install might know
    output_dir: str = ""
    learning_rate: float = 0.0


def test_unknown_arguments_are_dropped_with_one_warning_naming_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kwargs = {"output_dir": "x", "learning_rate": 0.1, "neftune_noise_alpha": 5.0, "seed": 1}
    with caplog.at_level(logging.WARNING, logger="medlora.train.arguments"):
        kept = supported_arguments(OlderArguments, kwargs)
    assert kept == {"output_dir": "x", "learning_rate": 0.1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "\n" not in line and "neftune_noise_alpha, seed" in line and "OlderArguments" in line


def test_the_installed_transformers_takes_every_argument_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = recipe_from_dict({"model": {"name": "x"}}, ["train.shuffle=false"])
    with caplog.at_level(logging.WARNING, logger="medlora.train.arguments"):
        args = training_arguments(recipe, tmp_path, has_eval=False)
    assert not caplog.records
    # Sequential order comes from transformers' own option, not a Trainer override.
    assert training_kwargs(recipe, tmp_path, False)["train_sampling_strategy"] == "sequential"
    assert args.train_sampling_strategy == "sequential"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "amx_bf16", "amx_tile"}, "bf16"), ({"avx512f", "avx512_bf16"}, "bf16"),
     ({"avx2", "fma"}, "fp32"), ({"avx512f"}, "fp32")],
)  # fmt: skip
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], expected: str
) -> None:
    import torch

    from medlora import machine
    from medlora.train.arguments import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    recipe = recipe_from_dict({"model": {"name": "x"}}, ["train.precision=auto"])
    resolved = resolve_precision(recipe)
    assert resolved.train.precision == expected
    assert recipe.train.precision == "auto"  # the caller's recipe is left as it was
    kwargs = training_kwargs(resolved, Path("run"), has_eval=False)
    assert kwargs["bf16"] is (expected == "bf16") and kwargs["fp16"] is False
