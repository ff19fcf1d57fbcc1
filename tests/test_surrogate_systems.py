"""Constructed systems for every surrogate and every class it claims to reach, the reachability rule,
and the per-arm / incremental-validity / fit-epoch statistics on data with known answers."""

import json

import numpy as np
import pytest
import torch

from linear_models.hypothesis import (arm_test, correct_link_family, evaluate, fit_epoch_link, holm,
                                     incremental_validity)
from linear_models.surrogates import (reachable_by_shape, reachable_classes, relation_jacobian_systems,
                                      relation_map_classes, relation_map_reachable, ridge_loo, solve_answer_system,
                                      weight_update_system)

DT = torch.float64


def _orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))[0]


def _square(n, rank, g):
    """An n x n matrix of the given rank, its left null directions, and a vector in its range."""
    U, V = _orth(n, n, g), _orth(n, n, g)
    s = torch.cat([torch.linspace(3, 1, rank, dtype=DT), torch.zeros(n - rank, dtype=DT)])
    A = U @ torch.diag(s) @ V.T
    return A, U[:, rank:], A @ torch.randn(n, generator=g, dtype=DT)


# ---------------------------------------------------------------------------------------------- reachability


def test_reachable_classes_rule():
    # square, full rank: only "unique" (any b has exactly one solution)
    assert reachable_classes(6, 6, 6) == ("unique",)
    # wide at full row rank: never "no solution", never "unique" (unknowns outnumber equations)
    assert reachable_classes(4, 9, 4) == ("infinitely_many",)
    # tall at full column rank: no solution or unique
    assert reachable_classes(9, 4, 4) == ("no_solution", "unique")
    # rank-deficient square: no solution or infinitely many
    assert reachable_classes(6, 6, 5) == ("no_solution", "infinitely_many")
    # rank only bounded (matrix-free): a class any rank in the bounds reaches is kept
    assert reachable_classes(6, 6, 4, 6) == ("no_solution", "unique", "infinitely_many")
    assert "unique" not in reachable_by_shape(3, 8) and set(reachable_by_shape(8, 3)) == {
        "no_solution", "unique", "infinitely_many"}


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("kind", ["unique", "infinitely_many", "no_solution"])
def test_answer_system_constructed(kind):
    g = torch.Generator().manual_seed(3)
    n = 12
    if kind == "unique":
        J, _, b = _square(n, n, g)
    else:
        J, null, b = _square(n, n - 2, g)
        if kind == "no_solution":
            b = b + 0.5 * null[:, 0]
    feats, _ = solve_answer_system(J, b)
    assert feats["class"] == kind and kind in feats["reachable"]
    assert feats["n_equations"] == feats["n_unknowns"] == n
    if kind == "unique":
        assert feats["reachable"] == ["unique"] and feats["residual"] < 1e-10
    # b = 0 (every later gold token already wins by the margin): x = 0, consistent
    zero, _ = solve_answer_system(J, torch.zeros(n, dtype=DT))
    assert zero["class"] == ("unique" if kind == "unique" else "infinitely_many") and zero["solution_norm"] == 0


# ---------------------------------------------------------------------------------------------- (b)


def test_relation_map_constructed_and_reachable_by_shape():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(30, 5, generator=g, dtype=DT)
    Y = S @ torch.randn(5, 3, generator=g, dtype=DT) + 0.01 * torch.randn(30, 3, generator=g, dtype=DT)
    Y[4] = 5 * torch.randn(3, generator=g, dtype=DT)
    fit = ridge_loo(S, Y, ridge=1e-6)
    cls = relation_map_classes(fit, residual_tol=0.5)
    assert cls[4] == "no_solution" and set(cls) == {"no_solution", "unique"}
    assert relation_map_reachable(fit) == ("no_solution", "unique")
    # states in a 3-dimensional subspace of R^5: rank(S_c) = 3 < d, infinitely many maps
    low = torch.randn(30, 3, generator=g, dtype=DT) @ _orth(5, 3, g).T
    fit_low = ridge_loo(low, low @ torch.randn(5, 3, generator=g, dtype=DT), ridge=1e-6)
    assert set(relation_map_classes(fit_low, 0.5)) == {"infinitely_many"}
    assert relation_map_reachable(fit_low) == ("no_solution", "infinitely_many")
    # n <= d: "unique" is unreachable whatever the data (rank(S_c) <= n - 1 < d)
    wide = ridge_loo(S[:5], Y[:5], ridge=1e-6)
    assert "unique" not in relation_map_reachable(wide) and "unique" not in relation_map_classes(wide, 0.5)


