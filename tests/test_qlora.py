"""QLoRA: the bundled recipe, the bitsandbytes settings, and a one-line refusal without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medlora import models
from medlora.cli import BUNDLED_RECIPES, app
from medlora.config import load_recipe
from medlora.errors import ConfigError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


def test_qlora_recipe_is_4bit_all_linear_bf16() -> None:
    recipe = load_recipe(BUNDLED_RECIPES / "llama-3.2-3b-qlora.yaml")
    assert recipe.model.quantization == "4bit" and recipe.model.dtype == "bfloat16"
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.train.precision == "bf16" and recipe.train.gradient_checkpointing
    assert load_recipe(None).model.quantization == "none"  # the default stays plain LoRA


def test_bad_quantization_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization='2bit'"):
        load_recipe(None, ["model.quantization=2bit"])


def test_4bit_is_nf4_double_quantized_with_bf16_compute() -> None:
    kwargs = models._quantization_kwargs("4bit", "bfloat16")
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 == kwargs["dtype"]
    assert models._quantization_kwargs("8bit", "float16")["quantization_config"].load_in_8bit


@no_gpu
def test_quantized_load_without_cuda_fails_before_any_download(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolved or downloaded the model before refusing")

    monkeypatch.setattr(models, "local_folder", no_download)
    monkeypatch.setattr(models, "load_tokenizer", no_download)
    with pytest.raises(ConfigError) as error:
        models.load_model("meta-llama/Llama-3.2-3B", "bfloat16", quantization="4bit")
    message = str(error.value)
    assert "model.quantization=4bit needs a CUDA GPU" in message
    assert "--set model.quantization=none" in message and "\n" not in message


def test_missing_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs bitsandbytes.*pip install bitsandbytes"):
        models.check_quantization("8bit")


@no_gpu
@pytest.mark.parametrize("verb", ["train", "sweep"])
def test_cli_refuses_qlora_on_cpu_in_one_line(tmp_path: Path, verb: str) -> None:
    args = [verb, "llama-3.2-3b-qlora", "--out", str(tmp_path / "run")]
    if verb == "sweep":
        args += ["--set", "lora.r=4,8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "model.quantization=4bit needs a CUDA GPU" in result.output
