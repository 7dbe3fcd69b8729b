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

import json
import os
import shutil
import time
from pathlib import Path

from medlora.export.card import copy_card_files, model_card
from medlora.export.common import DEFAULT_GGUF_TYPE, FORMATS, ExportError, ExportResult
from medlora.export.gguf import adapter_fingerprint, convert_to_gguf
from medlora.export.merge import run_base_spec, save_merged
from medlora.io import move_files_atomic
from medlora.models import cache_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Copied into the export's top folder; an older run kept its data card at RUN/data_card.json.
PROVENANCE = (
    "recipe.yaml",
    "train_summary.json",
    "eval.json",
    "data/data_card.json",
    "data_card.json",
)
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


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    merge: bool = False,
    fmt: str = "hf",
    gguf_type: str = DEFAULT_GGUF_TYPE,
    base: str | None = None,
) -> ExportResult:
    """Export a run: adapter only, merged model, or merged model + GGUF (which implies --merge)."""
    run, out = Path(run_dir), Path(out)
    spec = run_base_spec(run, base)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    if out.resolve() == run.resolve():
        raise ExportError(f"--out {out} is the run directory itself: give a new folder")
    merge = merge or fmt == "gguf"
    scratch = out.parent / f".{out.name}.export.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if merge:
            save_merged(run, spec, scratch)
        # An adapter export is the run's own files; every export carries the provenance files.
        for name in PROVENANCE if merge else ADAPTER_FILES + TOKENIZER_FILES + PROVENANCE:
            if (run / name).is_file():
                shutil.copy2(run / name, scratch / Path(name).name)
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
        files=sorted(p.name for p in moved),
        gguf=out / "model.gguf" if fmt == "gguf" else None,
    )


def cached_gguf(
    run_dir: str | os.PathLike[str], base: str | None = None, gguf_type: str = DEFAULT_GGUF_TYPE
) -> Path:
    """The run merged and converted to GGUF once into the cache; later calls reuse it."""
    run = Path(run_dir)
    spec = run_base_spec(run, base)
    name = f"{run.resolve().name}-{gguf_type}-{adapter_fingerprint(run, spec)}"
    folder = cache_dir() / "exports" / name
    if not (folder / "model.gguf").is_file():
        export_run(run, folder, fmt="gguf", gguf_type=gguf_type, base=spec)
    return folder / "model.gguf"
