"""The paper's dataset filters (Gekhman et al. 2024, EntityQuestions setup).

Each filter is a pure function: examples in, ``(kept, FilterReport)`` out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from knowcat.examples import QAExample


@dataclass
class FilterReport:
    """What one filter did: how many kept and removed, and removed per relation."""

    name: str
    kept: int
    removed: int
    removed_by_relation: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        total = self.kept + self.removed
        share = 100.0 * self.removed / total if total else 0.0
        by = ", ".join(f"{r} {n:,}" for r, n in sorted(self.removed_by_relation.items(), key=lambda kv: (-kv[1], kv[0])))
        return (f"{self.name}: removed {self.removed:,} of {total:,} ({share:.1f}%), kept {self.kept:,}"
                + (f"; by relation: {by}" if by else ""))


def _report(name: str, kept: list[QAExample], removed: list[QAExample]) -> FilterReport:
    return FilterReport(name, len(kept), len(removed), dict(Counter(ex.relation for ex in removed)))


def _norm(s: str | None) -> str:
    return (s or "").strip().casefold()


def drop_multi_answer(examples: Sequence[QAExample]) -> tuple[list[QAExample], FilterReport]:
    """Drop questions with more than one gold answer (every split)."""
    kept = [ex for ex in examples if len(ex.answers) <= 1]
    removed = [ex for ex in examples if len(ex.answers) > 1]
    return kept, _report("drop_multi_answer", kept, removed)


ENTITY_FIELDS = ("subject", "answers")


def _entities(ex: QAExample, which: Sequence[str]) -> list[str]:
    names = []
    if "subject" in which and ex.subject:
        names.append(ex.subject)
    if "answers" in which:
        names.extend(ex.answers)
    return names


def drop_train_test_overlap(
    examples: Sequence[QAExample],
    train_fields: Sequence[str] = ("subject",),
    test_fields: Sequence[str] = ("subject",),
) -> tuple[list[QAExample], FilterReport]:
    """Drop train examples whose entities appear among test examples' entities.

    Entities are compared after strip + casefold, across all relations; other
    splits are left untouched. ``train_fields`` / ``test_fields`` are subsets of
    ``("subject", "answers")``. The default compares subjects with subjects: on
    EntityQuestions (after the multi-answer filter) it removes 1.9% of the
    in-distribution train questions, closest to the paper's 2.1%.
    ``("subject", "answers")`` on both sides is the paper's sentence read
    literally ("subject or object appears in test"): there a frequent answer
    shared with test ("France") removes every train question that has it, 61% of
    that train set, which cannot be what the paper did.
    """
    for which in (train_fields, test_fields):
        unknown = set(which) - set(ENTITY_FIELDS)
        if unknown or not which:
            raise ValueError(f"fields must be a non-empty subset of {ENTITY_FIELDS}, got {which!r}")
    test_entities = {_norm(n) for ex in examples if ex.split == "test" for n in _entities(ex, test_fields)}
    test_entities.discard("")
    kept, removed = [], []
    for ex in examples:
        hit = ex.split == "train" and any(_norm(n) in test_entities for n in _entities(ex, train_fields))
        (removed if hit else kept).append(ex)
    return kept, _report("drop_train_test_overlap", kept, removed)


def apply_paper_filters(
    examples: Sequence[QAExample],
    multi_answer: bool = True,
    overlap: bool = True,
    log: Callable[[str], object] | None = print,
) -> tuple[list[QAExample], list[FilterReport]]:
    """Apply the paper's filters in its order (multi-answer, then train/test overlap).

    ``log`` receives one line per filter (None to stay silent). Returns the kept
    examples and one report per filter applied.
    """
    kept = list(examples)
    reports = []
    steps = [(multi_answer, drop_multi_answer), (overlap, drop_train_test_overlap)]
    for enabled, fn in steps:
        if enabled:
            kept, rep = fn(kept)
            reports.append(rep)
            if log is not None:
                log(str(rep))
    return kept, reports
