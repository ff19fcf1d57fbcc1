"""Answer normalization and matching, as SQuAD's evaluation does it.

``normalize``: lowercase, drop punctuation, drop the articles a/an/the, collapse
white space. ``exact``: the normalized prediction equals a normalized gold
alias. ``contains``: a normalized gold alias occurs in the normalized prediction
as a whole-word span.
"""

from __future__ import annotations

import re
import string
from typing import Iterable

MATCH_MODES = ("exact", "contains")
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_correct(prediction: str, answers: Iterable[str], mode: str = "exact") -> bool:
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}; choose from {MATCH_MODES}")
    pred = normalize(prediction)
    golds = [normalize(a) for a in answers]
    if mode == "exact":
        return any(pred == g for g in golds)
    padded = f" {pred} "
    return any(g and f" {g} " in padded for g in golds)