@pytest.mark.parametrize("kind", ["unique", "infinitely_many", "no_solution"])
def test_relation_jacobian_constructed(kind):
    g = torch.Generator().manual_seed(5)
    d = 8
    W, null, t = _square(d, d if kind == "unique" else d - 1, g)
    if kind == "no_solution":
        t = t + 0.3 * null[:, 0]
    feats, _ = relation_jacobian_systems(W, t[None])
    assert feats[0]["class"] == kind and kind in feats[0]["reachable"]


# ---------------------------------------------------------------------------------------------- (c)


def _weight_case(kind, g, k=4, R=8):
    G_anchor = torch.randn(R, k, generator=g, dtype=DT)
    G_own = torch.randn(3, k, generator=g, dtype=DT)
    need = torch.tensor([1.0, 0.5, 0.0], dtype=DT)
    if kind == "unique":
        # direction 0 moves this example only: the anchors do not see it
        G_anchor[:, 0] = 0
        G_own = torch.zeros(3, k, dtype=DT)
        G_own[:, 0] = torch.tensor([2.0, 1.0, 0.0], dtype=DT)
        G_own[:, 1:] = 0.0
        G_own[2, 1] = 0.3  # the own rows also constrain direction 1, the anchors the rest: rank k
    elif kind == "infinitely_many":
        G_anchor[:, 0] = 0
        G_own = torch.zeros(3, k, dtype=DT)
        G_own[:, 0] = torch.tensor([2.0, 1.0, 0.0], dtype=DT)
        G_anchor[:, 3] = 0  # direction 3 moves nothing at all: a null space
    return G_own, need, G_anchor


@pytest.mark.parametrize("kind", ["unique", "infinitely_many", "no_solution"])
def test_weight_update_constructed(kind):
    g = torch.Generator().manual_seed(11)
    G_own, need, G_anchor = _weight_case(kind, g)
    f = weight_update_system(G_own, need, G_anchor, residual_tol=0.1, residual_sweep=(0.1, 0.999))
    assert f["class"] == kind and kind in f["reachable"], f
    assert f["n_equations"] == 11 and f["n_unknowns"] == 4
    assert f["sweep"]["0.1"] == kind
    if kind == "no_solution":
        # the update fitting this example alone moves the anchors
        assert f["residual"] > 0.1 and f["interference"] > 0 and f["update_norm"] > 0
    else:
        assert f["residual"] < 1e-10 and f["interference"] < 1e-10
    # tall (R >= k): every class is reachable only through the rank; full column rank excludes "infinitely_many"
    assert set(f["reachable"]) == ({"no_solution", "infinitely_many"} if kind == "infinitely_many"
                                   else {"no_solution", "unique"})


def test_weight_update_already_winning_is_consistent():
    g = torch.Generator().manual_seed(2)
    f = weight_update_system(torch.randn(3, 4, generator=g, dtype=DT), torch.zeros(3, dtype=DT),
                             torch.randn(8, 4, generator=g, dtype=DT), residual_tol=0.1)
    assert f["class"] == "unique" and f["residual"] == 0 and f["update_norm"] == 0


# ---------------------------------------------------------------------------------------------- arms


