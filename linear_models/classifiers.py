"""A calibrated classifier of knowledge categories from cheap features, and its validation.

The model: multinomial logistic regression (softmax, L2 penalty, fitted by L-BFGS on the
exact gradient) on standardized scalar features and the leading principal components of a
hidden-state block (a linear probe). The penalty is chosen by stratified K-fold
cross-validated log-loss, a proper scoring rule, so the probabilities are calibrated as well
as the features allow; every transformation (standardization, PCA) is fitted inside each
fold, never on the examples it predicts.

Validation statistics (pure functions): confusion matrix, macro-F1 and AUROC with
bootstrap percentile intervals, proportions with Wilson intervals, expected calibration error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# --- the model -------------------------------------------------------------------------------

def _loss_grad(w: np.ndarray, X: np.ndarray, Y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    n, d = X.shape
    k = Y.shape[1]
    W = w.reshape(d + 1, k)
    Z = X @ W[:-1] + W[-1]
    lp = log_softmax(Z, axis=1)
    loss = -(Y * lp).sum() / n + 0.5 * l2 * (W[:-1] ** 2).sum()
    G = (np.exp(lp) - Y) / n
    grad = np.vstack([X.T @ G + l2 * W[:-1], G.sum(0)])
    return float(loss), grad.ravel()


def fit_softmax(X: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> np.ndarray:
    """Weights ``(d + 1, n_classes)`` (last row: intercepts) of L2-penalized multinomial logistic
    regression (the intercepts are not penalized)."""
    Y = np.eye(n_classes)[y]
    w0 = np.zeros((X.shape[1] + 1) * n_classes)
    res = minimize(_loss_grad, w0, args=(X, Y, l2), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    return res.x.reshape(X.shape[1] + 1, n_classes)


def softmax_proba(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return softmax(X @ W[:-1] + W[-1], axis=1)


@dataclass
class ProbeClassifier:
    """Standardized scalars + the top ``pca_dim`` principal components of hidden states -> softmax."""

    n_classes: int
    l2: float = 1.0
    pca_dim: int = 32
    mean_s: np.ndarray | None = None
    std_s: np.ndarray | None = None
    mean_h: np.ndarray | None = None
    components: np.ndarray | None = None
    std_p: np.ndarray | None = None
    W: np.ndarray | None = None

    def _design(self, S: np.ndarray, H: np.ndarray | None) -> np.ndarray:
        parts = [(S - self.mean_s) / self.std_s]
        if H is not None and self.components is not None:
            parts.append(((H - self.mean_h) @ self.components) / self.std_p)
        return np.hstack(parts)

    def fit(self, S: np.ndarray, H: np.ndarray | None, y: np.ndarray) -> "ProbeClassifier":
        self.mean_s, self.std_s = S.mean(0), S.std(0) + 1e-8
        if H is not None and self.pca_dim > 0:
            self.mean_h = H.mean(0)
            Hc = (H - self.mean_h).astype(np.float64)
            evals, evecs = np.linalg.eigh(Hc.T @ Hc)  # principal axes: eigenvectors of the scatter matrix
            order = np.argsort(evals)[::-1][: min(self.pca_dim, Hc.shape[0], Hc.shape[1])]
            self.components = evecs[:, order]
            P = (H - self.mean_h) @ self.components
            self.std_p = P.std(0) + 1e-8
        self.W = fit_softmax(self._design(S, H), y, self.n_classes, self.l2)
        return self

    def predict_proba(self, S: np.ndarray, H: np.ndarray | None) -> np.ndarray:
        return softmax_proba(self.W, self._design(S, H))


def stratified_folds(y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per example, each class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return fold


def cross_val_proba(S, H, y, n_classes: int, l2: float, pca_dim: int, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities: each example predicted by a model fitted without it."""
    fold = stratified_folds(y, n_folds, seed)
    P = np.zeros((len(y), n_classes))
    for f in range(n_folds):
        tr, te = fold != f, fold == f
        if not te.any():
            continue
        m = ProbeClassifier(n_classes, l2, pca_dim).fit(S[tr], None if H is None else H[tr], y[tr])
        P[te] = m.predict_proba(S[te], None if H is None else H[te])
    return P


def log_loss(y: np.ndarray, P: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None))))


@dataclass
class CalibratedFit:
    model: ProbeClassifier
    l2: float
    cv_log_loss: dict[float, float]
    oof_proba: np.ndarray  # out-of-fold probabilities of the calibration examples at the chosen l2


def fit_calibrated(S, H, y, n_classes: int, pca_dim: int = 32, l2_grid=L2_GRID, n_folds: int = 5,
                   seed: int = 0) -> CalibratedFit:
    """Choose the penalty by cross-validated log-loss, then fit on every calibration example."""
    scores, oof = {}, {}
    for l2 in l2_grid:
        oof[l2] = cross_val_proba(S, H, y, n_classes, l2, pca_dim, n_folds, seed)
        scores[l2] = log_loss(y, oof[l2])
    best = min(scores, key=scores.get)
    model = ProbeClassifier(n_classes, best, pca_dim).fit(S, H, y)
    return CalibratedFit(model, best, scores, oof[best])


# --- validation statistics -------------------------------------------------------------------

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted."""
    M = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(M, (y_true, y_pred), 1)
    return M


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean over the classes present in ``y_true`` or ``y_pred`` of each class's F1."""
    M = confusion_matrix(y_true, y_pred, n_classes)
    f1s = []
    for c in range(n_classes):
        tp, fp, fn = M[c, c], M[:, c].sum() - M[c, c], M[c, :].sum() - M[c, c]
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (ties count half): the
    Mann-Whitney U statistic over n_pos * n_neg."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    n1, n0 = positive.sum(), (~positive).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(stat, arrays: tuple, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(*resampled arrays)`` over ``n_boot`` resamples of the examples."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return (float("nan"), float("nan"))
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return (float(lo), float(hi))


