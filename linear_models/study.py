"""Statistics of the fine-tuning study (Gekhman et al. 2024, section 4 and appendix I).

Pure functions over the per-epoch measurements that :mod:`knowcat.finetune` writes.

The paper's linear model, fitted by ordinary least squares over every
(variant, epoch) point::

    Accuracy = b0 + b_kn * N_kn / |D| + b_unk * N_unk / |D|

with N_kn and N_unk the numbers of Known and Unknown training examples fitted at
that epoch and Accuracy the test accuracy in percent (the paper: in-distribution
b0 36.9, b_kn 7.3, b_unk -8.3, R^2 0.86: ``PAPER_LINEAR_MODEL``). Significance of
EARLY_STOP against CONVERGENCE: the test set is split at random into 100 parts, each
part's accuracy is measured at both stops, and a paired t-test compares them.

Honest uncertainty. The (variant, epoch) points of one fine-tuning run are not
independent (the epochs of a run are serially correlated, and the sets share
examples), so the linear model's coefficients keep their OLS values and R^2 but
their standard errors, intervals and p-values are also given clustered by
fine-tuning run (statsmodels' cluster-robust covariance, t with G - 1 degrees of
freedom) and from a wild cluster bootstrap restricted under the null (WCR; Webb's
six-point weights by default, since the runs are few; intervals by test
inversion). Every finding carries an interval from resampling the test questions
(and the training examples where it compares categories) and a decision taken on
that interval (:func:`decide`): "holds" when the interval lies on the claimed side,
"does not hold" when it lies on the other side (or on the boundary), "unclear"
otherwise. Across replicates (:func:`across_replicates`) a finding holds only when
it holds in every replicate.
"""

from __future__ import annotations

import itertools

import numpy as np

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
PAPER_LINEAR_MODEL = {
    "in_distribution": {"b0": 36.9, "b_kn": 7.3, "b_unk": -8.3, "r2": 0.86},
    "ood": {"b0": 36.2, "b_kn": 3.2, "b_unk": -3.0, "r2": 0.95},
}
# Table 2 of the paper: test accuracy (Full / HighlyKnown / MaybeKnown / WeaklyKnown / Unknown)
PAPER_TABLE2 = {
    "early_stop": {"HighlyKnown": (40.5, 98.7, 60.1, 9.0, 0.6), "MaybeKnown": (43.6, 98.4, 69.9, 12.1, 1.0),
                   "WeaklyKnown": (39.2, 95.0, 59.2, 8.6, 0.4), "Unknown": (37.5, 95.6, 52.9, 6.5, 0.6),
                   "natural": (43.5, 98.0, 67.6, 14.1, 1.8)},
    "convergence": {"HighlyKnown": (40.0, 98.4, 58.8, 8.5, 0.7), "MaybeKnown": (43.2, 97.5, 68.2, 12.9, 1.3),
                    "WeaklyKnown": (35.4, 73.5, 55.8, 17.2, 2.2), "Unknown": (25.8, 55.8, 36.6, 12.2, 3.2),
                    "natural": (41.8, 95.5, 61.7, 14.8, 2.5)},
}



KNOWN = ("HighlyKnown", "MaybeKnown", "WeaklyKnown")
DECISIONS = ("holds", "does not hold", "unclear")
COEFS = ("b0", "b_kn", "b_unk")


def _design(n_known_fitted, n_unknown_fitted, size, n) -> np.ndarray:
    size = np.broadcast_to(np.asarray(size, dtype=float), (n,))
    X = np.column_stack([np.asarray(n_known_fitted, float) / size, np.asarray(n_unknown_fitted, float) / size])
    return np.column_stack([np.ones(n), X])


