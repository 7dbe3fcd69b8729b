"""Mixing sources by weight: shares, upsampling, untouched validation, the data card, the recipe
syntax, and PubMedQA long answers as a training source."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from medlora.cli import BUNDLED_RECIPES
from medlora.config import load_recipe, recipe_from_dict
from medlora.data.mix import source_group, tag_source_group, training_records
from medlora.data.prepare import load_splits, prepare_data
from medlora.data.records import Record
from medlora.data.sources import load_source
from medlora.errors import ConfigError, DataError


def _records(group: str, count: int) -> list[Record]:
    records = [
        Record(id=f"{group}-{i}", question=f"{group} q{i}?", answer="a", source=f"x/{group}")
        for i in range(count)
    ]
    tag_source_group(records, group)
    return records


def _write_jsonl(path: Path, prefix: str, count: int, answer_words: int) -> str:
    rows = [
        {
            "question": f"What does {prefix} note {i} say?",
            "answer": " ".join([f"{prefix}{i}"] * answer_words),
            "topic": f"{prefix}-{i}",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f"jsonl:{path}"


# --- training_records: mixing by weight ---------------------------------------------------------


@pytest.mark.parametrize("total", [80, 81, 7])
def test_weights_give_the_requested_shares(total: int) -> None:
    records = _records("big", 100) + _records("mid", 30) + _records("small", 10)
    weights = {"big": 2.0, "mid": 1.0, "small": 1.0}
    mixed, stats = training_records(records, weights, total, seed=3)

    assert len(mixed) == total
    drawn = Counter(source_group(r) for r in mixed)
    for group, weight in weights.items():
        assert abs(drawn[group] - total * weight / 4) <= 1, (group, drawn)
        assert stats["groups"][group]["drawn"] == drawn[group]
    # Same seed, same draw (and order); another seed draws differently.
    assert [r.id for r in training_records(records, weights, total, seed=3)[0]] == [
        r.id for r in mixed
    ]
    assert [r.id for r in training_records(records, weights, total, seed=4)[0]] != [
        r.id for r in mixed
    ]


def test_unweighted_groups_weigh_one_and_total_defaults_to_the_split() -> None:
    records = _records("a", 40) + _records("b", 20)
    mixed, stats = training_records(records, {"a": 1.0}, None, seed=0)
    assert len(mixed) == 60
    assert Counter(source_group(r) for r in mixed) == {"a": 30, "b": 30}
    assert stats["groups"]["b"]["weight"] == 1.0


def test_upsampling_repeats_a_small_source_and_says_so() -> None:
    records = _records("big", 100) + _records("small", 10)
    mixed, stats = training_records(records, {"big": 1.0, "small": 1.0}, 50, seed=0)

    small = Counter(r.id for r in mixed if source_group(r) == "small")
    assert len(small) == 10 and sum(small.values()) == 25
    assert set(small.values()) == {2, 3}  # every record twice, five of them three times
    assert stats["upsampled"] == ["small"]
    assert stats["groups"]["small"]["upsampled"] is True
    assert stats["groups"]["small"]["drawn_per_record"] == 2.5
    big = Counter(r.id for r in mixed if source_group(r) == "big")
    assert max(big.values()) == 1 and stats["groups"]["big"]["upsampled"] is False


def test_a_weight_for_a_source_with_no_training_records_is_explained() -> None:
    with pytest.raises(DataError, match="data.weights names 'jsonl:typo.jsonl'.*groups in"):
        training_records(_records("medquad", 5), {"jsonl:typo.jsonl": 2.0}, 4, seed=0)


def test_mix_by_source_gives_each_collection_an_equal_share() -> None:
    # One recipe entry (medquad) whose collections differ 20 : 2 in size, as GARD/GHR vs CDC.
    records = _records("big", 200) + _records("small", 20)
    for record in records:
        record.meta["source_group"] = "medquad"
    plain, no_stats = training_records(records, {}, 40, seed=0)
    assert no_stats is None and Counter(r.source for r in plain)["x/small"] < 10

    mixed, stats = training_records(records, {}, 40, seed=0, by="source")
    assert Counter(r.source for r in mixed) == {"x/big": 20, "x/small": 20}
    assert (
        stats is not None
        and stats["by"] == "source"
        and set(stats["groups"])
        == {
            "x/big",
            "x/small",
        }
    )
    weighted, _ = training_records(records, {"x/small": 3.0}, 40, seed=0, by="source")
    assert Counter(r.source for r in weighted) == {"x/big": 10, "x/small": 30}
    with pytest.raises(DataError, match="names 'x/smal' .*record sources in the training split"):
        training_records(records, {"x/smal": 1.0}, 40, seed=0, by="source")


def test_source_group_falls_back_for_splits_prepared_before_groups() -> None:
    old = Record(id="1", question="q", answer="a", source="medquad/2_GARD_QA")
    assert source_group(old) == "medquad"
    assert source_group(Record(id="2", question="q", answer="a", source="jsonl/faq")) == "jsonl/faq"


# --- prepare + train: the data card --------------------------------------------------------------


def test_prepare_card_counts_read_kept_and_splits_per_source(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", "alpha", 60, 3)
    b = _write_jsonl(tmp_path / "b.jsonl", "beta", 20, 3)
    # Five rows of b repeat a: de-duplication keeps the first (a's), so b keeps 20 - 5.
    dupes = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()[:5]]
    with (tmp_path / "b.jsonl").open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in dupes)
    card = prepare_data([a, b], tmp_path / "prepared", val_fraction=0.1, test_fraction=0.1)

    groups = card["source_groups"]
    assert list(groups) == [a, b]
    assert (groups[a]["read"], groups[a]["kept"]) == (60, 60)
    assert (groups[b]["read"], groups[b]["kept"]) == (25, 20)
    splits = load_splits(tmp_path / "prepared")
    for name, rows in splits.items():
        assert groups[a][name] + groups[b][name] == len(rows)
        assert groups[b][name] == sum(r.meta["source_group"] == b for r in rows)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """A one-step training run on two JSONL sources mixed 3 : 1 from 40 examples."""
    from medlora.models import load_model
    from medlora.train import prepare_run_data, train

    root = tmp_path_factory.mktemp("mix")
    big = _write_jsonl(root / "big.jsonl", "big", 60, 2)
    small = _write_jsonl(root / "small.jsonl", "small", 8, 12)  # fewer, longer answers
    recipe = recipe_from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {
                "sources": [{"source": big, "weight": 1}, {"source": small, "weight": 1}],
                "max_train_examples": 40,
                "val_fraction": 0.2,
                "test_fraction": 0.1,
                "system_prompt": None,
            },
        },
        ["train.max_steps=1", "train.batch_size=8", "train.grad_accum=1"],
    )
    model, tokenizer = load_model(str(tiny_model_dir))
    prepared = prepare_run_data(recipe, root / "run" / "data", tokenizer)
    train(recipe, root / "run", prepared_dir=prepared, model_and_tokenizer=(model, tokenizer))
    card = json.loads((root / "run" / "data" / "data_card.json").read_text(encoding="utf-8"))
    return {"card": card, "big": big, "small": small, "run": root / "run"}


def test_trained_card_reports_the_mix_and_token_shares(mixed_run: dict[str, Any]) -> None:
    card, big, small = mixed_run["card"], mixed_run["big"], mixed_run["small"]
    used = card["used"]
    assert used["train"] == 40
    per_group = used["per_group"]
    assert per_group[big]["examples"] == 20 and per_group[small]["examples"] == 20
    assert used["mix"]["weights"] == {big: 1.0, small: 1.0}
    # The small source has fewer than 20 training records: it was repeated, and the card says so.
    assert per_group[small]["available"] == card["source_groups"][small]["train"] < 20
    assert per_group[small]["upsampled"] is True and used["mix"]["upsampled"] == [small]
    # Token shares are of the examples trained on: the long-answer source has the larger share.
    tokens = {g: per_group[g]["tokens"] for g in (big, small)}
    for group in (big, small):
        assert per_group[group]["token_share"] == pytest.approx(
            tokens[group] / sum(tokens.values()), abs=1e-4
        )
    assert per_group[small]["token_share"] > 0.6


def test_model_card_shows_what_each_source_contributed(mixed_run: dict[str, Any]) -> None:
    from medlora.report.context import data_rows
    from medlora.report.facts import collect

    rows = dict(data_rows(collect(mixed_run["run"])))
    small = rows[f"trained on ({mixed_run['small']})"]
    assert small.startswith("20 examples, ") and "% of tokens, weight 1, upsampled x" in small
    assert "upsampled" not in rows[f"trained on ({mixed_run['big']})"]
    validation = mixed_run["card"]["splits"]["validation"]
    assert rows["used for training"] == f"train 40, validation {validation}"


def test_validation_is_not_reweighted(mixed_run: dict[str, Any]) -> None:
    card = mixed_run["card"]
    # Every validation record is used once, in the split's own (unequal) proportions.
    assert card["used"]["validation"] == card["splits"]["validation"]
    split = {g: c["validation"] for g, c in card["source_groups"].items() if c["validation"]}
    assert card["used"]["validation_per_group"] == split
    # The run weighs both sources 1 : 1, so reweighting validation would have evened these out.
    assert split[mixed_run["big"]] != split.get(mixed_run["small"], 0)


# --- recipe syntax -----------------------------------------------------------------------------


def test_string_sources_still_load_without_mixing() -> None:
    recipe = load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml")
    assert recipe.data.sources == ["medquad"] and recipe.data.weights == {}
    recipe = recipe_from_dict({}, ["data.sources=[jsonl:a.jsonl]"])
    assert recipe.data.sources == ["jsonl:a.jsonl"] and recipe.data.weights == {}


def test_mix_by_source_weights_name_collections() -> None:
    recipe = recipe_from_dict({}, ["data.mix_by=source", "data.weights={medquad/2_GARD_QA: 0.5}"])
    assert recipe.data.weights == {"medquad/2_GARD_QA": 0.5}
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({}, ["data.mix_by=collection"])
    assert "data.mix_by" in str(info.value) and "\n" not in str(info.value)


def test_weighted_entries_load_and_round_trip() -> None:
    recipe = load_recipe(BUNDLED_RECIPES / "smollm2-135m-mix.yaml")
    assert recipe.data.sources == ["medquad", "pubmedqa"]
    assert recipe.data.weights == {"medquad": 3.0, "pubmedqa": 1.0}
    again = recipe_from_dict({}, ["data.sources=[{source: medquad, weight: 2}, jsonl:a.jsonl]"])
    assert again.data.weights == {"medquad": 2.0}
    import yaml

    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.sources=[{source: medquad, weight: -1}]", "data.sources[0].weight=-1"),
        ("data.sources=[medquad, {source: 'jsonl:a.jsonl', weight: abc}]", "sources[1].weight"),
        ("data.sources=[{source: medquad, wieght: 2}]", "data.sources[0].wieght: unknown key"),
        ("data.weights={medquad: 0}", "data.weights.medquad=0"),
        ("data.weights={medqaud: 2}", "data.weights['medqaud']: not one of data.sources"),
    ],
)
def test_bad_weights_are_one_line_config_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({}, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


# --- PubMedQA long answers -----------------------------------------------------------------------


def test_pubmedqa_long_answers_from_the_real_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = data_dir / "pubmedqa" / "pqal_dev.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, report = load_source(f"pubmedqa:{path}")
    assert len(records) == len(raw) == 500
    first = records[0]
    pmid = next(iter(raw))
    assert first.question == raw[pmid]["QUESTION"].strip()
    assert first.answer == raw[pmid]["LONG_ANSWER"].strip()
    assert (first.topic, first.source) == (pmid, "pubmedqa")
    assert any("benchmark" in w for w in report.warnings)
    # A bare `pubmedqa` finds the same file under $MEDLORA_DATA_DIR.
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(data_dir))
    assert len(load_source("pubmedqa")[0]) == 500


def test_pubmedqa_items_without_a_long_answer_are_skipped_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "pq.json"
    items = {
        "1": {"QUESTION": "Does X help?", "LONG_ANSWER": "X helped."},
        "2": {"QUESTION": "Does Y help?"},
    }
    path.write_text(json.dumps(items), encoding="utf-8")
    records, report = load_source(f"pubmedqa:{path}")
    assert [r.answer for r in records] == ["X helped."]
    assert report.skipped == {"no_long_answer": 1}
    with pytest.raises(DataError, match=r"pq.json: item 2 has no LONG_ANSWER") as info:
        load_source(f"pubmedqa:{path}", strict=True)
    assert "\n" not in str(info.value)
