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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from knowcat.finetune import FinetuneConfig, eval_items, finetune, format_epochs
from knowcat.mixtures import MixtureConfig, build_mixtures, read_training_set, write_mixtures
from knowcat.rundir import FinetuneDir, RunDir
from knowcat.selection import DEV_RULE, OOD_RULE, early_stop_dev  # noqa: F401  (the study's rules)


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
    replicates: int = 1  # fine-tuning seeds per set: replicate r trains with seed finetune.seed + r
    n_boot: int = 1000  # resamples of the test questions (and training examples) behind each finding's interval
    n_boot_clusters: int = 1999  # draws of the wild cluster bootstrap of the linear model
    cluster_weights: str = "webb"  # its weights: webb (few runs) or rademacher


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


def load_dev(run_dir, dev_split: str = "dev", source: str | None = None) -> list[dict]:
    """The dev questions: from ``source`` or the data the run was categorized from."""
    from knowcat.loaders import load_examples

    if source is None:
        source = (RunDir(run_dir).read_categorize_config() or {}).get("data")
    if not source:
        raise ValueError("no dev data: give the dev questions (--dev DATA); the run does not record its data")
    return [{"id": e.id, "question": e.question, "answers": list(e.answers), "relation": e.relation}
            for e in load_examples(source) if e.split == dev_split]


def run_experiment(run_dir, model: str, cfg: ExperimentConfig = ExperimentConfig(), dev=None,
                   device: str = "auto", log=print, progress: bool = True) -> dict:
    run, rd = Path(run_dir), RunDir(run_dir)
    check_run_separate(rd, model)
    categorized = rd.read_categorized(missing_ok=False)
    t0 = time.time()
    mix = rd.mixtures
    sets = build_mixtures(categorized, cfg.mixtures, source=str(rd.categorized_jsonl))
    old = mix.read_manifest()
    if old is not None and old["sets"] != json.loads(json.dumps(sets["_manifest"]["sets"])):
        raise ValueError(f"{mix.root} holds other mixtures; remove it or use another run directory")
    write_mixtures(sets, mix.root)
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
    for r in range(cfg.replicates):
        ft_dir = rd.finetune_folder(r)
        ft_cfg = replace(cfg.finetune, seed=cfg.finetune.seed + r)
        if cfg.replicates > 1:
            log(f"replicate {r + 1}/{cfg.replicates} (fine-tuning seed {ft_cfg.seed}) in {rd.finetune_root(ft_dir)}")
        _finetune_variants(rd, model, cfg, ft_cfg, sets, variants, dev, test, ood, ft_dir, device, log, progress)
    analysis = analyze(run, cfg, variants)
    analysis["seconds"] = round(time.time() - t0, 1)
    rd.write_analysis(analysis)
    log(format_findings(analysis))
    return analysis


def check_run_separate(rd: RunDir, model) -> None:
    """Refuse (:class:`knowcat.errors.UsageError`) a run directory where the study would write into the
    folder of the model it fine-tunes: the study writes ``mixtures/``, ``finetune/``, ``replicates/`` and
    ``analysis.json`` there, none of which may be, hold or lie inside the model folder."""
    from knowcat.paths import check_output_separate
    from knowcat.rundir import WRITES

    check_output_separate([model], rd.root, WRITES["experiment"], what="run directory")


def _finetune_variants(rd: RunDir, model, cfg: ExperimentConfig, ft_cfg, sets, variants, dev, test, ood,
                       ft_dir: str, device, log, progress) -> None:
    """One fine-tuning run per set under the run's ``ft_dir`` (each resumable)."""
    mix = rd.mixtures
    trained: dict[str, str] = {}  # sha256 of a training file -> the variant first trained on it
    for i, v in enumerate(variants):
        if sets["_manifest"]["sets"][v]["n"] == 0:
            log(f"[{i + 1}/{len(variants)}] {v} is empty: skipped")
            continue
        digest = hashlib.sha256(mix.set_path(v).read_bytes()).hexdigest()
        twin = trained.setdefault(digest, v)
        if twin != v and rd.finetune(twin, ft_dir).complete():
            # e.g. D_Unknown and the 100% Unknown set under the paper's |D| rule: the same examples in the same
            # order, and fine-tuning is deterministic, so the run is copied rather than repeated
            log(f"[{i + 1}/{len(variants)}] {v} is the same training set as {twin} (identical file): "
                f"its fine-tuning run is reused")
            reuse_finetune_run(rd.finetune(twin, ft_dir).root, rd.finetune(v, ft_dir).root, twin)
            continue
        rows = read_training_set(mix.set_path(v))
        log(f"[{i + 1}/{len(variants)}] fine-tuning on {v} ({len(rows)} examples)")
        m = finetune(model, rows, {"dev": dev, "test": test}, rd.finetune(v, ft_dir).root, ft_cfg,
                     template=cfg.mixtures.prompt_template, ood_relations=ood, device=device, log=log,
                     progress=progress, ood_rule=OOD_RULE)
        log(format_epochs(m))