def fit_linear_model(accuracy, n_known_fitted, n_unknown_fitted, size, groups=None, n_boot: int = 9999,
                     weights: str = "webb", seed: int = 0, level: float = 0.95) -> dict:
    """OLS of ``accuracy`` on N_kn/|D| and N_unk/|D| (statsmodels), with standard errors,
    95% confidence intervals, p-values and R^2 as if the points were independent (``bse``,
    ``conf_int_95``, ``pvalues``); with ``groups`` (the fine-tuning run of each point) also
    ``cluster`` (cluster-robust covariance, t with G - 1 df) and ``wild_bootstrap`` (WCR
    p-values and test-inversion intervals), and ``inference`` saying which is which."""
    import statsmodels.api as sm

    y = np.asarray(accuracy, dtype=float)
    if len(y) < 4:
        raise ValueError(f"the linear model needs at least 4 (variant, epoch) points, got {len(y)}")
    X = _design(n_known_fitted, n_unknown_fitted, size, len(y))
    res = sm.OLS(y, X).fit()
    ci = np.asarray(res.conf_int(1 - level))
    out = {
        "params": dict(zip(COEFS, map(float, res.params))),
        "bse": dict(zip(COEFS, map(float, res.bse))),
        "conf_int_95": {n: [float(a), float(b)] for n, (a, b) in zip(COEFS, ci)},
        "pvalues": dict(zip(COEFS, map(float, res.pvalues))),
        "r2": float(res.rsquared),
        "r2_adj": float(res.rsquared_adj),
        "nobs": int(res.nobs),
        "rank": int(np.linalg.matrix_rank(X[:, 1:] - X[:, 1:].mean(0))) if len(y) > 1 else 0,
        "inference": "plain OLS (points independent)",
    }
    if groups is None:
        return out
    codes, labels = _codes(groups)
    G = len(labels)
    out["n_clusters"] = G
    if G < 3:
        out["cluster"] = out["wild_bootstrap"] = None
        out["inference_note"] = f"{G} fine-tuning run(s): too few to cluster; only the plain OLS inference"
        return out
    rc = sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": codes}, use_t=True)
    cci = np.asarray(rc.conf_int(1 - level))
    out["cluster"] = {"bse": dict(zip(COEFS, map(float, rc.bse))),
                      "conf_int_95": {n: [float(a), float(b)] for n, (a, b) in zip(COEFS, cci)},
                      "pvalues": dict(zip(COEFS, map(float, rc.pvalues))), "df": G - 1}
    wb = {"weights": weights, "n_boot": n_boot, "seed": seed, "pvalues": {}, "conf_int_95": {}}
    W = cluster_weights(G, n_boot, weights, seed)
    wb["n_boot"] = W.shape[0]
    for j, name in enumerate(COEFS):
        wb["pvalues"][name] = wild_cluster_pvalue(y, X, codes, j, 0.0, W)
        wb["conf_int_95"][name] = wild_cluster_interval(y, X, codes, j, W, level,
                                                        start=(float(rc.params[j]), float(rc.bse[j])))
    out["wild_bootstrap"] = wb
    out["inference"] = (f"OLS coefficients and R^2; standard errors, intervals and p-values clustered by "
                        f"fine-tuning run ({G} runs: cluster-robust, t with {G - 1} df) and from a wild cluster "
                        f"bootstrap restricted under the null ({weights} weights, {wb['n_boot']} draws); "
                        f"'bse', 'conf_int_95' and 'pvalues' at the top level treat the points as independent")
    return out


def _codes(groups) -> tuple[np.ndarray, list]:
    keys = [g if isinstance(g, (str, int)) else str(g) for g in groups]
    labels = sorted(set(keys), key=str)
    index = {k: i for i, k in enumerate(labels)}
    return np.array([index[k] for k in keys]), labels


def cluster_weights(n_clusters: int, n_boot: int = 9999, kind: str = "webb", seed: int = 0) -> np.ndarray:
    """(draws, clusters) bootstrap weights. Rademacher (+-1): every one of the 2^G sign vectors
    when that is no more than ``n_boot`` (the exact distribution), else random draws; Webb's
    six-point distribution (+-sqrt(1/2), +-1, +-sqrt(3/2)): random draws."""
    rng = np.random.default_rng(seed)
    if kind == "rademacher":
        if 2 ** n_clusters <= n_boot:
            return np.array(list(itertools.product((-1.0, 1.0), repeat=n_clusters)))
        return rng.choice((-1.0, 1.0), size=(n_boot, n_clusters))
    if kind == "webb":
        pts = np.sqrt(np.array([0.5, 1.0, 1.5]))
        return rng.choice(np.concatenate([-pts, pts]), size=(n_boot, n_clusters))
    raise ValueError(f"unknown bootstrap weights {kind!r}: 'webb' or 'rademacher'")


