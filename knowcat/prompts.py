"""The SliCK few-shot prompts (Gekhman et al. 2024).

For each relation and prompt index ``j`` (``n_prompts`` of them) ``k`` exemplars
are drawn at random from the exemplar split (dev) of the same relation, once;
every question of the relation is asked under the same ``n_prompts`` prefixes,
so their KV caches can be shared. An example is never its own exemplar: if it is
one of prompt ``j``'s exemplars, that slot takes the prompt's spare exemplar.

Format: ``Q: {question}\\nA: {answer}\\n`` per exemplar, then ``Q: {question}\\nA:``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knowcat.examples import QAExample


@dataclass(frozen=True)
class FewShotConfig:
    n_prompts: int = 10
    k: int = 4
    seed: int = 0
    exemplar_split: str = "dev"


def exemplar_sets(pool: list[QAExample], cfg: FewShotConfig) -> dict[str, list[list[QAExample]]]:
    """``{relation: [exemplars of prompt 0, ..., prompt n-1]}``; each list holds ``k`` exemplars
    and one spare at the end."""
    by_rel: dict[str, list[QAExample]] = {}
    for ex in pool:
        by_rel.setdefault(ex.relation, []).append(ex)
    out: dict[str, list[list[QAExample]]] = {}
    for rel in sorted(by_rel):
        exs = sorted(by_rel[rel], key=lambda e: e.id)
        if len(exs) < cfg.k + 1:
            raise ValueError(f"relation {rel}: {len(exs)} exemplars in the {cfg.exemplar_split} split, "
                             f"need at least k+1 = {cfg.k + 1}")
        rng = np.random.default_rng([cfg.seed, _rel_key(rel)])
        out[rel] = [[exs[i] for i in rng.choice(len(exs), size=cfg.k + 1, replace=False)]
                    for _ in range(cfg.n_prompts)]
    return out


def _rel_key(rel: str) -> int:
    return int.from_bytes(rel.encode("utf-8")[:8].ljust(8, b"\0"), "little")


def qa_block(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}\n"


def prompt_for(example: QAExample, exemplars_with_spare: list[QAExample]) -> tuple[str, str]:
    """``(prefix, suffix)`` of the prompt asking ``example`` under one exemplar set."""
    chosen = exemplars_with_spare[:-1]
    if any(e.id == example.id for e in chosen):
        spare = exemplars_with_spare[-1]
        chosen = [spare if e.id == example.id else e for e in chosen]
    prefix = "".join(qa_block(e.question, e.answers[0]) for e in chosen)
    return prefix, f"Q: {example.question}\nA:"
