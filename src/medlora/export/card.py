"""The model card an export carries: the one `medlora report` wrote, else one rendered now.

Both come from medlora.report's renderer; here the card is only adapted to the export (a merged
model's front matter and usage) and the files it links are copied beside it.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from medlora.config import load_recipe
from medlora.errors import MedloraError
from medlora.report.card import is_medlora_card, merged_usage, render_card, render_short_card
from medlora.report.facts import ReportOptions, collect, collect_short

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
        text = _rendered_card(run_dir, repo_id) or render_short_card(
            collect_short(run_dir, base, repo_id)
        )
    return _card_for_export(text, run_dir, merged, fmt, repo_id or str(run_dir.resolve()))


def _rendered_card(run_dir: Path, repo_id: str | None) -> str | None:
    try:
        # Exporting only reads the run; the charts it has are linked and copied.
        return render_card(collect(run_dir, ReportOptions(repo_id=repo_id)))
    except Exception as error:  # a card must never stop an export: fall back to the short one
        logger.warning(
            "cannot render the model card from %s (%s): writing a short one", run_dir, error
        )
        return None


def _system_prompt(run_dir: Path) -> str | None:
    """The run's system prompt (None when its recipe cannot be read)."""
    try:
        return load_recipe(run_dir / "recipe.yaml").data.system_prompt
    except (OSError, ValueError, MedloraError):
        return None


def _card_for_export(text: str, run_dir: Path, merged: bool, fmt: str, repo_id: str) -> str:
    """A merged export is a plain transformers model: say so in the front matter and the usage."""
    if not merged:
        return text
    if text.startswith("---\n") and "\n---" in text[3:]:
        try:
            card = ModelCard(text)
        except (ValueError, yaml.YAMLError):  # front matter that is not a mapping
            card = None
        if card is not None:
            card.data.library_name = "transformers"
            tags = [t for t in card.data.tags or [] if t != "peft"]
            card.data.tags = tags + (["gguf"] if fmt == "gguf" else [])
            text = str(card)
    section = merged_usage(repo_id, _system_prompt(run_dir), fmt == "gguf")
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
