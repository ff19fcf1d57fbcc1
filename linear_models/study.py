"""Statistics of the fine-tuning study (Gekhman et al. 2024, section 4 and appendix I).

Pure functions over the per-epoch measurements that :mod:`knowcat.finetune` writes.

The paper's linear model, fitted by ordinary least squares over every
(variant, epoch) point::

    Accuracy = b0 + b_kn * N_kn / |D| + b_unk * N_unk / |D|

with N_kn and N_unk the numbers of Known and Unknown training examples fitted at
that epoch and Accuracy the test accuracy in percent (the paper's coefficients:
``linear_models.names.PAPER_LINEAR_MODEL``). Significance of
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
from dataclasses import dataclass, field

import numpy as np

from linear_models.names import CATEGORIES, KNOWN, PAPER_LINEAR_MODEL, PAPER_TABLE2  # noqa: F401

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
    if not (np.isfinite(est) and np.isfinite(se)) or se <= 1e-10 * max(1.0, abs(est)):
        return None  # no spread (e.g. an exact fit): nothing to invert

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
        for _ in range(60):
            if abs(outside - inside) <= tol * se:
                break
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


# ---------------------------------------------------------------------------------------------
# the study's analyses, over what the fine-tuning runs measured (no file is read here)


@dataclass
class StudyInputs:
    """What the analysis needs from a run's files.

    size:          |D|
    runs:          {variant: metrics.json of its fine-tuning run}
    subsets:       {"in_distribution" / "ood": [test question ids]}
    test_answers:  {variant: {epoch: {"id": [...], "correct": [0/1], "abstained": [0/1]}}} (test set)
    train_fitted:  {variant: {epoch: {"category": [...], "fitted": [0/1]}}} (training examples,
                   the same order at every epoch); may be empty when not recorded
    """

    size: int
    runs: dict
    subsets: dict
    test_answers: dict
    train_fitted: dict = field(default_factory=dict)


@dataclass
class StudyOptions:
    linear_model_variants: list = field(default_factory=list)  # the sets whose points the linear model uses
    linear_model_rule: str = "paper"
    linear_model_rule_description: str = ""
    t_test_parts: int = 100
    idk_from: int = 50
    seed: int = 0
    n_boot: int = 2000  # resamples of test questions / training examples
    n_boot_clusters: int = 9999  # wild cluster bootstrap draws
    cluster_weights: str = "webb"
    level: float = 0.95


def pct_of(v: str) -> int:
    return int(v.split("_")[1])


def _acc(m: dict, subset: str) -> float | None:
    t = m.get("test", {})
    blk = t.get(subset) or (t.get("all") if subset == "in_distribution" else None)
    return None if blk is None or blk.get("accuracy") is None else 100 * blk["accuracy"]


def stop_accuracy(runs: dict, subsets) -> dict:
    """{variant: {stop: {epoch, accuracy per subset, dev, train_fitted}}} (None where the stop is undefined)."""
    acc = {}
    for v, m in runs.items():
        by_epoch = {e["epoch"]: e for e in m["epochs"]}
        acc[v] = {}
        for stop in ("early_stop", "convergence"):
            ep = m.get(stop)
            if ep is None:
                acc[v][stop] = {"epoch": None, **{s: None for s in subsets}, "dev": None, "train_fitted": None,
                                "note": early_stop_note(m)}
                continue
            e = by_epoch[ep]
            dev_acc = (e.get("dev") or {}).get("all", {}).get("accuracy")
            acc[v][stop] = {"epoch": ep, **{s: _acc(e, s) for s in subsets},
                            "dev": None if dev_acc is None else 100 * dev_acc, "train_fitted": e["train"]["fitted"]}
    return acc


def early_stop_note(m: dict) -> str:
    return m.get("early_stop_note") or "EARLY_STOP undefined (no dev measurements)"


def linear_model_points(runs: dict, variants, subset: str) -> dict:
    """The (variant, epoch) points: accuracy (percent), N_kn and N_unk fitted, the run of each point."""
    y, nk, nu, used = [], [], [], []
    for v in variants:
        for e in runs[v]["epochs"]:
            a = _acc(e, subset)
            if a is None:
                continue
            n_by, f_by = e["train"]["n_by_category"], e["train"]["fitted_by_category"]
            y.append(a)
            nk.append(sum(f_by.get(c, 0) * n_by.get(c, 0) for c in KNOWN))
            nu.append(f_by.get("Unknown", 0) * n_by.get("Unknown", 0))
            used.append([v, e["epoch"]])
    return {"accuracy": y, "n_known_fitted": nk, "n_unknown_fitted": nu, "points": used}


def accuracy_vs_unknown(acc: dict, subsets) -> dict:
    mix = sorted((v for v in acc if v.startswith("unknown_")), key=pct_of)
    out = {}
    for stop in ("early_stop", "convergence"):
        rows = []
        for v in mix:
            x = pct_of(v)
            k = f"known_{x:02d}"
            rows.append({"unknown_percent": x, **{s: acc[v][stop][s] for s in subsets},
                         **({f"known_{s}": acc[k][stop][s] for s in subsets} if k in acc else {})})
        out[stop] = rows
    return out


def table2(runs: dict) -> tuple[dict, dict]:
    """Table 2 of the paper: single-category sets and D_Natural, in-distribution test by category."""
    t2, notes = {}, {}
    for stop in ("early_stop", "convergence"):
        t2[stop] = {}
        for v in [*CATEGORIES, "natural"]:
            if v not in runs:
                continue
            if runs[v].get(stop) is None:
                notes[v] = f"no EARLY_STOP row: {early_stop_note(runs[v])}"
                continue
            e = {x["epoch"]: x for x in runs[v]["epochs"]}[runs[v][stop]]
            blk = e["test"].get("in_distribution") or e["test"]["all"]
            t2[stop][v] = {"full": 100 * blk["accuracy"],
                           **{c: 100 * blk["by_category"][c]["accuracy"] if c in blk["by_category"] else None
                              for c in CATEGORIES},
                           "paper": PAPER_TABLE2[stop].get(v)}
    return t2, notes


def fitting_curves(runs: dict) -> dict:
    """Per variant and category (and Known, pooled): the fitted share per epoch and its speed."""
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
    return fit


def idk_summary(runs: dict, acc: dict, idk_from: int) -> dict | None:
    if "idk" not in runs:
        return None
    m = runs["idk"]
    by = {e["epoch"]: e for e in m["epochs"]}
    idk = {}
    for stop in ("early_stop", "convergence"):
        if m.get(stop) is None:
            idk[stop] = None
            continue
        blk = by[m[stop]]["test"].get("in_distribution") or by[m[stop]]["test"]["all"]
        idk[stop] = {"epoch": m[stop], "accuracy_answered": 100 * (blk["accuracy_answered"] or 0),
                     "answered_share": 100 * blk["answered"] / blk["n"], "accuracy": 100 * blk["accuracy"],
                     "hallucination_rate": 100 * (blk["hallucination_rate"] or 0)}
    base = f"unknown_{idk_from:02d}"
    if base in acc:
        idk["plain_counterpart"] = {"variant": base, **{st: acc[base][st].get("in_distribution")
                                                         for st in ("early_stop", "convergence")}}
    return idk


def _correct(inp: StudyInputs, v: str, epoch: int, ids: list, key: str = "correct") -> np.ndarray:
    rec = inp.test_answers[v][epoch]
    pos = {i: k for k, i in enumerate(rec["id"])}
    return np.array([rec[key][pos[i]] for i in ids], dtype=float)


def analyze_study(inp: StudyInputs, opt: StudyOptions) -> dict:
    """Every analysis of the study and its findings, from the runs' measurements."""
    runs, subsets = inp.runs, inp.subsets
    out: dict = {"size": inp.size, "variants": sorted(runs),
                 "stops": {v: {"early_stop": m.get("early_stop"), "convergence": m["convergence"]}
                           for v, m in runs.items()}}
    no_early = {v: early_stop_note(m) for v, m in runs.items() if m.get("early_stop") is None}
    if no_early:
        out["early_stop_undefined"] = no_early
    acc = out["accuracy"] = stop_accuracy(runs, subsets)

    lm = {}
    where = {"rule": opt.linear_model_rule, "rule_description": opt.linear_model_rule_description,
             "variants": list(opt.linear_model_variants)}
    for s in subsets:
        pts = linear_model_points(runs, opt.linear_model_variants, s)
        try:
            lm[s] = {**fit_linear_model(pts["accuracy"], pts["n_known_fitted"], pts["n_unknown_fitted"], inp.size,
                                        groups=[v for v, _ in pts["points"]], n_boot=opt.n_boot_clusters,
                                        weights=opt.cluster_weights, seed=opt.seed, level=opt.level),
                     "paper": PAPER_LINEAR_MODEL.get(s), **where, "points": pts["points"]}
        except ValueError as err:
            lm[s] = {"error": str(err), **where, "points": pts["points"]}
    out["linear_model"] = lm
    out["linear_model_variants"] = where
    vs = out["accuracy_vs_unknown"] = accuracy_vs_unknown(acc, subsets)
    out["table2"], notes = table2(runs)
    if notes:
        out["table2_notes"] = notes
    tt = {}
    for v, m in runs.items():
        tt[v] = {}
        if v in no_early:
            out.setdefault("t_tests_skipped", {})[v] = no_early[v]
            continue
        for s, ids in subsets.items():
            tt[v][s] = paired_split_ttest(_correct(inp, v, m["early_stop"], ids),
                                          _correct(inp, v, m["convergence"], ids), opt.t_test_parts, seed=opt.seed)
    out["t_tests"] = tt
    out["fitting"] = fitting_curves(runs)
    idk = idk_summary(runs, acc, opt.idk_from)
    if idk is not None:
        out["idk"] = idk
    out["findings"] = study_findings(inp, opt, out, vs)
    out["inference"] = {
        "linear_model": next((r["inference"] for r in lm.values() if "inference" in r), None),
        "findings": f"{int(opt.level * 100)}% percentile intervals from {opt.n_boot} resamples of the test "
                    f"questions (and of the training examples where categories are compared); a decision is "
                    f"taken on the interval: holds / does not hold / unclear"}
    return out


