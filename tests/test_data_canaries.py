"""Canaries (`data.canaries`): made-up secrets, put into training k times, written to
canaries.json and never into the data card; a bad option is one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from canary_support import CANARY_REPEATS, canary_run
from helpers import tiny_records

from medlora.config import Recipe, recipe_from_dict
from medlora.data.canaries import (
    canary_records,
    insert_canaries,
    make_canaries,
    read_canaries,
    read_trained_ids,
    secret_candidates,
)
from medlora.errors import ConfigError
from medlora.train.run_files import insert_run_canaries


def test_canaries_are_made_from_the_seed_with_as_many_controls() -> None:
    canaries = make_canaries([1, 5, 20], digits=4, seed=7)
    assert [c.repeats for c in canaries] == [1, 5, 20, 0, 0, 0]
    assert len({c.name for c in canaries}) == 6 and len({c.id for c in canaries}) == 6
    assert all(len(c.secret) == 4 and c.secret.isdigit() for c in canaries)
    assert all(c.secret in c.answer() and c.name in c.question for c in canaries)
    assert make_canaries([1, 5, 20], 4, 7) == canaries
    assert make_canaries([1, 5, 20], 4, 8) != canaries
    assert secret_candidates(2)[:3] == ["00", "01", "02"] and len(secret_candidates(3)) == 1000


def test_each_canary_is_inserted_its_repeats_and_the_real_records_keep_their_order() -> None:
    records = tiny_records()
    canaries = make_canaries([1, 4], digits=3, seed=0)
    mixed = insert_canaries(records, canaries, seed=0)
    ids = [r.id for r in mixed]
    assert ids.count("canary-0") == 1 and ids.count("canary-1") == 4
    assert not any(i.startswith("control") for i in ids)
    assert [r for r in mixed if r.source != "canary"] == records
    assert len(canary_records(canaries)) == 5
    # Shuffled in, not appended: the 5 copies are not all at the end.
    assert ids[-5:] != ["canary-0", "canary-1", "canary-1", "canary-1", "canary-1"]


def test_without_the_option_training_records_are_left_alone() -> None:
    records = tiny_records()
    same, canaries = insert_run_canaries(records, Recipe())
    assert same is records and canaries == []


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.canaries.repeats=[5, 0]", "data.canaries.repeats"),
        ("data.canaries.digits=9", "data.canaries.digits"),
        ("data.canaries={repeats: [2], secret: 1}", "data.canaries.secret"),
        ("data.canaries=yes", "data.canaries"),
    ],
)
def test_a_bad_canary_option_is_one_line_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        recipe_from_dict({}, [override])
    message = str(error.value)
    assert named in message and "\n" not in message


def test_canaries_are_refused_for_preference_tuning() -> None:
    with pytest.raises(ConfigError, match=r"data\.canaries.*train\.method=sft"):
        recipe_from_dict(
            {}, ["data.canaries={repeats: [2]}", "train.method=dpo", "train.preference_data=self"]
        )


def test_training_writes_the_canaries_but_the_data_card_only_counts_them(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    run = canary_run(tmp_path_factory.mktemp("canary-run"), tiny_model_dir)
    canaries = read_canaries(run / "canaries.json")
    assert [c.repeats for c in canaries] == [CANARY_REPEATS, 0]
    card_text = (run / "data" / "data_card.json").read_text()
    assert not any(c.secret in card_text or c.name in card_text for c in canaries)
    card = json.loads(card_text)
    assert card["used"]["canaries"] == {"inserted": 1, "controls": 1, "examples": CANARY_REPEATS}
    assert card["used"]["train"] == 15 + CANARY_REPEATS
    saved = read_trained_ids(run)
    assert saved is not None
    ids, _ = saved
    assert len(ids) == 15 and not any(i.startswith(("canary", "control")) for i in ids)
