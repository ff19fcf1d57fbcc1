"""SFT datasets through knowcat: turns out as examples, categories back into the records, filtering.

:func:`prepare` turns an :class:`~knowcat.loaders.sft.SFTDataset` into examples (one per
asked turn) and sets aside the turns whose reference answer is too long to match
(``not_applicable``, with the reason). :func:`annotate_records` writes each turn's
category (from SliCK or from the estimator, ``method``) back into its record under
``knowcat``::

    "knowcat": {"category": <the record's category>, "method": "slick" | "estimate" | ...,
                "turns": [{"turn": 0, "field": "messages[3].content", "category": ..., ...}]}

A record's category is its least known categorized turn (Unknown before WeaklyKnown before
MaybeKnown before HighlyKnown); ``not_applicable`` only when no turn was categorized.
:func:`filter_sft_file` keeps, drops or relabels whole records by that category and writes
the kept records in their own format, the dropped ones to a rejects file with the reason,
and a stats file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.io import atomic_write_json
from knowcat.loaders.sft import (META_KEY, SFTDataset, annotate, container_of, detect_record_format, iter_raw,
                                 set_answer, strip_meta, write_rejects, write_sft, write_sft_stream)
from knowcat.matching import answer_too_long
from knowcat.rundir import RunDir
from knowcat.slick import CATEGORIES

NOT_APPLICABLE = "not_applicable"
ALL_LABELS = CATEGORIES + (NOT_APPLICABLE,)


def prepare(ds: SFTDataset, group_by: str | None = None, max_answer_tokens: int | None = None
            ) -> tuple[list[QAExample], dict[str, str]]:
    """(every turn as an example, ``{id: reason}`` of the turns that are not applicable)."""
    examples = ds.examples(group_by)
    return examples, not_applicable(examples, max_answer_tokens)


def not_applicable(examples: list[QAExample], max_answer_tokens: int | None) -> dict[str, str]:
    """``{id: reason}`` of the examples whose reference answer is too long to match."""
    return {ex.id: why for ex in examples if (why := answer_too_long(ex.answers, max_answer_tokens))}


def record_category(turn_categories: list[str]) -> str:
    cats = [c for c in turn_categories if c in CATEGORIES]
    if not cats:
        return NOT_APPLICABLE
    return max(cats, key=CATEGORIES.index)


def annotate_records(ds: SFTDataset, examples: list[QAExample], results: dict[str, dict], method: str | None,
                     not_applicable: dict[str, str] | None = None) -> list[dict]:
    """The dataset's records, each with its turns' categories under ``knowcat``.

    ``results``: ``{example id: {"category": ..., other fields to record}}``; examples in
    ``not_applicable`` get that category and the reason. ``method`` labels every record; with
    None each result names its own (``"method"``), and a record whose turns were labelled by
    several methods says ``"mixed"``."""
    not_applicable = not_applicable or {}
    per_record: dict[int, list[dict]] = {}
    for ex in examples:
        loc = ex.metadata["sft"]
        if ex.id in not_applicable:
            entry = {"category": NOT_APPLICABLE, "reason": not_applicable[ex.id]}
        elif ex.id in results:
            entry = dict(results[ex.id])
        else:
            raise KeyError(f"no result for example {ex.id} (record {loc['record']}, turn {loc['turn']})")
        per_record.setdefault(loc["record"], []).append({"turn": loc["turn"], "field": loc["field"], **entry})
    return [annotate(r.record, record_meta(per_record.get(pos, []), method)) for pos, r in enumerate(ds.records)]


def record_meta(turns: list[dict], method: str | None) -> dict:
    """A record's ``knowcat`` entry from its turns' (see :func:`annotate_records`)."""
    m = method
    if m is None:
        ms = {t["method"] for t in turns if "method" in t}
        m = ms.pop() if len(ms) == 1 else ("mixed" if ms else None)
    return {"category": record_category([t["category"] for t in turns]), "method": m, "turns": turns}


def annotated_stream(scan, examples, result_of, method: str | None, not_applicable=None):
    """:func:`annotate_records` record by record for an :class:`~knowcat.loaders.sft.SFTScan`: each record
    is read again from its file, annotated and handed on, so memory holds one record. ``result_of(id)``
    gives a turn's result (``{"category", ...}``), asked in record order; ``examples`` are the scan's, in
    record order (a list, or a :class:`~knowcat.loaders.sft.StreamedExamples` read along);
    ``not_applicable``: ``{id: reason}``, or a function of the example giving its reason or None."""
    from knowcat.loaders.sft import scanned_records

    not_applicable = not_applicable or {}
    if callable(not_applicable):
        reason_of = not_applicable
    else:
        def reason_of(e):
            return not_applicable[e.id] if e.id in not_applicable else None
    it = iter(examples)
    ex = next(it, None)
    for pos, rec in enumerate(scanned_records(scan)):
        turns = []
        while ex is not None and ex.metadata["sft"]["record"] == pos:
            loc = ex.metadata["sft"]
            reason = reason_of(ex)
            entry = dict(result_of(ex.id)) if reason is None else {"category": NOT_APPLICABLE, "reason": reason}
            turns.append({"turn": loc["turn"], "field": loc["field"], **entry})
            ex = next(it, None)
        yield annotate(rec, record_meta(turns, method))
    if ex is not None:
        left = 1 + sum(1 for _ in it)
        raise DataError(f"the file changed while it was read: {left} turns left without their record",
                        file=scan.path)


# --- filtering ---------------------------------------------------------------------------------

def is_annotated_sft(path) -> bool:
    """True when the file's first record is an SFT record that carries knowcat's metadata key."""
    try:
        for rr in iter_raw(path):
            if rr.error is None:
                return isinstance(rr.value, dict) and META_KEY in rr.value and \
                    detect_record_format(strip_meta(rr.value)) is not None
            return False
    except DataError:
        return False
    return False


class SFTFilter:
    """Keep / drop / relabel annotated SFT records one at a time (``cfg``: a
    :class:`knowcat.filtering.FilterConfig`), counting as it goes; memory does not grow with the data."""

    def __init__(self, cfg, source=None):
        if cfg.cap_per_relation is not None:
            raise ValueError("--cap-per-relation applies to QA records; SFT records are filtered by category only")
        self.cfg, self.source, self.fmt = cfg, source, None
        self.in_cat, self.kept_cat, self.by_method, self.reasons = Counter(), Counter(), Counter(), Counter()
        self.by_field: dict = {}
        self.total = self.kept = self.rejected = self.relabeled = 0

    def __call__(self, n, rec) -> tuple[dict | None, dict | None]:
        """(the record to keep, possibly relabeled, or None; the reject row or None)."""
        cfg = self.cfg
        meta = rec.get(META_KEY) if isinstance(rec, dict) else None
        if not isinstance(meta, dict) or "category" not in meta:
            raise DataError(f"no '{META_KEY}' categories: is this a categorized SFT file? (knowcat categorize "
                            f"or knowcat estimate writes one)", file=self.source, record=n, field=META_KEY)
        cat = meta["category"]
        if cat not in ALL_LABELS:
            raise DataError(f"unknown category {cat!r}; expected one of {list(ALL_LABELS)}", file=self.source,
                            record=n, field=f"{META_KEY}.category")
        fmt = detect_record_format(strip_meta(rec))
        if fmt is None:
            raise DataError("not an SFT record (no messages, prompt/completion, conversations, "
                            "instruction/output or question/answers)", file=self.source, record=n)
        self.fmt = self.fmt or fmt
        self.total += 1
        self.in_cat[cat] += 1
        self.by_method[meta.get("method")] += 1
        for t in meta.get("turns", []):
            self.by_field.setdefault(t.get("field"), Counter())[t.get("category")] += 1
        if cat in cfg.drop or (cfg.keep is not None and cat not in cfg.keep):
            reason = f"category {cat} filtered out"
            self.reasons[reason] += 1
            if cat == NOT_APPLICABLE:
                reason += ": " + "; ".join(t.get("reason", "") for t in meta.get("turns", []) if t.get("reason"))
            self.rejected += 1
            return None, {"record": n, "reason": reason, "method": meta.get("method"), "data": rec}
        if any(t.get("category") in cfg.relabel for t in meta.get("turns", [])):
            new, turns = rec, []
            for t in meta.get("turns", []):
                t = dict(t)
                if t.get("category") in cfg.relabel:
                    new = set_answer(new, fmt, t["field"], cfg.abstention)
                    t["relabeled"] = True
                    t["original_answer"] = _get_field(rec, fmt, t["field"])
                turns.append(t)
            rec = annotate(strip_meta(new), {**meta, "turns": turns})
            self.relabeled += 1
        self.kept += 1
        self.kept_cat[cat] += 1
        return rec, None

    def stats(self) -> dict:
        return {"format": self.fmt, "total": self.total, "kept": self.kept, "rejected": self.rejected,
                "relabeled": self.relabeled,
                "by_category": {c: {"in": self.in_cat[c], "kept": self.kept_cat[c]} for c in ALL_LABELS},
                "by_method": dict(self.by_method),
                "by_source_field": {f: dict(c) for f, c in self.by_field.items()},
                "reasons": dict(self.reasons)}


def filter_sft_records(records: list[dict], cfg, source=None, numbers=None) -> dict:
    """:class:`SFTFilter` over a list: ``{"kept", "rejects", "stats"}``; ``kept + rejects`` are all the records."""
    f = SFTFilter(cfg, source)
    kept, rejects = [], []
    numbers = numbers if numbers is not None else list(range(len(records)))
    for n, rec in zip(numbers, records):
        k, r = f(n, rec)
        if k is not None:
            kept.append(k)
        else:
            rejects.append(r)
    return {"kept": kept, "rejects": rejects, "stats": f.stats()}


def _get_field(rec: dict, fmt: str, fld: str):
    import re

    node = rec
    for s in re.findall(r"[^.\[\]]+|\[\d+\]", fld):
        node = node[int(s[1:-1])] if s.startswith("[") else node[s]
    return node


def format_stats(s: dict) -> str:
    lines = [f"kept {s['kept']} of {s['total']} records ({s['format']}); rejected {s['rejected']}; "
             f"relabeled {s['relabeled']}",
             "  by category: " + ", ".join(f"{c} {v['kept']}/{v['in']}" for c, v in s["by_category"].items()),
             "  labelled by: " + ", ".join(f"{m} {n}" for m, n in s["by_method"].items())]
    if s["reasons"]:
        lines.append("  rejected because: " + "; ".join(f"{r} ({n})" for r, n in s["reasons"].items()))
    return "\n".join(lines)


def filter_sft_file(src, out, cfg, rejects_path=None, stats_path=None, log=print) -> dict:
    """Filter an annotated SFT file: kept records to ``out`` (same format as the input unless ``out``'s
    suffix says otherwise), rejects (``{"record", "reason", "method", "data"}``) and stats beside it.
    Streams from every container to every container: records read one at a time (a JSON array is parsed
    whole), kept records written by :func:`~knowcat.loaders.sft.write_sft_stream`, rejects line by line;
    both files written to temporary names and renamed at the end. Returns ``{"kept", "rejects",
    "stats"}`` (counts of kept and rejected records, and the stats)."""
    src, out = Path(src), Path(out)
    stem = out.stem if out.suffix else out.name
    rp = Path(rejects_path) if rejects_path else out.with_name(stem + ".rejects.jsonl")
    sp = Path(stats_path) if stats_path else out.with_name(stem + ".stats.json")
    container_of(src)  # an unknown input type is refused before anything is written
    res = _stream_filter(src, out, rp, cfg)
    atomic_write_json(sp, res["stats"])
    log(format_stats(res["stats"]))
    log(f"filter: wrote {out} ({res['stats']['kept']} records), {rp} ({res['stats']['rejected']} rejects) and {sp}")
    return res


def _stream_filter(src: Path, out: Path, rp: Path, cfg) -> dict:
    import os
    import tempfile

    f = SFTFilter(cfg, str(src))
    rp.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{rp.name}.", suffix=".tmp", dir=rp.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as rej_f:
            def kept():
                for rr in iter_raw(src):
                    if rr.error is not None:
                        raise rr.error
                    k, r = f(rr.record, rr.value)
                    if k is not None:
                        yield k
                    else:
                        rej_f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")

            write_sft_stream(out, kept(), None if out.suffix else "hf")
        os.replace(tmp, rp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"kept": f.kept, "rejects": f.rejected, "stats": f.stats()}


# --- categorization ----------------------------------------------------------------------------

RESULT_FIELDS = ("category", "p_correct_greedy", "n_greedy", "n_greedy_correct", "n_sampled", "n_sampled_correct",
                 "match_mode")


def _load_for_run(stage: str, data, run: Path, format, turns, on_error, rejects, group_by, max_answer_tokens,
                  exemplars, log, pool_cap: int | None = None, seed: int = 0):
    """What ``categorize_sft`` and ``estimate_sft`` both start with: the SFT file scanned for its turns
    (:func:`~knowcat.loaders.sft.scan_sft`: the records are not kept), malformed records to the rejects file
    (the run's default when none is given), the turns as examples, those whose answer is too long set
    apart, and the exemplar pool (``exemplars`` or the examples themselves). With ``pool_cap`` the examples
    are not held either (:class:`~knowcat.loaders.sft.StreamedExamples`, read again on each pass), nor the
    ids not applicable (``not_applicable`` is then a function of the example giving its reason or None), and
    the pool keeps at most ``pool_cap`` exemplars per group (:func:`knowcat.estimate.bounded_pool`).
    Returns ``(scan, examples, not_applicable, todo, pool)``."""
    from knowcat.loaders.sft import load_sft, scan_sft

    stream = pool_cap is not None
    ds = scan_sft(data, format=format, turns=turns, on_error=on_error, group_by=group_by, stream=stream)
    examples = ds.examples
    if stream:  # the reason asked of each example as it passes (a file of long answers would hold every id)
        def na(ex):
            return answer_too_long(ex.answers, max_answer_tokens) or None

        todo = examples.where(lambda ex: not na(ex))
        n_na = len(examples) - len(todo)
    else:
        na = not_applicable(examples, max_answer_tokens)
        todo = [e for e in examples if e.id not in na]
        n_na = len(na)
    if ds.rejects or rejects:
        rp = Path(rejects) if rejects else RunDir(run).load_rejects
        write_rejects(rp, ds.rejects)
        log(f"{stage}: {len(ds.rejects)} malformed records skipped -> {rp}")
    log(f"{stage}: {ds.n_records} {ds.format} records from {data}: {len(examples)} turns, "
        f"{n_na} not applicable (answer over {max_answer_tokens} words)")
    if stream:
        from knowcat.estimate import bounded_pool

        source = scan_sft(exemplars, turns="all", group_by=group_by, stream=True).examples \
            if exemplars is not None else todo
        pool = bounded_pool(source, pool_cap, seed)
    else:
        pool = load_sft(exemplars, turns="all").examples(group_by) if exemplars is not None else todo
    return ds, examples, na, todo, pool


def categorize_sft(model_name: str, data, run_dir, cfg, *, format: str | None = None, turns: str = "last",
                   group_by: str | None = None, max_answer_tokens: int | None = 32, exemplars=None,
                   on_error: str = "raise", rejects=None, out=None, command: dict | None = None, log=print,
                   **run_options) -> Path:
    """SliCK categories of an SFT dataset's turns, written back into its records.

    Exemplars come from ``exemplars`` (another SFT file) or from the dataset itself (never a
    question as its own exemplar; with ``group_by`` from the same group). The categorization
    itself is :func:`knowcat.runs.run_categorize` (resumable, in ``run_dir``); the annotated
    records go to ``out`` (default ``run_dir/categorized_sft.<input's type>``). ``command``: the
    options the run was asked with beyond its identity (the data options: format, turns, ...),
    recorded in ``categorize/command.json`` once it finishes, for the report's rerun command.
    Returns that path.
    """
    from knowcat.runs import check_chat_template, run_categorize

    check_chat_template(model_name, cfg)  # before the rejects file is written
    run = Path(run_dir)
    ds, examples, na, todo, pool = _load_for_run("categorize", data, run, format, turns, on_error, rejects, group_by,
                                                 max_answer_tokens, exemplars, log)
    results = {}
    if todo:
        summary = run_categorize(model_name, todo, pool, run, cfg, data_source=str(data), log=log, **run_options)
        if command and summary:
            RunDir(run).write_categorize_command(command)
        for r in RunDir(run).read_categorized(missing_ok=False):
            results[r["id"]] = {k: r[k] for k in RESULT_FIELDS if k in r}

    def result_of(i):
        if i not in results:
            raise KeyError(f"no result for example {i} in {RunDir(run).root}")
        return results[i]

    dest = Path(out) if out else RunDir(run).categorized_sft(ds.container)
    n = write_sft_stream(dest, annotated_stream(ds, examples, result_of, "slick", na), None if dest.suffix else "hf")
    log(f"categorize: wrote {dest} ({n} records in their own format, categories under '{META_KEY}')")
    return dest


# --- estimation ----------------------------------------------------------------------------------

def estimate_sft(model, data, run_dir, cfg=None, slick_cfg=None, *, tokenizer=None, format: str | None = None,
                 turns: str = "last", group_by: str | None = None, max_answer_tokens: int | None = 32,
                 exemplars=None, labels=None, on_error: str = "raise", rejects=None, out=None,
                 model_name: str | None = None, device: str = "auto", dtype: str = "auto", shard_size: int = 4096,
                 run_slick: bool = False, pool_cap: int | None = None, log=print, progress: bool = True):
    """:func:`knowcat.estimate.estimate` on an SFT dataset: the categories of every turn (SliCK on the
    calibration sample, the estimator on the rest), written back into the records under ``knowcat``
    with the method that labelled each turn, in the input's own format (``out``, default
    ``run_dir/estimated_sft.<input's type>``), plus ``estimated.jsonl`` and ``estimate_summary.json``.

    ``model``: a hub id or folder, or a loaded model with ``tokenizer``. ``labels``: a categorized
    file's rows by example id (a dict, :func:`knowcat.estimate.read_labels`, or a
    :class:`knowcat.estimate.LabelIndex`) or its path (then indexed, not held).

    Memory does not grow with the records: the examples are read again from the file on each pass
    (:class:`~knowcat.loaders.sft.StreamedExamples`), the features and predictions go to shards on disk
    and are read back one at a time, and the few-shot pool keeps at most ``pool_cap`` examples per group
    (default :data:`knowcat.estimate.POOL_CAP`; every example of a group that has fewer). What is held
    per record is a few numbers (see :func:`knowcat.estimate.estimate`). Returns
    ``(path of the annotated records, the EstimateResult)``."""
    from knowcat.estimate import POOL_CAP, EstimateConfig, LabelIndex, estimate, write_estimate
    from knowcat.slick import SliCKConfig

    pool_cap = POOL_CAP if pool_cap is None else pool_cap
    cfg = cfg or EstimateConfig()
    slick_cfg = slick_cfg or SliCKConfig(keep_answers=True, chat_template=cfg.chat_template)
    run = Path(run_dir)
    if isinstance(model, (str, Path)):
        from probes.loading import load_model

        model_name = model_name or str(model)
        model, tokenizer = load_model(str(model), device=device, dtype=dtype)
    elif tokenizer is None:
        raise ValueError("estimate_sft: a loaded model needs its tokenizer")
    from knowcat.estimate import _renderer

    _renderer(tokenizer, cfg)  # a tokenizer without a chat template is refused before anything is written
    if labels is not None and not isinstance(labels, (dict, LabelIndex)):
        labels = LabelIndex(labels)
    ds, examples, na, todo, pool = _load_for_run("estimate", data, run, format, turns, on_error, rejects, group_by,
                                                 max_answer_tokens, exemplars, log, pool_cap=pool_cap, seed=cfg.seed)
    res = estimate(model, tokenizer, todo, pool, cfg, slick_cfg, labels=labels, run_dir=run,
                   model_name=model_name or getattr(model, "name_or_path", "model"), log=log, progress=progress,
                   shard_size=shard_size, run_slick=run_slick, pool_cap=pool_cap)
    rows = res.rows()  # in the examples' order, as annotated_stream asks for them

    def result_of(i):
        ex, cat, method, probs = next(rows)
        if ex.id != i:
            raise DataError(f"the file changed while it was read: turn {i} where {ex.id} was estimated", file=data)
        return {"category": cat, "method": method, "probs": dict(zip(CATEGORIES, map(float, probs)))}

    dest = Path(out) if out else RunDir(run).estimated_sft(ds.container)
    n = write_sft_stream(dest, annotated_stream(ds, examples, result_of, None, na), None if dest.suffix else "hf")
    write_estimate(run, todo, res)
    log(f"estimate: wrote {dest} ({n} records in their own format, categories under '{META_KEY}')")
    return dest, res


# --- a QA dataset as SFT files -----------------------------------------------------------------

def qa_as_sft(examples: list[QAExample], fmt: str) -> list[dict]:
    """QA examples as chat (``messages``) or Alpaca records; the first alias is the answer, and ``id``
    and ``relation`` ride along (so ``--group-by relation`` draws exemplars from the same relation)."""
    out = []
    for ex in examples:
        if fmt == "messages":
            rec = {"messages": [{"role": "user", "content": ex.question},
                                {"role": "assistant", "content": ex.answers[0]}]}
        elif fmt == "alpaca":
            rec = {"instruction": ex.question, "input": "", "output": ex.answers[0]}
        else:
            raise ValueError(f"qa_as_sft writes messages or alpaca records, not {fmt!r}")
        rec.update(id=ex.id, relation=ex.relation)
        out.append(rec)
    return out


def write_split_as_sft(data, out_dir, split: str = "train") -> dict[str, Path]:
    """One split of a QA dataset (a knowledge world's ``data`` folder, say) as ``<split>.chat.jsonl`` and
    ``<split>.alpaca.jsonl`` in ``out_dir``."""
    from knowcat.loaders import load_examples

    exs = [e for e in load_examples(data) if e.split == split]
    if not exs:
        raise DataError(f"no '{split}' examples", file=data)
    out = {}
    for fmt, name in (("messages", "chat"), ("alpaca", "alpaca")):
        out[name] = Path(out_dir) / f"{split}.{name}.jsonl"
        write_sft(out[name], qa_as_sft(exs, fmt))
    return out
