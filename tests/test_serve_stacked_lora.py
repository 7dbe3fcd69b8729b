"""Mixed-adapter batches through the stacked LoRA path equal each adapter run on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from serve_support import train_tiny_run, variant_adapter

from medlora.serve.adapters import BASE_ADAPTER, ModelSet
from medlora.serve.loader import build_engine

ROWS = ["a", BASE_ADAPTER, "b", "a", "b"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stacked")
    run = train_tiny_run(root, tiny_model_dir)
    return run, variant_adapter(run, root / "other", seed=1)


def row_by_row(model_set: ModelSet, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """Each row alone, with PEFT's single-adapter forward (or the base with adapters off)."""
    model = model_set.model
    outputs = []
    for index, name in enumerate(rows):
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                outputs.append(model(input_ids=ids[index : index + 1]).logits)
        else:
            model.set_adapter(name)
            outputs.append(model(input_ids=ids[index : index + 1]).logits)
    return torch.cat(outputs)


def test_a_mixed_batch_equals_each_adapter_alone(
    runs: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    run, other = runs
    served = build_engine(str(tiny_model_dir), [f"a={run}", f"b={other}"], engine="transformers")
    model_set = served.model_set
    assert model_set.uses_stacked
    ids = torch.randint(5, 60, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with model_set.rows(ROWS):
            mixed = model_set.model(input_ids=ids).logits
        alone = row_by_row(model_set, ids, ROWS)
    assert torch.allclose(mixed, alone, atol=1e-4)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-2)  # a and b answer differently

    # Unloading one adapter restacks: its rows would now be refused upstream; the others still match.
    model_set.unload("b")
    rows = ["a", BASE_ADAPTER]
    with torch.inference_mode():
        with model_set.rows(rows):
            mixed = model_set.model(input_ids=ids[:2]).logits
        alone = row_by_row(model_set, ids[:2], rows)
    assert torch.allclose(mixed, alone, atol=1e-4)


def test_a_dora_adapter_falls_back_to_peft_and_still_answers_per_row(
    runs: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    run, _ = runs
    dora = tmp_path / "dora"
    shutil.copytree(run, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True  # PEFT initializes the magnitudes from the base weights
    (dora / "adapter_config.json").write_text(json.dumps(config))
    served = build_engine(str(tiny_model_dir), [f"a={run}"], engine="transformers")
    model_set = served.model_set
    assert model_set.uses_stacked
    ids = torch.randint(5, 60, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), model_set.rows(["a", BASE_ADAPTER, "a"]):
        before = model_set.model(input_ids=ids).logits
    model_set.load("d", dora)
    assert not model_set.uses_stacked  # DoRA is a LoRA variant: PEFT's path for every row
    with torch.inference_mode(), model_set.rows(["a", BASE_ADAPTER, "a"]):
        after = model_set.model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)  # adapter a answers as it did when stacked
