"""Preference tuning (train.method dpo / orpo) on the tiny Llama with real MedQuAD pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import write_prepared

from medlora.config import load_recipe, recipe_from_dict
from medlora.data.medquad import load_medquad
from medlora.data.records import Record
from medlora.errors import ConfigError, DataError, TrainingError
from medlora.io import read_jsonl, write_jsonl_atomic
from medlora.models import load_model, load_with_adapter
from medlora.train import train
from medlora.train.preference_pairs import PAIRS_FILE, PreferencePair, preference_margins

MAX_LEN = 96
FAST = [
    "train.lr=0.01",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=8",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
    "train.seed=0",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=all-linear",
    "data.system_prompt=null",
    f"data.max_seq_len={MAX_LEN}",
]


def _medquad_records(data_dir: Path, count: int) -> list[Record]:
    """Real MedQuAD QA records (CancerGov), whitespace-normalised and cut to a short answer."""
    folder = data_dir / "medquad" / "1_CancerGov_QA"
    if not folder.is_dir():
        pytest.skip(f"MedQuAD collection missing: {folder}")
    records, _ = load_medquad(folder)
    picked: list[Record] = []
    seen: set[str] = set()
    for record in records:
        answer = " ".join(record.answer.split())[:160]
        if answer in seen or len(answer) < 80:
            continue
        seen.add(answer)
        picked.append(Record(record.id, record.question, answer, record.source, topic=record.topic))
        if len(picked) == count:
            break
    return picked


def _medquad_pairs(data_dir: Path, count: int = 8) -> list[PreferencePair]:
    """chosen = the record's reference answer, rejected = the next record's (another topic's)."""
    records = _medquad_records(data_dir, count)
    return [
        PreferencePair(r.question, r.answer, records[(i + 1) % len(records)].answer, r.id)
        for i, r in enumerate(records)
    ]


def _write_pairs(path: Path, pairs: list[PreferencePair]) -> Path:
    rows = [{"prompt": p.question, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    return write_jsonl_atomic(path, rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_grows_the_chosen_margin(
    method: str, tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    pairs = _medquad_pairs(data_dir)
    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", pairs)
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*FAST, f"train.method={method}", f"train.preference_data=jsonl:{pairs_file}"],
    )
    model, tokenizer = load_model(str(tiny_model_dir))
    before = preference_margins(model, tokenizer, pairs, None, MAX_LEN)
    run = tmp_path / "run"
    result = train(recipe, run, model_and_tokenizer=(model, tokenizer))
    assert result.steps == 8 and result.train_examples == len(pairs)

    reloaded, tokenizer = load_with_adapter(str(tiny_model_dir), run)
    after = preference_margins(reloaded, tokenizer, pairs, None, MAX_LEN)
    assert len(after) == len(before) == len(pairs)
    assert _mean(after) > _mean(before) + 5.0, (before, after)
    # Rejected answers are other records' chosen ones (same collection, similar openings), so
    # ORPO's likelihood term lifts some of them too (6 of 8 pairs improve here, DPO 8 of 8).
    assert sum(a > b for a, b in zip(after, before, strict=True)) > len(pairs) / 2

    # The run directory is an SFT run's: eval / serve / export read it unchanged.
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "chat_template.jinja",
        "recipe.yaml",
        "metrics.jsonl",
        "data/data_card.json",
        "train_summary.json",
        "charts/loss.png",
    ):
        assert (run / name).is_file(), name
    assert not (run / "ref").exists()  # DPO's frozen reference adapter is not saved
    assert f"method: {method}" in (run / "recipe.yaml").read_text()
    rows = [row for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 9))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "rewards/margins"):
        assert all(key in row for row in rows), key
    margins = [row["rewards/margins"] for row in rows]
    assert _mean(margins[-3:]) > _mean(margins[:3])
    card = json.loads((run / "data" / "data_card.json").read_text())
    assert card["preference"]["pairs"] == len(pairs) and card["used"]["train"] == len(pairs)


def test_dpo_continues_from_an_sft_adapter(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    records = _medquad_records(data_dir, 6)
    prepared = write_prepared(tmp_path / "prepared", records, records[:2], records[:2])
    sft_recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*FAST, "train.max_steps=4", "train.eval_steps=0"],
    )
    train(sft_recipe, tmp_path / "sft", prepared_dir=prepared)
    pairs = _medquad_pairs(data_dir, 6)
    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", pairs)
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            *FAST,
            "train.max_steps=4",
            "train.method=dpo",
            f"train.preference_data=jsonl:{pairs_file}",
            f"train.init_adapter={tmp_path / 'sft'}",
        ],
    )
    sft_model, tokenizer = load_with_adapter(str(tiny_model_dir), tmp_path / "sft")
    before = preference_margins(sft_model, tokenizer, pairs, None, MAX_LEN)
    train(recipe, tmp_path / "dpo", model_and_tokenizer=load_model(str(tiny_model_dir)))
    dpo_model, _ = load_with_adapter(str(tiny_model_dir), tmp_path / "dpo")
    after = preference_margins(dpo_model, tokenizer, pairs, None, MAX_LEN)
    assert _mean(after) > _mean(before)
    # The reference is the SFT adapter: at step 1 the policy equals it, so DPO's reward is 0.
    first = next(row for row in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "loss" in row)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


