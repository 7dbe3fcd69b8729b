"""`medlora push`: upload an export (or run) folder to a Hugging Face Hub model repo.

`huggingface_hub.upload_folder` does the work; the token comes from `HF_TOKEN` or the cached
`hf auth login`. `dry_run` only lists what would go up: the plan filters the folder with
huggingface_hub's own `filter_repo_objects`, the same patterns `upload_folder` gets plus its default
ignores, so the list is exactly what an upload sends. Offline, it fails in one line within seconds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.errors import MedloraError
from medlora.models import hub_endpoint, hub_offline, hub_reachable

# Left behind by interrupted writes or training; never worth uploading. huggingface_hub matches
# these with fnmatch on the path from the folder (`*` crosses `/`): `X/**` is a top-level folder,
# `**/X/**` the same folder at any depth.
SKIP = (
    "*.tmp",
    ".*",
    "**/.*",
    "checkpoints/**",
    "**/checkpoints/**",
    "__pycache__/**",
    "**/__pycache__/**",
    "*.pyc",
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class PushError(MedloraError):
    """A folder cannot be pushed to the Hub."""


@dataclass
class PushPlan:
    """What an upload sends: the folder and the files under it."""

    folder: Path
    files: list[tuple[str, int]]  # path in repo, size in bytes

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_push(folder: str | os.PathLike[str], repo_id: str) -> PushPlan:
    """The files under `folder` that `upload_folder(ignore_patterns=SKIP)` uploads, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = Path(folder)
    if not REPO_ID.match(repo_id):
        raise PushError(f"--repo {repo_id} is not USER/NAME (letters, digits, '-', '_', '.')")
    if not root.is_dir():
        raise PushError(f"folder not found: {root} (give a folder written by `medlora export`)")
    names = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    ignored = [*SKIP, *DEFAULT_IGNORE_PATTERNS]  # upload_folder adds the defaults itself
    files = [
        (name, (root / name).stat().st_size)
        for name in filter_repo_objects(names, ignore_patterns=ignored)
    ]
    if not files:
        raise PushError(f"{root} holds no files to upload")
    if not {"config.json", "adapter_config.json", "model.gguf"} & {name for name, _ in files}:
        raise PushError(
            f"{root} holds no model (config.json, adapter_config.json or model.gguf): run `medlora export` first"
        )
    return PushPlan(root, files)


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
) -> tuple[PushPlan, str | None]:
    """Create the repo if needed and upload the folder; returns the plan and the commit URL."""
    plan = plan_push(folder, repo_id)
    if dry_run:
        return plan, None
    if hub_offline():
        raise PushError(
            "push needs the network but HF_HUB_OFFLINE is set: unset it where you are online"
        )
    if not hub_reachable():
        raise PushError(
            f"cannot reach {hub_endpoint()}: push from a machine that is online (or set HF_ENDPOINT)"
        )
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=hub_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info: Any = api.upload_folder(
            folder_path=str(plan.folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload medlora export",
            ignore_patterns=list(SKIP),
        )
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", "?")
        hint = "check the token's write access" if status in (401, 403) else "see the Hub's answer"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PushError(f"upload to {repo_id} failed (HTTP {status}: {first}); {hint}") from None
    return plan, str(getattr(info, "commit_url", info))