def expected_calibration_error(y: np.ndarray, P: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-class probability: sum over bins of |accuracy - confidence| weighted by bin size."""
    conf = P.max(1)
    correct = (P.argmax(1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


@dataclass
class Validation:
    """How the estimator's categories agree with SliCK's on examples it was not fitted on."""

    classes: tuple[str, ...]
    n: int
    confusion: list[list[int]]  # rows: SliCK, columns: estimate
    accuracy: float
    macro_f1: float
    macro_f1_ci: tuple[float, float]
    auroc_unknown: float  # P(Unknown) separating Unknown from the Known categories
    auroc_unknown_ci: tuple[float, float]
    unknown_dropped: float  # share of SliCK-Unknown the estimate calls Unknown
    unknown_dropped_ci: tuple[float, float]
    highly_known_kept: float  # share of SliCK-HighlyKnown the estimate does not call Unknown
    highly_known_kept_ci: tuple[float, float]
    ece: float
    counts: dict = field(default_factory=dict)


def validate(y_true: np.ndarray, P: np.ndarray, classes: tuple[str, ...], unknown: str = "Unknown",
             highly_known: str = "HighlyKnown", alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> Validation:
    """The validation of probabilities ``P`` against true classes (drop rule: predicted class Unknown)."""
    k = len(classes)
    u, hk = classes.index(unknown), classes.index(highly_known)
    pred = P.argmax(1)
    is_u = y_true == u
    n_u, n_hk = int(is_u.sum()), int((y_true == hk).sum())
    dropped_u = int((pred[is_u] == u).sum())
    kept_hk = int((pred[y_true == hk] != u).sum())
    return Validation(
        classes=tuple(classes), n=len(y_true),
        confusion=confusion_matrix(y_true, pred, k).tolist(),
        accuracy=float((pred == y_true).mean()) if len(y_true) else float("nan"),
        macro_f1=macro_f1(y_true, pred, k),
        macro_f1_ci=bootstrap_ci(lambda a, b: macro_f1(a, b, k), (y_true, pred), n_boot, alpha, seed),
        auroc_unknown=auroc(is_u, P[:, u]),
        auroc_unknown_ci=bootstrap_ci(lambda a, s: auroc(a, s), (is_u, P[:, u]), n_boot, alpha, seed),
        unknown_dropped=dropped_u / n_u if n_u else float("nan"), unknown_dropped_ci=wilson(dropped_u, n_u, alpha),
        highly_known_kept=kept_hk / n_hk if n_hk else float("nan"), highly_known_kept_ci=wilson(kept_hk, n_hk, alpha),
        ece=expected_calibration_error(y_true, P),
        counts={"unknown": n_u, "unknown_dropped": dropped_u, "highly_known": n_hk, "highly_known_kept": kept_hk},
    )


def format_validation(v: Validation, title: str = "validation") -> str:
    w = max(len(c) for c in v.classes) + 2
    lines = [f"{title}: {v.n} examples (rows: SliCK, columns: estimate)",
             " " * w + "".join(f"{c:>{w}}" for c in v.classes)]
    for c, row in zip(v.classes, v.confusion):
        lines.append(f"{c:<{w}}" + "".join(f"{x:>{w}}" for x in row))
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    lines += [f"  accuracy {pct(v.accuracy)}; macro-F1 {v.macro_f1:.3f} [{v.macro_f1_ci[0]:.3f}, {v.macro_f1_ci[1]:.3f}]",
              f"  AUROC Unknown vs Known {v.auroc_unknown:.3f} [{v.auroc_unknown_ci[0]:.3f}, {v.auroc_unknown_ci[1]:.3f}]",
              f"  drop Unknown: drops {pct(v.unknown_dropped)} of Unknown [{pct(v.unknown_dropped_ci[0])}, "
              f"{pct(v.unknown_dropped_ci[1])}] ({v.counts['unknown_dropped']}/{v.counts['unknown']}), keeps "
              f"{pct(v.highly_known_kept)} of HighlyKnown [{pct(v.highly_known_kept_ci[0])}, "
              f"{pct(v.highly_known_kept_ci[1])}] ({v.counts['highly_known_kept']}/{v.counts['highly_known']})",
              f"  expected calibration error {v.ece:.3f}"]
    return "\n".join(lines)


DROP_UNKNOWN_TARGETS = {"auroc_unknown": 0.90, "unknown_dropped": 0.85, "highly_known_kept": 0.95}


def verdicts(v: Validation, targets: dict[str, float] = DROP_UNKNOWN_TARGETS) -> dict[str, str]:
    """Per target: ``met`` when the interval's lower bound clears it, ``missed`` when its upper bound is
    below it, else ``undecided`` (the data cannot tell at this sample size)."""
    out = {}
    for name, t in targets.items():
        lo, hi = getattr(v, name + "_ci")
        out[name] = "met" if lo >= t else "missed" if hi < t else "undecided"
    return out


def format_verdicts(v: Validation, targets: dict[str, float] = DROP_UNKNOWN_TARGETS) -> str:
    vs = verdicts(v, targets)
    return "  targets (met: the interval's lower bound clears it): " + ", ".join(
        f"{name} >= {t:g}: {vs[name]}" for name, t in targets.items())
