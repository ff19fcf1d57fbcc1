"""The study's inference: cluster-robust and wild-cluster-bootstrap intervals for the linear
model, resampling intervals and decisions for the findings, summaries across replicates."""

import numpy as np
import pytest
import statsmodels.api as sm

from linear_models.study import (accuracy_trend, across_replicates, cluster_weights, combine, decide,
                                 fit_linear_model, fitting_gap, linear_model_question_bootstrap,
                                 replicate_summary, resample_weights, wild_cluster_interval,
                                 wild_cluster_pvalue)


def _clustered(rng, G, m, effect=0.0, shock=3.0):
    """G runs of m points; regressors and errors share a per-run component (like epochs of one run)."""
    g = np.repeat(np.arange(G), m)
    nk = np.clip(rng.normal(50, 10, G)[g] + rng.normal(0, 3, G * m), 0, 100)
    nu = np.clip(rng.normal(40, 15, G)[g] + rng.normal(0, 3, G * m), 0, 100)
    y = 30 + effect * nu / 100 + shock * rng.normal(0, 1, G)[g] + rng.normal(0, 1, G * m)
    return y, nk, nu, g


def test_decide_and_combine():
    assert decide([0.1, 2.0], ">") == "holds" and decide([-1, -0.2], ">") == "does not hold"
    assert decide([-1, 2], ">") == "unclear" and decide([0.0, 0.0], "<") == "does not hold"
    assert decide([-3, -1], "<") == "holds" and decide([-0.5, 3], ">", margin=-1) == "holds"
    assert decide(None) == decide([None, 1]) == decide([float("nan"), 1]) == "unclear"
    assert combine(["holds"] * 3) == "holds" and combine(["holds", "unclear", "holds"]) == "unclear"
    assert combine(["does not hold"] * 2) == "does not hold" and combine([]) == "unclear"


def test_weights():
    W = cluster_weights(8, 999, "rademacher")
    assert W.shape == (256, 8) and len({tuple(r) for r in W}) == 256  # every sign vector once
    W = cluster_weights(5, 5000, "webb", seed=1)
    assert set(np.round(W.ravel() ** 2, 6)) == {0.5, 1.0, 1.5} and abs(W.mean()) < 0.05
    with pytest.raises(ValueError):
        cluster_weights(3, 10, "normal")


def test_cluster_fields_match_statsmodels_and_plain_ols_is_kept():
    rng = np.random.default_rng(3)
    y, nk, nu, g = _clustered(rng, 8, 16, effect=-8.0)
    r = fit_linear_model(y, nk, nu, 100, groups=[f"run{i}" for i in g], n_boot=999)
    X = sm.add_constant(np.column_stack([nk / 100, nu / 100]))
    plain = sm.OLS(y, X).fit()
    clus = sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": g}, use_t=True)
    assert r["params"]["b_unk"] == pytest.approx(plain.params[2]) and r["r2"] == pytest.approx(plain.rsquared)
    assert r["bse"]["b_unk"] == pytest.approx(plain.bse[2])
    assert r["cluster"]["bse"]["b_unk"] == pytest.approx(clus.bse[2]) and r["cluster"]["df"] == 7
    assert r["n_clusters"] == 8 and "clustered by fine-tuning run" in r["inference"]
    # with 8 correlated runs, the plain intervals are far too narrow
    assert r["cluster"]["bse"]["b_unk"] > 1.5 * r["bse"]["b_unk"]
    lo, hi = r["wild_bootstrap"]["conf_int_95"]["b_unk"]
    assert lo < r["params"]["b_unk"] < hi
    # the interval's ends are where the bootstrap p-value crosses 0.05
    W = cluster_weights(8, 999, "webb", 0)
    Xd = np.column_stack([np.ones(len(y)), nk / 100, nu / 100])
    assert wild_cluster_pvalue(y, Xd, g, 2, lo - 0.05 * (hi - lo), W) < 0.05
    assert wild_cluster_pvalue(y, Xd, g, 2, lo + 0.05 * (hi - lo), W) >= 0.05
    # too few runs: no clustered inference, said so
    few = fit_linear_model(y, nk, nu, 100, groups=(g >= 4).astype(int))
    assert few["cluster"] is None and "too few" in few["inference_note"]


def test_many_clusters_bootstrap_interval_approaches_cluster_robust():
    rng = np.random.default_rng(5)
    G = 300
    y, nk, nu, g = _clustered(rng, G, 3, effect=-5.0, shock=1.0)
    X = np.column_stack([np.ones(len(y)), nk / 100, nu / 100])
    clus = sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": g}, use_t=True)
    W = cluster_weights(G, 999, "rademacher", 1)
    ci = wild_cluster_interval(y, X, g, 2, W, start=(clus.params[2], clus.bse[2]))
    want = clus.conf_int(0.05)[2]
    width = want[1] - want[0]
    assert abs(ci[0] - want[0]) < 0.1 * width and abs(ci[1] - want[1]) < 0.1 * width


