"""Build the knowledge world: facts, an EntityQuestions-format dataset, a
pretraining corpus with known exposure counts, and the exposure ground truth.

Layout written into ``out_dir``::

    world.json                     the config and summary
    data/relation_query_templates.json
    data/{train,dev,test}/P<id>.<split>.json   EntityQuestions format
    corpus.jsonl                   pretraining documents {"text", "kind"}
    exposures.jsonl                per fact: id, relation, subject, answer, split,
                                   count, statement, qa (mentions in the corpus)

Every fact's exposure count is drawn from a long-tailed popularity distribution:
a share ``p_never`` is never mentioned, the rest ``ceil(LogNormal(log(median), sigma))``
times, capped at ``max_count``. Each mention is, independently, a closed-book
``Q: ...\\nA: ...`` line (probability ``qa_fraction``) or one of the relation's
declarative statements. The corpus is meant to be read once: a fact's count is
the number of times the model saw it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from knowcat.examples import content_id
from knowcat.io import atomic_write_json, atomic_write_text
from knowcat.rundir import WorldDir, write_jsonl
from knowcat.world.names import NamePool
from knowcat.world.relations import IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, RELATIONS, Relation, relation_for

SPLITS = ("train", "dev", "test")


@dataclass
class WorldConfig:
    seed: int = 0
    relations: tuple[str, ...] = IN_DISTRIBUTION + OUT_OF_DISTRIBUTION
    ood_relations: tuple[str, ...] = OUT_OF_DISTRIBUTION  # these get no train split (test-only, as in the paper)
    n_train: int = 150  # facts per relation and split
    n_dev: int = 20
    n_test: int = 60
    objects_per_relation: int = 1000  # the relation's answers are drawn uniformly from this many objects
    p_never: float = 0.2
    median_count: float = 40.0
    sigma: float = 1.0
    max_count: int = 200
    qa_fraction: float = 0.5
    p_conflict: float = 0.3  # share of facts whose sources disagree: some mentions give another answer
    max_conflict_rate: float = 0.5  # a conflicted fact's mentions give the other answer at a rate U(0.1, this)
    mentions_per_doc: int = 4
    # share of a fact's (statement, Q/A) mention pairs that appear together on one "page" document
    # (two facts, each stated then asked, as an article followed by its quiz): the model meets
    # documents whose context bears on the answer, as on the web, not only unrelated lines. Without
    # pages the small model ignores its few-shot context and its greedy answer hardly varies across
    # prompts (MaybeKnown 3% of the default world's train questions; with pages 15%, measured)
    page_fraction: float = 1.0
    # an EntityQuestions folder: real facts instead of synthetic ones. Its relations are the configured ones
    # where the folder holds them all (EntityQuestions itself: the paper's 19), otherwise every relation the
    # folder has; a relation without hand-written statement forms gets forms derived from its question template
    facts_from: str | None = None

    def split_sizes(self, relation: str) -> dict[str, int]:
        train = 0 if relation in self.ood_relations else self.n_train
        return {"train": train, "dev": self.n_dev, "test": self.n_test}


PRESETS: dict[str, WorldConfig] = {
    "default": WorldConfig(),
    "quick": WorldConfig(relations=("P17", "P19", "P26", "P36", "P69", "P136", "P264", "P50"),
                         ood_relations=("P50",), n_train=40, n_dev=10, n_test=20, objects_per_relation=120),
}


@dataclass
class Fact:
    id: str
    relation: str
    subject: str
    answer: str
    split: str
    question: str
    count: int = 0  # mentions with the true answer
    statement: int = 0
    qa: int = 0
    conflicting: int = 0  # mentions giving the distractor instead
    distractor: str | None = None


def draw_counts(cfg: WorldConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    seen = rng.random(n) >= cfg.p_never
    counts = np.ceil(np.exp(rng.normal(math.log(cfg.median_count), cfg.sigma, n))).astype(int)
    counts = np.clip(counts, 1, cfg.max_count)
    return np.where(seen, counts, 0)


def synthetic_facts(cfg: WorldConfig, rng: np.random.Generator) -> list[Fact]:
    names = NamePool(cfg.seed)
    type_pools: dict[str, list[str]] = {}
    facts: list[Fact] = []
    for rid in cfg.relations:
        rel = RELATIONS[rid]
        pool = type_pools.setdefault(rel.object_type, names.draw(rel.object_type, 2 * cfg.objects_per_relation))
        objects = list(rng.choice(pool, size=cfg.objects_per_relation, replace=False))
        for split, n in cfg.split_sizes(rid).items():
            for subj in names.draw(rel.subject_type, n):
                obj = str(objects[int(rng.integers(len(objects)))])
                q = rel.question(subj)
                facts.append(Fact(content_id(rid, q, [obj], split), rid, subj, obj, split, q))
    return facts


def real_facts(cfg: WorldConfig, rng: np.random.Generator) -> list[Fact]:
    """(subject, relation, answer) from an EntityQuestions folder, single-answer questions
    with a recovered subject, sampled per relation and split to the configured sizes."""
    from knowcat.loaders import load_entityquestions

    examples = load_entityquestions(cfg.facts_from, relations=list(cfg.relations))
    facts: list[Fact] = []
    for rid in cfg.relations:
        for split, n in cfg.split_sizes(rid).items():
            pool = [e for e in examples if e.relation == rid and e.split == split
                    and e.subject and len(e.answers) == 1]
            if not pool:
                continue
            take = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
            for i in sorted(int(t) for t in take):
                e = pool[i]
                facts.append(Fact(e.id, rid, e.subject, e.answers[0], split, e.question))
    return facts


def mention(fact: Fact, rel: Relation, qa: bool, rng: np.random.Generator, answer: str | None = None) -> str:
    answer = fact.answer if answer is None else answer
    if qa:
        return f"Q: {fact.question}\nA: {answer}\n"
    tpl = rel.statements[int(rng.integers(len(rel.statements)))]
    return tpl.format(s=fact.subject, o=answer) + "\n"


def facts_relations(cfg: WorldConfig) -> WorldConfig:
    """``cfg`` with the relations a ``facts_from`` folder provides (see :class:`WorldConfig`), the
    out-of-distribution ones among them kept; for a synthetic world, ``cfg`` itself."""
    if not cfg.facts_from:
        return cfg
    from dataclasses import replace

    from knowcat.loaders.entityquestions import discover_relations, load_templates

    folder = Path(cfg.facts_from)
    templates = load_templates(folder)
    present = [r for r in discover_relations(folder, SPLITS) if r in templates]
    if all(r in present for r in cfg.relations):
        return cfg
    if not present:
        from knowcat.errors import DataError

        raise DataError("no relation with both a template and question files", file=folder)
    return replace(cfg, relations=tuple(present), ood_relations=tuple(r for r in cfg.ood_relations if r in present))


def make_corpus(cfg: WorldConfig, facts: list[Fact], rng: np.random.Generator,
                templates: dict[str, str] | None = None) -> list[dict]:
    """Documents of ``mentions_per_doc`` mentions: Q/A documents hold one relation's
    questions (like a quiz sheet), statement documents mix relations, and page documents
    (``page_fraction``) state facts and then ask about them."""
    counts = draw_counts(cfg, len(facts), rng)
    conflicted = rng.random(len(facts)) < cfg.p_conflict
    rates = rng.uniform(0.1, max(0.1, cfg.max_conflict_rate), len(facts))
    answers_by_rel: dict[str, list[str]] = {}
    for f in facts:
        answers_by_rel.setdefault(f.relation, []).append(f.answer)
    qa_by_rel: dict[str, list[str]] = {}
    statements: list[str] = []
    pairs: list[tuple[str, str]] = []  # (statement, Q/A) of one fact with one answer, for page documents
    for fact, c, conf, rate in zip(facts, counts, conflicted, rates):
        rel = relation_for(fact.relation, (templates or {}).get(fact.relation))
        if conf and c > 0:
            others = [a for a in answers_by_rel[fact.relation] if a != fact.answer]
            fact.distractor = str(others[int(rng.integers(len(others)))]) if others else None
        mine: list[tuple[bool, bool, str]] = []  # (qa, wrong, text) in draw order
        for _ in range(int(c)):
            qa = bool(rng.random() < cfg.qa_fraction)
            wrong = fact.distractor is not None and bool(rng.random() < rate)
            text = mention(fact, rel, qa, rng, fact.distractor if wrong else None)
            if wrong:
                fact.conflicting += 1
            elif qa:
                fact.qa += 1
            else:
                fact.statement += 1
            mine.append((qa, wrong, text))
        paired: set[int] = set()
        for wrong in (False, True) if cfg.page_fraction else ():
            st = [i for i, m in enumerate(mine) if not m[0] and m[1] == wrong]
            qs = [i for i, m in enumerate(mine) if m[0] and m[1] == wrong]
            n_pairs = int(np.floor(cfg.page_fraction * min(len(st), len(qs)) + rng.random()))
            pairs.extend((mine[a][2], mine[b][2]) for a, b in zip(st[:n_pairs], qs[:n_pairs]))
            paired.update(st[:n_pairs] + qs[:n_pairs])
        for i, (qa, _, text) in enumerate(mine):
            if i not in paired:
                (qa_by_rel.setdefault(fact.relation, []) if qa else statements).append(text)
        fact.count = fact.qa + fact.statement
    docs = []
    k = cfg.mentions_per_doc
    for rid in sorted(qa_by_rel):
        lines = qa_by_rel[rid]
        order = rng.permutation(len(lines))
        for i in range(0, len(lines), k):
            docs.append({"text": "".join(lines[j] for j in order[i:i + k]), "kind": "qa"})
    order = rng.permutation(len(statements))
    for i in range(0, len(statements), k):
        docs.append({"text": "".join(statements[j] for j in order[i:i + k]), "kind": "statements"})
    order = rng.permutation(len(pairs))
    per_page = max(1, k // 2)
    for i in range(0, len(pairs), per_page):
        page = [pairs[j] for j in order[i:i + per_page]]
        asked = [page[j][1] for j in rng.permutation(len(page))]
        docs.append({"text": "".join(st for st, _ in page) + "".join(asked), "kind": "page"})
    return [docs[i] for i in rng.permutation(len(docs))]


def build_world(out_dir, cfg: WorldConfig | None = None, log=print) -> dict:
    """Write the world into ``out_dir`` and return its summary."""
    cfg = facts_relations(cfg or WorldConfig())
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    facts = real_facts(cfg, rng) if cfg.facts_from else synthetic_facts(cfg, rng)
    if cfg.facts_from:
        from knowcat.loaders.entityquestions import load_templates

        src = load_templates(Path(cfg.facts_from))
        tpl = {r: src[r] for r in cfg.relations if r in src}
    else:
        tpl = {r: RELATIONS[r].template for r in cfg.relations}
    corpus = make_corpus(cfg, facts, rng, tpl)

    world = WorldDir(out)
    data = world.data
    atomic_write_json(data / "relation_query_templates.json", tpl)
    for rid in cfg.relations:
        for split in SPLITS:
            recs = [{"question": f.question, "answers": [f.answer]}
                    for f in facts if f.relation == rid and f.split == split]
            atomic_write_text(data / split / f"{rid}.{split}.json", json.dumps(recs, ensure_ascii=False, indent=1))
    write_jsonl(world.corpus, corpus)
    write_jsonl(world.exposures, (asdict(f) for f in facts))
    counts = np.array([f.count for f in facts])
    total_mentions = int(sum(f.count + f.conflicting for f in facts))
    summary = {
        "config": asdict(cfg),
        "statement_forms": {r: ("hand-written" if r in RELATIONS else "derived from the question template")
                            for r in cfg.relations},
        "facts": len(facts),
        "relations": list(cfg.relations),
        "documents": len(corpus),
        "mentions": total_mentions,
        "conflicted_facts": int(sum(f.conflicting > 0 for f in facts)),
        "never_seen_share": float((counts == 0).mean()),
        "count_quantiles": {str(q): float(np.quantile(counts, q)) for q in (0.25, 0.5, 0.75, 0.9, 0.99)},
    }
    atomic_write_json(world.summary, summary)
    log(f"world: {len(facts)} facts over {len(cfg.relations)} relations, {len(corpus)} documents, "
        f"{summary['mentions']} mentions; never seen {summary['never_seen_share']:.0%}; "
        f"exposure quartiles {summary['count_quantiles']['0.25']:.0f}/{summary['count_quantiles']['0.5']:.0f}/"
        f"{summary['count_quantiles']['0.75']:.0f} -> {out}")
    return summary


def read_exposures(world_dir) -> list[dict]:
    return WorldDir(world_dir).read_exposures(missing_ok=False)
