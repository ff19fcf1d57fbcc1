"""The statistical test of the Ax=b hypothesis for one surrogate.

Hypothesis: no solution <-> Unknown, a unique solution <-> HighlyKnown,
infinitely many <-> MaybeKnown / WeaklyKnown. Given each example's class, its
relative residual and other system features, and its SliCK category:

- the contingency table class x category, the chi-square test of independence
  (scipy) and Cramér's V;
- Kruskal–Wallis of the residuals across the four categories;
- AUROC of the residual for Unknown against Known (HighlyKnown, MaybeKnown,
  WeaklyKnown), from the Mann–Whitney U statistic, with its p-value;
- a multinomial logit of the category on the features (statsmodels MNLogit);
- the verdict at ``alpha``:
  *supported* when the association is significant (chi-square) and goes the
  hypothesis' way: Unknown examples have larger residuals (AUROC > 0.5,
  significant) and fall in ``no_solution`` more often than Known ones;
  *contradicted* when it is significant the other way; *inconclusive*
  otherwise, and always when the surrogate puts (almost) every example in one
  class (``degenerate_share``): then the table cannot carry the hypothesis, and
  the verdict says so with the class counts.

The matrix-free path can label an example with two more values (see
:mod:`linear_models.lstsq`): ``consistent_rank_unknown`` (solutions exist, but
whether they are unique cannot be told from the triplets computed) and
``undetermined`` (the solver's budget ended before consistency was decided). The
first is a row of the table and enters the tests as a class of its own; the second
is shown in the table but left out of the chi-square test and of the no-solution
shares (it is a limit of the solver, not a property of the system), and the verdict
says how many there were.
"""

from __future__ import annotations

import math

import numpy as np

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
CLASSES = ("no_solution", "unique", "infinitely_many")
EXTRA_LABELS = ("consistent_rank_unknown", "undetermined")  # matrix-free only
UNDETERMINED = "undetermined"


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
    chi2, p, dof, _ = stats.chi2_contingency(M)
    n = M.sum()
    v = math.sqrt(chi2 / (n * (min(M.shape) - 1)))
    return {"chi2": float(chi2), "p": float(p), "dof": int(dof), "cramers_v": float(v)}


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

    names = [k for k, v in features.items() if np.nanstd(np.asarray(v, float)) > 0]
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
                    features: dict[str, list[float]] | None = None, alpha: float = 0.05,
                    degenerate_share: float = 0.95) -> dict:
    n = len(classes)
    table = contingency(classes, categories)
    counts = {cl: sum(row.values()) for cl, row in table.items()}
    chi = chi_square({cl: row for cl, row in table.items() if cl != UNDETERMINED})
    kw = kruskal(residuals, categories)
    unk = [r for r, c in zip(residuals, categories) if c == "Unknown"]
    kn = [r for r, c in zip(residuals, categories) if c != "Unknown"]
    roc = auroc(unk, kn)
    mnl = multinomial_logit(features or {"residual": residuals}, categories)
    # no-solution shares among the examples whose consistency was decided
    decided = [(cl, c) for cl, c in zip(classes, categories) if cl != UNDETERMINED]
    n_unk = sum(c == "Unknown" for _, c in decided)
    n_kn = len(decided) - n_unk
    ns_unk = sum(cl == "no_solution" and c == "Unknown" for cl, c in decided) / n_unk if n_unk else None
    ns_kn = sum(cl == "no_solution" and c != "Unknown" for cl, c in decided) / n_kn if n_kn else None
    top = max(counts.values()) / n if n else 1.0
    reasons = []
    if top >= degenerate_share:
        cl = max(counts, key=counts.get)
        verdict = "inconclusive"
        reasons.append(f"degenerate: {top:.1%} of examples are in class {cl} ({counts}); "
                       f"the class cannot separate the categories at this tolerance")
    else:
        sig = chi["p"] is not None and chi["p"] < alpha
        roc_sig = roc["p"] is not None and roc["p"] < alpha
        pro = roc["auroc"] is not None and roc["auroc"] > 0.5 and ns_unk is not None and ns_kn is not None \
            and ns_unk > ns_kn
        con = roc["auroc"] is not None and roc["auroc"] < 0.5 and ns_unk is not None and ns_kn is not None \
            and ns_unk < ns_kn
        if sig and roc_sig and pro:
            verdict = "supported"
        elif sig and roc_sig and con:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        reasons.append(f"chi-square p = {_fmt(chi['p'])}, AUROC(residual, Unknown vs Known) = {_fmt(roc['auroc'])} "
                       f"(p = {_fmt(roc['p'])}), no_solution share: Unknown {_fmt(ns_unk)} vs Known {_fmt(ns_kn)}")
    if counts.get(UNDETERMINED):
        reasons.append(f"{counts[UNDETERMINED]} of {n} examples undetermined (the matrix-free solver's budget ended "
                       f"before consistency was decided): left out of the chi-square test and the no-solution shares")
    if counts.get("consistent_rank_unknown"):
        reasons.append(f"{counts['consistent_rank_unknown']} of {n} examples consistent_rank_unknown (solutions exist; "
                       f"unique or infinitely many could not be told from the triplets computed)")
    return {"n": n, "alpha": alpha, "class_counts": counts, "table": table, "chi_square": chi, "kruskal": kw,
            "auroc_unknown_vs_known": roc, "no_solution_share": {"Unknown": ns_unk, "Known": ns_kn},
            "multinomial_logit": mnl, "verdict": verdict, "reasons": reasons}


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def format_verdict(name: str, t: dict) -> str:
    lines = [f"surrogate {name}: {t['verdict'].upper()} (n = {t['n']}, alpha = {t['alpha']})"]
    lines += [f"  {r}" for r in t["reasons"]]
    lines.append(f"  {'class':<16}" + "".join(f"{c[:2]:>7}" for c in CATEGORIES))
    for cl, row in t["table"].items():
        lines.append(f"  {cl:<16}" + "".join(f"{row[c]:>7}" for c in CATEGORIES))
    chi = t["chi_square"]
    if chi.get("chi2") is not None:
        lines.append(f"  chi2 {chi['chi2']:.1f} (dof {chi['dof']}), p {chi['p']:.3g}, Cramér's V {chi['cramers_v']:.3f}")
    kw = t["kruskal"]
    if kw.get("H") is not None:
        lines.append(f"  Kruskal-Wallis on residuals: H {kw['H']:.1f}, p {kw['p']:.3g}; medians "
                     + ", ".join(f"{c[:2]} {v:.3g}" for c, v in kw["median_by_category"].items()))
    return "\n".join(lines)