def _data(n_per, seed=0):
    rng = np.random.default_rng(seed)
    cats = ["HighlyKnown"] * n_per + ["MaybeKnown"] * n_per + ["WeaklyKnown"] * n_per + ["Unknown"] * n_per
    rel = [f"P{i % 3}" for i in range(len(cats))]
    return rng, cats, rel


def test_arm_test_detects_each_arm_and_its_direction():
    rng, cats, rel = _data(40)
    want = {"HighlyKnown": "unique", "MaybeKnown": "infinitely_many", "WeaklyKnown": "infinitely_many",
            "Unknown": "no_solution"}
    cls = [want[c] if rng.random() < 0.8 else rng.choice(["no_solution", "unique", "infinitely_many"]) for c in cats]
    reach = [("no_solution", "unique", "infinitely_many")] * len(cats)
    for arm in ("no_solution", "unique", "infinitely_many"):
        t = arm_test(cls, cats, rel, reach, arm)
        assert t["status"] == "testable" and t["method"] == "Cochran-Mantel-Haenszel"
        assert t["p"] < 1e-6 and t["direction"] == 1 and t["precision"] > t["base_rate"]
    # reversed: Unknown examples are the ones with solutions
    rev = ["unique" if c == "Unknown" else "no_solution" for c in cats]
    t = arm_test(rev, cats, rel, reach, "no_solution")
    assert t["p"] < 1e-6 and t["direction"] == -1


def test_arm_test_untestable_and_small_counts():
    rng, cats, rel = _data(10)
    cls = ["unique"] * len(cats)
    # a class no example can reach: untestable, whatever the classes say
    t = arm_test(cls, cats, rel, [("unique",)] * len(cats), "no_solution")
    assert t["status"] == "untestable" and "unreachable" in t["reason"]
    # a class every example takes: no variation
    t = arm_test(cls, cats, rel, [("unique", "no_solution")] * len(cats), "unique")
    assert t["status"] == "untestable" and "no variation" in t["reason"]
    # a rare class: an expected count below 5 -> permutation within relations, Fisher beside it
    cls = ["no_solution" if (c == "Unknown" and i % 10 < 3) else "unique" for i, c in enumerate(cats)]
    t = arm_test(cls, cats, rel, [("no_solution", "unique")] * len(cats), "no_solution", n_perm=999)
    assert t["min_expected"] < 5 and t["method"] == "permutation within relations" and t["direction"] == 1
    assert 0 < t["p"] < 0.05 and t["fisher_p"] < 0.05


def test_arm_test_is_stratified_by_relation():
    """Simpson: the class is a property of the relation and so is the Unknown share; within each relation
    class and category are independent. The pooled table is strongly associated, the stratified test not."""
    rng = np.random.default_rng(1)
    cats, rel, cls = [], [], []
    for r, p_unknown, klass in (("A", 0.9, "no_solution"), ("B", 0.1, "unique")):
        for _ in range(150):
            rel.append(r)
            cats.append("Unknown" if rng.random() < p_unknown else "HighlyKnown")
            cls.append(klass if rng.random() < 0.9 else ("unique" if klass == "no_solution" else "no_solution"))
    reach = [("no_solution", "unique")] * len(cls)
    t = arm_test(cls, cats, rel, reach, "no_solution")
    assert t["fisher_p"] < 1e-20  # pooled: "supported" if read naively
    assert t["p"] > 0.01  # within relations: nothing


