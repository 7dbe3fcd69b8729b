"""Answer hygiene: each rule on crafted cases and on the real MedQuAD files it was written for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlora.data.hygiene import RULES, apply_hygiene, restates_question
from medlora.data.records import Record


def rec(question: str, answer: str, source: str = "medquad/2_GARD_QA", topic: str = "") -> Record:
    return Record(id=question[:20], question=question, answer=answer, source=source, topic=topic)


def only(rule: str, record: Record) -> list[Record]:
    kept, _ = apply_hygiene([record], [rule])
    return kept


def test_question_echo_cuts_a_restated_question_and_keeps_other_openings() -> None:
    echoed = rec(
        "What causes Cleidocranial dysplasia ?",
        "What causes cleidocranial dysplasia? Cleidocranial dysplasia is caused by RUNX2 mutations.",
    )
    assert only("question_echo", echoed)[0].answer == (
        "Cleidocranial dysplasia is caused by RUNX2 mutations."
    )
    # Reworded, but names the topic: still the question restated.
    reworded = rec(
        "What are the treatments for Bell's palsy ?",
        "How might Bell's palsy be treated? Steroids help most people.",
        topic="Bell's palsy",
    )
    assert only("question_echo", reworded)[0].answer == "Steroids help most people."
    rhetorical = rec(
        "What is (are) Attention Deficit Hyperactivity Disorder ?",
        "Is it hard for your child to sit still? If so, your child may have ADHD.",
        topic="Attention Deficit Hyperactivity Disorder",
    )
    assert only("question_echo", rhetorical)[0].answer == rhetorical.answer
    # Nothing but the restated question: dropped.
    assert only("question_echo", rec("Is X syndrome inherited ?", "Is X syndrome inherited?")) == []


def test_restates_question_sees_added_words_but_not_a_paraphrase() -> None:
    question = "What are the symptoms of kidney stones ?"
    assert restates_question("What are the signs and symptoms of kidney stones? Pain.", question)
    assert not restates_question("Kidney stones cause sharp pain in the back and side.", question)
    assert not restates_question(
        "Stargardt disease is inherited in an autosomal recessive manner.",
        "Is Stargardt disease inherited ?",
    )
    assert not restates_question("Pain.", question)


def test_hpo_table_keeps_the_prose_and_drops_a_bare_table() -> None:
    table = (
        "The Human Phenotype Ontology provides the following list of signs and symptoms for X. "
        "Signs and Symptoms Approximate number of patients Abnormality of the ureter 90% "
        "The Human Phenotype Ontology (HPO) has collected information on how often a sign occurs."
    )
    with_prose = rec("What are the symptoms of X ?", "X causes short stature. " + table)
    assert only("hpo_table", with_prose)[0].answer == "X causes short stature."
    assert only("hpo_table", rec("What are the symptoms of X ?", table)) == []


def test_pointer_answers_are_dropped() -> None:
    pointer = rec(
        "What are the treatments for X ?",
        "These resources address the diagnosis or management of X: - Gene Review: X",
        source="medquad/3_GHR_QA",
    )
    assert only("pointer_answer", pointer) == []


@pytest.mark.parametrize(
    ("answer", "cleaned"),
    [
        (
            "Treatments can control symptoms. NIH: National Heart, Lung, and Blood Institute",
            "Treatments can control symptoms.",
        ),
        (
            "Eat a healthy diet. Centers for Disease Control and Prevention",
            "Eat a healthy diet.",
        ),
        (
            "Avoid mosquito bites.\n\nMore on: Resources for Health Professionals: Treatment",
            "Avoid mosquito bites.",
        ),
        (
            "Key Points\n- X is a cancer.\n\nX is a cancer of the hypopharynx.",
            "X is a cancer of the hypopharynx.",
        ),
        (
            "Surgery is standard. Check the list of NCI-supported cancer clinical trials that are "
            "now accepting patients with X. Radiation may follow.",
            "Surgery is standard. Radiation may follow.",
        ),
        # An ordinary last sentence is not a sign-off.
        ("Most people recover. See your doctor.", "Most people recover. See your doctor."),
    ],
)
def test_source_boilerplate(answer: str, cleaned: str) -> None:
    assert only("source_boilerplate", rec("What is X ?", answer))[0].answer == cleaned


def test_templated_duplicates_keep_three_of_each_template() -> None:
    template = (
        "This condition is inherited in an autosomal recessive pattern, which means {} is rare."
    )
    records = [
        rec(f"Is {name} inherited ?", template.format(name), topic=name)
        for name in ("alpha", "beta", "gamma", "delta", "epsilon")
    ]
    kept, counts = apply_hygiene(records, ["templated_duplicate"])
    assert [r.topic for r in kept] == ["alpha", "beta", "gamma"]
    assert counts["templated_duplicate"]["dropped"] == 2


def test_defaults_apply_to_medquad_only_and_an_empty_list_turns_them_off() -> None:
    echoed = "What causes X disease? X disease is caused by a virus."
    medquad = rec("What causes X disease ?", echoed)
    mine = rec("What causes X disease ?", echoed, source="jsonl/mine")
    kept, _ = apply_hygiene([medquad, mine])
    assert [r.answer for r in kept] == ["X disease is caused by a virus.", echoed]
    kept, counts = apply_hygiene([medquad, mine], [])
    assert [r.answer for r in kept] == [echoed, echoed]
    assert all(c == {"changed": 0, "dropped": 0} for c in counts.values())
    with pytest.raises(ValueError, match="unknown answer-hygiene rule 'typo'"):
        apply_hygiene([medquad], ["typo"])


def test_real_medquad_collections(data_dir: Path) -> None:
    from medlora.data.clean import clean_records
    from medlora.data.sources import load_source

    medquad = data_dir / "medquad"
    records: list[Record] = []
    for collection in ("2_GARD_QA", "3_GHR_QA", "4_MPlus_Health_Topics_QA", "9_CDC_QA"):
        records += clean_records(load_source(f"medquad:{medquad / collection}")[0])[0]
    kept, counts = apply_hygiene(records)
    # What each rule exists for is gone from the kept answers ...
    assert not any("Human Phenotype Ontology" in r.answer for r in kept)
    assert not any(r.answer.startswith("These resources address") for r in kept)
    assert not any(r.answer.endswith("NIH: National Cancer Institute") for r in kept)
    assert not any("More on:" in r.answer for r in kept)
    gard = [r for r in kept if r.source.endswith("GARD_QA")]
    echoed = sum(restates_question(r.answer, r.question) for r in gard)
    assert echoed / len(gard) < 0.01
    # ... every rule fired on real files, and most answers were kept.
    assert all(counts[name]["changed"] + counts[name]["dropped"] > 0 for name in RULES)
    assert len(kept) > 0.7 * len(records)


def test_prepare_writes_the_counts_into_the_data_card(data_dir: Path, tmp_path: Path) -> None:
    from medlora.data.prepare import prepare_data

    source = f"medquad:{data_dir / 'medquad' / '2_GARD_QA'}"
    card = prepare_data([source], tmp_path / "on")
    off = prepare_data([source], tmp_path / "off", hygiene=[])
    assert card["hygiene"]["question_echo"]["changed"] > 100
    assert card["hygiene"]["hpo_table"]["dropped"] > 100
    assert sum(card["splits"].values()) < sum(off["splits"].values())
    saved = json.loads((tmp_path / "on" / "data_card.json").read_text())
    assert saved["hygiene"] == card["hygiene"]


def test_preview_shows_raw_and_cleaned_answers(data_dir: Path) -> None:
    from typer.testing import CliRunner

    from medlora.cli import app

    gard = f"medquad:{data_dir / 'medquad' / '2_GARD_QA'}"
    result = CliRunner().invoke(
        app, ["data", "preview", "smollm2-135m-cpu", "--hygiene", "-n", "1", "--data", gard]
    )
    assert result.exit_code == 0, result.output
    assert "question_echo" in result.output and "hpo_table" in result.output
    assert "raw" in result.output and "(dropped)" in result.output


def test_drop_repetitive_keeps_loop_free_answers_and_none_keeps_all() -> None:
    from medlora.data.hygiene import drop_repetitive

    plain = rec("What is asthma?", "Asthma is a disease of the airways that makes breathing hard.")
    looped = rec(
        "What are the treatments for X?",
        "There are different types of treatment for patients with X. Different types of "
        "treatment are available for patients with X. There are different types of treatment.",
    )
    kept, dropped = drop_repetitive([plain, looped], 0.1)
    assert kept == [plain] and dropped == 1
    assert drop_repetitive([plain, looped], None) == ([plain, looped], 0)


def test_drop_repetitive_on_real_medquad_hits_cancergov_summaries(data_dir: Path) -> None:
    """CancerGov's PDQ summaries restate each heading in the next sentence; GARD's prose does not."""
    from medlora.data.clean import clean_records
    from medlora.data.hygiene import drop_repetitive
    from medlora.data.sources import load_source

    def share_dropped(collection: str) -> float:
        path = data_dir / "medquad" / collection
        records = apply_hygiene(clean_records(load_source(f"medquad:{path}")[0])[0])[0]
        kept, dropped = drop_repetitive(records, 0.05)
        assert len(kept) + dropped == len(records)
        return dropped / len(records)

    assert share_dropped("1_CancerGov_QA") > 0.3
    assert share_dropped("2_GARD_QA") < 0.05