def test_self_generated_pairs_are_cached_and_reused(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medlora.train import preference_pairs

    records = _medquad_records(data_dir, 4)
    prepared = write_prepared(tmp_path / "prepared", records, records[:1], records[:1])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            *FAST,
            "train.max_steps=2",
            "train.method=dpo",
            "train.preference_data=self",
            "eval.max_new_tokens=12",
            "eval.batch_size=2",
        ],
    )
    calls: list[int] = []
    real_generate = preference_pairs._generate

    def counting_generate(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(len(args[2]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(preference_pairs, "_generate", counting_generate)
    run = tmp_path / "run"
    train(recipe, run, prepared_dir=prepared)
    rows = read_jsonl(run / PAIRS_FILE)
    assert sum(calls) == 4 and len(rows) == 4
    assert [row["chosen"] for row in rows] == [r.answer for r in records]
    assert [row["prompt"] for row in rows] == [r.question for r in records]
    assert all(isinstance(row["rejected"], str) for row in rows)
    assert (run / "adapter_model.safetensors").is_file()

    # Rerun on the same records: every pair comes from the cache, nothing is generated.
    def no_generation(*args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("pairs should have been reused")

    monkeypatch.setattr(preference_pairs, "_generate", no_generation)
    train(recipe, run, prepared_dir=prepared)
    assert read_jsonl(run / PAIRS_FILE) == rows
    card = json.loads((run / "data" / "data_card.json").read_text())
    assert card["preference"]["reused"] == 4 and card["preference"]["generated"] == 0


def test_self_pairs_can_keep_only_looping_answers(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.self_pairs_min_repetition: DPO sees only the answers that loop; none left is one line."""
    from medlora.train import preference_pairs

    records = _medquad_records(data_dir, 4)
    prepared = write_prepared(tmp_path / "prepared", records, records[:1], records[:1])
    loop = "see your doctor if it hurts. " * 6
    answers = {records[0].question: loop, records[2].question: loop}

    penalties: list[float] = []

    def scripted(model: Any, tokenizer: Any, questions: list[str], recipe: Any) -> list[str]:
        penalties.append(preference_pairs.pair_generation(recipe).repetition_penalty)
        return [answers.get(q, "A short answer that never repeats itself.") for q in questions]

    monkeypatch.setattr(preference_pairs, "_generate", scripted)
    overrides = [*FAST, "train.max_steps=1", "train.method=dpo", "train.preference_data=self"]
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}, "generation": {"repetition_penalty": 1.05}},
        [
            *overrides,
            "train.self_pairs_min_repetition=0.3",
            "train.self_pairs_repetition_penalty=1.0",
        ],
    )
    run = tmp_path / "run"
    train(recipe, run, prepared_dir=prepared)
    card = json.loads((run / "data" / "data_card.json").read_text())["preference"]
    assert card["pairs"] == 2 and card["rejected_repeats_less"] == 2
    # The rejected answers were made at repetition_penalty 1.0; the run keeps its own 1.05 for
    # everything it serves and scores.
    assert penalties == [1.0]
    saved = load_recipe(run / "recipe.yaml")
    assert saved.generation.repetition_penalty == 1.05
    assert saved.train.self_pairs_repetition_penalty == 1.0

    answers.clear()
    with pytest.raises(TrainingError, match="self_pairs_min_repetition"):
        train(recipe, tmp_path / "run2", prepared_dir=prepared)


def test_preference_file_without_rejected_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = write_jsonl_atomic(
        tmp_path / "pairs.jsonl", [{"prompt": "What causes anemia?", "chosen": "Low iron."}]
    )
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        ["train.method=dpo", f"train.preference_data=jsonl:{bad}"],
    )
    with pytest.raises(DataError) as caught:
        train(recipe, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert str(bad) in message and "missing column 'rejected'" in message
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_missing_preference_file_and_recipe_errors_are_one_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        ["train.method=orpo", f"train.preference_data=jsonl:{tmp_path / 'nope.jsonl'}"],
    )
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        train(recipe, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"train\.preference_data=None: required"):
        recipe_from_dict({}, ["train.method=dpo"])
    with pytest.raises(ConfigError, match=r"KIND:PATH"):
        recipe_from_dict({}, ["train.method=dpo", "train.preference_data=pairs.jsonl"])
    assert recipe_from_dict({}).train.method == "sft"


def test_chat_style_rows_are_read(tmp_path: Path) -> None:
    from medlora.train.preference_pairs import load_preference_pairs

    rows = [
        {
            "chosen": [
                {"role": "user", "content": "What causes anemia?"},
                {"role": "assistant", "content": "Low iron."},
            ],
            "rejected": [
                {"role": "user", "content": "What causes anemia?"},
                {"role": "assistant", "content": "Nothing."},
            ],
        },
        {
            "prompt": [{"role": "user", "content": "Is hypertension inherited?"}],
            "chosen": [{"role": "assistant", "content": "Often, yes."}],
            "rejected": [{"role": "assistant", "content": "Never."}],
        },
    ]
    path = write_jsonl_atomic(tmp_path / "chat.jsonl", rows)
    pairs, skipped = load_preference_pairs(f"jsonl:{path}")
    assert [(p.question, p.chosen, p.rejected) for p in pairs] == [
        ("What causes anemia?", "Low iron.", "Nothing."),
        ("Is hypertension inherited?", "Often, yes.", "Never."),
    ]
    assert skipped == {}