def test_wild_cluster_pvalue_is_calibrated_under_the_null_where_plain_ols_is_not():
    rng = np.random.default_rng(11)
    n_sim, alpha = 150, 0.05
    wcr, plain = [], []
    W = cluster_weights(8, 199, "webb", 2)
    for _ in range(n_sim):
        y, nk, nu, g = _clustered(rng, 8, 16, effect=0.0)
        X = np.column_stack([np.ones(len(y)), nk / 100, nu / 100])
        wcr.append(wild_cluster_pvalue(y, X, g, 2, 0.0, W) < alpha)
        plain.append(sm.OLS(y, X).fit().pvalues[2] < alpha)
    # rejection rate near 5% (binomial sd over 150 runs: 1.8 points); plain OLS rejects far more often
    assert 0.005 <= np.mean(wcr) <= 0.11
    assert np.mean(plain) > 0.25


def test_fitting_gap_resamples_training_examples():
    rng = np.random.default_rng(0)
    epochs = 6
    # Known fitted from epoch 2, Unknown from epoch 4 (mostly)
    kn = (np.arange(1, epochs + 1)[:, None] >= rng.integers(1, 3, 40)[None, :]).astype(int)
    un = (np.arange(1, epochs + 1)[:, None] >= rng.integers(3, 7, 30)[None, :]).astype(int)
    res = fitting_gap({"a": {"Known": kn, "Unknown": un}, "b": {"Known": kn[:, :10], "Unknown": un[:, :5]}})
    assert res["value"] == pytest.approx(np.mean([kn.mean() - un.mean(), kn[:, :10].mean() - un[:, :5].mean()]))
    lo, hi = res["interval"]
    assert lo < res["value"] < hi and res["decision"] == "holds"
    same = fitting_gap({"a": {"Known": kn, "Unknown": kn}})
    assert same["value"] == 0 and same["decision"] == "unclear"


def test_accuracy_trend_interval_covers_and_decides():
    rng = np.random.default_rng(1)
    n = 400
    x = [0, 25, 50, 75, 100]
    C = np.array([rng.random(n) < p for p in (0.5, 0.46, 0.42, 0.38, 0.34)], float)
    W = resample_weights(n, 1000, 0)
    t = accuracy_trend(x, C, W)
    lo, hi = t["slope_interval"]
    assert lo < t["slope_per_10"] < hi < 0 and decide(t["slope_interval"], "<") == "holds"
    flat = np.tile(C[:1], (5, 1))
    f = accuracy_trend(x, flat, W)
    assert f["slope_per_10"] == pytest.approx(0) and f["spearman"] is None
    assert decide(f["slope_interval"], "<") == "does not hold"


def test_question_bootstrap_of_the_linear_model():
    rng = np.random.default_rng(2)
    n = 300
    nk = np.repeat([0, 50, 100, 150], 3)
    nu = np.tile([0, 60, 120], 4)
    p = 0.3 + 0.1 * nk / 150 - 0.15 * nu / 150
    C = (rng.random((12, n)) < p[:, None]).astype(float)
    ci = linear_model_question_bootstrap(C, nk, nu, 150, resample_weights(n, 500, 1))
    point = fit_linear_model(100 * C.mean(1), nk, nu, 150)["params"]
    for k in ("b0", "b_kn", "b_unk"):
        assert ci[k][0] < point[k] < ci[k][1]
    assert ci["b_unk"][1] < 0


def test_across_replicates():
    s = across_replicates([1.0, -2.0, 3.0, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2 / 3) and s["n_positive"] == 2 and s["n_negative"] == 1
    assert across_replicates([None])["mean"] is None
    a = {"claim": "c", "value": 1.0, "interval": [0.5, 1.5], "decision": "holds"}
    b = {**a, "value": 0.2, "decision": "unclear"}
    lm = {"in_distribution": {"params": {"b0": 1, "b_kn": 2, "b_unk": -3}, "r2": 0.5}}
    summ = replicate_summary({"r0": {"findings": {"f": a}, "linear_model": lm},
                              "r1": {"findings": {"f": b}, "linear_model": lm}})
    assert summ["findings"]["f"]["decision"] == "unclear" and summ["findings"]["f"]["decisions"] == ["holds", "unclear"]
    assert summ["linear_model"]["in_distribution"]["b_unk"]["n_negative"] == 2
    summ = replicate_summary({"r0": {"findings": {"f": a}}, "r1": {"findings": {"f": a}}})
    assert summ["findings"]["f"]["decision"] == "holds"