def test_holm_and_evaluate_verdicts():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng, cats, rel = _data(60, seed=4)
    ids = [f"e{i}" for i in range(len(cats))]
    # baseline: log-probability that separates Known from Unknown only partly
    lp = [(-1.0 if c != "Unknown" else -3.0) + rng.normal(0, 1.5) for c in cats]
    margin = [x + rng.normal(0, 1) for x in lp]
    baseline = {i: {"logprob": a, "first_token_margin": b} for i, a, b in zip(ids, lp, margin)}
    good = [{"id": i, "category": c, "relation": r, "class": "no_solution" if c == "Unknown" else "unique",
             "residual": (1.0 if c == "Unknown" else 0.01) * (1 + 0.1 * rng.random()),
             "reachable": ["no_solution", "unique"], "sweep": {}} for i, c, r in zip(ids, cats, rel)]
    noise = [{**row, "class": rng.choice(["no_solution", "unique"]), "residual": float(rng.random())} for row in good]
    out = evaluate({"good": good, "noise": noise}, baseline, None, n_perm=499, folds=4, n_boot=100)
    g, n = out["good"]["at_default"], out["noise"]["at_default"]
    assert g["arms"]["no_solution"]["verdict"] == "supported" and g["incremental_validity"]["adds_information"]
    assert g["arms"]["infinitely_many"]["verdict"] == "untestable"  # unreachable for every row
    assert g["verdict"] == "supported"
    assert n["verdict"] == "inconclusive" and not n["incremental_validity"]["adds_information"]
    assert {a["verdict"] for a in n["arms"].values()} <= {"inconclusive", "untestable"}
    # a surrogate that restates the baseline: its class is the baseline's own sign
    restate = [{**row, "class": "no_solution" if baseline[row["id"]]["logprob"] < -2 else "unique",
                "residual": -baseline[row["id"]]["logprob"]} for row in good]
    r = evaluate({"restate": restate}, baseline, None, n_perm=499, folds=4, n_boot=100)["restate"]["at_default"]
    assert r["arms"]["no_solution"]["verdict"] in ("not_beyond_baseline", "inconclusive")
    assert not r["incremental_validity"]["adds_information"]
    # a swept tolerance passes the same test as the default: cross-validated, not the likelihood ratio alone
    swept = [{**row, "sweep": {"0.5": row["class"]}} for row in good]
    sw = evaluate({"good": swept}, baseline, None, n_perm=499, folds=4, n_boot=100)["good"]["sweep"]["0.5"]
    assert sw["incremental_validity"]["cv_auroc_difference_ci"] is not None
    assert sw["verdict"] == "supported" and sw["incremental_validity"]["adds_information"]


def test_incremental_validity_nested():
    rng = np.random.default_rng(0)
    n = 400
    cats = rng.choice(["HighlyKnown", "Unknown"], n)
    base = rng.normal(0, 1, n) + (cats == "Unknown") * 0.5
    extra = rng.normal(0, 1, n) + (cats == "Unknown") * 1.5
    yes = incremental_validity(list(cats), {"logprob": base.tolist()}, {"x": extra.tolist()}, folds=5, n_boot=100)
    no = incremental_validity(list(cats), {"logprob": base.tolist()}, {"x": rng.normal(0, 1, n).tolist()}, folds=5,
                              n_boot=100)
    assert yes["p"] < 1e-6 and yes["cv_auroc_difference"] > 0.05 and yes["cv_auroc_difference_ci"][0] > 0
    assert no["p"] > 0.01 and no["cv_auroc_difference_ci"][0] < 0 < no["cv_auroc_difference_ci"][1] + 0.02


def test_fit_epoch_link():
    rng = np.random.default_rng(0)
    v = rng.random(60)
    cats = ["Unknown"] * 30 + ["HighlyKnown"] * 30
    epochs = [int(5 * x) + 1 if i < 30 else int(rng.integers(1, 5)) for i, x in enumerate(v)]
    out = fit_epoch_link(list(v), epochs, cats, n_boot=300)
    assert out["Unknown"]["rho"] > 0.8 and out["Unknown"]["holds"] and out["Unknown"]["ci"][0] > 0
    assert out["HighlyKnown"]["ci"][0] < 0 < out["HighlyKnown"]["ci"][1]
    assert out["MaybeKnown"]["rho"] is None and out["MaybeKnown"]["n"] == 0


