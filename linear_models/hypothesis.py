"""The statistical tests of the Ax=b hypothesis.

Hypothesis: no solution <-> Unknown, a unique solution <-> HighlyKnown, infinitely
many <-> MaybeKnown / WeaklyKnown. Each of the three is a separate claim (an *arm*)
and is tested separately (:func:`arm_test`):

- the 2 x 2 table (class = the arm's class) x (category in the arm's categories), over
  the examples for which the class is *reachable* (:func:`linear_models.surrogates.reachable_classes`:
  a system that cannot take that class says nothing about the arm); precision
  P(category | class) and recall P(class | category) with the base rate;
- the test, stratified by relation (the class of a relation-level surrogate is largely a
  property of the relation): Cochran–Mantel–Haenszel (statsmodels ``StratifiedTable``)
  when every expected cell count of the pooled table is at least 5, otherwise a
  permutation test within relations (the categories shuffled inside each relation; the
  statistic is the count of examples in both the class and the categories, the CMH
  numerator, two-sided around its expectation). Fisher's exact test of the pooled table
  is reported beside it. The direction is the Mantel–Haenszel pooled odds ratio (> 1: the
  hypothesis' way);
- an arm is *untestable* when its class is unreachable for every example, or when the
  class or the categories do not vary among the examples that can reach it (the table
  then has an empty row or column: no test can go either way).

All arms of all surrogates at all swept tolerances are read together: the p-values are
Holm-corrected over that family (statsmodels ``multipletests``). An arm is *supported*
when its corrected p is below ``alpha``, the odds ratio exceeds 1 and the surrogate adds
information beyond the trivial baseline (below); *not_beyond_baseline* when the first two
hold but not the third; *contradicted* when the corrected p is below ``alpha`` with an
odds ratio below 1; *inconclusive* otherwise.

Beyond the trivial baseline (:func:`incremental_validity`): a surrogate that restates "the
model already predicts the answer" supports nothing. The baseline is the model's own
log-probability of the gold answer and its first-token greedy margin under the same
prompt. Nested multinomial logits of the category (statsmodels ``MNLogit``) on the
baseline and on the baseline plus the surrogate's class indicators and log residual: the
likelihood-ratio test (Holm-corrected over the family), and the cross-validated macro
one-vs-rest AUROC of both models with a bootstrap interval of the difference. The
surrogate adds information when the corrected likelihood-ratio p is below ``alpha`` and
the cross-validated AUROC difference is positive.

Link to fine-tuning (:func:`fit_epoch_link`): within each category, the Spearman
correlation of a surrogate's per-example value with the epoch at which fine-tuning
first fits the example, with a bootstrap percentile interval (resamples with a constant series
count as no correlation, and when they are more than 5% the interval is not read).

Descriptive statistics kept from the whole table (:func:`hypothesis_test`): the class x
category table, its chi-square (with the smallest expected count, which says whether it
may be read), Cramér's V, Kruskal–Wallis of the residuals across categories, the AUROC of
the residual for Unknown vs Known and a multinomial logit on the system features.

The matrix-free path can label an example with two more values (see
:mod:`linear_models.lstsq`): ``consistent_rank_unknown`` (solutions exist, but whether
they are unique cannot be told) and ``undetermined`` (the solver's budget ended before
consistency was decided). The first counts as "not no_solution" in that arm and is left
out of the other two (whether it is unique is unknown); the second is left out of every
arm and of the chi-square.
"""

from __future__ import annotations

import math

import numpy as np

from linear_models.names import CATEGORIES, CLASSES, EXTRA_LABELS, UNDETERMINED  # noqa: F401


def contingency(classes: list[str], categories: list[str]) -> dict:
    """Counts of class x category: the three classes always, the matrix-free labels when present."""
    unknown = set(classes) - set(CLASSES) - set(EXTRA_LABELS)
    if unknown:
        raise ValueError(f"unknown class labels {sorted(unknown)}")
    table = {cl: {c: 0 for c in CATEGORIES} for cl in CLASSES + tuple(x for x in EXTRA_LABELS if x in classes)}
    for cl, c in zip(classes, categories):
        table[cl][c] += 1
    return table


