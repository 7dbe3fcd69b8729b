"""MedQuAD: find (or download once) the XML checkout and turn its QA pairs into records.

Layout: `<N>_<Name>_QA/*.xml`, each file a `<Document id url>` with `<Focus>` and
`<QAPairs>/<QAPair pid>/<Question qid qtype>` + `<Answer>`. Four NINDS files use an older lowercase
schema (`<doc docid>`, `<doctitle-focus>`, `<qaPairs>/<pair>/<question>/<answer>`) and one CDC file
has a `<DiseaseFile fid>` root; all three are read the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from medlora.data.records import Record, SourceReport
from medlora.errors import DataError

logger = logging.getLogger(__name__)

MEDQUAD_URL = "https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip"
DOWNLOAD_TIMEOUT_S = 60.0

# Tag spellings of the main schema and of the older lowercase NINDS files.
_PAIR_TAGS = frozenset({"QAPair", "pair"})
_QUESTION_TAGS = frozenset({"Question", "question"})
_ANSWER_TAGS = frozenset({"Answer", "answer"})
_FOCUS_TAGS = frozenset({"Focus", "doctitle-focus"})
_DOC_ID_ATTRS = ("id", "docid", "fid")


def _cache_dir() -> Path:
    # Same rule as medlora.models.cache_dir; kept local so the data stage imports no later stage.
    return Path(os.environ.get("MEDLORA_CACHE", Path.home() / ".cache" / "medlora")).expanduser()


def find_medquad_dir() -> Path:
    """`$MEDLORA_DATA_DIR/medquad`, else the cached copy, else download it once into the cache."""
    data_dir = os.environ.get("MEDLORA_DATA_DIR")
    if data_dir:
        candidate = Path(data_dir).expanduser() / "medquad"
        if candidate.is_dir():
            return candidate
    cached = _cache_dir() / "datasets" / "medquad"
    if cached.is_dir():
        return cached
    return download_medquad(cached)


def download_medquad(dest: Path) -> Path:
    """Fetch the GitHub archive and unpack it so that `dest` appears whole or not at all."""
    url = MEDQUAD_URL
    hint = (
        f"set MEDLORA_DATA_DIR=... to a folder containing medquad/, or unpack {MEDQUAD_URL} "
        f"into {dest}"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside `dest` (same filesystem) so the final step is one atomic rename.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".medquad-") as tmp:
        archive = Path(tmp) / "medquad.zip"
        logger.info("downloading MedQuAD from %s", url)
        try:
            with (
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
                open(archive, "wb") as handle,
            ):
                shutil.copyfileobj(response, handle)
        except (OSError, ValueError) as err:  # URLError, timeouts and refused ports are OSErrors
            reason = getattr(err, "reason", None) or err
            raise DataError(f"MedQuAD download failed from {url} ({reason}); {hint}") from err
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(
                f"MedQuAD download from {url} is not a valid zip ({err}); {hint}"
            ) from err
        # GitHub archives hold one top folder (MedQuAD-master/); use it when that is the layout.
        tops = [p for p in unpacked.iterdir() if p.is_dir()]
        root = tops[0] if len(tops) == 1 and not _xml_files(unpacked) else unpacked
        if not _collection_dirs(root):
            raise DataError(f"MedQuAD download from {url} holds no XML collections; {hint}")
        try:
            os.replace(root, dest)
        except OSError:
            if not dest.is_dir():  # another process may have finished the same download first
                raise
    return dest


def _xml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.xml") if p.is_file())


def _collection_order(folder: Path) -> tuple[int, str]:
    # Numeric prefix order (1_, 2_, …, 10_) reads better than plain string order; both are stable.
    match = re.match(r"(\d+)_", folder.name)
    return (int(match.group(1)) if match else 1_000_000, folder.name)


def _collection_dirs(path: Path) -> list[Path]:
    """Folders of XML files: `path` itself, its subfolders, or (archive layout) one level deeper."""
    if _xml_files(path):
        return [path]
    for depth_glob in ("*", "*/*"):
        found = [d for d in path.glob(depth_glob) if d.is_dir() and _xml_files(d)]
        if found:
            return sorted(found, key=_collection_order)
    return []


def _text(element: ET.Element | None) -> str:
    return "".join(element.itertext()).strip() if element is not None else ""


def _child(element: ET.Element, tags: frozenset[str]) -> ET.Element | None:
    """The first child spelled as one of `tags` (a file uses one schema's spellings)."""
    return next((child for child in element if child.tag in tags), None)


def _parse_file(file: Path, collection: str, report: SourceReport) -> tuple[list[Record], int]:
    """Records with answers from one XML file, and how many pairs it held in all."""
    root = ET.parse(file).getroot()
    doc_id = next((root.get(a) for a in _DOC_ID_ATTRS if root.get(a)), file.stem)
    url = root.get("url", "")
    focus = _text(_child(root, _FOCUS_TAGS))
    records: list[Record] = []
    pairs = 0
    for pair in root.iter():
        if pair.tag not in _PAIR_TAGS:
            continue
        pairs += 1
        question_el = _child(pair, _QUESTION_TAGS)
        question = _text(question_el)
        answer = _text(_child(pair, _ANSWER_TAGS))
        if not answer:
            report.skip("empty_answer")
            continue
        if not question:
            report.skip("empty_question")
            continue
        qid = (question_el.get("qid") if question_el is not None else None) or (
            f"{doc_id}-{pair.get('pid', pairs)}"
        )
        records.append(
            Record(
                # qids repeat across collections and even across files of one collection
                # (1_CancerGov_QA/0000013_2*.xml), so the file name makes the id unique.
                id=f"{collection}/{file.stem}/{qid}",
                question=question,
                answer=answer,
                source=f"medquad/{collection}",
                topic=focus,
                qtype=question_el.get("qtype", "") if question_el is not None else "",
                meta={"url": url, "document_id": doc_id, "collection": collection, "qid": qid},
            )
        )
    return records, pairs


def load_medquad(path: Path, strict: bool = False) -> tuple[list[Record], SourceReport]:
    """Every answered QA pair under a MedQuAD checkout root or a single collection folder."""
    path = Path(path)
    report = SourceReport(source=f"medquad:{path}")
    if not path.is_dir():
        raise DataError(
            f"MedQuAD folder not found: {path}; give medquad:PATH to a MedQuAD checkout"
        )
    collections = _collection_dirs(path)
    if not collections:
        raise DataError(
            f"{path}: no MedQuAD XML files found; point medquad:PATH at the checkout root "
            "(with <N>_<Name>_QA/ folders) or at one such folder"
        )
    records: list[Record] = []
    for folder in collections:
        collection = folder.name
        answered = 0
        pairs = 0
        for file in _xml_files(folder):
            try:
                file_records, file_pairs = _parse_file(file, collection, report)
            except ET.ParseError as err:
                if strict:
                    raise DataError(
                        f"{file}: malformed XML ({err}); fix or remove the file, "
                        "or drop --strict to skip it"
                    ) from err
                message = f"{file}: malformed XML ({err}); skipped"
                logger.warning(message)
                report.warnings.append(message)
                report.skip("malformed_xml")
                continue
            records.extend(file_records)
            answered += len(file_records)
            pairs += file_pairs
        if pairs and not answered:
            # MedlinePlus A.D.A.M., Drugs and Herbs ship questions only (answers cut for copyright).
            report.skip("answerless_collection")
            report.warnings.append(
                f"{collection}: none of its {pairs} questions has an answer; collection skipped"
            )
    return records, report
