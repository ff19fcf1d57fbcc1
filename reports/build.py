"""Build ``report.html`` from a run directory's files (never runs a model).

Reads what exists, in the run layout every knowcat stage writes:
``categorized.jsonl``, ``categorize/config.json``, ``categorize_summary.json``,
and when present ``config.json`` / ``demo_summary.json`` (a demo run),
``exposure_check.json`` and ``world/exposures.jsonl`` (the demo world's ground
truth), ``analysis.json`` and ``finetune/*/metrics.json`` (the fine-tuning study),
``surrogates/tests.json`` and ``surrogates/*.jsonl`` (the surrogates),
``filter/filter_summary.json`` (an SFT filtering run). A section
appears when its files do.

The page is one self-contained file: figures inline (SVG, or PNG when dense),
styles and script inline, no network. Every string from a dataset or a model is
escaped: the template autoescapes, and the example table's data is embedded as
JSON with ``<``, ``>`` and ``&`` written as unicode escapes and rendered with
``textContent``. The example table holds at most ``max_table_rows`` examples
(a seeded sample, stratified by category, when there are more), paginated and
searchable in the page; the figures are aggregates or, for the per-example point
clouds of a big run, PNGs of fixed size (the rule is in :mod:`reports.figures`), so
the page's size does not grow with the dataset beyond that. The run section lists
every seed found in the run's config files (:data:`SEED_FILES`).
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from knowcat.rundir import RunDir
from reports import figures as F

from linear_models.names import CATEGORIES, PAPER_CATEGORY_SHARES as PAPER_SHARES, PAPER_IDK  # noqa: E402


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("knowcat", "torch", "transformers", "datasets", "statsmodels", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _safe_json(obj) -> str:
    """JSON for a <script type="application/json"> block: nothing in it can close the tag."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sample_rows(rows: list[dict], n: int, seed: int = 0) -> tuple[list[dict], bool]:
    if len(rows) <= n:
        return rows, False
    rng = np.random.default_rng(seed)
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[r.get("category")].append(i)
    keep = []
    for c, idx in by.items():
        k = max(1, round(n * len(idx) / len(rows)))
        keep += rng.choice(idx, min(k, len(idx)), replace=False).tolist()
    return [rows[i] for i in sorted(keep)[:n]], True


# the run's config files, each read for every key named ``seed`` or ``*_seed`` (at any depth)
SEED_FILES = RunDir.CONFIG_FILES


def _seed_keys(obj, path: tuple = ()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict):
                yield from _seed_keys(v, path + (str(k),))
            elif (k == "seed" or str(k).endswith("_seed")) and isinstance(v, int) and not isinstance(v, bool):
                yield ".".join(path + (str(k),)), v


def run_seeds(run: Path) -> list[dict]:
    """Every seed in the run's config files: ``[{"file", "seeds": [(key, value), ...]}]``. Files of one
    pattern (the fine-tuning runs' ``finetune/*/config.json``) that agree are shown once, with their count."""
    out = []
    for pattern, files in RunDir(run).config_files():
        found: dict[tuple, list[str]] = {}
        for f in files:
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            for k, v in _seed_keys(obj):
                found.setdefault((k, v), []).append(f.relative_to(run).as_posix())
        by_file: dict[str, list] = defaultdict(list)
        for (k, v), fs in found.items():
            if len(fs) > 1 and len(fs) == len(files):
                where = f"{pattern} ({len(fs)} files)"
            else:
                where = ", ".join(fs)
            by_file[where].append((k, v))
        out += [{"file": f, "seeds": kv} for f, kv in by_file.items()]
    return out


