"""A run's adapter loaded on its float32 base and merged (`merge_and_unload`), with the
tokenizer and a generation config that stops at the end of a turn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from medlora.config import GenerationConfig
from medlora.evaluate.generate import run_generation_settings, stop_token_ids
from medlora.export.common import ExportError
from medlora.models import load_model, prepare_tokenizer


def run_base_spec(run_dir: Path, base: str | None = None) -> str:
    """`base` when given, else the base model spec the run was trained on (recipe.yaml, else the
    adapter config); an ExportError when `run_dir` is not a run."""
    check_run(run_dir)
    if base:
        return base
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        name = (data.get("model") or {}).get("name")
        if name:
            return str(name)
    config = run_dir / "adapter_config.json"
    if config.is_file():
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base:
            return str(base)
    raise ExportError(f"{run_dir} names no base model (recipe.yaml model.name): pass --base SPEC")


def check_run(run_dir: Path) -> None:
    if not (run_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"{run_dir} holds no adapter_config.json: give a run directory from `medlora train`"
        )


def load_merged(run_dir: Path, base: str | None = None) -> tuple[Any, Any]:
    """Base in float32 + the run's adapter, merged with `merge_and_unload`; the run's tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec = run_base_spec(run_dir, base)
    model, tokenizer = load_model(spec, dtype="float32")
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ExportError(
            f"base '{spec}' loaded quantized: merge needs full-precision weights; "
            "give a float checkpoint with --base SPEC"
        )
    if (run_dir / "tokenizer_config.json").is_file():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(run_dir))
    peft_model = PeftModel.from_pretrained(model, run_dir)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, tokenizer


def save_merged(run_dir: Path, base: str, folder: Path) -> None:
    """The merged model, its tokenizer and chat template, and the run's generation settings, saved
    into `folder` with `save_pretrained`."""
    model, tokenizer = load_merged(run_dir, base)
    _generation_config(model, tokenizer, run_generation_settings(run_dir))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not (folder / "chat_template.jinja").exists() and tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def _generation_config(model: Any, tokenizer: Any, settings: GenerationConfig) -> None:
    """The run's `generation:` settings and end-of-turn stops, so a plain `generate(**inputs)`
    answers as `medlora eval`, the demo and the server do.

    The model card's snippet calls `generate` without `max_new_tokens`; with the library default
    (20 tokens) its answers would be cut off after a few words.
    """
    config = model.generation_config
    config.eos_token_id = stop_token_ids(tokenizer) or config.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.max_length = None
    config.top_k = None
    config.temperature = None
    config.top_p = None
    for key, value in settings.generate_kwargs().items():
        setattr(config, key, value)
