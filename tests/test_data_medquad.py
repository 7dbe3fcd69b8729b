"""MedQuAD loading on the real XML checkout, its odd files, and finding/downloading it."""

from __future__ import annotations

import logging
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from medlora.data import medquad
from medlora.data.clean import clean_records
from medlora.data.medquad import find_medquad_dir, load_medquad
from medlora.data.records import Record, SourceReport
from medlora.data.split import split_by_topic, topic_key
from medlora.errors import DataError

# The four 6_NINDS_QA files in the older lowercase schema (<doc>/<pair>), 16 answered pairs in all.
LEGACY_NINDS_FILES = {"0000007", "0000018", "0000182", "0000244"}


@pytest.fixture(scope="module")
def full_medquad(data_dir: Path) -> tuple[list[Record], SourceReport, float]:
    """The whole checkout, read once for this module (≈2 s)."""
    start = time.perf_counter()
    records, report = load_medquad(data_dir / "medquad")
    return records, report, time.perf_counter() - start


def test_full_checkout_has_the_readme_counts(
    full_medquad: tuple[list[Record], SourceReport, float],
) -> None:
    records, report, seconds = full_medquad
    legacy = [
        r
        for r in records
        if r.source == "medquad/6_NINDS_QA" and r.meta["document_id"] in LEGACY_NINDS_FILES
    ]
    # README: 14,656 answered <QAPair>s; the legacy NINDS files add 16 more real pairs.
    assert len(records) - len(legacy) == 14_656
    assert len(legacy) == 16
    assert len(records) == 14_672
    assert report.skipped["answerless_collection"] == 3
    for name in ("10_MPlus_ADAM_QA", "11_MPlusDrugs_QA", "12_MPlusHerbsSupplements_QA"):
        assert any(w.startswith(name) for w in report.warnings)
        assert not any(r.source == f"medquad/{name}" for r in records)
    assert "malformed_xml" not in report.skipped
    assert len({r.id for r in records}) == len(records)  # ids are unique
    assert seconds < 60  # measured ≈2 s; minutes would mean a regression


def test_single_collection_folder_gives_full_records(data_dir: Path) -> None:
    records, report = load_medquad(data_dir / "medquad" / "2_GARD_QA")
    assert len(records) == 5_389
    assert report.skipped == {"empty_answer": 5}
    first = next(r for r in records if r.meta["document_id"] == "0000004")
    assert first.id == "2_GARD_QA/0000004/0000004-1"
    assert first.question == "What are the symptoms of ABCD syndrome ?"
    assert first.answer.startswith("What are the signs and symptoms of ABCD syndrome?")
    assert first.source == "medquad/2_GARD_QA"
    assert first.topic == "ABCD syndrome"
    assert first.qtype == "symptoms"
    assert first.meta == {
        "url": "https://rarediseases.info.nih.gov/gard/335/abcd-syndrome",
        "document_id": "0000004",
        "collection": "2_GARD_QA",
        "qid": "0000004-1",
    }
    again, _ = load_medquad(data_dir / "medquad" / "2_GARD_QA")
    assert [r.id for r in again] == [r.id for r in records]  # same order every time


def test_legacy_lowercase_schema_is_read(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "6_NINDS_QA"
    folder.mkdir()
    shutil.copy(data_dir / "medquad" / "6_NINDS_QA" / "0000007.xml", folder)
    records, _ = load_medquad(folder)
    assert len(records) == 4
    assert {r.topic for r in records} == {"Holmes-Adie"}
    assert records[0].qtype == "information"
    assert records[0].meta["url"].startswith("http://www.ninds.nih.gov/")


def _copy_collection(data_dir: Path, dest: Path, name: str = "9_CDC_QA") -> Path:
    return Path(shutil.copytree(data_dir / "medquad" / name, dest / name))


def test_archive_layout_one_level_deeper_is_found(data_dir: Path, tmp_path: Path) -> None:
    _copy_collection(data_dir, tmp_path / "MedQuAD-master")
    records, _ = load_medquad(tmp_path)
    assert len(records) == 270
    assert {r.source for r in records} == {"medquad/9_CDC_QA"}


def test_malformed_xml_is_skipped_and_named(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy_collection(data_dir, tmp_path)
    bad = folder / "0000000_broken.xml"
    bad.write_text("<Document id='x'><QAPairs><QAPair>", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="medlora.data.medquad"):
        records, report = load_medquad(tmp_path)
    assert len(records) == 270  # every valid file still read
    assert report.skipped["malformed_xml"] == 1
    assert any(str(bad) in w and "malformed XML" in w for w in report.warnings)
    assert str(bad) in caplog.text


def test_strict_makes_malformed_xml_fatal(data_dir: Path, tmp_path: Path) -> None:
    folder = _copy_collection(data_dir, tmp_path)
    (folder / "broken.xml").write_text("<Document>", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.xml: malformed XML .*--strict"):
        load_medquad(tmp_path, strict=True)


def test_folder_without_xml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no MedQuAD XML files found"):
        load_medquad(tmp_path)


def test_real_medquad_splits_by_topic_with_requested_fractions(
    full_medquad: tuple[list[Record], SourceReport, float],
) -> None:
    records, _ = clean_records(full_medquad[0])
    splits = split_by_topic(records, 0.05, 0.05)
    assert sum(len(s) for s in splits.values()) == len(records)
    keys = {name: {topic_key(r) for r in part} for name, part in splits.items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for name in ("validation", "test"):
        assert 0.03 < len(splits[name]) / len(records) < 0.07
    again = split_by_topic(records, 0.05, 0.05)
    assert {k: [r.id for r in v] for k, v in again.items()} == {
        k: [r.id for r in v] for k, v in splits.items()
    }


# Finding and downloading ---------------------------------------------------------------------


def test_data_dir_copy_is_used_first(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path))
    assert find_medquad_dir() == data_dir / "medquad"


def test_cached_copy_is_used_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "datasets" / "medquad"
    cached.mkdir(parents=True)
    monkeypatch.setattr(medquad, "MEDQUAD_URL", "http://127.0.0.1:9/")
    assert find_medquad_dir() == cached


def test_offline_download_fails_in_one_helpful_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDLORA_DATA_DIR", raising=False)
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(medquad, "MEDQUAD_URL", "http://127.0.0.1:9/")  # port 9 refuses at once
    with pytest.raises(DataError) as info:
        find_medquad_dir()
    message = str(info.value)
    assert "\n" not in message
    assert "download failed" in message
    assert "MEDLORA_DATA_DIR" in message
    cached = tmp_path / "cache" / "datasets" / "medquad"
    assert str(cached) in message
    assert not cached.exists()  # no half-unpacked folder left behind
    assert list(cached.parent.iterdir()) == []


def test_download_unpacks_the_archive_atomically(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local zip shaped like GitHub's archive stands in for the network.
    archive = tmp_path / "master.zip"
    source = data_dir / "medquad" / "9_CDC_QA"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(source.glob("*.xml")):
            zipped.write(file, f"MedQuAD-master/9_CDC_QA/{file.name}")
    monkeypatch.delenv("MEDLORA_DATA_DIR", raising=False)
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(medquad, "MEDQUAD_URL", archive.as_uri())
    found = find_medquad_dir()
    assert found == tmp_path / "cache" / "datasets" / "medquad"
    assert [p.name for p in found.parent.iterdir()] == ["medquad"]  # temp folder is gone
    records, _ = load_medquad(found)
    assert len(records) == 270
    # Second call reads the cache: the archive is no longer needed.
    archive.unlink()
    assert find_medquad_dir() == found
