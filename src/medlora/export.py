"""`medlora export`: a run directory → a folder other tools load (adapter, merged model, GGUF).

- adapter (default): the PEFT adapter + tokenizer + chat template, for `PeftModel.from_pretrained`.
- `--merge`: LoRA folded into the base with peft's `merge_and_unload`, saved with `save_pretrained`
  (+ tokenizer, chat template, a generation config that stops at the end of turn). The base is always
  reloaded in float32 first: merging into quantized weights would round the LoRA update away.
- `--format gguf`: the merged model converted for llama.cpp (`model.gguf`, used by `medlora serve`),
  with llama.cpp's own `convert_hf_to_gguf.py` (extracted once from the llama-cpp-python sdist by
  `make fast`).

Every export carries medlora's model card as `README.md` — the one `medlora report` wrote, else one
rendered now from the run's files (PEFT's template README is never used) — with the `charts/` and
images it links, and the run's provenance files. Everything is written into a scratch folder and
moved in file by file (atomic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlora.config import GenerationConfig
from medlora.errors import MedloraError, ModelError
from medlora.evaluate.generate import generate_arguments, run_generation_settings
from medlora.io import move_files_atomic
from medlora.models import cache_dir, load_model, prepare_tokenizer
from medlora.report.card import DISCLAIMER, HUB_BASE, card_header, is_medlora_card

logger = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# What llama.cpp's converter writes itself; the others are quantized from its f16 output by
# llama.cpp's quantizer. q4_0 trades answer fidelity for speed: its weights are repacked for
# AVX2/AVX-512 matmuls, ≈1.6× faster prefill than q8_0 on the 2-core reference machine.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PROVENANCE = ("recipe.yaml", "train_summary.json", "eval.json", "data_card.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class ExportError(MedloraError):
    """A run cannot be exported as asked."""


@dataclass
class ExportResult:
    out: Path
    merged: bool
    format: str
    files: list[str] = field(default_factory=list)
    gguf: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "merged": self.merged,
            "format": self.format,
            "files": self.files,
            "gguf": str(self.gguf) if self.gguf else None,
        }


def run_base_spec(run_dir: Path) -> str:
    """The base model spec the run was trained on (recipe.yaml, else the adapter config)."""
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

    check_run(run_dir)
    spec = base or run_base_spec(run_dir)
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


def _generation_config(model: Any, tokenizer: Any, settings: GenerationConfig) -> None:
    """The run's `generation:` settings and end-of-turn stops, so a plain `generate(**inputs)`
    answers as `medlora eval`, the demo and the server do.

    The model card's snippet calls `generate` without `max_new_tokens`; with the library default
    (20 tokens) its answers would be cut off after a few words.
    """
    from medlora.evaluate.generate import stop_token_ids

    config = model.generation_config
    config.eos_token_id = stop_token_ids(tokenizer) or config.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.max_length = None
    config.top_k = None
    config.temperature = None
    config.top_p = None
    for key, value in settings.generate_kwargs().items():
        setattr(config, key, value)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    if not (folder / "chat_template.jinja").exists() and tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


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


def llama_cpp_tools_dir() -> Path:
    """Where llama.cpp's converter scripts are (`MEDLORA_LLAMA_CPP_DIR`, else the medlora cache)."""
    env = os.environ.get("MEDLORA_LLAMA_CPP_DIR")
    return Path(env).expanduser() if env else cache_dir() / "llama.cpp"


def install_llama_cpp_tools(sdist: str | os.PathLike[str], dest: Path | None = None) -> Path:
    """Extract convert_hf_to_gguf.py and what it imports from a llama-cpp-python sdist (`make fast`)."""
    dest = dest or llama_cpp_tools_dir()
    scratch = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    wanted = (
        "convert_hf_to_gguf.py",
        "convert_lora_to_gguf.py",
        "conversion/",
        "gguf-py/",
        "LICENSE",
    )
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner and (inner in wanted or inner.startswith(wanted)) and member.isfile():
                member.name = inner
                tar.extract(member, scratch, filter="data")
    if not (scratch / "convert_hf_to_gguf.py").is_file():
        raise ExportError(
            f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py: give a llama-cpp-python sdist"
        )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(scratch, dest)
    return dest