def _rerun_command(run: Path, demo_cfg: dict | None, cat_cfg: dict | None, command: dict | None = None) -> str:
    """The command that made the run, every recorded setting as a flag (the run's identity in ``cat_cfg``,
    the other options it was given in ``command``), every value shell-quoted."""
    q = shlex.quote
    if demo_cfg:
        cmd = f"knowcat demo --preset {q(str(demo_cfg.get('preset', 'default')))} --out {q(str(run))}"
        seeds = {(demo_cfg.get(part) or {}).get("seed") for part in ("world", "pretrain", "slick")} - {None}
        if len(seeds) == 1:  # --seed sets all three
            cmd += f" --seed {q(str(seeds.pop()))}"
        return cmd
    if cat_cfg:
        parts = ["knowcat", "categorize", "--model", q(str(cat_cfg.get("model"))), q(str(cat_cfg.get("data"))),
                 "--out", q(str(run))]
        for key in ("shard_size", "backend"):
            if cat_cfg.get(key) is not None:
                parts += [f"--{key.replace('_', '-')}", q(str(cat_cfg[key]))]
        for k, v in (cat_cfg.get("protocol") or {}).items():
            flag = f"--{k.replace('_', '-')}"
            if isinstance(v, bool):
                parts.append(flag if v else f"--no-{k.replace('_', '-')}")
            elif v is not None:
                parts += [flag, q(str(v))]
        for k, v in (command or {}).items():
            flag = f"--{k.replace('_', '-')}"
            if isinstance(v, bool):
                parts.append(flag if v else f"--no-{k.replace('_', '-')}")
            elif isinstance(v, list):
                for x in v:
                    parts += [flag, q(str(x))]
            elif v is not None:
                parts += [flag, q(str(v))]
        return " ".join(parts)
    return ""


def knowledge_section(run: Path, rows: list[dict], max_table_rows: int) -> dict:
    by_rel = defaultdict(Counter)
    for r in rows:
        by_rel[r.get("relation", "?")][r.get("category")] += 1
    counts = Counter(r.get("category") for r in rows)
    n = len(rows)
    sec = {
        "n": n,
        "counts": [{"category": c, "n": counts.get(c, 0), "share": counts.get(c, 0) / n if n else 0,
                    "paper": PAPER_SHARES[c]} for c in CATEGORIES],
        "by_relation": [{"relation": rel, **{c: by_rel[rel].get(c, 0) for c in CATEGORIES},
                         "total": sum(by_rel[rel].values())} for rel in sorted(by_rel)],
        "fig_bars": F.category_bars({k: dict(v) for k, v in by_rel.items()}) if rows else "",
        "fig_hist": F.p_correct_histograms([r.get("p_correct_greedy") for r in rows],
                                           [r.get("p_correct_sampled") for r in rows]) if rows else "",
    }
    rd = RunDir(run)
    exposure_check = rd.read_exposure_check()
    expos = {e["id"]: e["count"] for e in rd.world.read_exposures()}
    if exposure_check:
        g = exposure_check["greedy_vs_exposure"]
        sec["ground_truth"] = {k: g[k] for k in g if k != "by_exposure"}
        sec["fig_exposure_acc"] = F.accuracy_by_exposure(g["by_exposure"])
        ce = exposure_check.get("category_exposure", {})
        sec["category_exposure"] = [{"category": c, **ce[c]} for c in CATEGORIES if c in ce]
        sec["ordered"] = ce.get("strictly_ordered")
    if expos:
        split = "train"
        values = {c: [expos[r["id"]] for r in rows if r.get("category") == c and r["id"] in expos
                      and r.get("split", split) == split] for c in CATEGORIES}
        if any(values.values()):
            sec["fig_exposure_box"] = F.exposure_by_category(values)
    sample, sampled = _sample_rows(rows, max_table_rows)
    table = []
    for r in sample:
        answers = r.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        greedy = r.get("greedy_answers") or []
        table.append({"id": str(r.get("id", "")), "relation": str(r.get("relation", "")),
                      "split": str(r.get("split", "")), "question": str(r.get("question", "")),
                      "answers": " | ".join(map(str, answers or [])), "category": str(r.get("category", "")),
                      "p0": r.get("p_correct_greedy"), "p1": r.get("p_correct_sampled"),
                      "model": " | ".join(map(str, greedy[:3]))})
    sec["table_json"] = _safe_json(table)
    sec["table_n"] = len(table)
    sec["table_sampled"] = sampled
    return sec


