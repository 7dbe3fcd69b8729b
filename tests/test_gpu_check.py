"""The GPU check's code path, on a tiny model on the CPU (the real run needs a lent GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_check.sh")], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_tiny_cpu_run_compares_both_engines(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_train.py"), "--tiny", "--device", "cpu"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    peer, medlora, *gpu_only = summary["rows"]
    # At the peer's memory, + liger, QLoRA: GPU-only rows, skipped with a reason on a CPU.
    assert [row["engine"] for row in gpu_only] == [
        "medlora at the peer's memory",
        "medlora at the peer's memory + liger",
        "medlora QLoRA (4-bit NF4)",
    ]
    assert all("CUDA" in row["skipped"] for row in gpu_only)
    for row in (peer, medlora):
        assert "error" not in row
        assert row["steps"] == 3 and row["tokens"] > row["answer_tokens"] > 0
        assert row["tokens_per_s"] > 0 and row["lora_dtype"] == "torch.float32"
    assert medlora["engine"] == "medlora train()"
    assert "train.packing=true" in medlora["overrides"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| peer: HF Trainer + peft (model card) |" in table
    assert "medlora train() ÷ peer" in table and "| medlora QLoRA (4-bit NF4) | skipped" in table
    assert (tmp_path / "medlora_metrics.jsonl").is_file()
