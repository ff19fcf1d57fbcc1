"""The paper's fine-tuning sets, built from a categorized train split.

Every set has (at most) the same size |D|. By default |D| follows the paper: for
each relation the size of its smallest category, summed over relations; each
relation then contributes that many examples to every set, so the relation mix
is the same in all of them. A given ``size`` is apportioned over relations in
proportion to their number of examples (largest remainders).

Sets (names are file stems under ``mixtures/``):

- ``unknown_XX``: XX% Unknown, the rest Known (HighlyKnown, MaybeKnown or
  WeaklyKnown, drawn uniformly from their union), per relation: the Unknown
  count of each relation is its share of XX% of |D|, within one example, and the
  total is exact. The sets are nested by construction: going up the XX, each
  step's increase is allocated on top of the previous counts (one example at a
  time to the relation furthest below its share; from zero this is the largest-
  remainder rule), so no relation ever loses Unknown at a higher XX; and each
  relation's Unknown and Known examples are prefixes of one fixed random order,
  so a set with more Unknown holds the Unknown of every set with fewer.
- ``known_XX``: ``unknown_XX`` with its Unknown examples removed (D_Known).
- ``HighlyKnown`` ... ``Unknown``: one category only (D_HighlyKnown ...).
- ``natural``: drawn uniformly per relation from the whole split (D_Natural).
- ``idk``: ``unknown_XX`` (XX = ``idk_from``) with its Unknown answers replaced by
  the abstention string (D_IDK).

Each set is written as JSONL of prompt/completion records, usable by other
trainers as they are, with the example's id, relation, category and question.
``manifest.json`` holds the sizes and the per-relation, per-category counts.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from knowcat.errors import DataError
from linear_models.names import CATEGORIES, KNOWN
DEFAULT_TEMPLATE = "Answer the following question. {question}\nAnswer:"


@dataclass
class MixtureConfig:
    unknown_percents: tuple[int, ...] = (0, 25, 50, 75, 100)
    size: int | None = None  # |D|; None: the paper's rule (per relation, its smallest category)
    known: bool = True  # the D_Known sets
    single: bool = True  # the single-category sets
    natural: bool = True
    idk: bool = True
    idk_from: int = 50  # D_IDK relabels the Unknown of this unknown_XX set
    abstention: str = "I don't know"
    prompt_template: str = DEFAULT_TEMPLATE
    split: str | None = "train"  # records of other splits are ignored (None: use all)
    seed: int = 0
    question_field: str = "question"
    answers_field: str = "answers"
    relation_field: str = "relation"
    category_field: str = "category"
    split_field: str = "split"
    id_field: str = "id"

    def __post_init__(self):
        for x in self.unknown_percents:
            if not 0 <= x <= 100:
                raise ValueError(f"unknown percent {x} is not in [0, 100]")
        if self.idk and self.idk_from not in self.unknown_percents:
            raise ValueError(f"idk_from={self.idk_from} must be one of the unknown percents {self.unknown_percents}")


def set_name(kind: str, x: int | None = None) -> str:
    return f"{kind}_{x:02d}" if x is not None else kind


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders;
    ties broken by key order, so the result is deterministic)."""
    keys = sorted(weights)
    w = np.array([weights[k] for k in keys], dtype=float)
    if total == 0 or w.sum() == 0:
        return {k: 0 for k in keys}
    exact = total * w / w.sum()
    base = np.floor(exact).astype(int)
    rest = total - int(base.sum())
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return {k: int(b) for k, b in zip(keys, base)}


def nested_counts(percents, per_rel: dict[str, int]) -> dict[int, dict[str, int]]:
    """``{x: {relation: Unknown count}}`` for every percent ``x``: the total is
    ``round(|D| * x / 100)``, each relation's count is within one example of its share
    ``x% * per_rel[r]`` and never above ``per_rel[r]``, and the counts never decrease with
    ``x``: each step's increase is given, one example at a time, to the relation furthest
    below its share (ties by key order) on top of the previous step's counts."""
    keys = sorted(per_rel)
    cap = np.array([per_rel[k] for k in keys], dtype=float)
    D = int(cap.sum())
    cur = np.zeros(len(keys), dtype=int)
    out = {}
    for x in sorted(set(percents)):
        total = round(D * x / 100)
        exact = total * cap / D if D else cap * 0
        for _ in range(total - int(cur.sum())):
            deficit = np.where(cur < cap, exact - cur, -np.inf)
            cur[int(np.argmax(deficit))] += 1  # argmax takes the first of ties: key order
        out[x] = {k: int(c) for k, c in zip(keys, cur)}
    return out


def _validate(records: list[dict], cfg: MixtureConfig, source: str | None) -> list[dict]:
    out = []
    for i, rec in enumerate(records):
        if cfg.split is not None and rec.get(cfg.split_field, cfg.split) != cfg.split:
            continue
        for f in (cfg.id_field, cfg.question_field, cfg.answers_field, cfg.relation_field, cfg.category_field):
            if f not in rec:
                raise DataError("missing field (is this a categorized file? knowcat categorize writes one)",
                                file=source, record=i, field=f)
        if rec[cfg.category_field] not in CATEGORIES:
            raise DataError(f"unknown category {rec[cfg.category_field]!r}; expected one of {list(CATEGORIES)}",
                            file=source, record=i, field=cfg.category_field)
        ans = rec[cfg.answers_field]
        if isinstance(ans, str):
            ans = [ans]
        if not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            raise DataError("answers must be a non-empty list of non-empty strings", file=source, record=i,
                            field=cfg.answers_field)
        out.append(rec)
    if not out:
        raise DataError(f"no records of split {cfg.split!r} to build mixtures from", file=source)
    return out


