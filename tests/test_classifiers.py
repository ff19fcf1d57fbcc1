"""linear_models.classifiers: the softmax fit, its gradient, cross-fitting, and the validation statistics."""

import numpy as np
import pytest
from scipy.optimize import check_grad

from linear_models.classifiers import (ProbeClassifier, _loss_grad, auroc, bootstrap_ci, confusion_matrix,
                                       cross_val_proba, expected_calibration_error, fit_calibrated, fit_softmax,
                                       macro_f1, softmax_proba, stratified_folds, validate, wilson)


def _blobs(n=300, k=4, d=5, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(size=(n, d)), y


def test_gradient_is_exact():
    X, y = _blobs(50, 3, 4)
    Y = np.eye(3)[y]
    w = np.random.default_rng(1).normal(size=(5 * 3))
    err = check_grad(lambda v: _loss_grad(v, X, Y, 0.3)[0], lambda v: _loss_grad(v, X, Y, 0.3)[1], w)
    assert err < 1e-5


def test_fit_recovers_separable_classes_and_matches_statsmodels():
    X, y = _blobs()
    W = fit_softmax(X, y, 4, l2=1e-3)
    assert (softmax_proba(W, X).argmax(1) == y).mean() > 0.95
    # without a penalty, the same maximum-likelihood fit as statsmodels' MNLogit (on overlapping classes)
    import statsmodels.api as sm

    Xo, yo = _blobs(400, 3, 2, sep=0.7, seed=3)
    W0 = fit_softmax(Xo, yo, 3, l2=0.0)
    res = sm.MNLogit(yo, sm.add_constant(Xo)).fit(disp=0)
    ours = softmax_proba(W0, Xo)
    theirs = res.predict(sm.add_constant(Xo))
    assert np.abs(ours - theirs).max() < 1e-4


def test_probe_classifier_uses_hidden_states_and_out_of_fold_is_honest():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    S = rng.normal(size=(n, 3))  # noise scalars
    H = rng.normal(size=(n, 40))
    H[:, 7] += 3 * y  # the label lives in one hidden direction
    P = cross_val_proba(S, H, y, 2, l2=0.1, pca_dim=40)
    assert (P.argmax(1) == y).mean() > 0.85  # Bayes rate: Phi(1.5) = 0.93
    P_noise = cross_val_proba(S, None, y, 2, l2=0.1, pca_dim=0)
    assert abs((P_noise.argmax(1) == y).mean() - 0.5) < 0.1  # nothing to learn: chance out of fold
    fit = fit_calibrated(S, H, y, 2, pca_dim=40, l2_grid=(0.01, 1.0, 1e4))
    assert fit.l2 in (0.01, 1.0) and fit.cv_log_loss[1e4] > fit.cv_log_loss[fit.l2]
    assert fit.model.predict_proba(S, H).shape == (n, 2)


def test_stratified_folds_spread_each_class():
    y = np.array([0] * 10 + [1] * 5)
    f = stratified_folds(y, 5)
    for c in (0, 1):
        assert sorted(np.bincount(f[y == c], minlength=5)) == ([2] * 5 if c == 0 else [1] * 5)


def test_statistics():
    yt = np.array([0, 0, 1, 1, 2, 3])
    yp = np.array([0, 1, 1, 1, 3, 3])
    M = confusion_matrix(yt, yp, 4)
    assert M.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    # per-class F1: 2/3, 4/5, 0, 2/3
    assert macro_f1(yt, yp, 4) == pytest.approx(np.mean([2 / 3, 4 / 5, 0, 2 / 3]))
    assert auroc(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auroc(np.array([1, 0], bool), np.array([0.5, 0.5])) == 0.5
    assert auroc(np.array([1, 1, 0, 0], bool), np.array([0.1, 0.8, 0.9, 0.2])) == 0.25
    lo, hi = wilson(9, 10)
    assert lo < 0.9 < hi
    rng = np.random.default_rng(0)
    s = rng.normal(size=500)
    lab = s + rng.normal(size=500) > 0
    a = auroc(lab, s)
    lo, hi = bootstrap_ci(auroc, (lab, s), n_boot=300)
    assert lo < a < hi and hi - lo < 0.15
    P = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(np.array([0, 1]), P) == pytest.approx(0.4)


def test_validate_drop_unknown_rule():
    classes = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
    y = np.array([0, 0, 3, 3, 3, 2])
    P = np.array([[.7, .1, .1, .1], [.1, .1, .1, .7], [.1, .1, .1, .7], [.1, .1, .1, .7], [.7, .1, .1, .1],
                  [.1, .1, .7, .1]])
    v = validate(y, P, classes, n_boot=50)
    assert v.unknown_dropped == pytest.approx(2 / 3) and v.highly_known_kept == pytest.approx(1 / 2)
    assert v.counts == {"unknown": 3, "unknown_dropped": 2, "highly_known": 2, "highly_known_kept": 1}
    assert v.confusion[3] == [1, 0, 0, 2]


def test_verdicts_go_both_ways():
    from linear_models.classifiers import verdicts

    classes = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
    y = np.array([0] * 200 + [3] * 200)
    good = np.where(y[:, None] == np.arange(4), 0.9, 0.1 / 3)
    assert set(verdicts(validate(y, good, classes, n_boot=100)).values()) == {"met"}
    bad = good[:, ::-1]  # calls every Unknown HighlyKnown and back
    assert set(verdicts(validate(y, bad, classes, n_boot=100)).values()) == {"missed"}
    few = validate(y[[0, 1, 200, 201]], good[[0, 1, 200, 201]], classes, n_boot=100)
    assert verdicts(few)["unknown_dropped"] == "undecided"
