"""The four built-in questions, and a lenient answer matcher.

Each question asks about one fact that the needle (a filing's Section 1) states.

>>> QUESTIONS.get("inc_state").prompt
'What state was the company incorporated in?'
>>> answer_matches("It is incorporated in DE.", "Delaware")
True
>>> answer_matches("about 12400 people", "12,400")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class Question:
    key: str
    prompt: str
    fact: str  # which field of a synthetic company answers it


QUESTIONS: Registry[Question] = Registry("question")
for _q in (
    Question("inc_state", "What state was the company incorporated in?", "inc_state"),
    Question("inc_year", "In what year was the company incorporated?", "inc_year"),
    Question("employee_count", "How many employees does the company have?", "employee_count"),
    Question("hq_state", "In what state is the company headquartered?", "hq_state"),
):
    QUESTIONS.register(_q.key, _q)

STATES: dict[str, str] = {
    "Alabama": "AL", "Alaska": "AK", "Arizona": "AZ", "Arkansas": "AR", "California": "CA",
    "Colorado": "CO", "Connecticut": "CT", "Delaware": "DE", "Florida": "FL", "Georgia": "GA",
    "Hawaii": "HI", "Idaho": "ID", "Illinois": "IL", "Indiana": "IN", "Iowa": "IA",
    "Kansas": "KS", "Kentucky": "KY", "Louisiana": "LA", "Maine": "ME", "Maryland": "MD",
    "Massachusetts": "MA", "Michigan": "MI", "Minnesota": "MN", "Mississippi": "MS", "Missouri": "MO",
    "Montana": "MT", "Nebraska": "NE", "Nevada": "NV", "New Hampshire": "NH", "New Jersey": "NJ",
    "New Mexico": "NM", "New York": "NY", "North Carolina": "NC", "North Dakota": "ND", "Ohio": "OH",
    "Oklahoma": "OK", "Oregon": "OR", "Pennsylvania": "PA", "Rhode Island": "RI", "South Carolina": "SC",
    "South Dakota": "SD", "Tennessee": "TN", "Texas": "TX", "Utah": "UT", "Vermont": "VT",
    "Virginia": "VA", "Washington": "WA", "West Virginia": "WV", "Wisconsin": "WI", "Wyoming": "WY",
}
_ABBREV_TO_STATE = {v: k for k, v in STATES.items()}
# per state, the patterns of the longer state names that hold it as whole words (any spacing)
_LONGER_STATES = {
    s: [r"\s+".join(map(re.escape, o.split())) for o in STATES if o != s and re.search(rf"\b{re.escape(s)}\b", o)]
    for s in STATES
}


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", s.lower())).strip()


def answer_matches(generated: str, answer: str) -> bool:
    """Lenient match of a model's answer against the gold answer.

    - numbers: the gold digits (separators ``,`` ``.`` ``_`` and spaces ignored) appear as a whole number
      in the generation, e.g. gold ``12,400`` matches ``12400`` and ``12 400`` but not ``124000``;
    - US states: the full name (case-insensitive) or its two-letter postal code as a separate upper-case
      word (``DE``), e.g. gold ``Delaware`` matches ``delaware`` and ``DE``, and not ``Delawares``;
      a longer state name holding it as words (``West Virginia`` for ``Virginia``) does not count;
    - anything else: the normalised gold text (lower case, punctuation dropped) occurs as whole words.
    """
    gold = answer.strip()
    digits = re.sub(r"[,._\s]", "", gold)
    if digits.isdigit():
        for m in re.finditer(r"\d[\d,._ ]*\d|\d", generated):
            if re.sub(r"[,._\s]", "", m.group()) == digits:
                return True
        return False
    state = next((s for s in STATES if s.lower() == gold.lower()), None)
    if state is None and gold.upper() in _ABBREV_TO_STATE:
        state = _ABBREV_TO_STATE[gold.upper()]
    if state is not None:
        for longer in _LONGER_STATES[state]:  # "West Virginia" is not an answer "Virginia"
            generated = re.sub(rf"\b{longer}\b", " ", generated, flags=re.IGNORECASE)
        if re.search(rf"\b{re.escape(STATES[state])}\b", generated):
            return True
        gold = state
    g, t = _norm_text(gold), _norm_text(generated)
    return bool(g) and re.search(rf"(^| ){re.escape(g)}( |$)", t) is not None
