"""Filtering an SFT dataset end to end, as the demo does with its world's train split.

:func:`run_sft_filter` writes a QA split as SFT files (chat ``messages`` and Alpaca), estimates the
categories of the chat file's records (:func:`knowcat.sft.estimate_sft`: SliCK labels for the
calibration sample, the estimator for the rest, the other labelled records validating it),
filters them (drop Unknown by default) and writes ``filter_summary.json``, which the report reads:

    OUT/sft/<split>.chat.jsonl, <split>.alpaca.jsonl     the split as SFT files
    OUT/estimate/                                        estimate_summary.json, estimated_sft.jsonl ...
    OUT/kept.jsonl, kept.rejects.jsonl, kept.stats.json  the filter's output
    OUT/filter_summary.json                              what the report shows

Each step is skipped when its output is already there, so a killed run resumes.
"""

from __future__ import annotations

from knowcat.rundir import FilterDir

N_REJECT_EXAMPLES = 12


def run_sft_filter(out_dir, model, data, labels: dict[str, dict], cfg=None, *, slick_cfg=None, split: str = "train",
                   drop: tuple[str, ...] = ("Unknown",), device: str = "auto", log=print, progress: bool = False) -> dict:
    """Write ``split`` of ``data`` (a QA dataset folder or file) as SFT files, estimate and filter the chat
    file, and return (and write) the summary. ``labels``: SliCK rows by example id (a categorized run's);
    ``slick_cfg``: the protocol that made them (its answers count lazy SliCK's tokens); ``cfg``: an
    :class:`knowcat.estimate.EstimateConfig` (default: a 20% calibration sample)."""
    from knowcat.estimate import EstimateConfig
    from knowcat.filtering import FilterConfig
    from knowcat.sft import estimate_sft, filter_sft_file, write_split_as_sft

    fd = FilterDir(out_dir)
    cfg = cfg or EstimateConfig(calibrate=0.2)
    files = {k: fd.sft_file(split, k) for k in ("chat", "alpaca")}
    if not all(p.exists() for p in files.values()):
        files = write_split_as_sft(data, fd.sft_dir, split)
    est = fd.estimate
    annotated = est.estimated_sft("jsonl")
    if not (annotated.exists() and est.estimate_summary.exists()):
        estimate_sft(model, files["chat"], est.root, cfg, slick_cfg, group_by="relation", labels=labels, device=device,
                     log=log, progress=progress)
    if not fd.kept_stats.exists():
        filter_sft_file(annotated, fd.kept, FilterConfig(drop=tuple(drop)), log=log)
    summary = filter_summary(fd.root, labels, drop)
    fd.write_summary(summary)
    return summary


def filter_summary(out_dir, labels: dict[str, dict] | None, drop) -> dict:
    """What the report shows of a filtering run: the category distribution before and after, what was
    dropped and why (counts, with SliCK's category where known, and a few examples), the estimator's
    agreement with SliCK and its cost."""
    from collections import Counter

    from knowcat.loaders.sft import META_KEY

    fd = FilterDir(out_dir)
    stats = fd.read_stats()
    est = fd.estimate.read_estimate_summary()
    dropped_by = Counter()
    examples = []
    for r in fd.read_rejects():
        rec = r["data"]
        meta = rec.get(META_KEY, {})
        turn = (meta.get("turns") or [{}])[-1]
        rid = str(rec.get("id"))
        slick = labels.get(rid, {}).get("category") if labels else None
        dropped_by[(meta.get("method"), slick)] += 1
        if len(examples) < N_REJECT_EXAMPLES:
            msgs = rec.get("messages") or []
            examples.append({
                "id": rid, "relation": rec.get("relation"),
                "question": next((m["content"] for m in msgs if m.get("role") == "user"), None),
                "answer": next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), None),
                "category": meta.get("category"), "method": meta.get("method"), "slick_category": slick,
                "p_unknown": (turn.get("probs") or {}).get("Unknown"), "reason": r["reason"]})
    return {
        "drop": list(drop), "format": stats["format"], "total": stats["total"], "kept": stats["kept"],
        "rejected": stats["rejected"], "by_category": stats["by_category"], "by_method": stats["by_method"],
        "reasons": stats["reasons"],
        "dropped_by_method_and_slick": [{"method": m, "slick_category": s, "n": n}
                                        for (m, s), n in sorted(dropped_by.items(), key=lambda kv: -kv[1])],
        "rejected_examples": examples,
        "estimate": {k: est.get(k) for k in ("n", "n_calibration", "labels", "layer", "config", "cost",
                                             "validation_calibration_oof", "validation_rest",
                                             "verdicts_calibration_oof", "verdicts_rest")},
    }
