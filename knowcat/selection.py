"""Which examples a stage works on: the data rules of categorization and fine-tuning.

- :func:`split_for_categorize`: the examples to categorize and the few-shot exemplar pool (by
  default every split but the exemplars', which is the pool);
- :func:`check_exemplars`: every relation asked needs k + 1 exemplars of its own;
- :func:`first_per_relation`: the first N questions of each relation, in input order;
- :func:`eval_records`, :func:`split_relations`: the evaluation questions of a split, and its relations;
- :func:`early_stop_dev` and :func:`finetune_ood`: the dev questions EARLY_STOP is chosen on and
  the out-of-distribution relations, the same rules for ``knowcat experiment`` and
  ``knowcat finetune``.

The command line only parses arguments and hands them to these functions.
"""

from __future__ import annotations

from collections import Counter

from knowcat.errors import UsageError

OOD_RULE = "test relations absent from the categorized train split"
DEV_RULE = "dev questions of the train split's relations only (out-of-distribution relations excluded)"


def split_for_categorize(examples, exemplar_split: str, splits: str | None, exemplars=None):
    """(examples to categorize, exemplar pool). Default: every split but the exemplars'."""
    pool = exemplars if exemplars is not None else [e for e in examples if e.split == exemplar_split]
    if not pool:
        raise UsageError(f"no exemplars: the data has no '{exemplar_split}' split; give --exemplars FILE "
                         f"(few-shot exemplars of the same relations) or --exemplar-split NAME")
    if splits:
        wanted = {s.strip() for s in splits.split(",") if s.strip()}
        todo = [e for e in examples if e.split in wanted]
    else:
        todo = [e for e in examples if exemplars is not None or e.split != exemplar_split]
    if not todo:
        raise UsageError(f"nothing to categorize (splits: {splits or 'all but ' + exemplar_split}); "
                         f"choose splits the data has with --splits")
    return todo, pool


def check_exemplars(todo, pool, k: int, exemplar_split: str) -> None:
    """Every relation to answer needs k + 1 exemplars of its own relation (k per prompt and a spare)."""
    have = Counter(e.relation for e in pool)
    for rel in sorted({e.relation for e in todo}):
        if have[rel] < k + 1:
            raise UsageError(f"relation {rel} has {have[rel]} exemplar(s) in the '{exemplar_split}' split; --k {k} "
                             f"needs at least {k + 1}: lower --k, or give more exemplars (--exemplars FILE)")


def first_per_relation(examples, n: int) -> list:
    """The first ``n`` examples of each relation, in input order."""
    if n < 1:
        raise UsageError(f"--per-relation must be at least 1, got {n}")
    seen: Counter = Counter()
    out = []
    for e in examples:
        seen[e.relation] += 1
        if seen[e.relation] <= n:
            out.append(e)
    return out


def select_for_categorize(examples, cfg, splits: str | None = None, exemplars=None, per_relation: int | None = None,
                          log=print):
    """(examples to categorize, exemplar pool) under SliCK config ``cfg``: :func:`split_for_categorize`,
    :func:`check_exemplars`, then (``per_relation``) :func:`first_per_relation`."""
    todo, pool = split_for_categorize(examples, cfg.exemplar_split, splits, exemplars)
    check_exemplars(todo, pool, cfg.k, cfg.exemplar_split)
    if per_relation:
        todo = first_per_relation(todo, per_relation)
        log(f"categorizing the first {per_relation} questions of each relation: {len(todo)}")
    return todo, pool


def early_stop_dev(dev: list[dict], train_relations, ood_relations=()) -> list[dict]:
    """The dev questions EARLY_STOP is chosen on, for ``knowcat experiment`` and ``knowcat finetune``
    alike: those of the relations trained on (``train_relations``; empty: not known, every relation)
    that are not out-of-distribution. Dev records without relations are kept as they are."""
    if not any(d.get("relation") for d in dev):
        return list(dev)
    train, ood = set(train_relations or ()), set(ood_relations)
    return [d for d in dev if (not train or d.get("relation") in train) and d.get("relation") not in ood]


def _records_file(path):
    """The records of ``path`` when it is a file of question records (a categorized file, say), else None."""
    from pathlib import Path

    from knowcat.filtering import read_records

    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".csv", ".parquet") and p.is_file():
        recs = read_records(p)
        if recs and "question" in recs[0]:
            return recs
    return None


def eval_records(path, split: str | None, load) -> list[dict]:
    """The evaluation questions (id, question, answers, relation and, from a categorized file, category)
    of ``split`` in the data at ``path`` (``None``: no data): a file of question records as it is (a
    record without a split counts as ``split``), else the examples ``load(path)`` returns."""
    if path is None:
        return []
    recs = _records_file(path)
    if recs is not None:
        return [r for r in recs if split is None or r.get("split", split) == split]
    return [{"id": e.id, "question": e.question, "answers": list(e.answers), "relation": e.relation}
            for e in load(path) if split is None or e.split == split]


def split_relations(path, split: str, load) -> set:
    """The relations of the records of ``split`` (records that name it) in the data at ``path``."""
    recs = _records_file(path)
    if recs is not None:
        return {r.get("relation") for r in recs if r.get("split") == split and r.get("relation")}
    return {e.relation for e in load(path) if e.split == split and e.relation}


def finetune_ood(test: list[dict], train_rows: list[dict], given: str | None = None, by_relation: bool = True,
                 split_relations: set | None = None, test_source=None, train_split: str = "train",
                 warn=None) -> tuple[list[str], str]:
    """The OOD relations of ``knowcat finetune`` and the rule that chose them: ``given``
    (comma-separated); else (``by_relation``) the test relations absent from the train split of the
    test data (``split_relations``, as ``knowcat experiment`` does, so a relation of the train split
    with no example in this training set stays in-distribution); else, when that data has no train
    split, those absent from the training set (``train_rows``), with a warning through ``warn``."""
    test_rels = {t["relation"] for t in test if t.get("relation")}
    if given is not None:
        return sorted({x.strip() for x in given.split(",") if x.strip()}), "given (--ood-relations)"
    if not by_relation or not test:
        return [], "none" if test else "no test set"
    if split_relations:
        return sorted(test_rels - split_relations), (f"test relations absent from the '{train_split}' split "
                                                     f"of {test_source}")
    if warn is not None:
        warn(f"knowcat finetune: warning: {test_source} has no '{train_split}' split, so OOD relations are those "
             f"absent from the training set; give --ood-relations, or a categorized file with both splits")
    return sorted(test_rels - {r.get("relation") for r in train_rows}), \
        "test relations absent from the training set (the test data has no train split)"


def finetune_dev(dev: list[dict], train_rows: list[dict], ood: list[str], split_relations: set | None = None) -> list[dict]:
    """The dev questions of ``knowcat finetune``'s EARLY_STOP: those of the trained relations (the train
    split's of the test data, else the training set's) that are not OOD, as ``knowcat experiment`` does."""
    train_rels = split_relations or {r.get("relation") for r in train_rows if r.get("relation")}
    return early_stop_dev(dev, train_rels, ood)