def _cluster_t(X, Y, codes, j, value) -> np.ndarray:
    """The cluster-robust t statistic of coefficient ``j`` against ``value``, for every column of ``Y``."""
    n, k = X.shape
    G = int(codes.max()) + 1
    XtX_inv = np.linalg.pinv(X.T @ X)
    beta = XtX_inv @ (X.T @ Y)
    E = Y - X @ beta
    a = (XtX_inv[j] @ X.T)[:, None]  # beta_j = a' y
    M = np.zeros((G, n))
    M[codes, np.arange(n)] = 1.0
    S = M @ (a * E)
    var = G / (G - 1) * (n - 1) / (n - k) * (S ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (beta[j] - value) / np.sqrt(var)


def wild_cluster_pvalue(y, X, codes, j: int, value: float, W: np.ndarray) -> float | None:
    """Two-sided p-value of H0: coefficient ``j`` = ``value`` from the wild cluster bootstrap
    restricted under H0 (WCR): the model is fitted with the coefficient fixed at ``value``, its
    residuals are multiplied by one weight per cluster (rows of ``W``) and the cluster-robust t
    of each bootstrap sample is compared with the observed one."""
    y = np.asarray(y, float)
    others = [i for i in range(X.shape[1]) if i != j]
    yt = y - value * X[:, j]
    Xr = X[:, others]
    br = np.linalg.lstsq(Xr, yt, rcond=None)[0]
    fit_r = Xr @ br + value * X[:, j]
    u = y - fit_r
    t0 = _cluster_t(X, y[:, None], codes, j, value)[0]
    if not np.isfinite(t0):
        return None
    Ystar = fit_r[:, None] + u[:, None] * W[:, codes].T
    tb = _cluster_t(X, Ystar, codes, j, value)
    tb = tb[np.isfinite(tb)]
    if len(tb) == 0:
        return None
    return float(np.mean(np.abs(tb) >= np.abs(t0) - 1e-12))


def wild_cluster_interval(y, X, codes, j: int, W: np.ndarray, level: float = 0.95, start=None,
                          tol: float = 1e-3) -> list | None:
    """The values of coefficient ``j`` that the WCR test does not reject at ``1 - level``,
    found by bisection on each side of the estimate (the same weights for every value)."""
    alpha = 1 - level
    est, se = start if start is not None else (float(np.linalg.lstsq(X, y, rcond=None)[0][j]), 1.0)
    if not (np.isfinite(est) and np.isfinite(se)) or se <= 0:
        return None

    def rejected(c):
        p = wild_cluster_pvalue(y, X, codes, j, c, W)
        return p is not None and p < alpha

    if rejected(est):
        return None
    ends = []
    for sign in (-1.0, 1.0):
        inside, step = est, se
        outside = est + sign * step
        for _ in range(60):
            if rejected(outside):
                break
            inside, step = outside, step * 2
            outside = est + sign * step
        else:
            ends.append(None)  # never rejected: the interval is unbounded on this side
            continue
        while abs(outside - inside) > tol * max(se, 1e-12):
            mid = (inside + outside) / 2
            inside, outside = (inside, mid) if rejected(mid) else (mid, outside)
        ends.append(float((inside + outside) / 2))
    return ends


# ---------------------------------------------------------------------------------------------
# findings: intervals from resampling, decisions on the intervals


def decide(interval, side: str = ">", margin: float = 0.0) -> str:
    """"holds" when the interval lies strictly on ``side`` of ``margin``, "does not hold" when it
    lies on the other side (boundary included), "unclear" otherwise (or when undefined)."""
    if interval is None or any(v is None or not np.isfinite(v) for v in interval):
        return "unclear"
    lo, hi = interval
    if side == ">":
        return "holds" if lo > margin else "does not hold" if hi <= margin else "unclear"
    if side == "<":
        return "holds" if hi < margin else "does not hold" if lo >= margin else "unclear"
    raise ValueError(f"side must be '>' or '<', got {side!r}")


def combine(decisions) -> str:
    """One decision from several (intervals of the same claim, or replicates): "holds" only
    when every one holds, "does not hold" when every one does not, "unclear" otherwise."""
    ds = list(decisions)
    if ds and all(d == "holds" for d in ds):
        return "holds"
    if ds and all(d == "does not hold" for d in ds):
        return "does not hold"
    return "unclear"


def resample_weights(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(draws, n) multinomial counts: each row a bootstrap resample of ``n`` items."""
    if n == 0:
        return np.zeros((n_boot, 0))
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def percentile_interval(draws, level: float = 0.95) -> list | None:
    d = np.asarray(draws, float)
    d = d[np.isfinite(d)]
    if len(d) < 10:
        return None
    a = (1 - level) / 2 * 100
    return [float(np.percentile(d, a)), float(np.percentile(d, 100 - a))]


def _mean_w(values: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Resampled means of the columns' items: ``values`` (..., n), ``W`` (draws, n) -> (..., draws)."""
    return values @ W.T / W.sum(axis=1)


def fitting_gap(per_variant: dict, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Are Unknown examples fitted more slowly than Known ones? ``per_variant``: {variant:
    {"Known": fitted (epochs x Known examples, 0/1), "Unknown": fitted (epochs x Unknown examples)}}.
    The gap is the mean fitted share over epochs, Known minus Unknown, averaged over variants;
    its interval resamples the training examples of each category of each variant."""
    gaps, draws = {}, []
    for i, (v, d) in enumerate(sorted(per_variant.items())):
        col = {c: np.asarray(d[c], float).mean(axis=0) for c in ("Known", "Unknown")}
        gaps[v] = float(col["Known"].mean() - col["Unknown"].mean())
        b = [_mean_w(col[c], resample_weights(len(col[c]), n_boot, seed + 7919 * i + k)) for k, c in
             enumerate(("Known", "Unknown"))]
        draws.append(b[0] - b[1])
    gap = float(np.mean(list(gaps.values()))) if gaps else None
    ci = percentile_interval(np.mean(draws, axis=0), level) if draws else None
    return {"value": gap, "interval": ci, "per_variant": gaps, "decision": decide(ci, ">"),
            "resampled": "training examples, within category and variant"}


def _slope(x, Y) -> np.ndarray:
    """Least-squares slope of each column of ``Y`` (points x draws) on ``x``."""
    x = np.asarray(x, float)
    xc = x - x.mean()
    return xc @ (Y - Y.mean(axis=0)) / (xc @ xc)


def _spearman(x, Y) -> np.ndarray:
    from scipy import stats

    out = np.full(Y.shape[1], np.nan)
    for b in range(Y.shape[1]):
        col = Y[:, b]
        if len(set(col.tolist())) > 1 and len(set(np.asarray(x).tolist())) > 1:
            out[b] = stats.spearmanr(x, col).statistic
    return out


def accuracy_trend(x, correct, W: np.ndarray, level: float = 0.95) -> dict:
    """Test accuracy (percent) against ``x`` (e.g. % Unknown): ``correct`` (points x questions, 0/1),
    every point on the same test questions, resampled together by ``W`` (draws x questions).
    Slope per 10 units of x and Spearman's rho, each with a percentile interval."""
    C = np.asarray(correct, float)
    acc = 100 * C.mean(axis=1)
    Yb = 100 * _mean_w(C, W)
    slope = 10 * float(_slope(x, acc[:, None])[0])
    sb = 10 * _slope(x, Yb)
    rho = _spearman(x, acc[:, None])[0]
    rb = _spearman(x, Yb[:, :min(Yb.shape[1], 1000)])
    return {"slope_per_10": slope, "slope_interval": percentile_interval(sb, level),
            "spearman": None if not np.isfinite(rho) else float(rho),
            "spearman_interval": percentile_interval(rb, level), "accuracy": acc.tolist(), "_slope_draws": sb}


def difference(a_draws, b_draws, a: float, b: float, side: str = ">", margin: float = 0.0,
               level: float = 0.95) -> dict:
    ci = percentile_interval(np.asarray(a_draws) - np.asarray(b_draws), level)
    return {"value": a - b, "interval": ci, "decision": decide(ci, side, margin)}


def answered_accuracy(correct, answered, W: np.ndarray) -> tuple[float | None, np.ndarray]:
    """Accuracy (percent) on the answered questions, and its resampled values."""
    c, a = np.asarray(correct, float), np.asarray(answered, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = 100 * (W @ (c * a)) / (W @ a)
    return (100 * (c * a).sum() / a.sum() if a.sum() else None), draws


def linear_model_question_bootstrap(correct, n_known_fitted, n_unknown_fitted, size, W: np.ndarray,
                                    level: float = 0.95) -> dict:
    """The linear model's coefficients refitted on resampled test questions: ``correct`` is
    (points x questions, 0/1); returns each coefficient's percentile interval."""
    C = np.asarray(correct, float)
    X = _design(n_known_fitted, n_unknown_fitted, size, C.shape[0])
    B = np.linalg.pinv(X) @ (100 * _mean_w(C, W))
    return {n: percentile_interval(B[j], level) for j, n in enumerate(COEFS)}


def finding(claim: str, value, interval, decision: str, **extra) -> dict:
    """One entry of ``analysis["findings"]``: the claim, the measured value, its interval, the
    decision taken on the interval (and ``holds``, its boolean form)."""
    return {"claim": claim, "value": value, "interval": interval, "decision": decision,
            "holds": decision == "holds", **extra}


def across_replicates(values) -> dict:
    """A coefficient or finding value over replicates: mean, spread, and sign agreement."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "n_positive": 0, "n_negative": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n_positive": int((v > 0).sum()),
            "n_negative": int((v < 0).sum()), "values": [float(x) for x in v]}


def replicate_summary(analyses: dict) -> dict:
    """{replicate: analysis} -> each linear-model coefficient and each finding across them; a
    finding holds only when it holds in every replicate (:func:`combine`)."""
    out = {"replicates": list(analyses), "linear_model": {}, "findings": {}}
    subsets = sorted({s for a in analyses.values() for s in a.get("linear_model", {})})
    for s in subsets:
        fits = [a["linear_model"].get(s, {}) for a in analyses.values()]
        out["linear_model"][s] = {k: across_replicates([f.get("params", {}).get(k) for f in fits])
                                  for k in COEFS}
        out["linear_model"][s]["r2"] = across_replicates([f.get("r2") for f in fits])
    names = sorted({n for a in analyses.values() for n, f in a.get("findings", {}).items() if "decision" in f})
    for n in names:
        fs = [a.get("findings", {}).get(n) for a in analyses.values()]
        decisions = [f["decision"] if f else "unclear" for f in fs]
        vals = [f.get("value") if f and isinstance(f.get("value"), (int, float)) else None for f in fs]
        out["findings"][n] = {"claim": next(f["claim"] for f in fs if f), "decisions": decisions,
                              "decision": combine(decisions), "value": across_replicates(vals)}
    return out


def paired_split_ttest(correct_a, correct_b, n_parts: int = 100, seed: int = 0) -> dict:
    """Paper appendix I: split the examples at random into ``n_parts`` parts, take each
    part's accuracy (percent) under A and B, and compare them with a paired t-test."""
    from scipy import stats

    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("the two answer sets must cover the same examples")
    n_parts = min(n_parts, len(a))
    if n_parts < 2:
        raise ValueError("need at least 2 examples for a paired t-test")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(a)), n_parts)
    pa = np.array([a[p].mean() * 100 for p in parts])
    pb = np.array([b[p].mean() * 100 for p in parts])
    if np.allclose(pa, pb):
        t, p = 0.0, 1.0
    else:
        r = stats.ttest_rel(pa, pb)
        t, p = float(r.statistic), float(r.pvalue)
    return {"n_parts": int(n_parts), "mean_a": float(pa.mean()), "mean_b": float(pb.mean()),
            "mean_diff": float((pa - pb).mean()), "t": t, "p": p}


def fitting_speed(curve: dict[int, float], levels=(0.5, 0.9, 1.0)) -> dict:
    """``curve``: {epoch: fraction fitted}. The first epoch reaching each level (None if never)
    and the area under the curve over the epochs (mean fraction fitted)."""
    epochs = sorted(curve)
    out = {f"epoch_to_{int(lv * 100)}": next((e for e in epochs if curve[e] >= lv - 1e-12), None) for lv in levels}
    out["mean_fitted"] = float(np.mean([curve[e] for e in epochs])) if epochs else None
    return out