def finetune_section(run: Path) -> dict | None:
    a = RunDir(run).read_analysis()
    if not a:
        return None
    sec = {"size": a["size"], "variants": a["variants"], "findings": a.get("findings", {})}
    fit = a.get("fitting", {})
    figs = []
    for v in ("unknown_50", "unknown_25", "unknown_75", "natural"):
        if v in fit:
            figs.append(F.fitting_curves({c: fit[v][c]["curve"] for c in (*CATEGORIES, "Known") if c in fit[v]},
                                         f"fitting on {v}"))
            break
    singles = {c: fit[c][c]["curve"] for c in CATEGORIES if c in fit and c in fit[c]}
    if singles:
        figs.append(F.fitting_curves(singles, "each single-category set, its own examples"))
    sec["fig_fitting"] = figs
    subsets = [s for s in ("in_distribution", "ood") if any(s in r for r in a["accuracy_vs_unknown"].get("convergence", []))]
    sec["fig_acc_vs_unknown"] = [F.accuracy_vs_unknown(a["accuracy_vs_unknown"], s) for s in subsets]
    lm = []
    for s, res in a.get("linear_model", {}).items():
        if "params" not in res:
            lm.append({"subset": s, "error": res.get("error")})
            continue
        paper = res.get("paper") or {}
        cl, wb = res.get("cluster") or {}, res.get("wild_bootstrap") or {}
        lm.append({"subset": s, "r2": res["r2"], "nobs": res["nobs"], "paper": paper,
                   "n_clusters": res.get("n_clusters"), "inference": res.get("inference"),
                   "note": res.get("inference_note"), "weights": wb.get("weights"), "n_boot": wb.get("n_boot"),
                   "coefs": [{"name": k, "value": res["params"][k], "se": res["bse"][k], "ci": res["conf_int_95"][k],
                              "p": res["pvalues"][k], "paper": paper.get(k),
                              "se_cluster": cl.get("bse", {}).get(k), "ci_cluster": cl.get("conf_int_95", {}).get(k),
                              "p_cluster": cl.get("pvalues", {}).get(k), "ci_wild": wb.get("conf_int_95", {}).get(k),
                              "p_wild": wb.get("pvalues", {}).get(k)}
                             for k in ("b0", "b_kn", "b_unk")]})
    sec["decided"] = [{"name": n, **f} for n, f in a.get("findings", {}).items()
                      if isinstance(f, dict) and "decision" in f]
    sec["inference"] = a.get("inference", {})
    rep = a.get("replicates")
    if rep:
        sec["replicates"] = {"n": len(rep["replicates"]), "seeds": rep.get("seeds", {}),
                             "coefs": [{"subset": s, "name": k, **c[k]} for s, c in rep["linear_model"].items()
                                       for k in ("b_kn", "b_unk")]}
    sec["linear_model"] = lm
    t2 = []
    for stop, rows in a.get("table2", {}).items():
        for v, r in rows.items():
            t2.append({"stop": stop, "variant": v, "full": r["full"], **{c: r.get(c) for c in CATEGORIES},
                       "paper": r.get("paper")})
    sec["table2"] = t2
    sec["t_tests"] = [{"variant": v, "subset": s, **t} for v, d in a.get("t_tests", {}).items() for s, t in d.items()]
    sec["accuracy"] = [{"variant": v, **{f"{stop}_{k}": d[stop].get(k) for stop in ("early_stop", "convergence")
                                         for k in ("epoch", "in_distribution", "ood", "dev")}}
                       for v, d in a.get("accuracy", {}).items()]
    sec["idk"] = a.get("idk")
    return sec


def surrogate_section(run: Path) -> dict | None:
    sd = RunDir(run).surrogates
    tests = sd.read_tests()
    if not tests:
        return None
    out = []
    for name, t in tests.items():
        d = t["at_default"]
        rows = sd.read_rows(name)
        resid = {c: [r["residual"] for r in rows if r["category"] == c and r.get("residual") is not None
                     and np.isfinite(r["residual"])] for c in CATEGORIES}
        resid = {c: v for c, v in resid.items() if v}
        out.append({
            "name": name, "verdict": d["verdict"], "reasons": d["reasons"], "n": d["n"],
            "chi": d["chi_square"], "kruskal": d["kruskal"], "auroc": d["auroc_unknown_vs_known"],
            "class_counts": d["class_counts"], "seconds": t.get("seconds"),
            "mnlogit": {k: v for k, v in d["multinomial_logit"].items() if k in ("llr_p", "pseudo_r2", "error", "features")},
            "fig_resid": F.residual_boxes(resid, f"{name}: relative residual by category") if resid else "",
            "fig_heat": F.class_heatmap(d["table"], f"{name}: class x category"),
            "fig_sweep": F.tolerance_sweep(t["sweep"], t.get("sweep_over", "tolerance"), f"{name}: tolerance sweep")
            if t.get("sweep") else "",
            "sweep": [{"tol": k, "class_counts": v.get("class_counts"), "verdict": v.get("verdict"),
                       "arms": {a: x.get("verdict") for a, x in (v.get("arms") or {}).items()}}
                      for k, v in sorted(t.get("sweep", {}).items(), key=lambda kv: float(kv[0]))],
            "reachable": (t.get("reachable") or {}).get("examples_that_can_reach"),
            "shapes": (t.get("reachable") or {}).get("shapes"),
            "arms": [_arm_row(a, x) for a, x in (d.get("arms") or {}).items()],
            "incremental": d.get("incremental_validity"),
            "link": _link_rows(t.get("fit_epoch_link")),
            "link_meta": {k: v for k, v in (t.get("fit_epoch_link") or {}).items() if k != "fields"},
        })
    return {"surrogates": out}