def study_findings(inp: StudyInputs, opt: StudyOptions, out: dict, vs: dict) -> dict:
    runs, subsets, lm = inp.runs, inp.subsets, out["linear_model"]
    f = {}
    lv = opt.level
    # Unknown fitted more slowly: resampling the training examples
    per_variant = {}
    for v in sorted(runs):
        ep = inp.train_fitted.get(v) or {}
        if not ep:
            continue
        epochs = sorted(ep)
        cats = np.array(ep[epochs[0]]["category"])
        F = np.array([ep[e]["fitted"] for e in epochs], dtype=float)
        kn, un = np.isin(cats, KNOWN), cats == "Unknown"
        if kn.any() and un.any():
            per_variant[v] = {"Known": F[:, kn], "Unknown": F[:, un]}
    fit = out["fitting"]
    paired = [v for v in runs if "Unknown" in fit[v] and "Known" in fit[v]]
    if per_variant:
        g = fitting_gap(per_variant, opt.n_boot, opt.seed, lv)
        f["unknown_fitted_more_slowly"] = finding(
            "Unknown training examples are fitted more slowly than Known ones (mean fitted share over epochs, "
            "Known minus Unknown, above 0)", g["value"], g["interval"], g["decision"],
            resampled=g["resampled"], per_variant=g["per_variant"], variants=sorted(per_variant),
            mean_fitted_known_minus_unknown=g["value"],
            epoch_to_50={v: {"Known": fit[v]["Known"]["epoch_to_50"], "Unknown": fit[v]["Unknown"]["epoch_to_50"]}
                         for v in sorted(per_variant)})
    elif paired:
        gap = float(np.mean([fit[v]["Known"]["mean_fitted"] - fit[v]["Unknown"]["mean_fitted"] for v in paired]))
        f["unknown_fitted_more_slowly"] = finding(
            "Unknown training examples are fitted more slowly than Known ones", gap, None, "unclear",
            note="no per-example training answers recorded: no interval", variants=paired,
            mean_fitted_known_minus_unknown=gap)

    s0 = "in_distribution" if "in_distribution" in subsets else next(iter(subsets))
    ids = subsets[s0]
    W = resample_weights(len(ids), opt.n_boot, opt.seed)
    # the linear model's b_unk
    if s0 in lm and "params" in lm[s0]:
        r = lm[s0]
        pts = r["points"]
        C = np.array([_correct(inp, v, e, ids) for v, e in pts])
        pts_n = linear_model_points(runs, opt.linear_model_variants, s0)
        qb = linear_model_question_bootstrap(C, pts_n["n_known_fitted"], pts_n["n_unknown_fitted"], inp.size, W, lv)
        runs_ci = ((r.get("wild_bootstrap") or {}).get("conf_int_95", {}).get("b_unk")
                   or (r.get("cluster") or {}).get("conf_int_95", {}).get("b_unk"))
        which = ("wild cluster bootstrap" if (r.get("wild_bootstrap") or {}).get("conf_int_95", {}).get("b_unk")
                 else "cluster-robust" if runs_ci else "plain OLS (too few runs to cluster)")
        runs_ci = runs_ci or r["conf_int_95"]["b_unk"]
        dec = combine([decide(runs_ci, "<"), decide(qb["b_unk"], "<")])
        f["b_unk_negative"] = finding(
            "each fitted Unknown example lowers test accuracy: b_unk < 0", r["params"]["b_unk"], runs_ci, dec,
            interval_from=which, interval_questions=qb["b_unk"], interval_plain=r["conf_int_95"]["b_unk"],
            b_unk=r["params"]["b_unk"], b_kn=r["params"]["b_kn"], b_kn_interval=(
                (r.get("wild_bootstrap") or {}).get("conf_int_95", {}).get("b_kn")
                or (r.get("cluster") or {}).get("conf_int_95", {}).get("b_kn") or r["conf_int_95"]["b_kn"]),
            b_kn_interval_questions=qb["b_kn"], p=r["pvalues"]["b_unk"],
            p_cluster=(r.get("cluster") or {}).get("pvalues", {}).get("b_unk"),
            p_wild_bootstrap=(r.get("wild_bootstrap") or {}).get("pvalues", {}).get("b_unk"), r2=r["r2"],
            paper=PAPER_LINEAR_MODEL.get(s0))
    # accuracy against % Unknown, at both stops (the same resampled questions for every set)
    trends = {}
    for stop in ("convergence", "early_stop"):
        rows = [(pct_of(v), v) for v in sorted((v for v in runs if v.startswith("unknown_")), key=pct_of)
                if runs[v].get(stop) is not None]
        if len(rows) < 3:
            continue
        x = [p for p, _ in rows]
        t = accuracy_trend(x, np.array([_correct(inp, v, runs[v][stop], ids) for _, v in rows]), W, lv)
        entry = {"slope_per_10pct_unknown": t["slope_per_10"], "slope_interval": t["slope_interval"],
                 "spearman": t["spearman"], "spearman_interval": t["spearman_interval"], "n_points": len(x),
                 "accuracy": {str(a): b for a, b in zip(x, t["accuracy"])},
                 "note": f"{len(x)} sets: slope and rank correlation given with intervals over resampled test "
                         f"questions; run-to-run variation is measured by replicates"}
        krows = [(p, f"known_{p:02d}") for p in x if runs.get(f"known_{p:02d}", {}).get(stop) is not None]
        kt = None
        if len(krows) >= 2:
            kt = accuracy_trend([p for p, _ in krows],
                                np.array([_correct(inp, k, runs[k][stop], ids) for _, k in krows]), W, lv)
            entry["known_slope_per_10pct_unknown"] = kt["slope_per_10"]
            entry["known_slope_interval"] = kt["slope_interval"]
            entry["known_accuracy"] = {str(a): b for (a, _), b in zip(krows, kt["accuracy"])}
        f[f"accuracy_vs_unknown_{stop}"] = entry
        trends[stop] = (x, t, krows, kt)
    if "convergence" in trends:
        x, t, krows, kt = trends["convergence"]
        f["convergence_accuracy_falls_with_unknown"] = finding(
            "at CONVERGENCE, test accuracy falls as the share of Unknown examples rises (slope per 10% < 0)",
            t["slope_per_10"], t["slope_interval"], decide(t["slope_interval"], "<"),
            slope_per_10pct_unknown=t["slope_per_10"], n_points=len(x))
        if kt is not None:
            f["known_does_not_fall"] = finding(
                "at CONVERGENCE, D_Known (the Unknown removed) loses less than 1 point per 10% (slope > -1)",
                kt["slope_per_10"], kt["slope_interval"], decide(kt["slope_interval"], ">", -1.0),
                known_slope_per_10pct_unknown=kt["slope_per_10"], margin=-1.0)
            same = [i for i, p in enumerate(x) if p in {q for q, _ in krows}]
            d_mix = 10 * _slope([x[i] for i in same], 100 * _mean_w(
                np.array([_correct(inp, f"unknown_{x[i]:02d}", runs[f"unknown_{x[i]:02d}"]["convergence"], ids)
                          for i in same]), W))
            d = difference(kt["_slope_draws"], d_mix, kt["slope_per_10"],
                           float(10 * _slope([x[i] for i in same], np.array(t["accuracy"])[same][:, None])[0]),
                           ">", 0.0, lv)
            f["known_falls_less_than_mixture"] = finding(
                "at CONVERGENCE, removing the Unknown examples (D_Known) makes accuracy fall less with the "
                "Unknown share than keeping them (slope difference D_Known - D > 0)", d["value"], d["interval"],
                d["decision"])
    if "convergence" in trends and "early_stop" in trends:
        xc, tc, _, _ = trends["convergence"]
        xe, te, _, _ = trends["early_stop"]
        if xc == xe:
            d = difference(te["_slope_draws"], tc["_slope_draws"], te["slope_per_10"], tc["slope_per_10"], ">", 0, lv)
            f["early_stop_mitigates"] = finding(
                "EARLY_STOP lessens the harm of Unknown examples: accuracy falls less with the Unknown share at "
                "EARLY_STOP than at CONVERGENCE (slope difference > 0)", d["value"], d["interval"], d["decision"])
    # D_IDK: accuracy on the questions it answers against the plain set's accuracy
    idk = out.get("idk")
    if idk is not None:
        f["idk"] = {st: idk[st] for st in ("early_stop", "convergence")}
        if "plain_counterpart" in idk:
            f["idk"]["plain_counterpart"] = idk["plain_counterpart"]
            base = idk["plain_counterpart"]["variant"]
            for stop in ("early_stop", "convergence"):
                if idk[stop] is None or runs[base].get(stop) is None:
                    continue
                a, a_draws = answered_accuracy(_correct(inp, "idk", runs["idk"][stop], ids),
                                               1 - _correct(inp, "idk", runs["idk"][stop], ids, "abstained"), W)
                c = _correct(inp, base, runs[base][stop], ids)
                d = difference(a_draws, 100 * _mean_w(c, W), a if a is not None else np.nan, 100 * c.mean(),
                               ">", 0.0, lv)
                f[f"idk_more_accurate_on_answered_{stop}"] = finding(
                    f"at {stop.upper()}, D_IDK is more accurate on the questions it answers than {base} on all "
                    f"(difference > 0)", None if a is None else d["value"], d["interval"], d["decision"],
                    answered_share=idk[stop]["answered_share"])
    for e in f.values():
        if isinstance(e, dict):
            e.pop("_slope_draws", None)
    return f
