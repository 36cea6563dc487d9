"""Metrics of the worked example tone `support_formal` (profiles/support.yaml)."""

from __future__ import annotations

import re

SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves"})
_WORD = re.compile(r"[a-z']+")


def second_person(text: str) -> float:
    """Share of an answer's words that address the reader ("you", "your", ...): 0 for an answer
    that never speaks to the customer. Contractions count as their first word ("you'll": you)."""
    words = [word.split("'")[0] for word in _WORD.findall(text.lower())]
    return sum(word in SECOND_PERSON for word in words) / len(words) if words else 0.0