def convert_to_gguf(hf_folder: Path, outfile: Path, outtype: str = "q8_0") -> Path:
    """Run llama.cpp's converter on a `save_pretrained` folder (subprocess: it is a script), then
    its quantizer for the types the converter does not write."""
    script = llama_cpp_tools_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(
            f"GGUF export needs llama.cpp's converter ({script} is missing): run `make fast`, "
            "or set MEDLORA_LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    if outtype not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {outtype} is not one of {', '.join(GGUF_TYPES)}")
    direct = outtype in CONVERTER_TYPES
    if not direct:
        _llama_cpp_for(outtype)  # fail before minutes of conversion
    tmp = outfile.with_name(outfile.name + (".tmp" if direct else ".f16.tmp"))
    command = [
        sys.executable,
        str(script),
        str(hf_folder),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype if direct else "f16",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"convert_hf_to_gguf.py failed on {hf_folder}: {last[0]}")
    if not direct:
        try:
            tmp = quantize_gguf(tmp, outfile.with_name(outfile.name + ".tmp"), outtype)
        finally:
            outfile.with_name(outfile.name + ".f16.tmp").unlink(missing_ok=True)
    os.replace(tmp, outfile)
    return outfile


def _llama_cpp_for(gguf_type: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"--gguf-type {gguf_type} needs llama.cpp's quantizer: install llama-cpp-python "
            "(make fast), or use --gguf-type q8_0"
        ) from None
    return llama_cpp


def quantize_gguf(source: Path, target: Path, gguf_type: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) from an f16/f32 GGUF to `gguf_type`."""
    import ctypes

    from medlora.serve.fast import default_threads

    llama_cpp = _llama_cpp_for(gguf_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[gguf_type]
    params.nthread = default_threads()
    # llama.cpp logs every tensor it quantizes; keep its errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp could not quantize {source} to {gguf_type} (status {status})")
    return target


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    merge: bool = False,
    fmt: str = "hf",
    gguf_type: str = "q8_0",
    base: str | None = None,
) -> ExportResult:
    """Export a run: adapter only, merged model, or merged model + GGUF (which implies --merge)."""
    run, out = Path(run_dir), Path(out)
    check_run(run)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    if out.resolve() == run.resolve():
        raise ExportError(f"--out {out} is the run directory itself: give a new folder")
    merge = merge or fmt == "gguf"
    spec = base or run_base_spec(run)
    scratch = out.parent / f".{out.name}.export.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if merge:
            model, tokenizer = load_merged(run, spec)
            _generation_config(model, tokenizer, run_generation_settings(run_dir))
            model.save_pretrained(scratch, safe_serialization=True)
            _save_tokenizer(tokenizer, scratch)
        else:
            for name in ADAPTER_FILES + TOKENIZER_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, scratch / name)
        for name in PROVENANCE:
            if (run / name).is_file():
                shutil.copy2(run / name, scratch / name)
        card = model_card(run, spec, merge, fmt, repo_id=str(out.resolve()))
        (scratch / "README.md").write_text(card, encoding="utf-8")
        copy_card_files(card, run, scratch)
        if fmt == "gguf":
            convert_to_gguf(scratch, scratch / "model.gguf", gguf_type)
        manifest = {
            "run": str(run.resolve()),
            "base_model": spec,
            "merged": merge,
            "format": fmt,
            "gguf_type": gguf_type if fmt == "gguf" else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (scratch / "medlora_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        moved = move_files_atomic(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(
        out=out,
        merged=merge,
        format=fmt,
        files=sorted(p.name for p in moved),
        gguf=out / "model.gguf" if fmt == "gguf" else None,
    )


def adapter_fingerprint(run_dir: Path, base: str) -> str:
    """Identifies an adapter's weights + base, to cache its GGUF export."""
    digest = hashlib.sha256(base.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = run_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_gguf(
    run_dir: str | os.PathLike[str], base: str | None = None, gguf_type: str = "q8_0"
) -> Path:
    """The run merged and converted to GGUF once into the cache; later calls reuse it."""
    run = Path(run_dir)
    check_run(run)
    spec = base or run_base_spec(run)
    folder = (
        cache_dir()
        / "exports"
        / f"{run.resolve().name}-{gguf_type}-{adapter_fingerprint(run, spec)}"
    )
    if not (folder / "model.gguf").is_file():
        export_run(run, folder, fmt="gguf", gguf_type=gguf_type, base=spec)
    return folder / "model.gguf"


def base_gguf(spec: str, gguf_type: str = "q8_0") -> Path:
    """A GGUF for a base model spec: the file itself for .gguf specs and the alias, else converted."""
    from medlora.models import local_folder, resolve

    source = resolve(spec)
    if source.kind in ("alias", "gguf"):
        return Path(source.location) / str(source.gguf_file)
    found = sorted(Path(source.location).glob("*.gguf")) if source.kind == "dir" else []
    if found:
        return found[0]
    folder = Path(local_folder(spec))
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    target = cache_dir() / "exports" / f"base-{folder.name}-{gguf_type}-{key}.gguf"
    if not target.is_file():
        if not (folder / "config.json").is_file():
            raise ModelError(f"cannot convert '{spec}' to GGUF: {folder} has no config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_to_gguf(folder, target, gguf_type)
    return target
