"""Report size: the HTML report of a synthetic run of N examples that has every section's files.

    python bench/report_size.py                 # N = 100,000 and a small run of 1,000
    python bench/report_size.py --n 20000 --small 500 --keep /tmp/runs

Builds, with numpy and no model, a run directory laid out as a demo run is, in
the formats knowcat's own writers use (most files are written by them):

- ``categorized.jsonl`` / ``.parquet`` (``knowcat.filtering.write_records``), ``categorize/config.json``
  (``knowcat.runs.run_identity``), ``categorize_summary.json`` (``knowcat.runs.summarize``): train and
  test questions of 12 in-distribution relations and test questions of 7 OOD ones, categories in the
  paper's shares, counts, P_Correct, Wilson intervals, the greedy answers and, as lazy SliCK keeps
  them, the samples of the questions with no correct greedy answer;
- the world's ground truth: ``world/world.json``, ``world/exposures.jsonl``, ``exposure_check.json``
  (``knowcat.world.validate.exposure_check``, ``knowcat.demo.category_exposure``),
  ``model/knowcat_pretrain.json``, ``config.json`` and ``demo_summary.json``;
- the fine-tuning study: ``mixtures/`` (``knowcat.mixtures.build_mixtures``/``write_mixtures``),
  ``finetune/<set>/config.json``, ``metrics.json`` and ``epochs/epoch_NNN.json`` for every epoch, the
  per-example answers of the EARLY_STOP and CONVERGENCE epochs (the ones the analysis reads), and
  ``analysis.json`` computed from them by ``knowcat.experiment.analyze``;
- the surrogates: ``surrogates/config.json``, ``<name>.jsonl`` / ``.parquet`` for the three surrogates
  (relation_map and relation_jacobian over every train question, answer_jacobian over 75 per category,
  as the defaults do) and ``tests.json`` computed from them by knowcat's hypothesis tests.

Then builds ``report.html`` and prints JSON and a one-line summary: the report's size in MB and its
build time, for N and for the small run. The synthetic seeds are distinct per stage (world 11,
pretrain 12, SliCK 13, mixtures 14, fine-tuning 15, surrogates 16) so the report's seed list can be
checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_models.names import CATEGORIES, PAPER_CATEGORY_SHARES  # noqa: E402

SHARES = tuple(PAPER_CATEGORY_SHARES[c] for c in CATEGORIES)  # the paper's categorized train set
ID_RELATIONS = ("P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69", "P740", "P800")
OOD_RELATIONS = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")
SEEDS = {"world": 11, "pretrain": 12, "slick": 13, "mixtures": 14, "finetune": 15, "surrogate": 16}
SYLLABLES = np.array(["ka", "lo", "mi", "ren", "sa", "tor", "vi", "zu", "an", "bel", "dor", "ei", "fa", "gun",
                      "ho", "ist", "jo", "kel", "mar", "nol", "os", "pra", "qui", "ros", "sul", "tan", "ul", "ver"])
TEMPLATES = {"P19": "Where was {} born?", "P17": "Which country is {} located in?", "P36": "What is the capital of {}?",
             "P26": "Who is {} married to?", "P69": "Where was {} educated?",
             "P136": "What type of music does {} play?",
             "P264": "What music label is {} represented by?", "P50": "Who is the author of {}?"}


def _names(rng, n: int, parts: int = 3) -> list[str]:
    idx = rng.integers(0, len(SYLLABLES), (n, parts))
    return [" ".join(w.capitalize() for w in ("".join(SYLLABLES[r[:2]]), "".join(SYLLABLES[r[2:]]))) for r in idx]


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval, vectorized (what statsmodels' proportion_confint(method='wilson') gives)."""
    n = np.maximum(n, 1)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


# ---------------------------------------------------------------------------------------------
# categorization and the world