def build_mixtures(records: list[dict], cfg: MixtureConfig = MixtureConfig(), source: str | None = None) -> dict:
    """The training sets as ``{name: [record, ...]}`` plus ``"_manifest"``."""
    recs = _validate(records, cfg, source)
    rng = np.random.default_rng(cfg.seed)
    pools: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {c: [] for c in CATEGORIES})
    for rec in recs:
        pools[rec[cfg.relation_field]][rec[cfg.category_field]].append(rec)
    relations = sorted(pools)
    # One fixed random order per relation and pool: every set takes prefixes of it.
    order = {}
    for r in relations:
        for c in CATEGORIES:
            p = pools[r][c]
            order[r, c] = [p[i] for i in rng.permutation(len(p))]
        known = [x for c in KNOWN for x in pools[r][c]]
        order[r, "Known"] = [known[i] for i in rng.permutation(len(known))]
        allr = [x for c in CATEGORIES for x in pools[r][c]]
        order[r, "All"] = [allr[i] for i in rng.permutation(len(allr))]

    if cfg.size is None:
        per_rel = {r: min(len(pools[r][c]) for c in CATEGORIES) for r in relations}
        rule = "paper: per relation the size of its smallest category, summed"
    else:
        per_rel = apportion(cfg.size, {r: sum(len(v) for v in pools[r].values()) for r in relations})
        rule = f"given size {cfg.size}, apportioned over relations by their number of examples"
    D = sum(per_rel.values())
    if D == 0:
        raise DataError("|D| = 0: every relation lacks some category, so the paper's rule builds empty sets; "
                        "give --size", file=source)

    def take(r: str, pool: str, n: int, what: str) -> list[dict]:
        avail = order[r, pool]
        if n > len(avail):
            raise DataError(f"set {what}: relation {r} needs {n} {pool} examples but has {len(avail)}; "
                            f"lower --size", file=source)
        return avail[:n]

    sets: dict[str, list[dict]] = {}
    unk_by_x = nested_counts(cfg.unknown_percents, per_rel)
    for x in cfg.unknown_percents:
        # each relation's Unknown count is its share of x% of |D| (never above its share of |D|), nested in x
        unk = unk_by_x[x]
        rows = []
        for r in relations:
            u = unk[r]
            rows += take(r, "Unknown", u, set_name("unknown", x)) + take(r, "Known", per_rel[r] - u,
                                                                          set_name("unknown", x))
        sets[set_name("unknown", x)] = rows
        if cfg.known and 0 < x < 100:
            sets[set_name("known", x)] = [row for row in rows if row[cfg.category_field] != "Unknown"]
    if cfg.single:
        for c in CATEGORIES:
            sets[c] = [row for r in relations for row in take(r, c, per_rel[r], c)]
    if cfg.natural:
        sets["natural"] = [row for r in relations for row in take(r, "All", per_rel[r], "natural")]

    out: dict[str, list[dict]] = {}
    for name, rows in sets.items():
        out[name] = [_training_record(row, cfg) for row in rows]
    if cfg.idk:
        out["idk"] = [dict(t, completion=" " + cfg.abstention, target=cfg.abstention, relabeled=True)
                      if t["category"] == "Unknown" else t for t in out[set_name("unknown", cfg.idk_from)]]

    manifest = {"size": D, "rule": rule, "per_relation": per_rel, "config": asdict(cfg), "source": source,
                "sets": {}}
    for name, rows in out.items():
        by = defaultdict(Counter)
        for t in rows:
            by[t["relation"]][t["category"]] += 1
        manifest["sets"][name] = {
            "n": len(rows),
            "by_category": dict(Counter(t["category"] for t in rows)),
            "by_relation": {r: dict(by[r]) for r in sorted(by)},
            "n_unknown": sum(t["category"] == "Unknown" for t in rows),
            "n_known": sum(t["category"] != "Unknown" for t in rows),
        }
    out["_manifest"] = manifest
    return out


def _training_record(rec: dict, cfg: MixtureConfig) -> dict:
    ans = rec[cfg.answers_field]
    ans = [ans] if isinstance(ans, str) else list(ans)
    q = rec[cfg.question_field]
    return {
        "id": rec[cfg.id_field],
        "relation": rec[cfg.relation_field],
        "category": rec[cfg.category_field],
        "question": q,
        "answers": ans,
        "target": ans[0],
        "prompt": cfg.prompt_template.format(question=q),
        "completion": " " + ans[0],
    }


def write_mixtures(sets: dict, out_dir) -> Path:
    """Every set as ``OUT/NAME.jsonl`` and ``OUT/manifest.json`` (:class:`knowcat.rundir.MixturesDir`)."""
    from knowcat.rundir import MixturesDir

    return MixturesDir(out_dir).write(sets)


def read_training_set(path) -> list[dict]:
    """A prompt/completion JSONL (as ``write_mixtures`` writes), checked record by record."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"malformed JSON: {err.msg}", file=str(path), record=i) from None
            for fld in ("prompt", "completion"):
                if not isinstance(rec.get(fld), str):
                    raise DataError("expected a string", file=str(path), record=i, field=fld)
            rows.append(rec)
    if not rows:
        raise DataError("empty training set", file=str(path))
    return rows


def format_manifest(m: dict) -> str:
    lines = [f"|D| = {m['size']} ({m['rule']})",
             f"{'set':<14}{'n':>6}" + "".join(f"{c[:2]:>6}" for c in CATEGORIES)]
    for name, s in m["sets"].items():
        lines.append(f"{name:<14}{s['n']:>6}" + "".join(f"{s['by_category'].get(c, 0):>6}" for c in CATEGORIES))
    return "\n".join(lines)
