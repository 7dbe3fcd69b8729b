"""`medlora push` against a local HTTP server that speaks the few Hub endpoints upload_folder uses."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medlora.cli import app
from medlora.push import PushError, plan_push, push_folder


class FakeHub(BaseHTTPRequestHandler):
    """create repo → validate README → preupload (all 'regular') → commit (NDJSON, base64 contents)."""

    repos: dict[str, dict[str, bytes]] = {}
    seen: list[tuple[str, str, str]] = []

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") != "Bearer hf_test_token":
            self._reply(401, {"error": "Invalid credentials"})
        elif self.path == "/api/repos/create":
            body = json.loads(raw)
            repo = f"{body.get('organization') or 'user'}/{body['name']}"
            self.repos.setdefault(repo, {})
            self._reply(
                200,
                {
                    "url": f"http://{self.headers['Host']}/{repo}",
                    "name": repo,
                    "private": body.get("private"),
                },
            )
        elif self.path == "/api/validate-yaml":  # the Hub checks a README's metadata block
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            self._reply(200, {"files": modes, "commitOid": "0" * 40})
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            for line in raw.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.repos.setdefault(repo, {})[value["path"]] = base64.b64decode(
                        value["content"]
                    )
            self._reply(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'1' * 40}",
                    "commitOid": "1" * 40,
                },
            )
        else:
            self._reply(404, {"error": f"unexpected {self.path}"})

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(("GET", self.path, ""))
        self._reply(404, {"error": f"unexpected {self.path}"})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    FakeHub.repos, FakeHub.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield url
    server.shutdown()
    thread.join()


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text("# card\n")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / "notes.txt").write_text("nested")
    (folder / "model.safetensors.tmp").write_text("half-written")  # left by a killed write
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("local only")
    return folder


def test_upload_reaches_the_hub_byte_for_byte(hub: str, export_dir: Path) -> None:
    plan, url = push_folder(export_dir, "alice/med-model", private=True)
    assert url and "alice/med-model/commit/" in url
    stored = FakeHub.repos["alice/med-model"]
    assert set(stored) == {"config.json", "README.md", "model.safetensors", "sub/notes.txt"}
    for name, data in stored.items():
        assert data == (export_dir / name).read_bytes()
    assert [name for name, _ in plan.files] == sorted(stored)
    assert all(auth == "Bearer hf_test_token" for _, _, auth in FakeHub.seen if auth)


def test_dry_run_lists_files_and_sends_nothing(hub: str, export_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["push", str(export_dir), "--repo", "alice/med-model", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "sub/notes.txt" in result.output
    assert ".tmp" not in result.output and ".cache" not in result.output
    assert FakeHub.seen == []


def test_offline_is_one_line(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["push", str(export_dir), "--repo", "alice/med-model"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0]


def test_unreachable_hub_fails_fast(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(PushError, match="cannot reach"):
        push_folder(export_dir, "alice/med-model")


def test_bad_token_is_explained(
    hub: str, export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PushError, match="HTTP 401"):
        push_folder(export_dir, "alice/med-model")


def test_bad_repo_id_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(PushError, match="USER/NAME"):
        plan_push(tmp_path, "no-slash")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PushError, match="no model"):
        plan_push(tmp_path, "alice/x")


def test_dry_run_lists_exactly_what_upload_folder_sends(hub: str, export_dir: Path) -> None:
    """Nested folders included: a run's checkpoints/ and caches at any depth, hidden files, and
    whatever huggingface_hub itself leaves out (.git, .cache/huggingface) never go up, and the
    dry run says so file for file."""
    nested = {
        "checkpoints/checkpoint-2/adapter_model.safetensors": "top-level checkpoint",
        "runs/a/checkpoints/checkpoint-4/adapter_model.safetensors": "nested checkpoint",
        "runs/a/adapter_config.json": "{}",
        "runs/a/__pycache__/notes.txt": "cache",
        "runs/a/.hidden/file.txt": "hidden folder",
        "runs/a/.env": "hidden file",
        "pkg/__pycache__/mod.cpython-311.pyc": "bytecode",
        ".git/config": "git",
        "sub/.git/HEAD": "nested git",
        "sub/.cache/huggingface/download/x": "hub cache",
        "sub/deeper/weights.bin": "kept",
        "sub/half.bin.tmp": "half-written",
    }
    for name, text in nested.items():
        (export_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (export_dir / name).write_text(text)
    plan, _ = push_folder(export_dir, "alice/med-model", dry_run=True)
    assert FakeHub.seen == []
    push_folder(export_dir, "alice/med-model")
    uploaded = sorted(FakeHub.repos["alice/med-model"])
    assert [name for name, _ in plan.files] == uploaded
    assert "sub/deeper/weights.bin" in uploaded and "runs/a/adapter_config.json" in uploaded
    assert not [name for name in uploaded if "checkpoints" in name or "__pycache__" in name]
