"""The fine-tuning study end to end, in a categorized run directory.

``run_experiment`` chains: the training sets (``RUN/mixtures``), one fine-tuning
run per set (``RUN/finetune/<set>``, each resumable) and the analysis
(``RUN/analysis.json``). Every stage reads the files of the previous one, so
each can be rerun alone; ``analyze`` needs only the fine-tuning runs' files.

The analysis answers the paper's questions on the run's own model and data:
are Unknown examples fitted more slowly than Known ones; the linear model
Accuracy = b0 + b_kn*N_kn/|D| + b_unk*N_unk/|D| over every (variant, epoch)
point of the chosen variants (``linear_model_variants``: by default the paper's,
the X% Unknown sets and the D_Known sets; ``"all"``: every analyzed set; or a
comma-separated list; ``analysis.json`` records the variants and the points);
test accuracy against %Unknown at EARLY_STOP and CONVERGENCE, with
D_Known beside it; the Table-2 analogue; EARLY_STOP against CONVERGENCE by
paired t-tests over 100 random splits of the test set; and D_IDK's accuracy on
the questions it answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from knowcat.finetune import FinetuneConfig, eval_items, finetune, format_epochs, read_epochs
from knowcat.io import atomic_write_json
from knowcat.mixtures import KNOWN, MixtureConfig, build_mixtures, read_training_set, write_mixtures
from knowcat.slick import CATEGORIES


@dataclass
class ExperimentConfig:
    mixtures: MixtureConfig = field(default_factory=MixtureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    variants: tuple[str, ...] | None = None  # None: every set the mixtures stage wrote
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    t_test_parts: int = 100
    # the (variant, epoch) points of the linear model: "paper" (the X% Unknown and D_Known sets, as
    # Gekhman et al. 2024 fit it), "all" (every analyzed set) or a comma-separated list of sets
    linear_model_variants: str = "paper"


LINEAR_MODEL_RULES = {
    "paper": "the X% Unknown sets (unknown_XX) and the D_Known sets (known_XX), as in the paper",
    "all": "every analyzed training set",
}


def _pct(v: str) -> int:
    return int(v.split("_")[1])


def linear_model_variants(available, rule: str = "paper") -> tuple[list[str], str]:
    """The training sets whose (variant, epoch) points the linear model is fitted on, out of
    ``available`` (the sets with finished runs), and a description of the rule."""
    available = list(available)
    mix = sorted((v for v in available if v.startswith("unknown_")), key=_pct)
    known = sorted((v for v in available if v.startswith("known_")), key=_pct)
    if rule == "paper":
        return mix + known, LINEAR_MODEL_RULES["paper"]
    if rule == "all":
        rest = sorted(v for v in available if v not in mix and v not in known)
        return mix + known + rest, LINEAR_MODEL_RULES["all"]
    chosen = [v.strip() for v in rule.split(",") if v.strip()]
    missing = [v for v in chosen if v not in available]
    if not chosen or missing:
        raise ValueError(f"linear_model_variants {rule!r}: give 'paper', 'all' or sets among the finished runs "
                         f"{sorted(available)}" + (f" ({', '.join(missing)} not among them)" if missing else ""))
    return chosen, "the given sets"


OOD_RULE = "test relations absent from the categorized train split"
DEV_RULE = "dev questions of the train split's relations only (out-of-distribution relations excluded)"


def early_stop_dev(dev: list[dict], train_relations, ood_relations=()) -> list[dict]:
    """The dev questions EARLY_STOP is chosen on, for ``knowcat experiment`` and ``knowcat finetune``
    alike: those of the relations trained on (``train_relations``; empty: not known, every relation)
    that are not out-of-distribution. Dev records without relations are kept as they are."""
    if not any(d.get("relation") for d in dev):
        return list(dev)
    train, ood = set(train_relations or ()), set(ood_relations)
    return [d for d in dev if (not train or d.get("relation") in train) and d.get("relation") not in ood]


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_dev(run_dir, dev_split: str = "dev", source: str | None = None) -> list[dict]:
    """The dev questions: from ``source`` or the data the run was categorized from."""
    from knowcat.loaders import load_examples

    if source is None:
        cfg_path = Path(run_dir) / "categorize" / "config.json"
        meta = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        source = meta.get("data")
    if not source:
        raise ValueError("no dev data: give the dev questions (--dev DATA); the run does not record its data")
    return [{"id": e.id, "question": e.question, "answers": list(e.answers), "relation": e.relation}
            for e in load_examples(source) if e.split == dev_split]


def run_experiment(run_dir, model: str, cfg: ExperimentConfig = ExperimentConfig(), dev=None,
                   device: str = "auto", log=print, progress: bool = True) -> dict:
    run = Path(run_dir)
    categorized = _read_jsonl(run / "categorized.jsonl")
    t0 = time.time()
    mix_dir = run / "mixtures"
    sets = build_mixtures(categorized, cfg.mixtures, source=str(run / "categorized.jsonl"))
    if (mix_dir / "manifest.json").exists():
        old = json.loads((mix_dir / "manifest.json").read_text())
        if old["sets"] != json.loads(json.dumps(sets["_manifest"]["sets"])):
            raise ValueError(f"{mix_dir} holds other mixtures; remove it or use another run directory")
    write_mixtures(sets, mix_dir)
    from knowcat.mixtures import format_manifest

    log(format_manifest(sets["_manifest"]))
    train_rels = {r["relation"] for r in categorized if r.get("split") == cfg.train_split}
    test = eval_items(categorized, cfg.test_split)
    if not test:
        raise ValueError(f"no categorized '{cfg.test_split}' examples in {run}: categorize the test split too "
                         f"(knowcat categorize ... --splits {cfg.train_split},{cfg.test_split})")
    dev = dev if dev is not None else load_dev(run, cfg.dev_split)
    ood = sorted({t["relation"] for t in test} - train_rels)
    dev = early_stop_dev(dev, train_rels, ood)
    names = [n for n in sets if not n.startswith("_")]
    variants = list(cfg.variants) if cfg.variants else names
    for v in variants:
        if v not in names:
            raise ValueError(f"unknown variant {v!r}; the mixtures are {names}")
    trained: dict[str, str] = {}  # sha256 of a training file -> the variant first trained on it
    for i, v in enumerate(variants):
        if sets["_manifest"]["sets"][v]["n"] == 0:
            log(f"[{i + 1}/{len(variants)}] {v} is empty: skipped")
            continue
        digest = hashlib.sha256((mix_dir / f"{v}.jsonl").read_bytes()).hexdigest()
        twin = trained.setdefault(digest, v)
        if twin != v and _complete(run / "finetune" / twin):
            # e.g. D_Unknown and the 100% Unknown set under the paper's |D| rule: the same examples in the same
            # order, and fine-tuning is deterministic, so the run is copied rather than repeated
            log(f"[{i + 1}/{len(variants)}] {v} is the same training set as {twin} (identical file): "
                f"its fine-tuning run is reused")
            reuse_finetune_run(run / "finetune" / twin, run / "finetune" / v, twin)
            continue
        rows = read_training_set(mix_dir / f"{v}.jsonl")
        log(f"[{i + 1}/{len(variants)}] fine-tuning on {v} ({len(rows)} examples)")
        m = finetune(model, rows, {"dev": dev, "test": test}, run / "finetune" / v, cfg.finetune,
                     template=cfg.mixtures.prompt_template, ood_relations=ood, device=device, log=log,
                     progress=progress, ood_rule=OOD_RULE)
        log(format_epochs(m))
    analysis = analyze(run, cfg, variants)
    analysis["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(run / "analysis.json", analysis)
    log(format_findings(analysis))
    return analysis


def _complete(d: Path) -> bool:
    return (d / "metrics.json").exists() and bool(json.loads((d / "metrics.json").read_text()).get("complete"))


def reuse_finetune_run(src: Path, dst: Path, name: str) -> None:
    """Copy the finished fine-tuning run ``src`` (measurements, answers and any saved model; not checkpoints) to ``dst``,
    whose training set is the same file; its config.json records ``same_training_set_as``. Atomic:
    ``dst`` appears whole or not at all."""
    m = json.loads((src / "metrics.json").read_text())
    if (dst / "metrics.json").exists() and json.loads((dst / "metrics.json").read_text()) == m:
        return
    tmp = dst.with_name(f".{dst.name}.reuse")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((tmp / "config.json").read_text())
    atomic_write_json(tmp / "config.json", {**cfg, "same_training_set_as": name})
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# analysis


def _acc(m: dict, subset: str) -> float | None:
    t = m.get("test", {})
    blk = t.get(subset) or (t.get("all") if subset == "in_distribution" else None)
    return None if blk is None or blk.get("accuracy") is None else 100 * blk["accuracy"]


def _test_correct(run: Path, variant: str, epoch: int, ids: list[str]) -> np.ndarray:
    rows = _read_jsonl(run / "finetune" / variant / "epochs" / f"epoch_{epoch:03d}.answers.jsonl")
    ok = {r["id"]: r["correct"] for r in rows if r["set"] == "test"}
    return np.array([ok[i] for i in ids], dtype=float)


def analyze(run_dir, cfg: ExperimentConfig = ExperimentConfig(), variants=None) -> dict:
    """The study's statistics from the run's files, over ``variants`` (default ``cfg.variants``,
    or every set of the mixtures manifest); a requested set without a finished run is listed
    in ``variants_without_runs``."""
    from linear_models.study import (PAPER_LINEAR_MODEL, PAPER_TABLE2, fit_linear_model, fitting_speed,
                                     paired_split_ttest)
    from scipy import stats

    run = Path(run_dir)
    manifest = json.loads((run / "mixtures" / "manifest.json").read_text())
    size = manifest["size"]
    requested = list(variants or cfg.variants or manifest["sets"])
    unknown = [v for v in requested if v not in manifest["sets"]]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; the mixtures are {list(manifest['sets'])}")
    runs = {}
    for v in requested:
        p = run / "finetune" / v / "metrics.json"
        if p.exists():
            runs[v] = json.loads(p.read_text())
    if not runs:
        raise ValueError(f"no finished fine-tuning runs under {run / 'finetune'} for {requested}")
    categorized = _read_jsonl(run / "categorized.jsonl")
    train_rels = {r["relation"] for r in categorized if r.get("split") == cfg.train_split}
    test = eval_items(categorized, cfg.test_split)
    subsets = {"in_distribution": [t["id"] for t in test if t["relation"] in train_rels],
               "ood": [t["id"] for t in test if t["relation"] not in train_rels]}
    subsets = {k: v for k, v in subsets.items() if v}
    mix = sorted((v for v in runs if v.startswith("unknown_")), key=_pct)
    stop_of = {v: {"early_stop": m.get("early_stop"), "convergence": m["convergence"]} for v, m in runs.items()}
    no_early = {v: runs[v].get("early_stop_note") or "EARLY_STOP undefined (no dev measurements)"
                for v in runs if stop_of[v]["early_stop"] is None}
    out: dict = {"size": size, "variants": sorted(runs),
                 "variants_without_runs": [v for v in requested if v not in runs], "stops": stop_of}
    if no_early:
        out["early_stop_undefined"] = no_early

    # accuracy at both stops, per variant (None where the stop is undefined)
    acc = {}
    for v, m in runs.items():
        by_epoch = {e["epoch"]: e for e in m["epochs"]}
        acc[v] = {}
        for stop in ("early_stop", "convergence"):
            if stop_of[v][stop] is None:
                acc[v][stop] = {"epoch": None, **{s: None for s in subsets}, "dev": None, "train_fitted": None,
                                "note": no_early[v]}
                continue
            e = by_epoch[stop_of[v][stop]]
            dev_acc = (e.get("dev") or {}).get("all", {}).get("accuracy")
            acc[v][stop] = {"epoch": stop_of[v][stop], **{s: _acc(e, s) for s in subsets},
                            "dev": None if dev_acc is None else 100 * dev_acc,
                            "train_fitted": e["train"]["fitted"]}
    out["accuracy"] = acc

    # the linear model over every (variant, epoch) point of the chosen sets (default: the paper's,
    # the X% Unknown and D_Known sets)
    lm_variants, lm_rule = linear_model_variants(runs, cfg.linear_model_variants)
    lm = {}
    for s in subsets:
        y, nk, nu, used = [], [], [], []
        for v in lm_variants:
            for e in runs[v]["epochs"]:
                a = _acc(e, s)
                if a is None:
                    continue
                n_by = e["train"]["n_by_category"]
                f_by = e["train"]["fitted_by_category"]
                y.append(a)
                nk.append(sum(f_by.get(c, 0) * n_by.get(c, 0) for c in KNOWN))
                nu.append(f_by.get("Unknown", 0) * n_by.get("Unknown", 0))
                used.append([v, e["epoch"]])
        where = {"rule": cfg.linear_model_variants, "rule_description": lm_rule, "variants": lm_variants,
                 "points": used}
        try:
            lm[s] = {**fit_linear_model(y, nk, nu, size), "paper": PAPER_LINEAR_MODEL[s], **where}
        except ValueError as err:
            lm[s] = {"error": str(err), **where}
    out["linear_model"] = lm
    out["linear_model_variants"] = {"rule": cfg.linear_model_variants, "rule_description": lm_rule,
                                    "variants": lm_variants}

    # accuracy against %Unknown, at both stops, D_Known beside
    vs = {}
    for stop in ("early_stop", "convergence"):
        rows = []
        for v in mix:
            x = int(v.split("_")[1])
            k = f"known_{x:02d}"
            rows.append({"unknown_percent": x, **{s: acc[v][stop][s] for s in subsets},
                         **({f"known_{s}": acc[k][stop][s] for s in subsets} if k in acc else {})})
        vs[stop] = rows
    out["accuracy_vs_unknown"] = vs

    # Table 2: single-category sets and D_Natural, in-distribution test by category
    t2 = {}
    for stop in ("early_stop", "convergence"):
        t2[stop] = {}
        for v in [*CATEGORIES, "natural"]:
            if v not in runs or stop_of[v][stop] is None:
                continue
            e = {x["epoch"]: x for x in runs[v]["epochs"]}[stop_of[v][stop]]
            blk = e["test"].get("in_distribution") or e["test"]["all"]
            t2[stop][v] = {"full": 100 * blk["accuracy"],
                           **{c: 100 * blk["by_category"][c]["accuracy"] if c in blk["by_category"] else None
                              for c in CATEGORIES},
                           "paper": PAPER_TABLE2[stop].get(v)}
    out["table2"] = t2
    skipped = [v for v in [*CATEGORIES, "natural"] if v in runs and v in no_early]
    if skipped:
        out["table2_notes"] = {v: f"no EARLY_STOP row: {no_early[v]}" for v in skipped}

    # EARLY_STOP vs CONVERGENCE: paired t-tests over random splits of the test set
    tt = {}
    for v, m in runs.items():
        tt[v] = {}
        if v in no_early:
            out.setdefault("t_tests_skipped", {})[v] = no_early[v]
            continue
        for s, ids in subsets.items():
            a = _test_correct(run, v, m["early_stop"], ids)
            b = _test_correct(run, v, m["convergence"], ids)
            tt[v][s] = paired_split_ttest(a, b, cfg.t_test_parts, seed=cfg.mixtures.seed)
    out["t_tests"] = tt

    # fitting speed per category
    fit = {}
    for v, m in runs.items():
        curves = {}
        for c in CATEGORIES:
            cur = {e["epoch"]: e["train"]["fitted_by_category"][c] for e in m["epochs"]
                   if c in e["train"]["fitted_by_category"]}
            if cur:
                curves[c] = {"curve": cur, **fitting_speed(cur)}
        kn = {}
        for e in m["epochs"]:
            n_by, f_by = e["train"]["n_by_category"], e["train"]["fitted_by_category"]
            n = sum(n_by.get(c, 0) for c in KNOWN)
            if n:
                kn[e["epoch"]] = sum(f_by.get(c, 0) * n_by.get(c, 0) for c in KNOWN) / n
        if kn:
            curves["Known"] = {"curve": kn, **fitting_speed(kn)}
        fit[v] = curves
    out["fitting"] = fit

    # D_IDK
    if "idk" in runs:
        m = runs["idk"]
        by = {e["epoch"]: e for e in m["epochs"]}
        idk = {}
        for stop in ("early_stop", "convergence"):
            if stop_of["idk"][stop] is None:
                idk[stop] = None
                continue
            e = by[m[stop]]
            blk = e["test"].get("in_distribution") or e["test"]["all"]
            idk[stop] = {"epoch": m[stop], "accuracy_answered": 100 * (blk["accuracy_answered"] or 0),
                         "answered_share": 100 * blk["answered"] / blk["n"], "accuracy": 100 * blk["accuracy"],
                         "hallucination_rate": 100 * (blk["hallucination_rate"] or 0)}
        base = f"unknown_{cfg.mixtures.idk_from:02d}"
        if base in acc:
            idk["plain_counterpart"] = {"variant": base, **{st: acc[base][st].get("in_distribution")
                                                             for st in ("early_stop", "convergence")}}
        out["idk"] = idk

    # findings, as measured
    f = {}
    paired = [v for v in runs if "Unknown" in fit[v] and "Known" in fit[v]]
    if paired:
        gaps = [fit[v]["Known"]["mean_fitted"] - fit[v]["Unknown"]["mean_fitted"] for v in paired]
        f["unknown_fitted_more_slowly"] = {
            "holds": bool(np.mean(gaps) > 0), "variants": paired,
            "mean_fitted_known_minus_unknown": float(np.mean(gaps)),
            "epoch_to_50": {v: {"Known": fit[v]["Known"]["epoch_to_50"], "Unknown": fit[v]["Unknown"]["epoch_to_50"]}
                            for v in paired}}
    s0 = "in_distribution" if "in_distribution" in subsets else next(iter(subsets))
    if s0 in lm and "params" in lm[s0]:
        f["b_unk_negative"] = {"holds": lm[s0]["params"]["b_unk"] < 0, "b_unk": lm[s0]["params"]["b_unk"],
                               "p": lm[s0]["pvalues"]["b_unk"], "b_kn": lm[s0]["params"]["b_kn"],
                               "r2": lm[s0]["r2"]}
    for stop in ("convergence", "early_stop"):
        rows = [r for r in vs[stop] if r.get(s0) is not None]
        if len(rows) >= 3:
            x = [r["unknown_percent"] for r in rows]
            y = [r[s0] for r in rows]
            slope = float(np.polyfit(x, y, 1)[0])
            # a constant series has no rank correlation: recorded as None, not NaN
            rho = None if len(set(x)) < 2 or len(set(y)) < 2 else float(stats.spearmanr(x, y).statistic)
            entry = {"slope_per_10pct_unknown": 10 * slope, "spearman": rho,
                     "accuracy": {str(a): b for a, b in zip(x, y)}}
            kx = [r["unknown_percent"] for r in rows if r.get(f"known_{s0}") is not None]
            if len(kx) >= 2:
                ky = [r[f"known_{s0}"] for r in rows if r.get(f"known_{s0}") is not None]
                entry["known_slope_per_10pct_unknown"] = 10 * float(np.polyfit(kx, ky, 1)[0])
                entry["known_accuracy"] = {str(a): b for a, b in zip(kx, ky)}
            f[f"accuracy_vs_unknown_{stop}"] = entry
    if "accuracy_vs_unknown_convergence" in f:
        e = f["accuracy_vs_unknown_convergence"]
        f["convergence_accuracy_falls_with_unknown"] = {"holds": e["slope_per_10pct_unknown"] < 0 and (e["spearman"] or 0) < 0,
                                                        "slope_per_10pct_unknown": e["slope_per_10pct_unknown"]}
        if "known_slope_per_10pct_unknown" in e:
            f["known_does_not_fall"] = {
                "holds": e["known_slope_per_10pct_unknown"] > e["slope_per_10pct_unknown"]
                and e["known_slope_per_10pct_unknown"] > -1.0,
                "known_slope_per_10pct_unknown": e["known_slope_per_10pct_unknown"]}
    if "idk" in out:
        f["idk"] = {st: out["idk"][st] for st in ("early_stop", "convergence")}
        if "plain_counterpart" in out["idk"]:
            f["idk"]["plain_counterpart"] = out["idk"]["plain_counterpart"]
    out["findings"] = f
    out["config"] = json.loads(json.dumps(asdict(cfg)))
    return out


def format_findings(a: dict) -> str:
    f = a["findings"]
    lines = [f"fine-tuning study (|D| = {a['size']}, {len(a['variants'])} variants):"]
    for v, note in a.get("early_stop_undefined", {}).items():
        lines.append(f"  {v}: EARLY_STOP undefined ({note})")
    if "unknown_fitted_more_slowly" in f:
        u = f["unknown_fitted_more_slowly"]
        lines.append(f"  Unknown fitted more slowly than Known: {'yes' if u['holds'] else 'no'} "
                     f"(mean fitted share Known - Unknown over epochs: {u['mean_fitted_known_minus_unknown']:+.2f})")
    if "b_unk_negative" in f:
        b = f["b_unk_negative"]
        lines.append(f"  linear model: b_kn {b['b_kn']:+.1f}, b_unk {b['b_unk']:+.1f} (p {b['p']:.2g}), "
                     f"R^2 {b['r2']:.2f}; b_unk < 0: {'yes' if b['holds'] else 'no'} "
                     f"(paper: +7.3, -8.3, R^2 0.86); points: "
                     f"{a.get('linear_model_variants', {}).get('rule_description', '?')}")
    for stop in ("early_stop", "convergence"):
        e = f.get(f"accuracy_vs_unknown_{stop}")
        if e:
            acc = ", ".join(f"{x}%: {y:.1f}" for x, y in sorted(e["accuracy"].items(), key=lambda kv: int(kv[0])))
            line = f"  {stop.upper()} test accuracy by %Unknown: {acc} (slope {e['slope_per_10pct_unknown']:+.2f} per 10%)"
            if "known_accuracy" in e:
                line += "; D_Known: " + ", ".join(f"{x}%: {y:.1f}" for x, y in
                                                  sorted(e["known_accuracy"].items(), key=lambda kv: int(kv[0])))
            lines.append(line)
    if "idk" in f:
        i = f["idk"]
        for stop in ("early_stop", "convergence"):
            if i[stop] is None:
                lines.append(f"  D_IDK at {stop.upper()}: undefined (no dev set)")
                continue
            lines.append(f"  D_IDK at {stop.upper()}: accuracy on answered {i[stop]['accuracy_answered']:.1f}%, "
                         f"answers {i[stop]['answered_share']:.1f}% of questions"
                         + (f" (plain set: {i['plain_counterpart'][stop]:.1f}%)"
                            if (i.get("plain_counterpart") or {}).get(stop) is not None else ""))
    return "\n".join(lines)