def test_fit_epoch_link_decides_three_ways_and_keeps_degenerate_resamples():
    rng = np.random.default_rng(1)
    # a later fit for a smaller value: the interval lies below 0
    v = rng.random(40)
    out = fit_epoch_link(list(v), [int(5 * (1 - x)) + 1 for x in v], ["Unknown"] * 40, n_boot=300)
    assert out["Unknown"]["decision"] == "contradicted" and out["Unknown"]["holds"] is False
    assert out["Unknown"]["ci"][1] < 0 and out["Unknown"]["degenerate_share"] == 0
    # 38 of 40 fitted at epoch 1; the two fitted later have the two smallest values. Resamples missing
    # both are constant (about 13% of them): dropping them would leave only resamples holding a late,
    # small example, all negative, an interval below 0 from two examples. Counted, they make it unclear.
    v = np.sort(rng.random(40))
    epochs = [2, 2] + [1] * 38
    out = fit_epoch_link(list(v), epochs, ["HighlyKnown"] * 40, n_boot=1000)
    hk = out["HighlyKnown"]
    assert 0.05 < hk["degenerate_share"] < 0.25
    assert hk["decision"] == "unclear" and hk["holds"] is None and "constant series" in hk["note"]
    assert hk["ci"][1] >= 0  # the zeros of the constant resamples are inside the interval
    loose = fit_epoch_link(list(v), epochs, ["HighlyKnown"] * 40, n_boot=1000, max_degenerate=1.0)
    assert loose["HighlyKnown"]["decision"] in ("unclear", "contradicted")


def test_fit_epoch_link_family_is_holm_corrected():
    """A weak correlation whose interval just excludes 0 holds alone, and not among many read together."""
    rng = np.random.default_rng(2)
    v = rng.random(200)
    e = np.round(2 * v + rng.normal(0, 3, 200))  # rho 0.16, p 0.03
    one = fit_epoch_link(list(v), list(e), ["Unknown"] * 200, n_boot=500)
    u = one["Unknown"]
    assert u["decision"] == "holds" and 1e-3 < u["p"] < 0.05
    alone = {"fields": {"residual": {"Unknown": dict(u)}}}
    correct_link_family([alone])
    assert alone["fields"]["residual"]["Unknown"]["decision"] == "holds"
    many = [{"fields": {"residual": {"Unknown": dict(u)}}}] + [
        {"fields": {"residual": {"Unknown": {"p": 0.5, "decision": "unclear"}}}} for _ in range(40)]
    correct_link_family(many)
    cell = many[0]["fields"]["residual"]["Unknown"]
    assert cell["decision"] == "unclear" and cell["holds"] is None and cell["p_holm"] >= 0.05
    assert many[0]["family_size"] == 41


def test_fit_epochs_from_a_finetune_run(tmp_path):
    from knowcat.surrogate import fit_epochs

    for variant, fitted in (("natural", {"a": 2, "b": None}), ("known_50", {"a": 1})):
        d = tmp_path / "finetune" / variant / "epochs"
        d.mkdir(parents=True)
        for epoch in (1, 2, 3):
            lines = [json.dumps({"set": "train", "id": i, "fitted": f is not None and epoch >= f})
                     for i, f in fitted.items()] + [json.dumps({"set": "dev", "id": "z", "fitted": True})]
            (d / f"epoch_{epoch:03d}.answers.jsonl").write_text("\n".join(lines) + "\n")
    one = fit_epochs(tmp_path, "natural")
    assert one["epochs"] == {"a": 2, "b": 4} and one["never_fitted"] == 1
    both = fit_epochs(tmp_path)
    assert both["epochs"] == {"a": 1.5, "b": 4}  # the mean over the runs holding the example
    with pytest.raises(ValueError):
        fit_epochs(tmp_path, "nope")
    assert fit_epochs(tmp_path / "missing") is None
