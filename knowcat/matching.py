"""Answer normalization and matching, as SQuAD's evaluation does it.

``normalize``: lowercase, drop punctuation, drop the articles a/an/the, collapse
white space. ``exact``: the normalized prediction equals a normalized gold
alias. ``contains``: a normalized gold alias occurs in the normalized prediction
as a whole-word span. ``f1``: SQuAD's token F1 (bag of normalized words) against
the best alias is at least a threshold, 0.5 unless the mode names another
(``f1@0.7``): the measure for answers longer than an entity. ``judge``: a model
(:class:`Judge`, set with :func:`set_judge`) says whether the answer agrees with a reference.

An answer too long for any of these to mean anything (more than a bound of
normalized words, :func:`answer_too_long`) is not categorized at all: the
record is ``not_applicable`` with that reason, never Unknown.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Iterable

F1_THRESHOLD = 0.5
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_F1_MODE = re.compile(r"^f1(?:@(0(?:\.\d+)?|1(?:\.0*)?))?$")


class _Modes(tuple):
    """The match modes; ``"f1@T"`` (a threshold T in [0, 1]) is a member too."""

    def __contains__(self, mode) -> bool:
        return isinstance(mode, str) and (tuple.__contains__(self, mode) or bool(_F1_MODE.match(mode)))


MATCH_MODES = _Modes(("exact", "contains", "f1", "judge"))


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token F1 of two texts (both normalized); 1.0 when both are empty, 0.0 when one is."""
    p, g = normalize(prediction).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_threshold(mode: str) -> float:
    m = _F1_MODE.match(mode)
    if not m:
        raise ValueError(f"not an f1 mode: {mode!r}")
    return float(m.group(1)) if m.group(1) else F1_THRESHOLD


def check_mode(mode: str) -> str:
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}; choose from exact, contains, f1, f1@THRESHOLD or judge")
    return mode


JUDGE_PROMPT = ("Reference answer: {reference}\nProposed answer: {prediction}\n"
                "Does the proposed answer agree with the reference answer? Answer Yes or No.\nAnswer:")


class Judge:
    """A model asked whether a proposed answer agrees with a reference (:data:`JUDGE_PROMPT`).

    The verdict is one teacher-forced pass (:mod:`probes.scoring`): "agrees" when " Yes" is more
    probable than " No" after the prompt. An answer equal to a reference after normalization agrees
    and an empty one does not, without asking; verdicts are cached per (answer, reference)."""

    def __init__(self, model, tokenizer, prompt: str = JUDGE_PROMPT):
        from probes.engine import open_engine

        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.engine = open_engine("transformers", (model, tokenizer))
        self.cache: dict[tuple[str, str], bool] = {}
        self.asked = 0

    def agrees(self, prediction: str, reference: str) -> bool:
        p, g = normalize(prediction), normalize(reference)
        if not p:
            return False
        if p == g:
            return True
        key = (prediction.strip(), reference.strip())
        if key not in self.cache:
            from probes.scoring import ScoreRequest

            text = self.prompt.format(reference=key[1], prediction=key[0])
            s = self.engine.score([ScoreRequest("yes", text, " Yes"), ScoreRequest("no", text, " No")])
            self.cache[key] = s["yes"].logprob > s["no"].logprob
            self.asked += 1
        return self.cache[key]


_JUDGE: list[Judge] = []


def set_judge(judge: Judge | None) -> None:
    """The judge ``is_correct(..., mode="judge")`` asks (None: none)."""
    _JUDGE.clear()
    if judge is not None:
        _JUDGE.append(judge)


def is_correct(prediction: str, answers: Iterable[str], mode: str = "exact") -> bool:
    check_mode(mode)
    if mode == "judge":
        if not _JUDGE:
            raise RuntimeError("--match judge needs a judge model (--judge-model; knowcat.matching.set_judge)")
        return any(_JUDGE[0].agrees(prediction, a) for a in answers)
    if mode.startswith("f1"):
        t = f1_threshold(mode)
        return any(f1_score(prediction, a) >= t for a in answers)
    pred = normalize(prediction)
    golds = [normalize(a) for a in answers]
    if mode == "exact":
        return any(pred == g for g in golds)
    padded = f" {pred} "
    return any(g and f" {g} " in padded for g in golds)


_WORD = re.compile(r"\w*", re.UNICODE)


def may_still_match(partial: str, answers: Iterable[str], mode: str = "exact") -> bool:
    """Whether some continuation of ``partial`` (the first characters of an answer still being
    generated) can make it correct under ``mode``; False only when none can, so an answer
    abandoned on False would have been judged wrong whatever followed. Only ``exact`` ever
    answers False: a ``contains`` match, an F1 over the threshold or a judge's yes can come
    from any continuation.

    For ``exact``: the words before the last white space are final (normalization is local to a
    word: lowercasing and dropping punctuation act on characters, the articles are whole words),
    so they must begin a normalized alias; the word being written must begin the alias's next word,
    unless it may still become an article (dropped) or holds characters that split words by
    themselves (then nothing is decided)."""
    if mode != "exact":
        return True
    return _may_still_match(partial, tuple(answers))


@lru_cache(maxsize=4096)
def _alias_words(answers: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(normalize(g).split()) for g in answers)


def _may_still_match(partial: str, answers: tuple[str, ...]) -> bool:
    cut = len(partial)
    while cut and not partial[cut - 1].isspace():
        cut -= 1
    done, last = tuple(normalize(partial[:cut]).split()), partial[cut:].lower()
    # a word not finished yet: lowercasing turns a capital sigma at its end into a final sigma, which
    # becomes an ordinary one once more letters follow
    last = "".join(ch for ch in last if ch not in _PUNCT).replace("ς", "σ")
    for words in _alias_words(answers):
        if words[:len(done)] != done:
            continue
        if not last or not _WORD.fullmatch(last) or any(a.startswith(last) for a in ("a", "an", "the")):
            return True
        if len(words) > len(done) and words[len(done)].replace("ς", "σ").startswith(last):
            return True
    return False


def answer_tokens(answer: str) -> int:
    """Length of an answer in SQuAD tokens (normalized words)."""
    return len(normalize(answer).split())


def answer_too_long(answers: Iterable[str], max_answer_tokens: int | None) -> str | None:
    """The reason an example cannot be categorized by matching (its shortest reference is over the bound), or None."""
    if max_answer_tokens is None:
        return None
    n = min(answer_tokens(a) for a in answers)
    if n > max_answer_tokens:
        return f"reference answer has {n} words, over --max-answer-tokens {max_answer_tokens}"
    return None
