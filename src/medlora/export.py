"""`medlora export`: a run directory → a folder other tools load (adapter, merged model, GGUF).

- adapter (default): the PEFT adapter + tokenizer + chat template, for `PeftModel.from_pretrained`.
- `--merge`: LoRA folded into the base with peft's `merge_and_unload`, saved with `save_pretrained`
  (+ tokenizer, chat template, a generation config that stops at the end of turn). The base is always
  reloaded in float32 first: merging into quantized weights would round the LoRA update away.
- `--format gguf`: the merged model converted for llama.cpp (`model.gguf`, used by `medlora serve`),
  with llama.cpp's own `convert_hf_to_gguf.py` (extracted once from the llama-cpp-python sdist by
  `make fast`).

The run's model card (`README.md`, or a short generated one) and provenance files go with every export.
Everything is written into a scratch folder and moved in file by file (atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlora.errors import MedloraError, ModelError
from medlora.io import move_files_atomic
from medlora.models import cache_dir, load_model, prepare_tokenizer

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
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


def _generation_config(model: Any, tokenizer: Any) -> None:
    """Stop at the end of turn and allow a full answer, so a plain `generate(**inputs)` works.

    The model card's snippet calls `generate` without `max_new_tokens`; with the library default
    (20 tokens) its answers are cut off after a few words.
    """
    from medlora.serve.engine import stop_token_ids

    config = model.generation_config
    config.eos_token_id = sorted(stop_token_ids(tokenizer)) or config.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.max_new_tokens = 512
    config.max_length = None
    config.do_sample = False
    config.temperature = None
    config.top_p = None
    config.top_k = None


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    if not (folder / "chat_template.jinja").exists() and tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def model_card(run_dir: Path, base: str, merged: bool, fmt: str) -> str:
    """The run's README.md when `medlora report` wrote one, else a short card from the run's files."""
    card = run_dir / "README.md"
    if card.is_file():
        return card.read_text(encoding="utf-8")
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    adapter = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    kind = "merged model" if merged else "LoRA adapter"
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'transformers' if merged else 'peft'}",
        "tags: [medical, lora, medlora]",
        "---",
        "",
        f"# {run_dir.resolve().name} ({kind})",
        "",
        f"A {kind} fine-tuned from `{base}` with LoRA (r={adapter.get('r')}, "
        f"alpha={adapter.get('lora_alpha')}, targets {adapter.get('target_modules')}) by medlora.",
    ]
    if summary:
        lines += [
            "",
            f"Training: {summary.get('train_examples')} examples, {summary.get('steps')} steps, "
            f"final train loss {summary.get('train_loss')}, validation loss {summary.get('eval_loss')}.",
        ]
    if fmt == "gguf":
        lines += ["", "`model.gguf` runs with llama.cpp (`medlora serve DIR`)."]
    lines += [
        "",
        "## Medical disclaimer",
        "Research artefact, not a medical device: its answers are not medical advice.",
        "",
    ]
    return "\n".join(lines)


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
    """Run llama.cpp's converter on a `save_pretrained` folder (subprocess: it is a script)."""
    script = llama_cpp_tools_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(
            f"GGUF export needs llama.cpp's converter ({script} is missing): run `make fast`, "
            "or set MEDLORA_LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    if outtype not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {outtype} is not one of {', '.join(GGUF_TYPES)}")
    tmp = outfile.with_name(outfile.name + ".tmp")
    command = [
        sys.executable,
        str(script),
        str(hf_folder),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"convert_hf_to_gguf.py failed on {hf_folder}: {last[0]}")
    os.replace(tmp, outfile)
    return outfile


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
            _generation_config(model, tokenizer)
            model.save_pretrained(scratch, safe_serialization=True)
            _save_tokenizer(tokenizer, scratch)
        else:
            for name in ADAPTER_FILES + TOKENIZER_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, scratch / name)
        for name in PROVENANCE:
            if (run / name).is_file():
                shutil.copy2(run / name, scratch / name)
        (scratch / "README.md").write_text(model_card(run, spec, merge, fmt), encoding="utf-8")
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