def chi_square(table: dict) -> dict:
    from scipy import stats

    M = np.array([[table[cl][c] for c in CATEGORIES] for cl in table], dtype=float)
    M = M[M.sum(1) > 0][:, M.sum(0) > 0]
    if M.shape[0] < 2 or M.shape[1] < 2:
        return {"chi2": None, "p": None, "dof": 0, "cramers_v": None,
                "note": "fewer than two non-empty classes or categories: no test"}
    chi2, p, dof, exp = stats.chi2_contingency(M)
    n = M.sum()
    v = math.sqrt(chi2 / (n * (min(M.shape) - 1)))
    out = {"chi2": float(chi2), "p": float(p), "dof": int(dof), "cramers_v": float(v),
           "min_expected": float(exp.min()), "cells_expected_below_5": int((exp < 5).sum()), "cells": int(exp.size)}
    if exp.min() < 5:
        out["note"] = (f"{out['cells_expected_below_5']} of {exp.size} cells expected below 5 (min {exp.min():.2f}): "
                       "the chi-square approximation is not to be read; the per-arm tests use exact methods there")
    return out


def auroc(scores_pos, scores_neg) -> dict:
    """AUROC of ``scores`` for positives vs negatives (ties count half), with the two-sided
    Mann–Whitney p-value."""
    from scipy import stats

    a, b = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if len(a) == 0 or len(b) == 0:
        return {"auroc": None, "p": None}
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {"auroc": float(u.statistic / (len(a) * len(b))), "p": float(u.pvalue)}


def kruskal(residuals, categories) -> dict:
    from scipy import stats

    groups = [np.asarray([r for r, c in zip(residuals, categories) if c == cat], float) for cat in CATEGORIES]
    groups = [g for g in groups if len(g)]
    if len(groups) < 2 or all(np.all(g == groups[0][0]) for g in groups):
        return {"H": None, "p": None, "note": "fewer than two groups, or every residual equal"}
    h, p = stats.kruskal(*groups)
    return {"H": float(h), "p": float(p),
            "median_by_category": {c: float(np.median([r for r, k in zip(residuals, categories) if k == c]))
                                   for c in CATEGORIES if c in categories}}


def multinomial_logit(features: dict[str, list[float]], categories: list[str]) -> dict:
    """MNLogit of the category on standardized features (statsmodels); reports what failed
    (e.g. perfect separation) instead of raising."""
    import statsmodels.api as sm

    names = [k for k, v in features.items() if np.isfinite(np.asarray(v, float)).sum() > 1
             and np.nanstd(np.asarray(v, float)) > 0]
    present = [c for c in CATEGORIES if c in categories]
    if not names or len(present) < 2:
        return {"error": "no varying feature or fewer than two categories"}
    X = np.column_stack([np.asarray(features[k], float) for k in names])
    X = np.where(np.isfinite(X), X, np.nan)
    ok = ~np.isnan(X).any(1)
    X = X[ok]
    X = (X - X.mean(0)) / X.std(0).clip(min=1e-12)
    y = np.array([present.index(c) for c, k in zip(categories, ok) if k])
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.MNLogit(y, sm.add_constant(X, has_constant="add")).fit(disp=0, maxiter=200)
        return {"features": names, "base_category": present[0], "categories": present,
                "llr_p": float(res.llr_pvalue), "pseudo_r2": float(res.prsquared), "nobs": int(res.nobs),
                "params": np.asarray(res.params).tolist(), "pvalues": np.asarray(res.pvalues).tolist(),
                "converged": bool(res.mle_retvals.get("converged", True))}
    except Exception as err:  # statsmodels raises several kinds on separation / singular Hessians
        return {"error": f"{type(err).__name__}: {err}", "features": names}


def hypothesis_test(classes: list[str], residuals: list[float], categories: list[str],
                    features: dict[str, list[float]] | None = None, alpha: float = 0.05) -> dict:
    """The whole-table description of one surrogate at one tolerance (no verdict: the verdict is
    per arm, :func:`evaluate`)."""
    n = len(classes)
    table = contingency(classes, categories)
    counts = {cl: sum(row.values()) for cl, row in table.items()}
    chi = chi_square({cl: row for cl, row in table.items() if cl != UNDETERMINED})
    kw = kruskal(residuals, categories)
    unk = [r for r, c in zip(residuals, categories) if c == "Unknown"]
    kn = [r for r, c in zip(residuals, categories) if c != "Unknown"]
    roc = auroc(unk, kn)
    mnl = multinomial_logit(features or {"residual": residuals}, categories)
    notes = []
    if counts.get(UNDETERMINED):
        notes.append(f"{counts[UNDETERMINED]} of {n} examples undetermined (the matrix-free solver's budget ended "
                     f"before consistency was decided): left out of the tests")
    if counts.get("consistent_rank_unknown"):
        notes.append(f"{counts['consistent_rank_unknown']} of {n} examples consistent_rank_unknown (solutions exist; "
                     f"unique or infinitely many could not be told from the triplets computed)")
    return {"n": n, "alpha": alpha, "class_counts": counts, "table": table, "chi_square": chi, "kruskal": kw,
            "auroc_unknown_vs_known": roc, "multinomial_logit": mnl, "notes": notes}


