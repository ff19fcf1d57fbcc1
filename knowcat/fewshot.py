"""Few-shot greedy evaluation: each example asked under ``n_prompts`` SliCK prompts.

``greedy_accuracy`` returns, per example, the greedy answers and the share that
match a gold alias: P_Correct(T=0) of SliCK.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from knowcat.examples import QAExample
from knowcat.matching import is_correct
from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for


@dataclass
class GreedyResult:
    id: str
    relation: str
    answers: list[str] = field(default_factory=list)  # one per prompt
    correct: list[bool] = field(default_factory=list)

    @property
    def p_correct(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def greedy_accuracy(model, tokenizer, examples: list[QAExample], exemplar_pool: list[QAExample],
                    cfg: FewShotConfig = FewShotConfig(), match: str = "exact", batch_size: int = 64,
                    max_new_tokens: int = 32, progress: bool = True) -> list[GreedyResult]:
    from tqdm.auto import tqdm

    from probes.generation import PromptRequest, generate_greedy

    sets = exemplar_sets(exemplar_pool, cfg)
    missing = sorted({e.relation for e in examples} - set(sets))
    if missing:
        raise ValueError(f"no {cfg.exemplar_split} exemplars for relations {missing}")
    reqs = []
    for ex in examples:
        for j, ex_set in enumerate(sets[ex.relation]):
            prefix, suffix = prompt_for(ex, ex_set)
            reqs.append(PromptRequest((ex.id, j), prefix, suffix))
    bar = tqdm(total=len(reqs), desc="greedy", unit="prompt", disable=not progress)
    answers = generate_greedy(model, tokenizer, reqs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=bar.update)
    bar.close()
    out = []
    for ex in examples:
        ans = [answers[(ex.id, j)] for j in range(cfg.n_prompts)]
        out.append(GreedyResult(ex.id, ex.relation, ans, [is_correct(a, ex.answers, match) for a in ans]))
    return out
