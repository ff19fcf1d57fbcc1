"""``knowcat surrogate``: fit the linearized surrogates on a categorized run and test
the Ax=b hypothesis against the SliCK categories.

Surrogates (unknowns, equations, linearization point and reachable classes in
:mod:`linear_models.surrogates`):

- ``answer_jacobian`` (a): the blog's system, x_gen unknown: per example, the Jacobian of
  the pre-norm states at the answer positions with respect to the gold answer tokens'
  embeddings, under the example's SliCK prompt ``prompt_index``; the causally forced
  first block (first-token greedy margin) reported as its own component; dense (SVD)
  when the Jacobian fits the memory budget, matrix-free (randomized SVD + CGLS from
  Jacobian products) when it does not (those rows may also be
  ``consistent_rank_unknown`` or ``undetermined``, see :mod:`linear_models.lstsq`);
- ``relation_map`` (b): per relation, ridge least squares from subject states at
  a middle layer to the gold answers' unembedding rows, with leave-one-out
  residuals from the hat matrix;
- ``relation_jacobian`` (b'): per relation, the mean local Jacobian W and bias,
  and per example the square system W s = z* - bias;
- ``weight_update`` (c): a weight update of the last MLP's down projection in the span
  of its top-k singular pairs; per example, the update making the gold answer win by the
  margin without moving R anchor examples' margins, its minimum-norm size and its
  interference.

Writes ``RUN/surrogates/<name>.jsonl`` and ``.parquet`` (one row per example: the class,
what it could have been (``reachable``), relative residual, ranks, nullity, condition
numbers, effective rank and the class at every swept tolerance),
``RUN/surrogates/baseline.jsonl`` (the trivial baseline: log-probability of the gold
answer and first-token margin under the same prompt, from :mod:`probes.scoring`) and
``RUN/surrogates/tests.json`` (per surrogate: the per-arm tests, verdicts, incremental
validity and the fine-tuning link, at the chosen tolerance and at every swept one; all
surrogates present in the directory are read together for the Holm correction).
``answer_jacobian`` streams its rows to shards, so a killed run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from knowcat.rundir import RunDir, SurrogatesDir

SURROGATES = ("answer_jacobian", "relation_map", "relation_jacobian", "weight_update")


@dataclass
class SurrogateConfig:
    surrogates: tuple[str, ...] = SURROGATES
    split: str = "train"
    prompt_index: int = 0  # which SliCK prompt the systems are built under
    margin: float = 1.0  # logits by which each gold token must win (the b of (a) and (b'))
    rtol: float | None = None  # rank cutoff rtol * s_max; None: max(m, n) * eps
    atol: float = 0.0
    residual_tol: float = 0.5  # relation_map: relative leave-one-out residual above this -> no_solution
    ridge: float | None = None  # relation_map: lambda = ridge * trace(S^T S) / d; None: by leave-one-out CV
    layer: int | None = None  # subject-state layer (None: the middle block, n // 2, but not the last)
    jacobian_examples: int = 8  # relation_jacobian: examples averaged per relation
    rtol_sweep: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    residual_sweep: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    alpha: float = 0.05
    dtype: str = "float32"  # float32 or float64 for the linear algebra
    memory_budget_mb: float | None = None  # dense Jacobian allowed up to this; None: 1/8 of free (device) memory
    matrix_free: bool | None = None  # force the path (None: per example, by the memory budget)
    matrix_free_k: int = 64  # singular triplets sought on the matrix-free path (plus the oversampling)
    matrix_free_oversample: int = 10  # extra sketch columns of the randomized SVD (their triplets are used too)
    matrix_free_power_iters: int = 2  # power iterations of the randomized SVD
    matrix_free_iters: int = 300  # CGLS iterations at most (each: one Jacobian product and one transposed)
    # matrix-free, where the sketch does not resolve the rank: consistent iff the CGLS relative residual
    # ||b - Ax|| / ||b|| is at most this (see linear_models.lstsq)
    matrix_free_residual_tol: float = 1e-3
    matrix_free_normal_tol: float = 1e-4  # CGLS converged when ||A^T r|| <= this * ||A|| * ||r|| (LSQR's rule)
    # Jacobian products: "jvp" (torch.func forward mode, falling back to double backward where the attention
    # has no forward-mode derivative) or "double_backward" (measured faster on a CPU: see probes.jacobians)
    matrix_free_products: str = "jvp"
    max_examples: int | None = None  # first N examples of the split (in file order), None: all
    # answer_jacobian costs about m^2 d / 2 token passes per example (m answer tokens, d hidden size):
    # by default it runs on a seeded sample of this many examples per category (0: every example)
    answer_jacobian_per_category: int = 75
    shard_size: int = 128
    seed: int = 0
    weight_update_rank: int = 8  # k: directions of the last down projection the update may use
    weight_update_anchors: int = 32  # R: other examples whose first-token margins the update must not move
    permutations: int = 2000  # permutation tests within relations (arms with an expected count below 5)
    cv_folds: int = 5  # incremental validity: cross-validation folds
    bootstrap: int = 500  # bootstrap resamples (AUROC difference, Spearman intervals)
    finetune_variant: str | None = None  # fine-tuning run for the fit-epoch link (None: the mean over every run)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def dense_fits(n: int, d: int, itemsize: int, budget_bytes: float) -> bool:
    """Whether the dense path of (a) fits the budget: J (n x n), A = [0; J] ((n + d) x n), its SVD
    factors and the augmented matrix [A|b], at most 6 n (n + d) values of ``itemsize`` bytes."""
    return 6 * n * (n + d) * itemsize <= budget_bytes


def _load_examples(run: Path, cfg: SurrogateConfig, data: str | None):
    """The categorized examples of the split (as QAExample, with their category) and the exemplar pool."""
    from knowcat.loaders import load_examples
    from knowcat.slick import SliCKConfig

    rd = RunDir(run)
    cat = rd.read_categorized(missing_ok=False)
    by_id = {r["id"]: r for r in cat if r.get("split") == cfg.split}
    if not by_id:
        raise ValueError(f"no categorized '{cfg.split}' examples in {rd.categorized_jsonl}")
    meta = rd.read_categorize_config()
    if meta is None:
        raise FileNotFoundError(f"{rd.categorize_config} does not exist: the run was not made by knowcat categorize")
    source = data or meta.get("data")
    if not source:
        raise ValueError("the run does not record its data; give --data")
    protocol = SliCKConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["protocol"].items()})
    examples = load_examples(source)
    todo = [e for e in examples if e.id in by_id]
    if cfg.max_examples:
        todo = todo[:cfg.max_examples]
    pool = [e for e in examples if e.split == protocol.exemplar_split]
    return todo, {i: by_id[i]["category"] for i in by_id}, pool, protocol


def _prompts(todo, pool, protocol, index: int) -> dict:
    from knowcat.prompts import exemplar_sets, prompt_for

    sets = exemplar_sets(pool, protocol.fewshot)
    out = {}
    for e in todo:
        pre, suf = prompt_for(e, sets[e.relation][index % protocol.n_prompts])
        out[e.id] = pre + suf
    return out


def run_surrogates(run_dir, model_name: str, cfg: SurrogateConfig = SurrogateConfig(), data: str | None = None,
                   device: str = "auto", log=print, progress: bool = True) -> dict:
    from linear_models.hypothesis import format_verdict

    from probes.surrogate_inputs import load_frozen

    for s in cfg.surrogates:
        if s not in SURROGATES:
            raise ValueError(f"unknown surrogate {s!r}; choose from {SURROGATES}")
    from knowcat.paths import check_output_separate
    from knowcat.rundir import WRITES

    run = Path(run_dir)
    check_output_separate([model_name], run, WRITES["surrogate"], what="run directory")
    sd = RunDir(run).surrogates
    out = sd.root
    out.mkdir(parents=True, exist_ok=True)
    todo, cats, pool, protocol = _load_examples(run, cfg, data)
    prompts = _prompts(todo, pool, protocol, cfg.prompt_index)
    model, tok = load_frozen(model_name, device=device)
    sd.write_config({"model": model_name, "config": asdict(cfg), "n": len(todo)})
    t = time.time()
    baseline = baseline_scores(model, tok, todo, prompts)
    sd.write_baseline(baseline)
    seconds = {"baseline": round(time.time() - t, 1)}
    for name in cfg.surrogates:
        t = time.time()
        fn = {"answer_jacobian": _answer_jacobian, "relation_map": _relation_map,
              "relation_jacobian": _relation_jacobian, "weight_update": _weight_update}[name]
        rows = fn(model, tok, todo, prompts, cats, cfg, out, log, progress)
        for r in rows:
            r.update({f"baseline_{k}": v for k, v in baseline.get(r["id"], {}).items()})
        seconds[name] = round(time.time() - t, 1)
        sd.write_rows(name, rows)
        log(f"surrogate {name}: {len(rows)} examples in {seconds[name]:.0f} s")
    tests = evaluate_run(run, cfg, seconds, log)
    for name, t_ in tests.items():
        log(format_verdict(name, t_["at_default"], t_.get("fit_epoch_link")))
    return tests


def baseline_scores(model, tok, todo, prompts) -> dict:
    """The trivial baseline per example: the gold answer's log-probability and its first-token margin
    under the same prompt the systems are built under (teacher-forced, the engine's ``score``)."""
    from probes.engine import open_engine
    from probes.scoring import ScoreRequest

    engine = open_engine("transformers", (model, tok))
    got = engine.score([ScoreRequest(e.id, prompts[e.id], " " + e.answers[0]) for e in todo])
    return {k: {"logprob": s.logprob, "first_token_margin": s.first_token_margin, "greedy_match": s.greedy_match}
            for k, s in got.items()}


def fit_epochs(run: Path, variant: str | None = None) -> dict | None:
    """The epoch at which each training example is first fitted (greedy decoding reproduces its target),
    from ``finetune/<variant>/epochs/epoch_NNN.answers.jsonl``; an example never fitted gets
    n_epochs + 1 (it ranks after every fitted one). ``variant``: one fine-tuning run, or None for every
    run but D_IDK's: then an example's value is the mean of its first-fit epochs over the runs whose
    training set holds it (the runs are different mixtures, so each example is seen in several)."""
    rd = RunDir(run)
    runs = {d.name: (d, d.epochs_with_answers()) for d in rd.finetune_runs() if d.epochs_dir.is_dir()}
    runs = {k: v for k, v in runs.items() if v[1]}
    if not runs:
        return None
    if variant is not None and variant not in runs:
        raise ValueError(f"no fine-tuning run {variant!r} with measured epochs in {rd.finetune_root()}; "
                         f"have {sorted(runs)}")
    # D_IDK trains Unknown examples on the abstention string: its "fitted" is another target, so it is left
    # out of the mean (it can still be chosen by name)
    chosen = [variant] if variant is not None else sorted(v for v in runs if "idk" not in v.lower())
    per: dict[str, list[int]] = {}
    never = 0
    for v in chosen:
        first: dict[str, int | None] = {}
        ft, epochs = runs[v]
        for epoch in epochs:
            for r in ft.read_answers(epoch):
                if r.get("set") != "train":
                    continue
                first.setdefault(r["id"], None)
                if r.get("fitted") and first[r["id"]] is None:
                    first[r["id"]] = epoch
        n_epochs = len(epochs)
        for k, e in first.items():
            never += e is None
            per.setdefault(k, []).append(e if e is not None else n_epochs + 1)
    return {"variant": variant or "mean over " + ",".join(chosen), "runs": chosen,
            "n_epochs": {v: len(runs[v][1]) for v in chosen}, "never_fitted_as": "n_epochs + 1",
            "never_fitted": never, "epochs": {k: float(np.mean(v)) for k, v in per.items()}}


LINK_FIELDS = {"answer_jacobian": ("residual", "solution_norm"), "relation_map": ("residual",),
               "relation_jacobian": ("residual",), "weight_update": ("residual", "update_norm", "interference")}


def evaluate_run(run, cfg: SurrogateConfig = SurrogateConfig(), seconds: dict | None = None, log=print) -> dict:
    """The tests of every surrogate whose rows are in ``RUN/surrogates`` (read together for the Holm
    correction) against the baseline and the fine-tuning run; writes ``tests.json``."""
    from linear_models.hypothesis import evaluate

    run = Path(run)
    sd = RunDir(run).surrogates
    rows = {n: sd.read_rows(n) for n in SURROGATES}
    rows = {n: r for n, r in rows.items() if r}
    baseline = sd.read_baseline()
    fe = fit_epochs(run, cfg.finetune_variant)
    if fe is None:
        log("surrogates: no fine-tuning run with per-epoch answers in this run: no fit-epoch link")
    tests = evaluate(rows, baseline, fe, alpha=cfg.alpha, n_perm=cfg.permutations, folds=cfg.cv_folds,
                     n_boot=cfg.bootstrap, seed=cfg.seed, link_fields=LINK_FIELDS)
    old = sd.read_tests() or {}
    for name, t in tests.items():
        t["sweep_over"] = "relative residual tolerance" if name in ("relation_map", "weight_update") else "rank rtol"
        t["reachable"] = _reachable_summary(rows[name])
        paths = [r.get("path") for r in rows[name] if r.get("path")]
        if paths:
            t["paths"] = {p: paths.count(p) for p in sorted(set(paths))}
        s = (seconds or {}).get(name, (old.get(name) or {}).get("seconds"))
        t["seconds"] = s
        t["seconds_per_example"] = s / max(1, len(rows[name])) if s is not None else None
    if seconds and "baseline" in seconds:
        tests_meta = {"baseline_seconds": seconds["baseline"]}
    else:
        tests_meta = {}
    sd.write_tests({**tests})
    if tests_meta:
        sd.write_timings(tests_meta)
    return tests


def _reachable_summary(rows: list[dict]) -> dict:
    """How many examples could reach each class, and under which shapes (equations x unknowns)."""
    from linear_models.hypothesis import CLASSES

    shapes: dict[str, int] = {}
    for r in rows:
        key = f"{r.get('n_equations')}x{r.get('n_unknowns')}"
        shapes[key] = shapes.get(key, 0) + 1
    return {"examples_that_can_reach": {c: sum(c in (r.get("reachable") or CLASSES) for r in rows) for c in CLASSES},
            "n": len(rows), "shapes": dict(sorted(shapes.items(), key=lambda kv: -kv[1])[:10])}


def _bar(total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not progress)


def stratified_sample(todo, cats: dict, per_category: int, seed: int) -> list:
    """At most ``per_category`` examples of each category, drawn with ``seed``, in input order."""
    if not per_category:
        return list(todo)
    rng = np.random.default_rng(seed)
    keep = set()
    for c in sorted({cats[e.id] for e in todo}):
        idx = [i for i, e in enumerate(todo) if cats[e.id] == c]
        keep.update(idx if len(idx) <= per_category else rng.choice(idx, per_category, replace=False).tolist())
    return [e for i, e in enumerate(todo) if i in keep]


def _rank_at(S: torch.Tensor, rt: float, atol: float) -> int:
    smax = float(S[0]) if len(S) else 0.0
    return int((S > max(atol, rt * smax)).sum())


def _answer_jacobian(model, tok, todo, prompts, cats, cfg, out, log, progress) -> list[dict]:
    from linear_models.lstsq import Tolerance, no_tf32, sweep_classes
    from linear_models.surrogates import reachable_classes, solve_answer_system
    from probes.jacobians import answer_jacobian, answer_system, prenorm_margin_targets
    from probes.surrogate_inputs import answer_end_token, free_memory_bytes

    dt = _dtype(cfg.dtype)
    tol = Tolerance(cfg.rtol, cfg.atol)
    if cfg.matrix_free_products not in ("jvp", "double_backward"):
        raise ValueError(f"matrix_free_products must be jvp or double_backward, not {cfg.matrix_free_products!r}")
    end = answer_end_token(tok)
    n_all = len(todo)
    todo = stratified_sample(todo, cats, cfg.answer_jacobian_per_category, cfg.seed)
    if len(todo) < n_all:
        log(f"answer_jacobian: a stratified sample of {len(todo)} of {n_all} examples "
            f"(at most {cfg.answer_jacobian_per_category} per category; --answer-jacobian-per-category 0 for all)")
    budget = (cfg.memory_budget_mb * 2 ** 20) if cfg.memory_budget_mb else free_memory_bytes(model) / 8
    itemsize = torch.finfo(dt).bits // 8
    shards = SurrogatesDir(out).shards("answer_jacobian")
    relevant = ("split", "prompt_index", "margin", "rtol", "atol", "rtol_sweep", "dtype", "memory_budget_mb",
                "matrix_free", "matrix_free_k", "matrix_free_oversample", "matrix_free_power_iters",
                "matrix_free_iters", "matrix_free_residual_tol", "matrix_free_normal_tol", "matrix_free_products",
                "max_examples",
                "answer_jacobian_per_category", "shard_size", "seed")
    # "system": the formulation (pre-norm states, forced first block apart): shards of another are not reused
    config_key = json.dumps({"model": getattr(model, "name_or_path", None), "system": "prenorm-forced-first-block",
                             **{k: v for k, v in asdict(cfg).items() if k in relevant}}, sort_keys=True)
    shards.reset_unless_key(config_key)
    rows: list[dict] = []
    bar = _bar(len(todo), "surrogate answer_jacobian", progress)
    for s0 in range(0, len(todo), cfg.shard_size):
        shard = s0 // cfg.shard_size
        chunk = todo[s0:s0 + cfg.shard_size]
        if shards.done(shard):
            rows += shards.read(shard)
            bar.update(len(chunk))
            continue
        part = []
        for e in chunk:
            t = time.time()
            sysm = answer_system(model, tok, prompts[e.id], e.answers[0], end)
            delta, mu, _, _ = prenorm_margin_targets(model, sysm.prenorm, sysm.targets, cfg.margin)
            m, d = sysm.x_gen.shape
            n = m * d
            b = delta[1:].reshape(-1).to(dt)  # the forced first block (position P-1) is not part of the system
            x_norm = float(sysm.x_gen.norm())
            dense = dense_fits(n, d, itemsize, budget) if cfg.matrix_free is None else not cfg.matrix_free
            if dense:
                with no_tf32():
                    J = answer_jacobian(model, sysm).to(dt)
                feats, full = solve_answer_system(J, b, tol, x_norm)
                feats |= {"rank_upper": feats["rank"], "rank_exact": True, "decided_by": "rank"}
                S = full["singular_values"]
                sweep = sweep_classes(S, full["singular_values_aug"], n, cfg.rtol_sweep, cfg.atol)
                sweep_reach = {str(rt): list(reachable_classes(n, n, _rank_at(S, rt, cfg.atol))) for rt in cfg.rtol_sweep}
            else:
                feats, sweep = _matrix_free_features(model, sysm, b, cfg, tol, x_norm)
                sweep_reach = {str(rt): list(reachable_classes(n, n, 0, n)) for rt in cfg.rtol_sweep}
            part.append({"id": e.id, "relation": e.relation, "category": cats[e.id], **feats,
                         "path": "dense" if dense else "matrix_free", "answer_tokens": m,
                         "first_token_margin": float(mu[0]), "first_token_greedy": bool(mu[0] > 0),
                         "first_token_wins_by_margin": bool(mu[0] >= cfg.margin),
                         "min_margin_rest": float(mu[1:].min()), "b_zero": bool(float(b.abs().max()) == 0.0),
                         "sweep": {str(k): v for k, v in sweep.items()}, "sweep_reachable": sweep_reach,
                         "seconds": round(time.time() - t, 4)})
            bar.update(1)
        shards.write(shard, part)
        rows += part
    bar.close()
    return rows


def _matrix_free_features(model, sysm, b: torch.Tensor, cfg: SurrogateConfig, tol, x_norm: float) -> tuple[dict, dict]:
    """Surrogate (a) on the matrix-free path: A = J (square, the forced first block apart) from Jacobian
    products."""
    from linear_models.lstsq import matrix_free_solve
    from linear_models.surrogates import reachable_classes
    from probes.jacobians import answer_operators

    n = sysm.x_gen.numel()
    mv, rmv = answer_operators(model, sysm, mode="auto" if cfg.matrix_free_products == "jvp" else "double_backward")
    mf = matrix_free_solve(mv, rmv, b, n, cfg.matrix_free_k, tol, residual_tol=cfg.matrix_free_residual_tol,
                           seed=cfg.seed, max_iter=cfg.matrix_free_iters, oversample=cfg.matrix_free_oversample,
                           power_iters=cfg.matrix_free_power_iters, normal_tol=cfg.matrix_free_normal_tol,
                           sweep_rtols=cfg.rtol_sweep)
    cg = mf["cgls"] or {}
    feats = {"residual": mf["residual"], "rank": mf["rank"], "rank_upper": mf["rank_upper"],
             "rank_exact": mf["rank_exact"], "rank_aug": mf["rank_aug"], "n_unknowns": n, "n_equations": n,
             "nullity": mf["nullity"], "nullity_lower": mf["nullity_lower"], "cond": None, "cond_kept": mf["cond_kept"],
             "effective_rank": mf["effective_rank"], "class": mf["class"], "decided_by": mf["decided_by"],
             "range_error": mf["range_error"], "triplets": mf["triplets"], "cgls_iterations": cg.get("iterations"),
             "cgls_converged": cg.get("converged"), "product": mv.state["mode"],
             "solution_norm": float(mf["x"].norm()) / x_norm if x_norm else float(mf["x"].norm()),
             "reachable": list(reachable_classes(n, n, mf["rank"], mf["rank_upper"]))}
    return feats, mf["sweep"]


def _subject_states(model, tok, todo, prompts, cfg):
    from probes.surrogate_inputs import subject_states

    return subject_states(model, tok, [prompts[e.id] for e in todo], [e.subject for e in todo],
                          [e.answers[0] for e in todo], cfg.layer)


def _relation_map(model, tok, todo, prompts, cats, cfg, out, log, progress) -> list[dict]:
    from linear_models.lstsq import Tolerance
    from linear_models.surrogates import relation_map_classes, relation_map_reachable, ridge_loo

    st = _subject_states(model, tok, todo, prompts, cfg)
    S, Y, layer = st.S, st.Y, st.layer
    tol, dt = Tolerance(cfg.rtol, cfg.atol), _dtype(cfg.dtype)
    rows = []
    rels = sorted({e.relation for e in todo})
    for rel in rels:
        idx = [i for i, e in enumerate(todo) if e.relation == rel]
        if len(idx) < 3:
            continue
        fit = ridge_loo(S[idx], Y[idx], cfg.ridge, tol=tol, dtype=dt)
        classes = relation_map_classes(fit, cfg.residual_tol)
        for j, i in enumerate(idx):
            e = todo[i]
            r = float(fit["rel_loo"][j])
            sweep = {str(t): relation_map_classes({**fit, "rel_loo": fit["rel_loo"][j:j + 1]}, t)[0]
                     for t in cfg.residual_sweep}
            rows.append({"id": e.id, "relation": rel, "category": cats[e.id], "class": classes[j], "residual": r,
                         "fit_residual": float(fit["rel_fit"][j]), "leverage": float(fit["leverage"][j]),
                         "rank": fit["rank"], "n_unknowns": fit["d"], "nullity": fit["d"] - fit["rank"],
                         "relation_n": fit["n"], "cond": fit["cond"], "cond_kept": fit["cond_kept"],
                         "effective_rank": fit["effective_rank"], "cutoff": fit["cutoff"], "layer": layer,
                         "lambda": fit["lambda"], "ridge": fit["ridge"], "sweep": sweep,
                         "reachable": list(relation_map_reachable(fit)), "n_equations": fit["n"]})
    return rows


def _relation_jacobian(model, tok, todo, prompts, cats, cfg, out, log, progress) -> list[dict]:
    from linear_models.lstsq import Tolerance, no_tf32, sweep_classes
    from linear_models.surrogates import reachable_classes, relation_jacobian_systems
    from probes.jacobians import layer_jacobian, prenorm_margin_targets

    dt = _dtype(cfg.dtype)
    st = _subject_states(model, tok, todo, prompts, cfg)
    S, Z, first, pos, layer = st.S, st.Z, st.first, st.positions, st.layer
    rows = []
    rels = sorted({e.relation for e in todo})
    bar = _bar(len(rels), "surrogate relation_jacobian (relations)", progress)
    for rel in rels:
        idx = [i for i, e in enumerate(todo) if e.relation == rel]
        use = sorted(idx, key=lambda i: todo[i].id)[:cfg.jacobian_examples]
        with no_tf32():
            W = torch.stack([layer_jacobian(model, tok, prompts[todo[i].id], pos[i], layer) for i in use]).mean(0)
        beta = (Z[idx] - S[idx] @ W.T).mean(0)
        delta, mu, _, _ = prenorm_margin_targets(model, Z[idx], [first[i] for i in idx], cfg.margin)
        target = (Z[idx] + delta - beta).to(dt)
        Wd = W.to(dt)
        feats, full = relation_jacobian_systems(Wd, target, Tolerance(cfg.rtol, cfg.atol))
        for j, i in enumerate(idx):
            e = todo[i]
            Sj = full["singular_values"][j]
            sweep = sweep_classes(Sj, full["singular_values_aug"][j], Wd.shape[1], cfg.rtol_sweep, cfg.atol)
            rows.append({"id": e.id, "relation": rel, "category": cats[e.id], **feats[j], "layer": layer,
                         "first_token_margin": float(mu[j]), "jacobian_examples": len(use),
                         "sweep": {str(k): v for k, v in sweep.items()},
                         "sweep_reachable": {str(rt): list(reachable_classes(Wd.shape[0], Wd.shape[1],
                                                                             _rank_at(Sj, rt, cfg.atol)))
                                             for rt in cfg.rtol_sweep}})
        bar.update(1)
    bar.close()
    return rows


def _weight_update(model, tok, todo, prompts, cats, cfg, out, log, progress) -> list[dict]:
    """Surrogate (c): per example the system [G_own; G_anchor] theta = [need; 0] in the span of the last
    down projection's top ``weight_update_rank`` singular pairs (:mod:`linear_models.surrogates`)."""
    from linear_models.lstsq import Tolerance, no_tf32
    from linear_models.surrogates import weight_update_system
    from probes.jacobians import down_projection_basis, margin_gradients_batch
    from probes.surrogate_inputs import answer_end_token

    dt = _dtype(cfg.dtype)
    tol = Tolerance(cfg.rtol, cfg.atol)
    end = answer_end_token(tok)
    k = cfg.weight_update_rank
    U, V = down_projection_basis(model, k)
    rng = np.random.default_rng(cfg.seed)
    R = min(cfg.weight_update_anchors, max(0, len(todo) - 1))
    if R < k:
        log(f"weight_update: only {R} anchors for k = {k} directions: systems may be wide (see reachable)")
    anchor_idx = sorted(rng.choice(len(todo), R, replace=False).tolist()) if R else []
    got = margin_gradients_batch(model, tok, [(prompts[todo[i].id], todo[i].answers[0]) for i in anchor_idx], end,
                                 U, V, cfg.margin, first_only=True)
    anchors = {todo[i].id: g["G"][0] for i, g in zip(anchor_idx, got)}
    rows = []
    bar = _bar(len(todo), "surrogate weight_update", progress)
    with no_tf32():
        grads = margin_gradients_batch(model, tok, [(prompts[e.id], e.answers[0]) for e in todo], end, U, V,
                                       cfg.margin)
        for e, g in zip(todo, grads):
            others = [v for a_id, v in anchors.items() if a_id != e.id]
            G_anc = torch.stack(others).to(dt) if others else g["G"].new_zeros(0, k).to(dt)
            feats = weight_update_system(g["G"].to(dt), g["need"].to(dt), G_anc, tol, cfg.residual_tol,
                                         cfg.residual_sweep)
            rows.append({"id": e.id, "relation": e.relation, "category": cats[e.id], **feats,
                         "answer_tokens": g["answer_tokens"], "anchors": len(others), "subspace_rank": k,
                         "first_token_margin": float(g["mu"][0]), "min_margin": float(g["mu"].min())})
            bar.update(1)
    bar.close()
    return rows


def _tests(rows: list[dict], cfg: SurrogateConfig, name: str) -> dict:
    """The tests of one surrogate's rows alone (no baseline, no fine-tuning link; its own Holm family)."""
    from linear_models.hypothesis import evaluate

    t = evaluate({name: rows}, None, None, alpha=cfg.alpha, n_perm=cfg.permutations, folds=cfg.cv_folds,
                 n_boot=cfg.bootstrap, seed=cfg.seed)[name]
    t["sweep_over"] = "relative residual tolerance" if name in ("relation_map", "weight_update") else "rank rtol"
    t["reachable"] = _reachable_summary(rows)
    paths = [r.get("path") for r in rows if r.get("path")]
    if paths:
        t["paths"] = {p: paths.count(p) for p in sorted(set(paths))}
    return t
