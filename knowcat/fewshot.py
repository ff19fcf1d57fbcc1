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


def run_greedy(model_name: str, examples: list[QAExample], run_dir, cfg: FewShotConfig = FewShotConfig(),
               eval_split: str | None = "train", match: str = "exact", world=None, device: str = "auto",
               dtype: str = "auto", batch_size: int | None = None, log=print) -> list[GreedyResult]:
    """``knowcat greedy``: the few-shot greedy accuracy of ``model_name`` on the ``eval_split`` examples
    (all when empty), exemplars from ``cfg.exemplar_split``; writes ``RUN/greedy.jsonl`` and, with a
    knowledge ``world`` folder, ``RUN/exposure_check.json`` (accuracy against exposure)."""
    from knowcat.errors import UsageError
    from knowcat.rundir import RunDir
    from knowcat.selection import check_exemplars
    from probes.engine import open_engine

    pool = [e for e in examples if e.split == cfg.exemplar_split]
    evalset = [e for e in examples if e.split == eval_split] if eval_split else examples
    if not evalset:
        raise UsageError(f"no example of the split '{eval_split}' to evaluate; choose one with --eval-split")
    check_exemplars(evalset, pool, cfg.k, cfg.exemplar_split)
    engine = open_engine("transformers", model_name, device=device, dtype=dtype, batch_size=batch_size)
    res = greedy_accuracy(engine, evalset, pool, cfg, match=match)
    out = RunDir(run_dir)
    out.write_greedy({"id": r.id, "relation": r.relation, "p_correct_greedy": r.p_correct,
                      "greedy_answers": r.answers} for r in res)
    acc = sum(r.p_correct for r in res) / max(1, len(res))
    log(f"greedy accuracy {acc:.1%} over {len(res)} examples -> {out.greedy_jsonl}")
    if world:
        from knowcat.world.build import read_exposures
        from knowcat.world.validate import exposure_check, format_check

        check = exposure_check({r.id: r.p_correct for r in res}, read_exposures(world))
        out.write_exposure_check(check)
        log(format_check(check))
    return res
