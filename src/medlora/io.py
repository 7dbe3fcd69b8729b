"""Atomic file writes: a killed process leaves the previous good file or none, never half of one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _fsync_replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    # fsync the folder so the rename itself survives a power cut.
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _scratch(final: Path) -> Path:
    # One scratch name per process: under torchrun every rank may write the same file, and a
    # shared name would let one rank truncate another's half-written scratch before its rename.
    return final.with_name(f"{final.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | os.PathLike[str], text: str | Iterable[str]) -> Path:
    """Write `text` (or its pieces, one at a time) to `path` via a scratch file + fsync + rename."""
    return _write_atomic(path, [text] if isinstance(text, str) else text, "w")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` via a scratch file + fsync + rename (images, binary blobs)."""
    return _write_atomic(path, [data], "wb")


def _write_atomic(path: str | os.PathLike[str], pieces: Iterable[Any], mode: str) -> Path:
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(final)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            handle.writelines(pieces)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_replace(tmp, final)
    return final


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    # Line by line: a large file is never built whole in memory.
    return write_text_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one line and flush it: a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def move_files_atomic(src_dir: Path, dst_dir: Path) -> list[Path]:
    """Move every file of `src_dir` into `dst_dir`, each with one atomic rename, then drop `src_dir`.

    Used for folders written by libraries (`save_pretrained`): they write into a scratch folder
    beside the destination, so each final file appears whole or not at all.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for item in sorted(src_dir.iterdir()):
        target = dst_dir / item.name
        if item.is_dir():
            if target.exists():
                shutil.rmtree(target)
            os.replace(item, target)
        else:
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
            _fsync_replace(item, target)
        moved.append(target)
    shutil.rmtree(src_dir, ignore_errors=True)
    return moved