def _arm_row(arm: str, x: dict) -> dict:
    """One arm of a surrogate's verdict for the report: what was tested, how, and what came out."""
    return {"arm": arm, "categories": "/".join(x.get("categories", [])), "verdict": x.get("verdict"),
            "n": x.get("n"), "precision": x.get("precision"), "recall": x.get("recall"),
            "base_rate": x.get("base_rate"), "method": x.get("method"), "statistic": x.get("statistic"),
            "p": x.get("p"), "p_holm": x.get("p_holm"), "odds_ratio": x.get("odds_ratio_mh"),
            "fisher_p": x.get("fisher_p"), "min_expected": x.get("min_expected"), "reason": x.get("reason")}


def _link_rows(link: dict | None) -> list[dict]:
    if not link:
        return []
    return [{"field": f, "category": c, **{k: v.get(k) for k in ("n", "rho", "p", "ci", "holds", "decision",
                                                                          "degenerate_share")}}
            for f, per in link.get("fields", {}).items() for c, v in per.items()]


def _defined(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def format_or_na(spec: str, *args) -> str:
    """``spec % args``, or "n/a" when a value is undefined (None or NaN, e.g. a correlation of a constant
    series): the report's number formatting, used by the template as its ``format`` filter."""
    if not all(_defined(a) for a in args):
        return "n/a"
    return spec % args


def format_pct(x, digits: int = 1) -> str:
    """A share as a percentage, or "n/a" when undefined; the template's ``pct`` filter."""
    return format_or_na(f"%.{digits}f%%", 100 * x if _defined(x) else None)


def _iv(iv) -> str:
    return "n/a" if not iv or not all(_defined(x) for x in iv) else f"[{iv[0]:+.1f}, {iv[1]:+.1f}]"


def summary_lines(know: dict, ft: dict | None, sg: dict | None, gt: dict | None) -> list[str]:
    lines = []
    if know["n"]:
        shares = ", ".join(f"{c['category']} {c['share']:.0%}" for c in know["counts"])
        paper = ", ".join(f"{c} {s:.0%}" for c, s in PAPER_SHARES.items())
        lines.append(f"{know['n']} questions categorized: {shares} (the paper's EntityQuestions train set: {paper}).")
    if gt:
        lines.append(f"Ground truth (demo world): greedy accuracy against exposure, Spearman "
                     f"{format_or_na('%.2f', gt.get('spearman'))}; never-seen facts answered correctly "
                     f"{format_pct(gt.get('never_seen_accuracy'))}; mean exposure ordered "
                     f"HighlyKnown > MaybeKnown > WeaklyKnown > Unknown: {'yes' if know.get('ordered') else 'no'}.")
    if ft:
        f = ft["findings"]
        if "unknown_fitted_more_slowly" in f:
            u = f["unknown_fitted_more_slowly"]
            lines.append(f"Fine-tuning: Unknown examples fitted more slowly than Known ones: {u.get('decision', 'unclear')} "
                         f"(gap {format_or_na('%+.2f', u.get('value'))}, 95% {_iv(u.get('interval'))}).")
        if "b_unk_negative" in f:
            b = f["b_unk_negative"]
            paper = b.get("paper") or {}
            lines.append(f"Linear model: each fitted Unknown example (as a share of |D|) changes test accuracy by "
                         f"b_unk = {b['b_unk']:+.1f} points (95% by fine-tuning run {_iv(b.get('interval'))}, "
                         f"{b.get('interval_from', 'plain OLS')}; points treated as independent: "
                         f"{_iv(b.get('interval_plain'))}), each Known one by b_kn = {b['b_kn']:+.1f}"
                         + (f" (paper: {paper['b_unk']:+.1f} and {paper['b_kn']:+.1f})" if paper else "")
                         + f"; b_unk < 0: {b.get('decision', 'unclear')}.")
        c = f.get("accuracy_vs_unknown_convergence")
        if c:
            lines.append(f"At CONVERGENCE, test accuracy changes by {c['slope_per_10pct_unknown']:+.1f} points per 10% more "
                         f"Unknown (95% {_iv(c.get('slope_interval'))})"
                         + (f"; with the Unknown removed (D_Known) by {c['known_slope_per_10pct_unknown']:+.1f} "
                            f"(95% {_iv(c.get('known_slope_interval'))})" if "known_slope_per_10pct_unknown" in c else "")
                         + ".")
    if sg:
        lines.append("Ax=b surrogates: " + "; ".join(f"{s['name']} {s['verdict']}" for s in sg["surrogates"]) + ".")
    return lines


def filter_section(run: Path) -> dict | None:
    """The filtering run's section (``filter/filter_summary.json``, as :mod:`knowcat.sft_run` writes it):
    the category distribution before and after, what was dropped and why, the estimator's agreement
    with SliCK (confusion matrix, macro-F1, AUROC, drop-Unknown shares) and its cost."""
    fs = RunDir(run).filter.read_summary()
    if not fs:
        return None
    est = fs.get("estimate") or {}
    checks = []
    for key, title in (("validation_rest", "labelled examples outside the calibration sample"),
                       ("validation_calibration_oof", "calibration sample, out of fold")):
        v = est.get(key)
        if v:
            checks.append({"title": title, **v,
                           "confusion_rows": list(zip(v["classes"], v["confusion"]))})
    return {**fs, "checks": checks, "cost": est.get("cost") or {}, "n_calibration": est.get("n_calibration"),
            "config": est.get("config") or {}}


def build_report(run_dir, out: str | Path | None = None, max_table_rows: int = 2000) -> Path:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    run, rd = Path(run_dir), RunDir(run_dir)
    rows = rd.read_categorized()
    if not rows and not rd.analysis.exists():
        raise FileNotFoundError(f"{run} holds no categorized.jsonl: nothing to report")
    cat_cfg = rd.read_categorize_config()
    demo_cfg = rd.read_demo_config()
    demo_summary = rd.read_demo_summary()
    cat_summary = rd.read_categorize_summary()
    know = knowledge_section(run, rows, max_table_rows)
    ft = finetune_section(run)
    sg = surrogate_section(run)
    flt = filter_section(run)
    progress = None
    if demo_summary and demo_summary.get("status") == "running":
        done = demo_summary.get("stages_done", [])
        progress = {"done": done, "todo": [s for s in demo_summary.get("stages", []) if s not in done]}
    precision = (demo_cfg or {}).get("precision")
    machine = (demo_cfg or {}).get("machine")
    seconds = (demo_summary or {}).get("seconds") or ({"categorize": cat_summary["seconds"]} if cat_summary else {})
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    env.filters["format"] = format_or_na
    env.filters["pct"] = format_pct
    html = env.get_template("report.html.j2").render(
        title=f"knowcat report: {run.name}", run=str(run), generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        model=(cat_cfg or {}).get("model"), data=(cat_cfg or {}).get("data"),
        protocol=(cat_cfg or {}).get("protocol", {}), seeds=run_seeds(run), versions=_versions(), seconds=seconds,
        rerun=_rerun_command(run, demo_cfg, cat_cfg, rd.read_categorize_command()), know=know, ft=ft, sg=sg, flt=flt,
        summary=summary_lines(know, ft, sg, know.get("ground_truth")), categories=CATEGORIES,
        progress=progress, precision=precision, machine=machine, paper_idk=PAPER_IDK,
    )
    path = Path(out) if out else rd.report
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
