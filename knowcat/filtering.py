"""Filter a categorized SFT dataset: keep or drop categories, relabel some to an
abstention answer, cap each relation. Works on any categorized file (JSONL,
JSON, CSV, Parquet) in the user's own record format: records pass through as
they are, only the answers of relabeled records change (the original answers
are kept beside them in ``original_<answers field>``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knowcat.errors import DataError
from knowcat.io import atomic_write_text
from knowcat.slick import CATEGORIES


@dataclass
class FilterConfig:
    keep: tuple[str, ...] | None = None  # categories to keep (None: all)
    drop: tuple[str, ...] = ()  # categories to drop
    relabel: tuple[str, ...] = ()  # categories whose answers become the abstention string
    abstention: str = "I don't know"
    cap_per_relation: int | None = None
    category_field: str = "category"
    answers_field: str = "answers"
    relation_field: str = "relation"
    seed: int = 0

    def __post_init__(self):
        for name in ("keep", "drop", "relabel"):
            vals = getattr(self, name) or ()
            bad = [v for v in vals if v not in CATEGORIES + ("not_applicable",)]
            if bad:
                raise ValueError(f"--{name}: unknown categories {bad}; choose from {list(CATEGORIES)} "
                                 f"or not_applicable")


@dataclass
class FilterResult:
    kept: list[dict]
    rejects: list[dict]
    counts: dict = field(default_factory=dict)

    def __str__(self) -> str:
        c = self.counts
        lines = [f"kept {len(self.kept)} of {c['total']} records; rejected {len(self.rejects)}; "
                 f"relabeled {c['relabeled']}"]
        lines.append("  by category: " + ", ".join(
            f"{cat} {c['kept_by_category'].get(cat, 0)}/{c['in_by_category'].get(cat, 0)}" for cat in CATEGORIES))
        if c["reasons"]:
            lines.append("  rejected because: " + "; ".join(f"{r} ({n})" for r, n in c["reasons"].items()))
        return "\n".join(lines)


def filter_records(records: list[dict], cfg: FilterConfig, source: str | None = None) -> FilterResult:
    kept, rejects = [], []
    in_cat: Counter = Counter()
    relabeled = 0
    for i, rec in enumerate(records):
        cat = rec.get(cfg.category_field)
        if cat is None:
            raise DataError("no category: is this a categorized file? (knowcat categorize writes one)",
                            file=source, record=i, field=cfg.category_field)
        if cat not in CATEGORIES:
            raise DataError(f"unknown category {cat!r}; expected one of {list(CATEGORIES)}",
                            file=source, record=i, field=cfg.category_field)
        in_cat[cat] += 1
        if cat in cfg.drop or (cfg.keep is not None and cat not in cfg.keep):
            rejects.append({"record": rec, "reason": f"category {cat} filtered out"})
            continue
        if cat in cfg.relabel:
            if cfg.answers_field not in rec:
                raise DataError("cannot relabel: the record has no answers field", file=source, record=i,
                                field=cfg.answers_field)
            rec = dict(rec)
            old = rec[cfg.answers_field]
            rec["original_" + cfg.answers_field] = old
            rec[cfg.answers_field] = cfg.abstention if isinstance(old, str) else [cfg.abstention]
            relabeled += 1
        kept.append(rec)
    if cfg.cap_per_relation is not None:
        by_rel: dict = {}
        for j, rec in enumerate(kept):
            by_rel.setdefault(rec.get(cfg.relation_field), []).append(j)
        rng = np.random.default_rng(cfg.seed)
        keep_idx = set()
        for rel, idxs in by_rel.items():
            if len(idxs) <= cfg.cap_per_relation:
                keep_idx.update(idxs)
            else:
                keep_idx.update(int(x) for x in rng.choice(idxs, size=cfg.cap_per_relation, replace=False))
        capped = [kept[j] for j in range(len(kept)) if j not in keep_idx]
        rejects.extend({"record": r, "reason": f"over the cap of {cfg.cap_per_relation} for relation "
                                               f"{r.get(cfg.relation_field)}"} for r in capped)
        kept = [kept[j] for j in sorted(keep_idx)]
    reasons = Counter(r["reason"] for r in rejects)
    counts = {"total": len(records), "kept": len(kept), "rejected": len(rejects), "relabeled": relabeled,
              "in_by_category": dict(in_cat),
              "kept_by_category": dict(Counter(r[cfg.category_field] for r in kept)),
              "reasons": dict(reasons)}
    return FilterResult(kept, rejects, counts)


def _format(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in (".jsonl", ".json"):
        return "jsonl" if suf == ".jsonl" else "json"
    if suf in (".parquet", ".csv"):
        return suf[1:]
    raise ValueError(f"{path}: unknown file type {suf!r}; use .jsonl, .json, .csv or .parquet")


def read_records(path) -> list[dict]:
    """Records of a categorized file as dicts, whatever its format."""
    import pandas as pd

    path = Path(path)
    fmt = _format(path)
    if fmt in ("jsonl", "json"):
        text = path.read_text(encoding="utf-8")
        if fmt == "json" and text.lstrip().startswith("["):
            return json.loads(text)
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON: {e.msg}", file=path, record=n) from None
        return out
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict(orient="records")


def write_records(path, records: list[dict]) -> None:
    import pandas as pd

    path = Path(path)
    fmt = _format(path)
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif fmt == "json":
        atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=1))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), tmp)
        else:
            pd.DataFrame(records).to_csv(tmp, index=False)
        tmp.replace(path)


def filter_file(src, out, cfg: FilterConfig, rejects_path=None, log=print, stats_path=None) -> FilterResult:
    """Filter a categorized file. SFT records (chat, ShareGPT, Alpaca...) with knowcat's metadata key
    go through :func:`knowcat.sft.filter_sft_file`: kept in their own format, with a stats file."""
    from knowcat.sft import filter_sft_file, is_annotated_sft

    if is_annotated_sft(src):
        res = filter_sft_file(src, out, cfg, rejects_path=rejects_path, stats_path=stats_path, log=log)
        return FilterResult(res["kept"], res["rejects"], res["stats"])  # counts, not lists, when streamed
    records = read_records(src)
    res = filter_records(records, cfg, source=str(src))
    res.counts["by_method"] = dict(Counter(r.get("category_method", "slick") for r in records))
    write_records(out, res.kept)
    rp = Path(rejects_path) if rejects_path else Path(out).with_name(Path(out).stem + ".rejects.jsonl")
    atomic_write_text(rp, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res.rejects))
    from knowcat.io import atomic_write_json

    atomic_write_json(Path(stats_path) if stats_path else Path(out).with_name(Path(out).stem + ".stats.json"),
                      res.counts)
    log(str(res))
    log(f"filter: wrote {out} ({len(res.kept)} records) and {rp} ({len(res.rejects)} rejects)")
    return res