def reuse_finetune_run(src: Path, dst: Path, name: str) -> None:
    """Copy the finished fine-tuning run ``src`` (measurements, answers and any saved model; not checkpoints) to ``dst``,
    whose training set is the same file; its config.json records ``same_training_set_as``. Atomic:
    ``dst`` appears whole or not at all."""
    src, dst = FinetuneDir(src), FinetuneDir(dst)
    if dst.read_metrics() is not None and dst.read_metrics() == src.read_metrics():
        return
    src.copy_to(dst, same_training_set_as=name)


# ---------------------------------------------------------------------------------------------
# analysis: read the run's files, hand them to linear_models.study


def read_answers(run_dir, variant: str, epoch: int, finetune_dir: str = "finetune") -> list[dict]:
    return RunDir(run_dir).finetune(variant, finetune_dir).read_answers(epoch)


def study_inputs(run: Path, runs: dict, size: int, subsets: dict, finetune_dir: str = "finetune"):
    """The measurements ``linear_models.study.analyze_study`` needs, read from the runs' answer files."""
    from linear_models.study import StudyInputs

    test_answers, train_fitted = {}, {}
    rd = RunDir(run)
    for v, m in runs.items():
        test_answers[v], train_fitted[v] = {}, {}
        ft = rd.finetune(v, finetune_dir)
        recorded = set(ft.epochs_with_answers())
        for e in m["epochs"]:
            if e["epoch"] not in recorded:  # an epoch whose answers were not recorded: its metrics alone are used
                continue
            rows = ft.read_answers(e["epoch"])
            t = [r for r in rows if r.get("set") == "test"]
            test_answers[v][e["epoch"]] = {"id": [r["id"] for r in t], "correct": [bool(r["correct"]) for r in t],
                                           "abstained": [bool(r.get("abstained", False)) for r in t]}
            tr = [r for r in rows if r.get("set") == "train"]
            if tr:
                train_fitted[v][e["epoch"]] = {"category": [r.get("category") for r in tr],
                                               "fitted": [bool(r["fitted"]) for r in tr]}
        if not train_fitted[v]:
            del train_fitted[v]
    return StudyInputs(size=size, runs=runs, subsets=subsets, test_answers=test_answers, train_fitted=train_fitted)


def replicate_dirs(run_dir) -> dict[str, str]:
    """{replicate name: its fine-tuning folder, relative to the run}: ``finetune`` (replicate 0)
    and every ``replicates/rep_NN/finetune`` present."""
    return RunDir(run_dir).replicate_folders()


def analyze(run_dir, cfg: ExperimentConfig = ExperimentConfig(), variants=None, replicates: bool = True) -> dict:
    """The study's statistics from the run's files, over ``variants`` (default ``cfg.variants``,
    or every set of the mixtures manifest); a requested set without a finished run is listed
    in ``variants_without_runs``. With replicates (``replicates/rep_NN/finetune``), each is
    analyzed alike and ``replicates`` gives every coefficient and finding across them; a
    finding's ``decision`` is then the one across replicates (holds only if it holds in each)."""
    from linear_models.study import replicate_summary

    a = analyze_replicate(run_dir, cfg, variants, "finetune")
    reps = replicate_dirs(run_dir) if replicates else {}
    if len(reps) > 1:
        each = {"rep_00": a}
        for name, d in reps.items():
            if name != "rep_00":
                each[name] = analyze_replicate(run_dir, cfg, variants, d)
        summ = replicate_summary(each)
        summ["folders"] = reps
        summ["seeds"] = {name: cfg.finetune.seed + int(name.split("_")[1]) for name in reps}
        a["replicates"] = summ
        for n, s in summ["findings"].items():
            if n in a["findings"]:
                fnd = a["findings"][n]
                fnd["decision_first_replicate"] = fnd["decision"]
                fnd["decision"], fnd["holds"] = s["decision"], s["decision"] == "holds"
                fnd["decisions_by_replicate"] = s["decisions"]
    return a


def analyze_run(run_dir, cfg: ExperimentConfig = ExperimentConfig(), variants=None, log=print) -> dict:
    """``knowcat analyze``: :func:`analyze` the run's files again and write ``RUN/analysis.json``."""
    rd = RunDir(run_dir)
    a = analyze(run_dir, cfg, variants)
    rd.write_analysis(a)
    log(format_findings(a))
    log(f"-> {rd.analysis}")
    return a