# ---------------------------------------------------------------------------------------------
# per-arm tests

ARMS = {"no_solution": ("Unknown",), "unique": ("HighlyKnown",), "infinitely_many": ("MaybeKnown", "WeaklyKnown")}
MIN_EXPECTED = 5.0


def _auc(score: np.ndarray, pos: np.ndarray) -> float | None:
    from scipy.stats import rankdata

    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(score)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _permutation_within(x: np.ndarray, y: np.ndarray, strata: np.ndarray, n_perm: int, seed: int) -> dict:
    """Two-sided permutation test of a = sum(x & y) with y shuffled within strata."""
    codes = np.unique(strata, return_inverse=True)[1]
    order = np.argsort(codes, kind="stable")
    xs, ys, cs = x[order], y[order], codes[order]
    expected = 0.0
    for k in np.unique(cs):
        sel = cs == k
        expected += xs[sel].sum() * ys[sel].sum() / sel.sum()
    a = float((xs & ys).sum())
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((n_perm, len(ys))) + cs[None, :], axis=1)
    ap = (xs[None, :] & ys[perm]).sum(1)
    extreme = np.abs(ap - expected) >= abs(a - expected) - 1e-9
    return {"a": a, "expected": expected, "p": float((1 + extreme.sum()) / (n_perm + 1)), "permutations": n_perm}


def arm_test(classes, categories, strata, reachable, arm: str, n_perm: int = 2000, seed: int = 0) -> dict:
    """One arm (``arm``: a class of :data:`ARMS`) over the examples that can reach it. Returns the
    pooled table, precision, recall, base rate, the smallest expected count, the test used and its
    statistic and p-value, Fisher's exact p, the Mantel–Haenszel odds ratio, or ``untestable`` with
    the reason."""
    from scipy import stats

    cats = ARMS[arm]
    keep = [i for i, (cl, rc) in enumerate(zip(classes, reachable)) if arm in rc and cl != UNDETERMINED
            and not (cl == "consistent_rank_unknown" and arm != "no_solution")]
    out = {"arm": arm, "categories": list(cats), "n": len(keep),
           "n_unreachable": sum(arm not in rc for rc in reachable)}
    if not keep:
        return {**out, "status": "untestable", "reason": f"{arm} is unreachable for every example"}
    x = np.array([classes[i] == arm for i in keep])
    y = np.array([categories[i] in cats for i in keep])
    s = np.array([strata[i] for i in keep])
    a, b = int((x & y).sum()), int((x & ~y).sum())
    c, d = int((~x & y).sum()), int((~x & ~y).sum())
    out.update(table={"class_and_category": a, "class_not_category": b, "category_not_class": c, "neither": d},
               precision=a / (a + b) if a + b else None, recall=a / (a + c) if a + c else None,
               base_rate=(a + c) / len(keep))
    if a + b == 0 or c + d == 0:
        return {**out, "status": "untestable",
                "reason": f"no variation: {a + b} of {len(keep)} examples that can reach it are {arm}"}
    if a + c == 0 or b + d == 0:
        return {**out, "status": "untestable",
                "reason": f"no variation: {a + c} of {len(keep)} examples are {'/'.join(cats)}"}
    n = len(keep)
    expected = np.outer([a + b, c + d], [a + c, b + d]) / n
    out["min_expected"] = float(expected.min())
    out["fisher_p"] = float(stats.fisher_exact([[a, b], [c, d]]).pvalue)
    tables = []
    for k in np.unique(s):
        sel = s == k
        t = np.array([[(x & y)[sel].sum(), (x & ~y)[sel].sum()], [(~x & y)[sel].sum(), (~x & ~y)[sel].sum()]], float)
        if t.sum() >= 2 and t.sum(0).min() > 0 and t.sum(1).min() > 0:
            tables.append(t)
    out["informative_strata"] = len(tables)
    out["strata"] = int(len(np.unique(s)))
    if not tables:
        return {**out, "status": "untestable",
                "reason": "within every relation the class or the categories do not vary: no stratified test"}
    from statsmodels.stats.contingency_tables import StratifiedTable

    st = StratifiedTable(tables)
    with np.errstate(divide="ignore", invalid="ignore"):
        orr = float(st.oddsratio_pooled)
    out["odds_ratio_mh"] = orr if np.isfinite(orr) else (None if np.isnan(orr) else orr)
    perm = None
    if out["min_expected"] < MIN_EXPECTED:
        perm = _permutation_within(x, y, s, n_perm, seed)
        out.update(method="permutation within relations", statistic=perm["a"], expected_statistic=perm["expected"],
                   p=perm["p"], permutations=perm["permutations"])
        direction = np.sign(perm["a"] - perm["expected"])
    else:
        r = st.test_null_odds(correction=True)
        out.update(method="Cochran-Mantel-Haenszel", statistic=float(r.statistic), p=float(r.pvalue))
        direction = np.sign(orr - 1) if np.isfinite(orr) else np.sign(
            sum(t[0, 0] - t[0].sum() * t[:, 0].sum() / t.sum() for t in tables))
    out["direction"] = int(direction)
    return {**out, "status": "testable"}


