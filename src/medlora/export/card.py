"""The model card an export carries: the one `medlora report` wrote, else one rendered now."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from medlora.evaluate.generate import generate_arguments, run_generation_settings
from medlora.report.card import DISCLAIMER, HUB_BASE, card_header, is_medlora_card

logger = logging.getLogger(__name__)


def model_card(run_dir: Path, base: str, merged: bool, fmt: str, repo_id: str | None = None) -> str:
    """medlora's card for an export of the run.

    The run's README.md when `medlora report` wrote it; otherwise (no card, or only the template
    PEFT's save_pretrained leaves in every run) the same card rendered now from the run's files,
    and if those cannot be read, a short card from what can. `repo_id` is where the usage snippet
    loads from (default: the run's own folder). Merged exports get a snippet that needs no peft.
    """
    path = run_dir / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not is_medlora_card(text):
        text = _rendered_card(run_dir, repo_id) or short_card(run_dir, base, repo_id)
    return _card_for_export(text, run_dir, merged, fmt, repo_id or str(run_dir.resolve()))


def _rendered_card(run_dir: Path, repo_id: str | None) -> str | None:
    from medlora.report.card import collect, render_card

    try:
        # draw_charts=False: exporting only reads the run; charts it has are linked and copied.
        return render_card(collect(run_dir, repo_id=repo_id, draw_charts=False))
    except Exception as error:  # a card must never stop an export: fall back to the short one
        logger.warning(
            "cannot render the model card from %s (%s): writing a short one", run_dir, error
        )
        return None


def _read(path: Path) -> dict[str, Any]:
    """A run file as a dict, {} when it is missing or unreadable (the short card says what it has)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def short_card(run_dir: Path, base: str, repo_id: str | None = None) -> str:
    """Base model, recipe, the metrics the run holds, usage and the disclaimer, from whatever of
    the run's files is readable (for runs `medlora report` cannot read)."""
    base = HUB_BASE.get(base, base)  # the Hub repo a local alias stands for, as `medlora report`
    recipe, adapter = _read(run_dir / "recipe.yaml"), _read(run_dir / "adapter_config.json")
    summary, evaluation = _read(run_dir / "train_summary.json"), _read(run_dir / "eval.json")
    lora, train, data = (_dict(recipe.get(k)) for k in ("lora", "train", "data"))
    sources = data.get("sources")
    recipe_rows = [
        ("LoRA r / alpha", f"{adapter.get('r', lora.get('r'))} / {adapter.get('lora_alpha')}"),
        ("LoRA target modules", adapter.get("target_modules") or lora.get("target_modules")),
        ("learning rate", train.get("lr")),
        ("epochs / max steps", f"{train.get('epochs')} / {train.get('max_steps')}"),
        (
            "batch size × gradient accumulation",
            f"{train.get('batch_size')} × {train.get('grad_accum')}",
        ),
        ("max sequence length", data.get("max_seq_len")),
        ("data sources", ", ".join(map(str, sources)) if isinstance(sources, list) else sources),
    ]
    metric_rows = [
        (label, summary.get(key))
        for key, label in (
            ("train_examples", "training examples"),
            ("steps", "optimizer steps"),
            ("train_loss", "final train loss"),
            ("eval_loss", "validation loss"),
            ("tokens_per_s", "training tokens / s"),
        )
    ]
    metric_rows.append(("held-out answer loss", evaluation.get("loss")))
    metric_rows.append(("held-out answer loss of the base model", evaluation.get("base_loss")))
    for name, entry in _dict(_dict(evaluation.get("quality")).get("metrics")).items():
        metric_rows.append((f"{name}, held-out mean", _dict(_dict(entry).get("model")).get("mean")))
    metrics = [f"- {label}: {value}" for label, value in metric_rows if value is not None]
    system = data.get("system_prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "What are the symptoms of asthma?"}
    ]
    where = repo_id or str(run_dir.resolve())
    front = {"base_model": base, "library_name": "peft", "tags": ["medical", "lora", "peft"]}
    lines = [
        *card_header(
            front,
            f"{base} + LoRA for medical question answering",
            f"A LoRA adapter (PEFT) fine-tuned from `{base}` by medlora "
            f"(run `{run_dir.resolve().name}`).",
        ),
        "## Recipe",
        "",
        *[f"- {label}: {value}" for label, value in recipe_rows if value not in (None, "")],
        "",
        "## Metrics",
        "",
        *(metrics or ["No metrics in this run: run `medlora eval`, then `medlora report RUN`."]),
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})  # the chat template used in training",
        f"model = PeftModel.from_pretrained(base, {where!r})",
        "",
        f"messages = {json.dumps(messages, ensure_ascii=False)}",
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        f"output = model.generate(**inputs, {generate_arguments(run_generation_settings(run_dir))})",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Medical disclaimer",
        "",
        DISCLAIMER,
        "",
        "_Written by `medlora export` from the files in the run directory; `medlora report RUN` "
        "writes the full card._",
        "",
    ]
    return "\n".join(lines)


