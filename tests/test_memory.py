"""Memory as a budget: the row choice on a measured line, and a real run that holds its budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medlora.config import recipe_from_dict
from medlora.train.memory import GIB, HEADROOM, PeakSampler, choose_row_tokens, longest_fitting_row

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def test_longest_fitting_row_is_a_multiple_of_the_step_under_the_headroom() -> None:
    fixed, per_token = 1.0 * GIB, 1e6  # 1 GiB + 1 MB per token
    tokens = longest_fitting_row(fixed, per_token, 2 * GIB, step=256)
    assert tokens % 256 == 0
    assert fixed + per_token * tokens <= HEADROOM * 2 * GIB < fixed + per_token * (tokens + 256)
    assert longest_fitting_row(fixed, per_token, 1 * GIB, step=256) == 0


def test_choose_row_tokens_checkpoints_when_one_row_does_not_fit_and_refuses_below_that() -> None:
    checkpointing = []

    def probe(tokens: int) -> int:
        per_token = 0.5e6 if checkpointing else 4e6  # checkpointing keeps an eighth
        return int(GIB + per_token * tokens)

    choice = choose_row_tokens(
        probe, 2.0, 256, enable_checkpointing=lambda: checkpointing.append(1)
    )
    assert choice.gradient_checkpointing and choice.tokens_per_batch >= 256
    assert choice.predicted_peak_gb <= HEADROOM * 2.0
    with pytest.raises(ValueError, match="one row of 256 tokens needs"):
        choose_row_tokens(lambda tokens: int(3 * GIB + tokens), 2.0, 256)


def test_peak_sampler_sees_a_short_lived_allocation() -> None:
    import torch

    with PeakSampler() as idle:
        pass
    with PeakSampler() as busy:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del block
    assert busy.peak - idle.peak > 32 * 1024 * 1024


def test_auto_rows_need_a_budget_and_packing() -> None:
    from medlora.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="needs train.max_memory_gb"):
        recipe_from_dict({}, ["train.packing=true", "train.tokens_per_batch=auto"])


def _wide_model(folder: Path, tokenizer: object) -> Path:
    """A tiny Llama with a narrow residual and a wide MLP: activations (per token ~ the MLP's
    width), not weights, dominate a long row's memory. Hidden 64 x 8,192 has hidden 128 x 4,096's
    weights, so 2,048-token rows peak near where 4,096-token rows did, in half the matmul work
    (an AVX2 CPU emulates bf16; most of the bf16 case's cut from 230 s came from grad_accum=1)."""
    from conftest import build_tiny_llama

    model = build_tiny_llama(
        len(tokenizer),  # type: ignore[arg-type]
        hidden_size=64, intermediate_size=8192, num_hidden_layers=4, max_position_embeddings=1024,
    )  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    model.save_pretrained(folder)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def _train(tmp_path: Path, name: str, model: Path, prepared: Path, overrides: list[str]) -> dict:
    config = tmp_path / f"{name}.json"
    run_dir = tmp_path / name
    config.write_text(
        json.dumps(
            {
                "model": str(model),
                "prepared": str(prepared),
                "run_dir": str(run_dir),
                "overrides": overrides,
            }  # fmt: skip
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, TESTS / "train_driver.py", config], env=env, check=True)
    return json.loads((run_dir / "train_summary.json").read_text())


LONG_ROW = 2048  # tokens per row of the run without a budget


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_with_a_budget_stays_under_it_where_long_rows_would_not(
    tmp_path: Path, tiny_tokenizer: object, precision: str
) -> None:
    from helpers import tiny_records, write_prepared

    model = _wide_model(tmp_path / "wide", tiny_tokenizer)
    records = tiny_records(30)  # 150 short examples: a row of LONG_ROW tokens fills up
    prepared = write_prepared(tmp_path / "prepared", records, records[:4], records[:4])
    common = [
        # One row per step: the peak is one row's, and the card's grad_accum 4 would do it 4 times.
        "train.packing=true", "train.max_steps=1", "train.grad_accum=1", "train.eval_steps=0",
        "train.lr=1e-3",
        "data.max_seq_len=128", "data.system_prompt=null", "lora.target_modules=all-linear",
        f"train.precision={precision}",  # CPU bf16: bf16 weights, padded row widths
    ]  # fmt: skip
    long_rows = _train(
        tmp_path, "long", model, prepared, [*common, f"train.tokens_per_batch={LONG_ROW}"]
    )
    # A budget the long rows break: 80 % of their peak.
    budget_gb = round(0.8 * long_rows["peak_rss_mb"] / 1024, 3)
    fitted = _train(
        tmp_path,
        "fitted",
        model,
        prepared,
        [*common, "train.tokens_per_batch=auto", f"train.max_memory_gb={budget_gb}"],
    )
    assert long_rows["peak_rss_mb"] / 1024 > budget_gb
    assert fitted["row_choice"]["tokens_per_batch"] < LONG_ROW
    assert fitted["peak_rss_mb"] / 1024 <= budget_gb
