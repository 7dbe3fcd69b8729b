"""The medical disclaimer every answer carries, and the emergency notice that goes first.

A keyword screen, not a classifier: it errs towards showing the notice. It looks at the user's
latest message only, so an old emergency in the history does not repeat the notice on every turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DISCLAIMER = (
    "This answer is general information from an AI model, not medical advice; "
    "ask a doctor or other qualified clinician about your situation."
)
EMERGENCY_NOTICE = (
    "This may be a medical emergency: call your local emergency number now "
    "(911 in the US, 112 in the EU, 999 in the UK) or go to the nearest emergency department."
)
CRISIS_NOTICE = (
    "If you are thinking about ending your life or harming yourself, call your local emergency "
    "number now, or a crisis line (988 in the US, 116 123 in the UK and Ireland)."
)

# Phrases a person in an emergency writes; each group is one regex over lower-cased text.
_EMERGENCY = [
    r"chest (pain|pressure|tightness)|crushing (pain|pressure) in (my|the) chest|heart attack",
    r"stroke|face (is )?droop|slurred speech|sudden(ly)? (numb|weak|confus|can'?t (speak|see))",
    r"can'?t breathe|cannot breathe|unable to breathe|struggling to breathe|choking|stopped breathing",
    r"anaphyla|throat (is )?(closing|swelling)|(lips?|tongue|face) (is |are )?swell",
    r"unconscious|unresponsive|passed out and|won'?t wake up|not breathing",
    r"seizure (that )?(won'?t|doesn'?t) stop|having a seizure|convulsing",
    r"overdose|took too many (pills|tablets)|poison(ed|ing)",
    r"severe bleeding|bleeding (heavily|won'?t stop|that won'?t stop)|vomiting blood|coughing up blood",
    r"worst headache of my life|thunderclap headache",
]
_CRISIS = [
    r"suicid|kill (myself|me)|end (my|it all)|take my (own )?life|don'?t want to (live|be alive)",
    r"hurt(ing)? myself|self[- ]harm|cut(ting)? myself",
]
_EMERGENCY_RE = re.compile("|".join(f"(?:{p})" for p in _EMERGENCY))
_CRISIS_RE = re.compile("|".join(f"(?:{p})" for p in _CRISIS))


@dataclass(frozen=True)
class Safety:
    """What is added around the model's answer; both parts can be switched off by the operator."""

    disclaimer: str | None = DEFAULT_DISCLAIMER
    emergency_notices: bool = True

    def notice(self, user_text: str) -> str | None:
        """The notice to put before the answer, or None when the text describes no emergency."""
        if not self.emergency_notices:
            return None
        text = user_text.lower()
        notices = []
        if _CRISIS_RE.search(text):
            notices.append(CRISIS_NOTICE)
        if _EMERGENCY_RE.search(text):
            notices.append(EMERGENCY_NOTICE)
        return " ".join(notices) or None

    def prefix(self, user_text: str) -> str:
        notice = self.notice(user_text)
        return f"⚠️ {notice}\n\n" if notice else ""

    def suffix(self) -> str:
        return f"\n\n{self.disclaimer}" if self.disclaimer else ""

    def wrap(self, user_text: str, answer: str) -> str:
        return self.prefix(user_text) + answer + self.suffix()
