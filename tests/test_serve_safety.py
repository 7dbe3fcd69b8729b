"""The emergency notice and the disclaimer: who gets the notice, and that it can be switched off."""

from __future__ import annotations

import pytest

from medlora.serve.safety import CRISIS_NOTICE, DEFAULT_DISCLAIMER, EMERGENCY_NOTICE, Safety

EMERGENCIES = [
    "My dad has crushing chest pain and his left arm hurts",
    "I think my mother is having a stroke, her face is drooping and her speech is slurred",
    "My son ate peanuts and his throat is closing",
    "she is unconscious and not breathing",
    "my friend took too many pills an hour ago",
    "Worst headache of my life, came on in seconds",
    "I can't breathe properly since this morning",
]
CRISES = ["I want to kill myself", "I don't want to live anymore", "I keep cutting myself"]
ORDINARY = [
    "What are the symptoms of asthma?",
    "How is type 2 diabetes treated?",
    "What is the outlook for people with migraine?",
    "Can stress cause chest acne?",
]


@pytest.mark.parametrize("text", EMERGENCIES)
def test_emergencies_get_the_notice_first(text: str) -> None:
    answer = Safety().wrap(text, "Model answer.")
    assert answer.startswith(f"⚠️ {EMERGENCY_NOTICE}")
    assert answer.index("Model answer.") > answer.index(EMERGENCY_NOTICE)


@pytest.mark.parametrize("text", CRISES)
def test_suicidal_intent_gets_the_crisis_notice(text: str) -> None:
    assert CRISIS_NOTICE in Safety().prefix(text)


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_questions_get_no_notice(text: str) -> None:
    assert Safety().notice(text) is None
    assert Safety().wrap(text, "Answer.") == f"Answer.\n\n{DEFAULT_DISCLAIMER}"


def test_both_parts_can_be_configured() -> None:
    quiet = Safety(disclaimer=None, emergency_notices=False)
    assert quiet.wrap(EMERGENCIES[0], "Answer.") == "Answer."
    assert Safety(disclaimer="See a doctor.").suffix() == "\n\nSee a doctor."