def holm(pvalues: list[float]) -> list[float]:
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return []
    return [float(p) for p in multipletests(pvalues, method="holm")[1]]


def arm_verdict(t: dict, p_holm: float | None, adds_information: bool | None, alpha: float) -> tuple[str, str]:
    """(verdict, the statistic it rests on) for one arm test."""
    if t["status"] != "testable":
        return "untestable", t["reason"]
    stat = (f"{t['method']}: statistic {t['statistic']:.3g}, p {t['p']:.3g}, Holm p {p_holm:.3g}, "
            f"MH odds ratio {_fmt(t.get('odds_ratio_mh'))}, Fisher p {t['fisher_p']:.3g}, precision "
            f"{_fmt(t['precision'])}, recall {_fmt(t['recall'])} (base rate {t['base_rate']:.3g}, n {t['n']})")
    if p_holm >= alpha:
        return "inconclusive", stat
    if t["direction"] < 0:
        return "contradicted", stat
    if t["direction"] > 0 and adds_information:
        return "supported", stat
    if t["direction"] > 0:
        return "not_beyond_baseline", stat + "; the surrogate adds nothing beyond log-probability and margin"
    return "inconclusive", stat


def overall_verdict(arms: dict) -> str:
    v = [a["verdict"] for a in arms.values()]
    if "supported" in v and "contradicted" not in v:
        return "supported"
    if "contradicted" in v and "supported" not in v:
        return "contradicted"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------
# incremental validity over the trivial baseline


def _standardize(X: np.ndarray) -> np.ndarray:
    return (X - X.mean(0)) / X.std(0).clip(min=1e-12)


def _mnlogit(y, X, start=None):
    """MNLogit by Newton's method (BFGS when Newton fails), from ``start`` when given (the nested
    baseline's parameters, zeros for the added features: the full model then never ends below it)."""
    import warnings

    import statsmodels.api as sm

    model = sm.MNLogit(y, sm.add_constant(X, has_constant="add"))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            res = model.fit(method="newton", maxiter=100, disp=0, start_params=start)
            if not np.isfinite(res.llf):
                raise ValueError("non-finite log-likelihood")
        except Exception:
            res = model.fit(method="bfgs", maxiter=2000, disp=0, start_params=start)
    return res


def _nested_start(res_base, n_added: int) -> np.ndarray:
    P = np.asarray(res_base.params)  # [k_exog, K-1]
    return np.vstack([P, np.zeros((n_added, P.shape[1]))]).ravel(order="F")


def _predict(res, X):
    """Class probabilities by a stable softmax of the linear predictors (the base category's is 0)."""
    import statsmodels.api as sm
    from scipy.special import softmax

    Z = sm.add_constant(X, has_constant="add") @ np.asarray(res.params)
    P = softmax(np.column_stack([np.zeros(len(Z)), Z]), axis=1)
    if not np.isfinite(P).all():
        raise ValueError("non-finite predicted probabilities (diverging coefficients: separation)")
    return P


