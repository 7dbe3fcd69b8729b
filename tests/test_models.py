"""Model specs: local folders, the SmolLM2 GGUF alias (cached conversion), offline Hub ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from medlora.errors import ModelError
from medlora.models import DEFAULT_CHAT_TEMPLATE, load_model, load_tokenizer, resolve


def test_local_folder_loads_with_pad_token_and_template(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.pad_token_id is not None
    assert tokenizer.chat_template
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_without_template_gets_the_default(
    tmp_path: Path, tiny_tokenizer: object
) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    config = tmp_path / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert load_tokenizer(str(tmp_path)).chat_template == DEFAULT_CHAT_TEMPLATE


def test_missing_folder_and_bad_folder_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model folder not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "x.gguf"))


def test_unreachable_hub_id_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as caught:
        load_model("meta-llama/Llama-3.2-3B")
    message = str(caught.value)
    assert (
        "meta-llama/Llama-3.2-3B" in message
        and "--local-dir" in message
        and "model.name=DIR" in message
    )
    assert "\n" not in message


@pytest.mark.slow
def test_smollm2_alias_converts_once_then_loads_fast(
    monkeypatch: pytest.MonkeyPatch, smollm2_cache: Path
) -> None:
    monkeypatch.setenv("MEDLORA_CACHE", str(smollm2_cache))
    source = resolve("smollm2-135m-instruct")
    assert source.kind == "alias" and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None  # Trainer accepts it
    assert getattr(model, "hf_quantizer", None) is None
    assert list((smollm2_cache / "models").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    from transformers import AutoModelForCausalLM

    gguf_loads = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        gguf_loads.append(kwargs.get("gguf_file"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model("smollm2-135m-instruct")
    assert gguf_loads == [None]  # the second load reads the cached plain copy, not the GGUF
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
