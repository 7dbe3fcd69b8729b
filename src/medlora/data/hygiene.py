"""Answer hygiene: named rules that fix or drop answers that make bad training targets.

A fine-tune copies its targets' habits. MedQuAD's answers carry habits we do not want a medical
assistant to learn, each found by reading the collections and counted in `data_card.json`:

- `question_echo`      GARD answers that open by restating the question ("What causes X? X is caused
                       by …"): the opening question is cut (tuned models copied the echo).
- `hpo_table`          GARD symptom answers that are a Human Phenotype Ontology table (terms and
                       percentages, then a paragraph explaining the table): the table is cut, the prose
                       before it kept; an answer with nothing else is dropped.
- `pointer_answer`     GHR treatment answers that are only lists of links ("These resources address the
                       diagnosis or management of …"): dropped.
- `source_boilerplate` sign-offs and site furniture: MedlinePlus's closing agency name ("NIH: National
                       Cancer Institute"), CDC's "More on: …" links, CancerGov's "Key Points" header and
                       its clinical-trial notices.
- `templated_duplicate` answers that are one template with the topic's name filled in (GHR's
                       "This condition is inherited in an autosomal recessive pattern, which means …",
                       hundreds of times): at most `TEMPLATE_COPIES` of each are kept.

Every rule is a plain function; `apply_hygiene` runs the chosen ones in the order above and counts,
per rule, how many answers it changed and how many it dropped.

One more filter judges training *targets* only, so it is not a rule here: `drop_repetitive`
(`data.max_answer_repetition`) keeps answers whose own share of repeated word 4-grams would teach
loops (CancerGov's summaries restate each heading in the next sentence) out of the training sample,
while evaluation keeps every reference (a repetitive reference is still a right answer).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from medlora.data.records import Record

TEMPLATE_COPIES = 3
_WORD = re.compile(r"[\w']+")
_INTERROGATIVE = (
    "what", "how", "is", "are", "can", "who", "which", "why", "when", "where", "does", "do",
    "should", "could", "will",
)  # fmt: skip
# An opening question: up to the first '?' within 300 characters, with no sentence end before it.
_OPENING_QUESTION = re.compile(r"^\s*([^.!?\n]{3,300}\?)\s*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same text (0 when short).

    The `repetition` metric of `medlora eval`, and the test of `drop_repetitive`.
    """
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def drop_repetitive(records: Sequence[Record], max_share: float | None) -> tuple[list[Record], int]:
    """The records whose answer repeats at most `max_share` of its word 4-grams, and how many
    were dropped (None keeps all). Applied to the training split only, before sampling."""
    if max_share is None:
        return list(records), 0
    kept = [r for r in records if repeated_ngram_share(r.answer) <= max_share]
    return kept, len(records) - len(kept)


ECHO_SHARE = 0.75


def restates_question(text: str, question: str, share: float = ECHO_SHARE) -> bool:
    """Does `text` open by restating `question` as a question? True when its first word asks
    (what, how, is, …) and at least `share` of the question's words follow, in order, among its
    first words (as many as the question has, plus 4, so "What are the signs and symptoms of X?"
    restates "What are the symptoms of X?"). A statement that names the topic first ("X is
    inherited in …") is an answer, not an echo.

    The same test is the `echo` metric of `medlora eval`, so what the data stage removes from
    the targets is what the evaluation counts in the answers.
    """
    import difflib

    asked = _words(question)
    said = _words(text)[: len(asked) + 4]
    if len(asked) < 3 or len(said) < 3 or said[0] not in _INTERROGATIVE:
        return False
    blocks = difflib.SequenceMatcher(None, asked, said, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks) / len(asked) >= share


def _names_topic(text: str, topic: str) -> bool:
    named = set(_words(topic))
    return bool(named) and len(named & set(_words(text))) / len(named) >= ECHO_SHARE


def strip_question_echo(record: Record) -> str | None:
    """Cut an opening question that restates the record's question ("What causes X? X is …",
    "How might X be treated? …": it restates the question or names the record's topic).

    Openings that ask something else (a rhetorical "Is it hard for your child to sit still?", a
    heading "Who Is at Risk?") are kept.
    """
    match = _OPENING_QUESTION.match(record.answer)
    if match is None:
        return record.answer
    opening = _words(match.group(1))
    if not opening or opening[0] not in _INTERROGATIVE:
        return record.answer
    opening_text = match.group(1)
    if not (
        restates_question(opening_text, record.question) or _names_topic(opening_text, record.topic)
    ):
        return record.answer
    rest = record.answer[match.end() :].strip()
    return rest or None


_HPO_START = re.compile(
    r"\s*(The Human Phenotype Ontology provides the following list of signs and symptoms"
    r"|The Human Phenotype Ontology \(HPO\) has collected information).*\Z",
    re.DOTALL,
)