def analyze_replicate(run_dir, cfg: ExperimentConfig = ExperimentConfig(), variants=None,
                      finetune_dir: str = "finetune") -> dict:
    from linear_models.study import StudyOptions, analyze_study

    run, rd = Path(run_dir), RunDir(run_dir)
    manifest = rd.mixtures.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{rd.mixtures.manifest} does not exist: run the study first (knowcat experiment)")
    requested = list(variants or cfg.variants or manifest["sets"])
    unknown = [v for v in requested if v not in manifest["sets"]]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; the mixtures are {list(manifest['sets'])}")
    runs = {}
    for v in requested:
        m = rd.finetune(v, finetune_dir).read_metrics()
        if m is not None:
            runs[v] = m
    if not runs:
        raise ValueError(f"no finished fine-tuning runs under {rd.finetune_root(finetune_dir)} for {requested}")
    categorized = rd.read_categorized(missing_ok=False)
    train_rels = {r["relation"] for r in categorized if r.get("split") == cfg.train_split}
    test = eval_items(categorized, cfg.test_split)
    subsets = {"in_distribution": [t["id"] for t in test if t["relation"] in train_rels],
               "ood": [t["id"] for t in test if t["relation"] not in train_rels]}
    subsets = {k: v for k, v in subsets.items() if v}
    lm_variants, lm_rule = linear_model_variants(runs, cfg.linear_model_variants)
    opt = StudyOptions(linear_model_variants=lm_variants, linear_model_rule=cfg.linear_model_variants,
                       linear_model_rule_description=lm_rule, t_test_parts=cfg.t_test_parts,
                       idk_from=cfg.mixtures.idk_from, seed=cfg.mixtures.seed, n_boot=cfg.n_boot,
                       n_boot_clusters=cfg.n_boot_clusters, cluster_weights=cfg.cluster_weights)
    out = analyze_study(study_inputs(run, runs, manifest["size"], subsets, finetune_dir), opt)
    out["variants_without_runs"] = [v for v in requested if v not in runs]
    out["finetune_dir"] = finetune_dir
    out["config"] = json.loads(json.dumps(asdict(cfg)))
    return out


def _num(x, spec: str = ".2g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _interval(iv) -> str:
    return "n/a" if not iv or any(_num(x) == "n/a" for x in iv) else f"[{iv[0]:+.2f}, {iv[1]:+.2f}]"


def format_findings(a: dict) -> str:
    from linear_models.study import PAPER_LINEAR_MODEL

    f = a["findings"]
    lines = [f"fine-tuning study (|D| = {a['size']}, {len(a['variants'])} variants):"]
    for v, note in a.get("early_stop_undefined", {}).items():
        lines.append(f"  {v}: EARLY_STOP undefined ({note})")
    for s, r in a.get("linear_model", {}).items():
        if "params" not in r:
            continue
        p = PAPER_LINEAR_MODEL.get(s) or {}
        lines.append(f"  linear model ({s}, {r['nobs']} points, {r.get('n_clusters', '?')} runs): R^2 {_num(r['r2'], '.2f')}"
                     + (f" (paper: b0 {p['b0']:+.1f}, b_kn {p['b_kn']:+.1f}, b_unk {p['b_unk']:+.1f}, "
                        f"R^2 {p['r2']:.2f})" if p else ""))
        for k in ("b_kn", "b_unk"):
            cl, wb = r.get("cluster") or {}, r.get("wild_bootstrap") or {}
            lines.append(f"    {k} {_num(r['params'][k], '+.2f')}: plain 95% {_interval(r['conf_int_95'][k])} "
                         f"p {_num(r['pvalues'][k])}; by run: cluster-robust {_interval(cl.get('conf_int_95', {}).get(k))}"
                         f" p {_num(cl.get('pvalues', {}).get(k))}, wild bootstrap "
                         f"{_interval(wb.get('conf_int_95', {}).get(k))} p {_num(wb.get('pvalues', {}).get(k))}")
    for stop in ("early_stop", "convergence"):
        e = f.get(f"accuracy_vs_unknown_{stop}")
        if e:
            acc = ", ".join(f"{x}%: {y:.1f}" for x, y in sorted(e["accuracy"].items(), key=lambda kv: int(kv[0])))
            line = (f"  {stop.upper()} test accuracy by %Unknown: {acc} (slope {_num(e['slope_per_10pct_unknown'], '+.2f')} "
                    f"per 10%, 95% {_interval(e.get('slope_interval'))})")
            if "known_accuracy" in e:
                line += "; D_Known: " + ", ".join(f"{x}%: {y:.1f}" for x, y in
                                                  sorted(e["known_accuracy"].items(), key=lambda kv: int(kv[0])))
            lines.append(line)
    for name, e in f.items():
        if isinstance(e, dict) and "decision" in e:
            v = e.get("value")
            lines.append(f"  [{e['decision']}] {e['claim']}: {_num(v, '+.2f')}, "
                         f"95% {_interval(e.get('interval'))}"
                         + (f"; by replicate: {', '.join(e['decisions_by_replicate'])}"
                            if "decisions_by_replicate" in e else ""))
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
    rep = a.get("replicates")
    if rep:
        lines.append(f"  across {len(rep['replicates'])} replicates (fine-tuning seeds):")
        for s, co in rep["linear_model"].items():
            for k in ("b_kn", "b_unk"):
                c = co[k]
                if c["n"]:
                    lines.append(f"    {s} {k}: mean {c['mean']:+.2f}, sd {c['sd'] if c['sd'] is not None else float('nan'):.2f}, "
                                 f"range [{c['min']:+.2f}, {c['max']:+.2f}], {c['n_negative']}/{c['n']} negative")
    return "\n".join(lines)