def _macro_auc(P: np.ndarray, y: np.ndarray) -> float | None:
    aucs = [_auc(P[:, k], y == k) for k in range(P.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def class_features(classes: list[str], residuals: list[float]) -> dict[str, list[float]]:
    """The surrogate's class (indicators, the most frequent class as reference) and log10 residual."""
    out = {"log_residual": [float(np.log10(max(r, 1e-12))) if r is not None and np.isfinite(r) else np.nan
                            for r in residuals]}
    present = sorted(set(classes), key=classes.count, reverse=True)
    for cl in present[1:]:
        out[f"class={cl}"] = [float(c == cl) for c in classes]
    return out


def incremental_validity(categories: list[str], baseline: dict[str, list[float]], extra: dict[str, list[float]],
                         folds: int = 5, seed: int = 0, n_boot: int = 500) -> dict:
    """Does ``extra`` predict the category beyond ``baseline``? Nested MNLogit likelihood-ratio test
    and cross-validated macro one-vs-rest AUROC of both models (stratified folds, the same for both),
    with a bootstrap percentile interval of the AUROC difference over the out-of-fold predictions."""
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _incremental_validity(categories, baseline, extra, folds, seed, n_boot)


def _incremental_validity(categories, baseline, extra, folds, seed, n_boot) -> dict:
    from scipy import stats

    present = [c for c in CATEGORIES if c in categories]
    Xb = np.column_stack([np.asarray(v, float) for v in baseline.values()])
    ex = {k: np.asarray(v, float) for k, v in extra.items()}
    ok = np.isfinite(Xb).all(1)
    for v in ex.values():
        ok &= np.isfinite(v)
    ex = {k: v for k, v in ex.items() if np.nanstd(v[ok]) > 0}
    out = {"baseline": list(baseline), "added": list(ex), "n": int(ok.sum()), "categories": present}
    if len(present) < 2 or not ex or ok.sum() < 10:
        return {**out, "error": "fewer than two categories, no varying surrogate feature or fewer than 10 examples"}
    y = np.array([present.index(c) for c in categories])[ok]
    Xb = _standardize(Xb[ok])
    Xf = np.column_stack([Xb, _standardize(np.column_stack(list(ex.values()))[ok])])
    try:
        rb = _mnlogit(y, Xb)
        rf = _mnlogit(y, Xf, _nested_start(rb, Xf.shape[1] - Xb.shape[1]))
    except Exception as err:  # statsmodels raises several kinds on separation / singular Hessians
        return {**out, "error": f"{type(err).__name__}: {err}"}
    lr = max(0.0, 2 * (rf.llf - rb.llf))
    dof = (len(present) - 1) * len(ex)
    out.update(llf_baseline=float(rb.llf), llf_full=float(rf.llf), lr=float(lr), dof=int(dof),
               p=float(stats.chi2.sf(lr, dof)), pseudo_r2_baseline=float(rb.prsquared),
               pseudo_r2_full=float(rf.prsquared))
    if folds < 2:
        return out
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for k in range(len(present)):
        idx = np.flatnonzero(y == k)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    Pb, Pf = np.zeros((len(y), len(present))), np.zeros((len(y), len(present)))
    try:
        for f in range(folds):
            tr, te = fold != f, fold == f
            if len(np.unique(y[tr])) < len(present) or not te.any():
                raise ValueError("a fold lacks a category")
            fb = _mnlogit(y[tr], Xb[tr])
            Pb[te] = _predict(fb, Xb[te])
            Pf[te] = _predict(_mnlogit(y[tr], Xf[tr], _nested_start(fb, Xf.shape[1] - Xb.shape[1])), Xf[te])
    except Exception as err:
        return {**out, "cv_error": f"{type(err).__name__}: {err}"}
    ab, af = _macro_auc(Pb, y), _macro_auc(Pf, y)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        a1, a0 = _macro_auc(Pf[i], y[i]), _macro_auc(Pb[i], y[i])
        if a1 is not None and a0 is not None:
            diffs.append(a1 - a0)
    unk = present.index("Unknown") if "Unknown" in present else None
    out.update(folds=folds, cv_auroc_baseline=ab, cv_auroc_full=af, cv_auroc_difference=af - ab,
               cv_auroc_difference_ci=[float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
               if diffs else None, bootstrap=len(diffs),
               cv_auroc_unknown_baseline=_auc(Pb[:, unk], y == unk) if unk is not None else None,
               cv_auroc_unknown_full=_auc(Pf[:, unk], y == unk) if unk is not None else None)
    return out


# ---------------------------------------------------------------------------------------------
# fine-tuning link


def fit_epoch_link(values: list[float], epochs: list[float], categories: list[str], n_boot: int = 1000,
                   seed: int = 0, max_degenerate: float = 0.05) -> dict:
    """Within each category: Spearman's rho of ``values`` with the fitted epoch, its p-value and a
    bootstrap percentile 95% interval over the category's examples.

    A resample whose values or epochs are all equal has no rank correlation. Such resamples are not
    dropped (keeping only the resamples that happen to vary selects them, and gave intervals narrower
    than the data allow when most examples of a category are fitted at the same epoch): they count as
    rho = 0, their share is reported as ``degenerate_share``, and when it exceeds ``max_degenerate`` the
    interval is not read. ``decision``: "holds" when the interval lies above 0 (the hypothesis' way: a
    larger value, a later fit), "contradicted" when it lies below 0, "unclear" otherwise; ``holds`` is
    True, False or None accordingly."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    out = {}
    for cat in CATEGORIES:
        idx = [i for i, c in enumerate(categories) if c == cat and values[i] is not None and np.isfinite(values[i])
               and epochs[i] is not None]
        v, e = np.asarray([values[i] for i in idx], float), np.asarray([epochs[i] for i in idx], float)
        rec = {"n": len(idx)}
        if len(idx) < 5 or np.all(v == v[0]) or np.all(e == e[0]):
            out[cat] = {**rec, "rho": None, "p": None, "ci": None, "holds": None, "decision": "unclear",
                        "degenerate_share": None, "note": "fewer than 5 examples, or a constant series: undefined"}
            continue
        r = stats.spearmanr(v, e)
        boots, degenerate = np.zeros(n_boot), 0
        for b in range(n_boot):
            i = rng.integers(0, len(v), len(v))
            if np.all(v[i] == v[i][0]) or np.all(e[i] == e[i][0]):
                degenerate += 1
                continue
            boots[b] = stats.spearmanr(v[i], e[i]).statistic
        ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if n_boot else None
        share = degenerate / n_boot if n_boot else None
        rec.update(rho=float(r.statistic), p=float(r.pvalue), ci=ci, degenerate_share=share)
        if ci is None or share > max_degenerate:
            out[cat] = {**rec, "holds": None, "decision": "unclear",
                        **({"note": f"{100 * share:.0f}% of resamples have a constant series (more than "
                                    f"{100 * max_degenerate:.0f}%): the interval is not read"} if ci else {})}
            continue
        decision = "holds" if ci[0] > 0 else "contradicted" if ci[1] < 0 else "unclear"
        out[cat] = {**rec, "holds": {"holds": True, "contradicted": False}.get(decision), "decision": decision}
    return out


# ---------------------------------------------------------------------------------------------
# the family: every surrogate, every tolerance, every arm, read together


def evaluate(rows_by_name: dict[str, list[dict]], baseline: dict[str, dict] | None, fit_epochs: dict | None,
             default_key: str = "default", alpha: float = 0.05, n_perm: int = 2000, folds: int = 5,
             n_boot: int = 500, seed: int = 0, link_fields=("residual",)) -> dict:
    """All the tests of the hypothesis for every surrogate. ``rows_by_name[name]``: per example ``class``,
    ``residual``, ``category``, ``relation``, ``reachable`` (at the default tolerance), ``sweep``
    ({tol: class}) and optionally ``sweep_reachable`` ({tol: classes}). ``baseline[id]``:
    ``logprob`` and ``first_token_margin`` of the gold answer under the same prompt. ``fit_epochs``:
    {"variant", "epochs": {id: epoch}} or None. Returns per surrogate: ``at_default`` (the whole-table
    description, ``arms`` and ``verdict``), ``sweep`` (per tolerance the same), ``incremental_validity``
    (at the default tolerance and per swept one) and ``fit_epoch_link``."""
    settings = {}  # (name, tol) -> (classes, reachable)
    for name, rows in rows_by_name.items():
        settings[(name, default_key)] = ([r["class"] for r in rows], [r.get("reachable") or CLASSES for r in rows])
        keys = [set(r.get("sweep") or {}) for r in rows]
        common = set.intersection(*keys) if keys else set()
        for tol in sorted(common, key=float):
            settings[(name, tol)] = ([r["sweep"][tol] for r in rows],
                                     [(r.get("sweep_reachable") or {}).get(tol) or r.get("reachable") or CLASSES
                                      for r in rows])
    # incremental validity per setting
    inc = {}
    for (name, tol), (classes, _) in settings.items():
        rows = rows_by_name[name]
        if not baseline:
            inc[(name, tol)] = {"error": "no baseline scores"}
            continue
        ids = [r["id"] for r in rows]
        base = {"logprob": [baseline.get(i, {}).get("logprob", np.nan) for i in ids],
                "first_token_margin": [baseline.get(i, {}).get("first_token_margin", np.nan) for i in ids]}
        # cross-validated at every tolerance, not only the default: a swept tolerance's "supported" passes
        # the same test as the default's (the likelihood-ratio test alone called swept settings supported
        # whose cross-validated gain was nil)
        inc[(name, tol)] = incremental_validity([r["category"] for r in rows], base,
                                                class_features(classes, [r["residual"] for r in rows]),
                                                folds=folds, seed=seed, n_boot=n_boot)
    lr_keys = [k for k, v in inc.items() if v.get("p") is not None]
    for k, p in zip(lr_keys, holm([inc[k]["p"] for k in lr_keys])):
        inc[k]["p_holm"] = p
    for k, v in inc.items():
        # the cross-validated gain must be positive with its bootstrap interval above 0, not only on average
        diff, ci = v.get("cv_auroc_difference"), v.get("cv_auroc_difference_ci")
        cv_gain = diff is None or (ci[0] > 0 if ci else diff > 0)
        v["adds_information"] = bool(v.get("p_holm") is not None and v["p_holm"] < alpha and cv_gain) \
            if "p" in v else None
    # arms
    arm_tests = {}
    for (name, tol), (classes, reach) in settings.items():
        rows = rows_by_name[name]
        for arm in ARMS:
            arm_tests[(name, tol, arm)] = arm_test(classes, [r["category"] for r in rows],
                                                   [r.get("relation") or "" for r in rows], reach, arm, n_perm, seed)
    testable = [k for k, t in arm_tests.items() if t["status"] == "testable"]
    adj = dict(zip(testable, holm([arm_tests[k]["p"] for k in testable])))
    out = {}
    for name, rows in rows_by_name.items():
        cats = [r["category"] for r in rows]
        res = {}
        for (nm, tol), (classes, reach) in settings.items():
            if nm != name:
                continue
            arms = {}
            iv = inc[(name, tol)]
            for arm in ARMS:
                t = arm_tests[(name, tol, arm)]
                t["p_holm"] = adj.get((name, tol, arm))
                t["verdict"], t["because"] = arm_verdict(t, t["p_holm"], iv.get("adds_information"), alpha)
                arms[arm] = t
            desc = hypothesis_test(classes, [r["residual"] for r in rows], cats, None if tol != default_key else
                                   _system_features(rows), alpha)
            verdict = overall_verdict(arms)
            reasons = [f"arm {arm} <-> {'/'.join(ARMS[arm])}: {t['verdict']} ({t['because']})" for arm, t in arms.items()]
            if iv.get("p") is not None:
                reasons.append(f"beyond log-probability and first-token margin: LR {iv['lr']:.3g} (dof {iv['dof']}), "
                               f"p {iv['p']:.3g}, Holm p {iv.get('p_holm', float('nan')):.3g}"
                               + (f", CV macro AUROC {iv['cv_auroc_baseline']:.3f} -> {iv['cv_auroc_full']:.3f} "
                                  f"(difference CI {_fmt(iv['cv_auroc_difference_ci'][0])} to "
                                  f"{_fmt(iv['cv_auroc_difference_ci'][1])})"
                                  if iv.get("cv_auroc_difference_ci") else "")
                               + f": {'adds information' if iv['adds_information'] else 'adds no information'}")
            elif iv.get("error"):
                reasons.append(f"incremental validity not computed: {iv['error']}")
            reasons += desc.pop("notes")
            res[tol] = {**desc, "arms": arms, "verdict": verdict, "reasons": reasons, "incremental_validity": iv}
        link = None
        if fit_epochs and fit_epochs.get("epochs"):
            ep = fit_epochs["epochs"]
            sub = [r for r in rows if r["id"] in ep]
            link = {"variant": fit_epochs.get("variant"), "n_epochs": fit_epochs.get("n_epochs"),
                    "never_fitted_as": fit_epochs.get("never_fitted_as"), "n": len(sub),
                    "fields": {f: fit_epoch_link([r.get(f) for r in sub], [ep[r["id"]] for r in sub],
                                                 [r["category"] for r in sub], n_boot=n_boot, seed=seed)
                               for f in (link_fields.get(name, ("residual",)) if isinstance(link_fields, dict)
                                         else link_fields) if any(r.get(f) is not None for r in sub)}}
        d = res.pop(default_key)
        out[name] = {"at_default": d, "sweep": res, "fit_epoch_link": link}
        keys = [set(r.get("sweep") or {}) for r in rows]
        if keys and set.union(*keys) != set.intersection(*keys):
            out[name]["sweep_left_out"] = sorted(set.union(*keys) - set.intersection(*keys), key=float)
    correct_link_family([out[n]["fit_epoch_link"] for n in out], alpha=alpha)
    return out


def correct_link_family(links: list[dict | None], alpha: float = 0.05) -> None:
    """Holm over every (surrogate, value, category) correlation of the fit-epoch link read together (tens of
    them: a few intervals above 0 are expected by chance alone). Adds ``p_holm`` to each and keeps
    "holds" / "contradicted" only where the corrected p is below ``alpha`` too; the others become
    "unclear" with the reason. In place."""
    cells = [v for link in links if link for per in link["fields"].values() for v in per.values()
             if v.get("p") is not None]
    for v, ph in zip(cells, holm([v["p"] for v in cells])):
        v["p_holm"] = ph
        if v["decision"] in ("holds", "contradicted") and not ph < alpha:
            v.update(decision="unclear", holds=None,
                     note=f"interval excludes 0 but Holm p {ph:.3g} over the {len(cells)} correlations read together")
    for link in links:
        if link:
            link["family_size"] = len(cells)


def _system_features(rows) -> dict[str, list[float]]:
    def f(r, k):
        v = r.get(k)
        return float(v) if v is not None else np.nan

    return {"log_residual": [float(np.log10(max(f(r, "residual"), 1e-12))) for r in rows],
            "rank_share": [f(r, "rank") / max(1, r.get("n_unknowns") or 1) for r in rows],
            "log_cond": [float(np.log10(min(max(f(r, "cond_kept"), 1.0), 1e300))) for r in rows],
            "effective_rank_share": [f(r, "effective_rank") / max(1, r.get("n_unknowns") or 1) for r in rows]}


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def format_verdict(name: str, t: dict, link: dict | None = None) -> str:
    lines = [f"surrogate {name}: {t['verdict'].upper()} (n = {t['n']}, alpha = {t['alpha']})"]
    lines += [f"  {r}" for r in t["reasons"]]
    lines.append(f"  {'class':<24}" + "".join(f"{c[:2]:>7}" for c in CATEGORIES))
    for cl, row in t["table"].items():
        lines.append(f"  {cl:<24}" + "".join(f"{row[c]:>7}" for c in CATEGORIES))
    chi = t["chi_square"]
    if chi.get("chi2") is not None:
        lines.append(f"  chi2 {chi['chi2']:.1f} (dof {chi['dof']}), p {chi['p']:.3g}, Cramér's V {chi['cramers_v']:.3f}, "
                     f"min expected {chi['min_expected']:.2f}")
    kw = t["kruskal"]
    if kw.get("H") is not None:
        lines.append(f"  Kruskal-Wallis on residuals: H {kw['H']:.1f}, p {kw['p']:.3g}; medians "
                     + ", ".join(f"{c[:2]} {v:.3g}" for c, v in kw["median_by_category"].items()))
    if link:
        for f, per in link["fields"].items():
            lines.append(f"  fit-epoch link ({f}, Spearman with the epoch first fitted): " + "; ".join(
                f"{c[:2]} {_fmt(v.get('rho'))}" + (f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v.get("ci") else "")
                + f" {v.get('decision', 'unclear')}" for c, v in per.items()))
    return "\n".join(lines)