def _categorized(run: Path, n: int, rng, keep_answers: bool) -> tuple[list[dict], list]:
    from knowcat.examples import QAExample
    from knowcat.rundir import RunDir
    from knowcat.runs import run_identity, summarize
    from knowcat.slick import SliCKConfig

    cfg = SliCKConfig(keep_answers=keep_answers, seed=SEEDS["slick"])
    n_test = max(len(ID_RELATIONS) + len(OOD_RELATIONS), n // 4)
    n_train = n - n_test
    n_ood = int(n_test * 0.35)
    rel = np.concatenate([rng.choice(ID_RELATIONS, n_train), rng.choice(ID_RELATIONS, n_test - n_ood),
                          rng.choice(OOD_RELATIONS, n_ood)])
    split = np.array(["train"] * n_train + ["test"] * n_test)
    cat = rng.choice(4, n, p=SHARES)
    P, S = cfg.n_prompts, cfg.n_samples
    g_ok = np.where(cat == 0, P, np.where(cat == 1, rng.integers(1, P, n), 0))
    # lazy SliCK: samples only while no answer is correct; WeaklyKnown stops at its first correct sample
    first_hit = rng.integers(1, P * S + 1, n)
    n_sampled = np.where(cat == 3, P * S, np.where(cat == 2, first_hit, 0))
    s_ok = (cat == 2).astype(int)
    glo, ghi = _wilson(g_ok, np.full(n, P))
    slo, shi = _wilson(s_ok, n_sampled)
    subjects = _names(rng, n)
    city = _names(rng, 997)
    ans = rng.integers(0, len(city), n)
    wrong = rng.integers(0, len(city), (n, P))
    rows, examples = [], []
    for i in range(n):
        r = str(rel[i])
        q = TEMPLATES.get(r, "What is the " + r + " of {}?").format(subjects[i])
        ex = QAExample(id=f"{r}-{split[i]}-{i:06d}", question=q, answers=(city[ans[i]],), relation=r,
                       subject=subjects[i], split=str(split[i]))
        examples.append(ex)
        c = int(cat[i])
        greedy = [city[ans[i]] if j < g_ok[i] else city[wrong[i, j]] for j in range(P)]
        rec = {"id": ex.id, "relation": r, "question": q, "answers": [city[ans[i]]], "subject": subjects[i],
               "split": ex.split, "category": CATEGORIES[c], "n_greedy": P, "n_greedy_correct": int(g_ok[i]),
               "p_correct_greedy": float(g_ok[i] / P), "ci_greedy": [round(float(glo[i]), 6), round(float(ghi[i]), 6)],
               "n_sampled": int(n_sampled[i]), "n_sampled_correct": int(s_ok[i]),
               "p_correct_sampled": 0.0 if c == 3 else None,
               "ci_sampled": [round(float(slo[i]), 6), round(float(shi[i]), 6)] if c == 3 else None,
               "match_mode": cfg.match, "mode": "lazy"}
        if keep_answers:
            samples = []
            left = int(n_sampled[i])
            for j in range(P):
                k = min(S, left)
                left -= k
                s = [city[(ans[i] + 1 + j * S + t) % len(city)] for t in range(k)]
                if c == 2 and k and left == 0:  # WeaklyKnown: its last sample is the first correct one
                    s[-1] = city[ans[i]]
                samples.append(s)
            rec["greedy_answers"], rec["sampled_answers"] = greedy, samples
        rows.append(rec)
    rd = RunDir(run)
    rd.write_categorized(rows)
    rd.write_categorize_config(run_identity("synthetic/model", examples, [], cfg, 256, None, "transformers"))
    res = {r["id"]: r for r in rows}
    summary = summarize(examples, res)
    summary["seconds"] = round(n * 0.05, 1)
    rd.write_categorize_summary(summary)
    return rows, examples


def _world(run: Path, rows: list[dict], rng) -> None:
    from knowcat.demo import category_exposure, demo_config
    from knowcat.io import atomic_write_json
    from knowcat.rundir import RunDir, write_jsonl
    from knowcat.world.validate import exposure_check

    rd = RunDir(run)

    cfg = demo_config("default")
    cfg = replace(cfg, world=replace(cfg.world, seed=SEEDS["world"]),
                  pretrain=replace(cfg.pretrain, seed=SEEDS["pretrain"]),
                  slick=replace(cfg.slick, seed=SEEDS["slick"]),
                  experiment=replace(cfg.experiment, mixtures=replace(cfg.experiment.mixtures, seed=SEEDS["mixtures"]),
                                     finetune=replace(cfg.experiment.finetune, seed=SEEDS["finetune"])),
                  surrogate=replace(cfg.surrogate, seed=SEEDS["surrogate"]))
    rd.write_demo_config({"stage": "demo", "preset": "synthetic", **asdict(cfg)})
    median = {"HighlyKnown": 60.0, "MaybeKnown": 25.0, "WeaklyKnown": 6.0, "Unknown": 1.5}
    exposures = []
    for r in rows:
        c = r["category"]
        never = rng.random() < {"HighlyKnown": 0.01, "MaybeKnown": 0.05, "WeaklyKnown": 0.3, "Unknown": 0.55}[c]
        count = 0 if never else int(min(400, rng.lognormal(np.log(median[c]), 1.0)))
        conflicting = int(rng.random() < 0.3) * int(rng.integers(0, max(1, count // 2) + 1))
        exposures.append({"id": r["id"], "relation": r["relation"], "subject": r["subject"], "answer": r["answers"][0],
                          "split": r["split"], "question": r["question"], "count": count, "statement": count // 2,
                          "qa": count - count // 2, "conflicting": conflicting,
                          "distractor": None if not conflicting else "Distractor City"})
    write_jsonl(rd.world.exposures, exposures)
    counts = np.array([e["count"] for e in exposures])
    atomic_write_json(rd.world.summary, {
        "config": asdict(cfg.world), "facts": len(exposures), "relations": sorted({r["relation"] for r in rows}),
        "documents": len(exposures) // 4, "mentions": int(counts.sum()), "conflicted_facts": int(sum(
            e["conflicting"] > 0 for e in exposures)), "never_seen_share": float((counts == 0).mean()),
        "count_quantiles": {str(q): float(np.quantile(counts, q)) for q in (0.25, 0.5, 0.75, 0.9, 0.99)}})
    atomic_write_json(rd.pretrain_record, {
        "config": asdict(cfg.pretrain), "bf16": False, "world": str(rd.world.root), "tokens": int(counts.sum()) * 12,
        "steps": 1000, "final_loss": 1.1, "seconds_this_session": 600.0,
        "history": [{"step": s, "loss": float(6 * np.exp(-s / 200) + 1.0)} for s in range(0, 1001, 50)]})
    check_split = "train"
    check = exposure_check({r["id"]: r["p_correct_greedy"] for r in rows if r["split"] == check_split}, exposures)
    ce = category_exposure(rows, exposures, check_split)
    rd.write_exposure_check({"greedy_vs_exposure": check, "category_exposure": ce})
    return cfg


# ---------------------------------------------------------------------------------------------
# the fine-tuning study


def _block(correct: np.ndarray, abstained: np.ndarray, cats: np.ndarray) -> dict:
    """knowcat.finetune.score_answers' block, vectorized."""
    n = len(correct)
    k = int(correct.sum())
    ab = int(abstained.sum())
    answered = n - ab
    by = {c: {"n": int((cats == c).sum()), "accuracy": float(correct[cats == c].mean())}
          for c in CATEGORIES if (cats == c).any()}
    return {"n": n, "accuracy": k / n if n else None, "abstention_rate": ab / n if n else None, "answered": answered,
            "accuracy_answered": k / answered if answered else None,
            "hallucination_rate": (answered - k) / answered if answered else None, "by_category": by}


def _study(run: Path, rows: list[dict], cfg, rng) -> None:
    from knowcat.experiment import analyze
    from knowcat.finetune import choose_stops, eval_items
    from knowcat.io import atomic_write_json
    from knowcat.mixtures import build_mixtures, write_mixtures
    from knowcat.rundir import RunDir, write_jsonl

    rd = RunDir(run)
    exp = cfg.experiment
    ft = exp.finetune
    sets = build_mixtures(rows, exp.mixtures, source=str(rd.categorized_jsonl))
    write_mixtures(sets, rd.mixtures.root)
    test = eval_items(rows, exp.test_split)
    tid = np.array([t["id"] for t in test])
    tcat = np.array([t["category"] for t in test])
    trel = np.array([t["relation"] for t in test])
    ood = np.isin(trel, OOD_RELATIONS)
    base = {"HighlyKnown": 0.95, "MaybeKnown": 0.6, "WeaklyKnown": 0.12, "Unknown": 0.01}
    p_base = np.array([base[c] for c in tcat])
    n_dev = 200
    epochs = range(1, ft.epochs + 1)
    for v in (k for k in sets if not k.startswith("_")):
        train = sets[v]
        if not train:
            continue
        out = rd.finetune(v)
        out.epochs_dir.mkdir(parents=True, exist_ok=True)
        out.write_config({"model": "synthetic/model", "config": asdict(ft),
                                                "template": exp.mixtures.prompt_template, "n_train": len(train),
                                                "eval_sets": {"dev": n_dev, "test": len(test)}})
        n_by = Counter(t["category"] for t in train)
        u = n_by.get("Unknown", 0) / len(train)
        idk = v == "idk"
        metrics, draws = [], {}
        for e in epochs:
            f_by = {c: float(1 - np.exp(-e / (7.0 if c == "Unknown" else 2.0))) for c in n_by}
            harm = 0.12 * u * f_by.get("Unknown", 0.0)
            p = np.clip(p_base * (1 - harm) + rng.normal(0, 0.005), 0, 1)
            correct = rng.random(len(tid)) < p
            abstained = (rng.random(len(tid)) < 0.5 * (tcat == "Unknown")) if idk else np.zeros(len(tid), bool)
            correct &= ~abstained
            draws[e] = (correct, abstained)
            dev_acc = float(np.clip(0.45 - harm + 0.02 * np.sin(e) + rng.normal(0, 0.005), 0, 1))
            m = {"epoch": e, "seconds_measuring": 1.0,
                 "train": {"n": len(train), "fitted": sum(f_by[c] * n_by[c] for c in n_by) / len(train),
                           "fitted_by_category": f_by, "n_by_category": dict(n_by)},
                 "dev": {"all": {"n": n_dev, "accuracy": dev_acc}},
                 "test": {"all": _block(correct, abstained, tcat),
                          "in_distribution": _block(correct[~ood], abstained[~ood], tcat[~ood]),
                          "ood": _block(correct[ood], abstained[ood], tcat[ood])},
                 "train_loss": float(2 * np.exp(-e / 3))}
            atomic_write_json(out.epoch(e), m)
            metrics.append(m)
        stops = choose_stops(metrics)
        for e in epochs:  # as knowcat finetune writes them: the test answers of every measured epoch
            correct, abstained = draws[e]
            write_jsonl(out.answers(e), (
                {"set": "test", "id": str(i), "relation": str(r), "category": str(c), "answer": "x",
                 "correct": bool(k), "abstained": bool(a)}
                for i, r, c, k, a in zip(tid, trel, tcat, correct, abstained)))
        out.write_metrics({"complete": True, "config": asdict(ft), "model": "synthetic/model",
                                                 "n_train": len(train), "world_size": 1, "seconds_training": 60.0,
                                                 **stops, "epochs": metrics})
    analysis = analyze(run, exp)
    analysis["seconds"] = 3600.0
    rd.write_analysis(analysis)


# ---------------------------------------------------------------------------------------------
# the surrogates


def _surrogates(run: Path, rows: list[dict], cfg, rng) -> dict:
    from knowcat.rundir import RunDir
    from knowcat.surrogate import _tests, stratified_sample

    sd = RunDir(run).surrogates
    sc = cfg.surrogate
    train = [r for r in rows if r["split"] == sc.split]
    sd.write_config({"model": "synthetic/model", "config": asdict(sc),
                                                           "n": len(train)})
    cat_ix = {c: i for i, c in enumerate(CATEGORIES)}
    tests = {}

    class _E:  # stratified_sample needs objects with an id
        def __init__(self, i):
            self.id = i

    aj_ids = {e.id for e in stratified_sample([_E(r["id"]) for r in train], {r["id"]: r["category"] for r in train},
                                              sc.answer_jacobian_per_category, sc.seed)}
    for name in sc.surrogates:
        todo = [r for r in train if r["id"] in aj_ids] if name == "answer_jacobian" else train
        c = np.array([cat_ix[r["category"]] for r in todo])
        resid = np.clip(rng.lognormal(np.log(0.15 + 0.12 * c), 0.6), 1e-6, 5.0)
        d = 64 if name != "answer_jacobian" else 3 * 64
        rank = np.where(rng.random(len(todo)) < 0.5, d, d - rng.integers(1, 8, len(todo)))
        tols = sc.residual_sweep if name == "relation_map" else sc.rtol_sweep
        out = []
        for k, r in enumerate(todo):
            cl = "no_solution" if resid[k] > sc.residual_tol else ("unique" if rank[k] == d else "infinitely_many")
            sweep = {}
            for j, t in enumerate(tols):
                thr = t if name == "relation_map" else sc.residual_tol * (1 + j) / len(tols) * 2
                sweep[str(t)] = "no_solution" if resid[k] > thr else ("unique" if rank[k] == d else "infinitely_many")
            out.append({"id": r["id"], "relation": r["relation"], "category": r["category"], "class": cl,
                        "residual": float(resid[k]), "rank": int(rank[k]), "n_unknowns": d,
                        "nullity": int(d - rank[k]), "cond_kept": float(10 ** rng.uniform(1, 6)),
                        "effective_rank": float(rank[k] - rng.uniform(0, 3)), "layer": 8, "sweep": sweep})
        sd.write_rows(name, out)
        t = time.time()
        tests[name] = _tests(out, sc, name)
        tests[name]["seconds"] = round(time.time() - t + 0.01 * len(out), 1)
        tests[name]["seconds_per_example"] = tests[name]["seconds"] / max(1, len(out))
    sd.write_tests(tests)
    return tests


def synthetic_run(run_dir, n: int, seed: int = 0, keep_answers: bool = True) -> Path:
    """A run directory of ``n`` categorized examples with every report section's files (see the module doc)."""
    from knowcat.rundir import RunDir

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, _ = _categorized(run, n, rng, keep_answers)
    cfg = _world(run, rows, rng)
    _study(run, rows, cfg, rng)
    tests = _surrogates(run, rows, cfg, rng)
    RunDir(run).write_demo_summary({
        "run_dir": str(run), "preset": "synthetic",
        "seconds": {"world": 10.0, "pretrain": 600.0, "categorize": round(n * 0.05, 1), "experiment": 3600.0,
                    "surrogates": 300.0},
        "surrogate_verdicts": {k: v["at_default"]["verdict"] for k, v in tests.items()}})
    return run


def measure(n: int, root: Path, seed: int = 0, keep_answers: bool = True) -> dict:
    from knowcat.rundir import RunDir
    from reports import build_report

    t = time.perf_counter()
    run = synthetic_run(root / f"run_{n}", n, seed, keep_answers)
    t_run = time.perf_counter() - t
    t = time.perf_counter()
    path = build_report(run)
    t_build = time.perf_counter() - t
    html = path.read_text(encoding="utf-8")
    size = path.stat().st_size
    return {"n_examples": n, "report_bytes": size, "report_mb": size / 2 ** 20, "build_seconds": t_build,
            "synthetic_run_seconds": t_run,
            "run_dir_mb": sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) / 2 ** 20,
            "categorized_jsonl_mb": RunDir(run).categorized_jsonl.stat().st_size / 2 ** 20,
            "png_figures": html.count('data-format="png"'), "svg_figures": html.count('data-format="svg"'),
            "path": str(path)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="examples of the big run")
    p.add_argument("--small", type=int, default=1_000, help="examples of the small run (0: none)")
    p.add_argument("--no-answers", action="store_true", help="leave the model's answers out of categorized.jsonl")
    p.add_argument("--keep", default=None, help="build the runs under this folder and keep them")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="knowcat_report_size_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        res = {"bound_mb": 20}
        if args.small:
            res["small"] = measure(args.small, root, keep_answers=not args.no_answers)
        res["big"] = measure(args.n, root, keep_answers=not args.no_answers)
        if args.small:
            res["size_ratio_big_over_small"] = res["big"]["report_bytes"] / res["small"]["report_bytes"]
            res["examples_ratio_big_over_small"] = args.n / args.small
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    b = res["big"]
    line = (f"SUMMARY report of a {b['n_examples']:,}-example synthetic run (every section): {b['report_mb']:.2f} MB "
            f"(bound 20 MB) built in {b['build_seconds']:.1f} s from a {b['run_dir_mb']:.0f} MB run directory, "
            f"{b['png_figures']} PNG + {b['svg_figures']} SVG figures")
    if args.small:
        s = res["small"]
        line += (f"; {s['n_examples']:,} examples: {s['report_mb']:.2f} MB in {s['build_seconds']:.1f} s "
                 f"({s['png_figures']} PNG + {s['svg_figures']} SVG); {res['examples_ratio_big_over_small']:.0f}x the "
                 f"examples, {res['size_ratio_big_over_small']:.2f}x the bytes")
    print(line)


if __name__ == "__main__":
    main()