def _merged_usage(repo_id: str, system: str | None, fmt: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "What are the symptoms of asthma?"}
    ]
    usage = f"""LoRA is merged into the weights: plain transformers loads this model, no peft needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({repo_id!r})
tokenizer = AutoTokenizer.from_pretrained({repo_id!r})  # the chat template used in training

messages = {json.dumps(messages, ensure_ascii=False)}
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs)  # generation_config.json: greedy, stops at the end of the turn
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
    if fmt == "gguf":
        usage += (
            "\n\n`model.gguf` is the same model for llama.cpp: `medlora serve FOLDER` or "
            "`llama-server -m model.gguf`. Its weights are quantized, so greedy answers can part "
            "from the float model's after some words."
        )
    return usage


def _card_for_export(text: str, run_dir: Path, merged: bool, fmt: str, repo_id: str) -> str:
    """A merged export is a plain transformers model: say so in the front matter and the usage."""
    if not merged:
        return text
    if text.startswith("---\n") and "\n---" in text[3:]:
        end = text.index("\n---", 3)
        try:
            front = yaml.safe_load(text[4:end]) or {}
        except yaml.YAMLError:
            front = None
        if isinstance(front, dict):
            front["library_name"] = "transformers"
            tags = [t for t in front.get("tags") or [] if t != "peft"]
            front["tags"] = tags + (["gguf"] if fmt == "gguf" else [])
            text = "---\n" + yaml.safe_dump(front, sort_keys=False).strip() + text[end:]
    system = ((_read(run_dir / "recipe.yaml").get("data")) or {}).get("system_prompt")
    section = "## Usage\n\n" + _merged_usage(repo_id, system, fmt) + "\n\n"
    start = text.find("\n## Usage\n")
    if start >= 0:
        after = text.find("\n## ", start + 1)
        return text[: start + 1] + section + (text[after + 1 :] if after >= 0 else "")
    for heading in ("\n## Limitations\n", "\n## Medical disclaimer\n"):
        at = text.find(heading)
        if at >= 0:
            return text[: at + 1] + section + text[at + 1 :]
    return text.rstrip() + "\n\n" + section


# Markdown images ![alt](path) and HTML <img src="path"> in the card.
_CARD_LINKS = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\s[^>]*src=[\"']([^\"']+)")


def copy_card_files(card: str, run_dir: Path, dest: Path) -> list[str]:
    """Copy the run's charts/ and every local file the card links into `dest`, so the card's
    images show in the export folder and on the Hub; links outside the run are left alone."""
    run = run_dir.resolve()
    wanted = {
        p.relative_to(run)
        for p in sorted((run / "charts").rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")
    }
    for match in _CARD_LINKS.finditer(card):
        link = (match.group(1) or match.group(2)).split("#")[0].split("?")[0]
        if not link or "://" in link or link.startswith(("/", "data:")):
            continue
        source = (run / link).resolve()
        if source.is_file() and source.is_relative_to(run):
            wanted.add(source.relative_to(run))
    for relative in sorted(wanted):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / relative, target)
    return sorted(p.as_posix() for p in wanted)
