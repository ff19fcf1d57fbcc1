"""Few-shot greedy evaluation: each example asked under ``n_prompts`` SliCK prompts.

The greedy half of SliCK (:func:`knowcat.slick.categorize` with no samples):
per example, the greedy answers and the share that match a gold alias,
P_Correct(T=0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from knowcat.examples import QAExample
from knowcat.prompts import FewShotConfig


@dataclass
class GreedyResult:
    id: str
    relation: str
    answers: list[str] = field(default_factory=list)  # one per prompt
    correct: list[bool] = field(default_factory=list)

    @property
    def p_correct(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def greedy_accuracy(engine, examples: list[QAExample], exemplar_pool: list[QAExample],
                    cfg: FewShotConfig = FewShotConfig(), match: str = "exact", max_new_tokens: int = 32,
                    progress: bool = True) -> list[GreedyResult]:
    """Greedy answers of ``engine`` (a :class:`probes.engine.Engine`) under every prompt."""
    from tqdm.auto import tqdm

    from knowcat.matching import is_correct
    from knowcat.slick import SliCKConfig, categorize

    scfg = SliCKConfig(n_prompts=cfg.n_prompts, k=cfg.k, seed=cfg.seed, exemplar_split=cfg.exemplar_split,
                       n_samples=0, match=match, max_new_tokens=max_new_tokens, keep_answers=True)
    bar = tqdm(total=len(examples) * cfg.n_prompts, desc="greedy", unit="prompt", disable=not progress)
    res = categorize(engine, examples, exemplar_pool, scfg, progress=bar.update)
    bar.close()
    by_id = {ex.id: ex for ex in examples}
    return [GreedyResult(r.id, by_id[r.id].relation, r.greedy_answers,
                         [is_correct(a, by_id[r.id].answers, match) for a in r.greedy_answers]) for r in res]
