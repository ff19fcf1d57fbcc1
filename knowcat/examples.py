"""The QA example record shared by every stage, and stable example ids.

An example is one question with all its gold answers (aliases). Every stage
(loading, categorization, filtering, mixtures, fine-tuning, surrogates) reads
and writes these records; fields a stage adds go into ``metadata`` or into the
stage's own columns, and the user's extra fields ride along in ``metadata``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator


@dataclass
class QAExample:
    """One closed-book question.

    id:        stable identifier; given by the data or derived from content
               (:func:`content_id`), so later stages can join and resume.
    relation:  relation id (``P17``) or any grouping key; few-shot exemplars
               come from the same relation.
    question:  the question text.
    answers:   every gold alias (non-empty strings, at least one).
    subject:   the subject entity when known (recovered from a template for
               EntityQuestions).
    split:     ``train`` / ``dev`` / ``test`` or ``None``.
    metadata:  free fields carried through every stage untouched.
    """

    id: str
    relation: str
    question: str
    answers: list[str]
    subject: str | None = None
    split: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QAExample":
        return cls(
            id=str(d["id"]),
            relation=str(d["relation"]),
            question=str(d["question"]),
            answers=[str(a) for a in d["answers"]],
            subject=d.get("subject"),
            split=d.get("split"),
            metadata=dict(d.get("metadata") or {}),
        )


def content_id(relation: str, question: str, answers: Iterable[str], split: str | None = None) -> str:
    """A stable id derived from an example's content.

    The same (split, relation, question, answers) always gives the same id, on
    any machine and in any order of loading.
    """
    payload = json.dumps([split or "", relation, question, list(answers)], ensure_ascii=False)
    digest = hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]
    return f"{relation}-{digest}"


def assign_content_ids(examples: Iterable[QAExample]) -> Iterator[QAExample]:
    """Give every example without an id its content id.

    Exact duplicates (real datasets have them: EntityQuestions' P495 train file
    repeats 64 records) get ``-2``, ``-3`` ... appended in file order, so ids
    stay unique and deterministic for a given file.
    """
    seen: dict[str, int] = {}
    for ex in examples:
        if not ex.id:
            base = content_id(ex.relation, ex.question, ex.answers, ex.split)
            n = seen.get(base, 0) + 1
            seen[base] = n
            ex.id = base if n == 1 else f"{base}-{n}"
        yield ex


def write_jsonl(path, examples: Iterable[QAExample]) -> int:
    """Write examples as JSONL atomically (temporary name, then rename)."""
    from knowcat.io import atomic_write_text

    lines = [json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def read_jsonl(path) -> list[QAExample]:
    """Read examples written by :func:`write_jsonl`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(QAExample.from_dict(json.loads(line)))
    return out
