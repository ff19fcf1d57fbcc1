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

from knowcat.errors import DataError, UsageError
from knowcat.io import atomic_write_bytes, atomic_write_text, json_safe
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
        if self.cap_per_relation is not None and self.cap_per_relation < 1:
            raise ValueError(f"--cap-per-relation must be at least 1, got {self.cap_per_relation}")
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
            rel = rec.get(cfg.relation_field)
            key = rel if rel is None or isinstance(rel, (str, int, float)) else json.dumps(rel, default=str)
            by_rel.setdefault(key, []).append(j)
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
    raise UsageError(f"{path}: unknown file type {suf!r}; use .jsonl, .json, .csv or .parquet")


def _csv_cell(v: str):
    """A CSV cell back as written: JSON lists and objects decoded, everything else text."""
    s = v.strip()
    if s[:1] in ("[", "{") and s[-1:] in ("]", "}"):
        try:
            return json.loads(s)
        except ValueError:
            return v
    return v


def read_records(path) -> list[dict]:
    """Records of a categorized file as dicts, whatever its format; the first bad record raises
    :class:`DataError` naming the file and the record. What :func:`write_records` wrote reads back
    equal (CSV cells are text: lists and objects come back from their JSON, numbers as text)."""
    from knowcat.loaders.readers import READERS

    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a file", file=path)
    out = []
    for rr in READERS[fmt](path):
        if rr.error is not None:
            raise rr.error
        rec = rr.value
        if not isinstance(rec, dict):
            raise DataError(f"expected a record (a JSON object), got {type(rec).__name__}", file=path,
                            record=rr.record)
        if fmt == "csv":
            rec = {k: _csv_cell(v) for k, v in rec.items()}
        out.append(rec)
    return out


def _parquet_table(records: list[dict]):
    """An Arrow table of ``records``; a column whose values share no Arrow type (a number in one
    record, text in another) or hold mappings (whose keys differ from record to record) is stored as
    JSON text and named in the schema's metadata, so :func:`read_records` gives it back as it was."""
    import pyarrow as pa

    from knowcat.loaders.readers import JSON_COLUMNS_KEY

    names: dict = {}
    for r in records:
        names.update(dict.fromkeys(r))
    arrays, json_cols = {}, []
    for name in names:
        col = [r.get(name) for r in records]
        nested = any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v))
                     for v in col)
        arr = None
        if not nested:
            try:
                arr = pa.array(col)
                kinds = {type(v) for v in col if v is not None}
                if len(kinds - {int, float}) > 1 or (bool in kinds and len(kinds) > 1) or pa.types.is_null(arr.type) and kinds:
                    arr = None
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                arr = None
        if arr is None:
            arr = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, allow_nan=False) for v in col],
                           type=pa.string())
            json_cols.append(name)
        arrays[name] = arr
    table = pa.table(arrays) if arrays else pa.table({})
    if json_cols:
        table = table.replace_schema_metadata({JSON_COLUMNS_KEY: json.dumps(json_cols).encode()})
    return table


def _csv_text(records: list[dict]) -> str:
    import csv
    import io

    names: dict = {}
    for r in records:
        names.update(dict.fromkeys(r))
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(names))
    for r in records:
        w.writerow(["" if r.get(k) is None else r[k] if isinstance(r[k], str)
                    else json.dumps(r[k], ensure_ascii=False, allow_nan=False) for k in names])
    return buf.getvalue()


def write_records(path, records: list[dict]) -> None:
    """Write ``records`` atomically in the format of ``path``'s suffix: JSONL, JSON (a list), CSV
    (lists and objects as JSON text) or Parquet (see :func:`_parquet_table`). NaN is never written:
    JSON has none (it becomes null)."""
    path = Path(path)
    fmt = _format(path)
    records = json_safe(records)
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records))
    elif fmt == "json":
        atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=1, allow_nan=False))
    elif fmt == "csv":
        atomic_write_text(path, _csv_text(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        pq.write_table(_parquet_table(records), buf)
        atomic_write_bytes(path, buf.getvalue().to_pybytes())  # a unique temporary name, then rename


def filter_file(src, out, cfg: FilterConfig, rejects_path=None, log=print, stats_path=None) -> FilterResult:
    """Filter a categorized file. SFT records (chat, ShareGPT, Alpaca...) with knowcat's metadata key
    go through :func:`knowcat.sft.filter_sft_file`: kept in their own format, with a stats file."""
    from knowcat.sft import filter_sft_file, is_annotated_sft

    rp = Path(rejects_path) if rejects_path else Path(out).with_name(Path(out).stem + ".rejects.jsonl")
    if Path(src).resolve() in (Path(out).resolve(), rp.resolve()):
        raise UsageError(f"the output {out} or its rejects file {rp} is the input {src}; write elsewhere")
    if is_annotated_sft(src):
        res = filter_sft_file(src, out, cfg, rejects_path=rp, stats_path=stats_path, log=log)
        return FilterResult(res["kept"], res["rejects"], res["stats"])  # counts, not lists, when streamed
    _format(Path(out))  # an unknown output type is refused before any work (SFT may write a saved dataset)
    records = read_records(src)
    if not records:
        raise DataError("empty file: it holds no records", file=src)
    res = filter_records(records, cfg, source=str(src))
    res.counts["by_method"] = dict(Counter(r.get("category_method", "slick") for r in records))
    write_records(out, res.kept)
    atomic_write_text(rp, "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n"
                                  for r in res.rejects))
    from knowcat.io import atomic_write_json

    atomic_write_json(Path(stats_path) if stats_path else Path(out).with_name(Path(out).stem + ".stats.json"),
                      res.counts)
    log(str(res))
    log(f"filter: wrote {out} ({len(res.kept)} records) and {rp} ({len(res.rejects)} rejects)")
    return res