def strip_hpo_table(record: Record) -> str | None:
    """Cut the Human Phenotype Ontology table and its explanation; keep the prose before it."""
    rest = _HPO_START.sub("", record.answer).strip()
    return rest or None


_POINTER = re.compile(
    r"^(These resources address the diagnosis or management of"
    r"|These resources from MedlinePlus offer information)",
)


def drop_pointer_answer(record: Record) -> str | None:
    """An answer that only points at other resources teaches nothing: drop it."""
    return None if _POINTER.match(record.answer) else record.answer


_ORGANISATION = (
    r"(?:NIH: [^.!?\n]{3,120}"
    r"|(?:(?:[A-Z][\w.,'&-]*|and|for|of|on|the|in|&)\s+){0,12}"
    r"(?:Institute|Administration|Agency|Prevention|Health|Services|Office|Department|Society|"
    r"Association|Foundation|Commission)\b[^.!?\n]{0,60})"
)
_BOILERPLATE = (
    # MedlinePlus signs each topic with the agency that wrote it, after the last sentence.
    re.compile(r"(?<=[.!?:)\]])\s+" + _ORGANISATION + r"\s*\Z"),
    # CDC: link lines ("More on: Resources for Health Professionals: Treatment"), anywhere.
    re.compile(r"^More on:[^\n]*(?:\n|\Z)", re.MULTILINE),
    # CancerGov: the "Key Points" block; its bullets repeat the body after the blank line.
    re.compile(r"\AKey Points\n.*?\n\n(?=\S)", re.DOTALL),
    re.compile(r"\AKey Points\s+"),
    # CancerGov: the clinical-trial notice repeated in every treatment summary.
    re.compile(
        r"\s*(?:Check the list of NCI-supported cancer clinical trials[^.]*\."
        r"|Clinical trials are taking place in many parts of the country\.[^.]*\."
        r"|Information about (?:ongoing )?clinical trials is available from the NCI website\.)"
    ),
)


def strip_source_boilerplate(record: Record) -> str | None:
    """Cut sign-offs, link lists, the Key Points header and clinical-trial notices."""
    text = record.answer
    for pattern in _BOILERPLATE:
        text = pattern.sub(" ", text).strip()
    text = re.sub(r"[ \t]{2,}", " ", text)
    return text or None


RecordRule = Callable[[Record], str | None]

RECORD_RULES: dict[str, RecordRule] = {
    "question_echo": strip_question_echo,
    "hpo_table": strip_hpo_table,
    "pointer_answer": drop_pointer_answer,
    "source_boilerplate": strip_source_boilerplate,
}
RULES = (*RECORD_RULES, "templated_duplicate")
# Sources whose records get every rule when the recipe does not choose (`data.clean: null`).
DEFAULT_FOR = ("medquad/",)


def template_key(record: Record) -> str:
    """The answer with its topic's words masked: answers built from one template share it."""
    topic = set(_words(record.topic))
    words = ["<topic>" if w in topic else w for w in _words(record.answer)]
    return " ".join(words)


def apply_hygiene(
    records: Iterable[Record], chosen: Sequence[str] | None = None
) -> tuple[list[Record], dict[str, dict[str, int]]]:
    """Run the rules; returns the kept records and {rule: {"changed": n, "dropped": n}}.

    `chosen` None (`data.clean: null`): every rule on MedQuAD records, none on others.
    """
    unknown = [name for name in chosen or () if name not in RULES]
    if unknown:
        raise ValueError(
            f"unknown answer-hygiene rule {unknown[0]!r}; choose from {', '.join(RULES)}"
        )
    counts = {name: {"changed": 0, "dropped": 0} for name in RULES}
    kept: list[Record] = []
    templates: Counter[str] = Counter()  # answers kept so far per template
    for record in records:
        if chosen is not None:
            rules: Sequence[str] = chosen
        else:
            rules = RULES if record.source.startswith(DEFAULT_FOR) else ()
        answer: str | None = record.answer
        for name, rule in RECORD_RULES.items():
            if name not in rules:
                continue
            new = rule(dataclasses.replace(record, answer=answer))
            if new is None:
                counts[name]["dropped"] += 1
                answer = None
                break
            if new != answer:
                counts[name]["changed"] += 1
                answer = new
        if answer is None:
            continue
        cleaned = record if answer == record.answer else dataclasses.replace(record, answer=answer)
        if "templated_duplicate" in rules:  # the first TEMPLATE_COPIES of each template stay
            key = template_key(cleaned)
            templates[key] += 1
            if templates[key] > TEMPLATE_COPIES:
                counts["templated_duplicate"]["dropped"] += 1
                continue
        kept.append(cleaned)
    return kept, counts
