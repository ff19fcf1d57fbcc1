import numpy as np
import pytest

from linear_models.study import fit_linear_model, fitting_speed, paired_split_ttest


def test_ols_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    D = 500
    nk = rng.integers(0, 400, 120)
    nu = rng.integers(0, 250, 120)
    y = 36.9 + 7.3 * nk / D - 8.3 * nu / D + rng.normal(0, 0.1, 120)
    res = fit_linear_model(y, nk, nu, D)
    p = res["params"]
    assert p["b0"] == pytest.approx(36.9, abs=0.1)
    assert p["b_kn"] == pytest.approx(7.3, abs=0.2)
    assert p["b_unk"] == pytest.approx(-8.3, abs=0.2)
    for k, v in (("b0", 36.9), ("b_kn", 7.3), ("b_unk", -8.3)):
        lo, hi = res["conf_int_95"][k]
        assert lo < res["params"][k] < hi and abs(res["params"][k] - v) < 4 * res["bse"][k]
    assert res["r2"] > 0.99 and res["nobs"] == 120 and res["pvalues"]["b_unk"] < 1e-6


def test_ols_without_effect_is_not_significant():
    rng = np.random.default_rng(1)
    nk, nu = rng.integers(0, 100, 60), rng.integers(0, 100, 60)
    res = fit_linear_model(40 + rng.normal(0, 1, 60), nk, nu, 100)
    assert res["pvalues"]["b_kn"] > 0.01 and res["pvalues"]["b_unk"] > 0.01 and res["r2"] < 0.2
    with pytest.raises(ValueError, match="at least 4"):
        fit_linear_model([1, 2], [1, 2], [0, 1], 10)


def test_paired_split_ttest():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.6
    same = paired_split_ttest(a, a)
    assert same["p"] == 1.0 and same["mean_diff"] == 0 and same["n_parts"] == 100
    b = a.copy()
    flip = np.flatnonzero(a)[:150]  # B loses 150 correct answers
    b[flip] = False
    res = paired_split_ttest(a, b)
    assert res["mean_diff"] == pytest.approx(15.0, abs=0.5) and res["p"] < 1e-6 and res["t"] > 0
    # the parts are a partition: part means average to the overall accuracy
    assert res["mean_a"] == pytest.approx(100 * a.mean(), abs=0.01)
    with pytest.raises(ValueError):
        paired_split_ttest(a, b[:10])


def test_fitting_speed():
    s = fitting_speed({1: 0.1, 2: 0.55, 3: 0.9, 4: 1.0})
    assert s == {"epoch_to_50": 2, "epoch_to_90": 3, "epoch_to_100": 4, "mean_fitted": pytest.approx(0.6375)}
    assert fitting_speed({1: 0.2, 2: 0.3})["epoch_to_50"] is None
