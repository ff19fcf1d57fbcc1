"""Statistics of the fine-tuning study (Gekhman et al. 2024, section 4 and appendix I).

Pure functions over the per-epoch measurements that :mod:`knowcat.finetune` writes.

The paper's linear model, fitted by ordinary least squares over every
(variant, epoch) point::

    Accuracy = b0 + b_kn * N_kn / |D| + b_unk * N_unk / |D|

with N_kn and N_unk the numbers of Known and Unknown training examples fitted at
that epoch and Accuracy the test accuracy in percent (the paper: in-distribution
b0 36.9, b_kn 7.3, b_unk -8.3, R^2 0.86). Significance of EARLY_STOP against
CONVERGENCE: the test set is split at random into 100 parts, each part's accuracy
is measured at both stops, and a paired t-test compares them.
"""

from __future__ import annotations

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


def fit_linear_model(accuracy, n_known_fitted, n_unknown_fitted, size) -> dict:
    """OLS of ``accuracy`` on N_kn/|D| and N_unk/|D| (statsmodels), with standard errors,
    95% confidence intervals, p-values and R^2."""
    import statsmodels.api as sm

    y = np.asarray(accuracy, dtype=float)
    size = np.broadcast_to(np.asarray(size, dtype=float), y.shape)
    X = np.column_stack([np.asarray(n_known_fitted, float) / size, np.asarray(n_unknown_fitted, float) / size])
    names = ["b0", "b_kn", "b_unk"]
    if len(y) < 4:
        raise ValueError(f"the linear model needs at least 4 (variant, epoch) points, got {len(y)}")
    res = sm.OLS(y, sm.add_constant(X, has_constant="add")).fit()
    ci = np.asarray(res.conf_int(0.05))
    return {
        "params": dict(zip(names, map(float, res.params))),
        "bse": dict(zip(names, map(float, res.bse))),
        "conf_int_95": {n: [float(a), float(b)] for n, (a, b) in zip(names, ci)},
        "pvalues": dict(zip(names, map(float, res.pvalues))),
        "r2": float(res.rsquared),
        "r2_adj": float(res.rsquared_adj),
        "nobs": int(res.nobs),
        "rank": int(np.linalg.matrix_rank(X - X.mean(0))) if len(y) > 1 else 0,
    }


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
