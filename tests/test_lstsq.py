"""Constructed systems with known answers, on the dense and the matrix-free paths."""

import math

import pytest
import torch

from linear_models.hypothesis import hypothesis_test
from linear_models.lstsq import (Tolerance, cgls, classify, effective_rank, matrix_free_solve, randomized_svd,
                                 svd_solve, sweep_classes)
from linear_models.surrogates import relation_map_classes, ridge_loo, solve_answer_system

DT = torch.float64


def _orth(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))
    return q


def system(kind: str, m=12, n=8, seed=0):
    """(A, b, expected class, expected rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=DT)
    if kind == "full_rank_consistent":
        A = torch.randn(m, n, generator=g, dtype=DT)
        return A, A @ x, "unique", n
    if kind == "inconsistent":
        A = torch.randn(m, n, generator=g, dtype=DT)
        U = torch.linalg.svd(A).U
        return A, A @ x + 0.5 * U[:, n], "no_solution", n  # a component orthogonal to range(A)
    if kind == "rank_deficient_consistent":
        A = _orth(m, 3, g) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)) @ _orth(n, 3, g).T
        return A, A @ x, "infinitely_many", 3
    if kind == "rank_deficient_inconsistent":
        A = _orth(m, 3, g) @ _orth(n, 3, g).T
        U = torch.linalg.svd(A).U
        return A, A @ x + U[:, 5], "no_solution", 3
    raise KeyError(kind)


KINDS = ["full_rank_consistent", "inconsistent", "rank_deficient_consistent", "rank_deficient_inconsistent"]


@pytest.mark.parametrize("kind", KINDS)
def test_dense_classifies_constructed_systems(kind):
    A, b, want, rank = system(kind)
    res = svd_solve(A, b)
    assert classify(res["rank"], res["rank_aug"], A.shape[1]) == [want]
    assert int(res["rank"]) == rank and int(res["nullity"]) == A.shape[1] - rank
    # the least-squares solution is the minimum-norm one: equal to the pseudo-inverse's
    assert torch.allclose(res["x"], torch.linalg.pinv(A) @ b, atol=1e-10)
    if want != "no_solution":
        assert float(res["residual"]) < 1e-10
    else:
        assert float(res["residual"]) > 0.01


def _ops(A):
    return (lambda V: A @ V), (lambda U: A.T @ U)


def _dense_class(A, b, tol=Tolerance()):
    res = svd_solve(A, b, tol)
    return classify(res["rank"], res["rank_aug"], A.shape[1])[0], res


SWEEP = (1e-12, 1e-8, 1e-4, 1e-2, 0.5)


@pytest.mark.parametrize("k", [8, 4, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_free_agrees_with_dense_when_the_sketch_covers_the_rank(kind, k):
    """k + oversample >= n: the sketch spans range(A), the rank is exact and the matrix-free path
    reaches the dense class, rank, residual, solution and sweep (k = 2, 4 failed before: the
    consistency test asked CGLS for a residual within the rank cutoff, and "unique" for rank = k = n)."""
    A, b, want, rank = system(kind)
    dense_cls, dense = _dense_class(A, b)
    mf = matrix_free_solve(*_ops(A), b, A.shape[1], k=k, sweep_rtols=SWEEP)
    assert dense_cls == want and mf["class"] == want and mf["decided_by"] == "rank"
    assert mf["rank"] == rank and mf["rank_exact"] and mf["rank_upper"] == rank and mf["range_error"] == 0.0
    assert mf["nullity"] == A.shape[1] - rank
    assert mf["residual"] == pytest.approx(float(dense["residual"]), abs=1e-8)
    assert torch.allclose(mf["x"], dense["x"], atol=1e-6)
    assert torch.allclose(mf["singular_values"][:rank], dense["singular_values"][:rank], rtol=1e-8)
    assert mf["sweep"] == sweep_classes(dense["singular_values"], dense["singular_values_aug"], A.shape[1], SWEEP)
    assert mf["cgls"] is None  # decided from the sketch alone


def big_system(kind: str, seed=0):
    """Systems with more unknowns than the sketch below: (A, b, true class, rank)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tall_full_rank_consistent":
        A = torch.randn(60, 40, generator=g, dtype=DT)
        return A, A @ torch.randn(40, generator=g, dtype=DT), "unique", 40
    if kind == "tall_full_rank_inconsistent":
        A = torch.randn(60, 40, generator=g, dtype=DT)
        U = torch.linalg.svd(A).U
        b = A @ torch.randn(40, generator=g, dtype=DT)
        return A, b + 0.3 * b.norm() * U[:, 50], "no_solution", 40
    if kind == "rank3_consistent":
        A = _orth(60, 3, g) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)) @ _orth(40, 3, g).T
        return A, A @ torch.randn(40, generator=g, dtype=DT), "infinitely_many", 3
    if kind == "rank3_inconsistent":
        A = _orth(60, 3, g) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)) @ _orth(40, 3, g).T
        U = torch.linalg.svd(A).U
        return A, A @ torch.randn(40, generator=g, dtype=DT) + U[:, 10], "no_solution", 3
    if kind == "wide_consistent":  # 40 equations, 60 unknowns, full row rank
        A = torch.randn(40, 60, generator=g, dtype=DT)
        return A, A @ torch.randn(60, generator=g, dtype=DT), "infinitely_many", 40
    raise KeyError(kind)


TIGHT = Tolerance(rtol=1e-10)  # far above float64 rounding, far below every non-zero singular value here


# (kind, k, oversample) -> (class, decided_by, rank is exact): what the matrix-free path can tell with
# p = k + oversample triplets of a 60 x 40 (or 40 x 60) system
FEW = {
    # rank 40 > p = 6: consistency from CGLS; "unique" would need all 40 singular values -> honest label
    ("tall_full_rank_consistent", 4, 2): ("consistent_rank_unknown", "residual", False),
    ("tall_full_rank_inconsistent", 4, 2): ("no_solution", "residual", False),
    # p = 4 >= rank 3: the range error is at rounding level, the rank is exact, Rouché–Capelli decides
    ("rank3_consistent", 4, 0): ("infinitely_many", "rank", True),
    ("rank3_inconsistent", 4, 0): ("no_solution", "rank", True),
    # p = 2 < rank 3: consistency from CGLS, the number of solutions cannot be told (n = 40 <= m = 60)
    ("rank3_consistent", 2, 0): ("consistent_rank_unknown", "residual", False),
    ("rank3_inconsistent", 2, 0): ("no_solution", "residual", False),
    # n = 60 > m = 40: consistent means infinitely many (nullity >= 20), whatever the rank
    ("wide_consistent", 4, 2): ("infinitely_many", "residual", False),
}


@pytest.mark.parametrize("case", list(FEW), ids=lambda c: f"{c[0]}-k{c[1]}+{c[2]}")
def test_matrix_free_with_fewer_triplets_than_unknowns(case):
    kind, k, over = case
    want_cls, want_by, exact = FEW[case]
    A, b, true_cls, rank = big_system(kind)
    m, n = A.shape
    dense_cls, dense = _dense_class(A, b, TIGHT)
    assert dense_cls == true_cls and int(dense["rank"]) == rank
    mf = matrix_free_solve(*_ops(A), b, n, k=k, oversample=over, tol=TIGHT, residual_tol=1e-6, max_iter=400,
                           normal_tol=1e-10)
    assert k + over < n and mf["triplets"] == k + over
    assert (mf["class"], mf["decided_by"], mf["rank_exact"]) == (want_cls, want_by, exact)
    # the rank bounds always hold, and are exact only when they meet
    assert mf["rank"] <= rank <= mf["rank_upper"]
    assert mf["rank"] == rank if exact else mf["rank"] < mf["rank_upper"]
    assert mf["nullity_lower"] == n - mf["rank_upper"] and mf["nullity_lower"] <= n - rank
    if kind == "wide_consistent":
        assert mf["nullity_lower"] >= n - m
    # never a contradiction of the dense path: the same consistency, and a count only where dense has it
    assert (mf["class"] == "no_solution") == (dense_cls == "no_solution")
    if mf["class"] in ("unique", "infinitely_many"):
        assert mf["class"] == dense_cls
    # the least-squares residual is the dense one
    assert mf["residual"] == pytest.approx(float(dense["residual"]), abs=1e-6)
    if want_by == "residual":
        assert mf["cgls"]["converged"] or mf["cgls"]["consistent_stop"]


def test_matrix_free_budget_and_residual_floor():
    """CGLS stopped before it converged: an inconsistency it has not established stays
    "undetermined", unless a known lower bound of the residual (structural zero rows) decides it."""
    g = torch.Generator().manual_seed(5)
    J = _orth(50, 40, g) @ torch.diag(torch.logspace(0, -4, 40, dtype=DT)) @ _orth(40, 40, g).T
    A = torch.cat([torch.zeros(10, 40, dtype=DT), J])  # 10 structurally zero rows on top, condition 1e4
    b = A @ torch.randn(40, generator=g, dtype=DT)
    b[:10] = 0.05 * b.norm() / 10 ** 0.5  # on the zero rows: outside range(A)
    floor = float(b[:10].norm())
    kw = dict(k=2, oversample=0, tol=TIGHT, residual_tol=1e-3, max_iter=2, normal_tol=1e-12)
    stopped = matrix_free_solve(*_ops(A), b, 40, **kw)
    assert stopped["class"] == "undetermined" and not stopped["cgls"]["converged"]
    assert stopped["cgls"]["iterations"] == 2 and stopped["residual"] > 1e-3
    floored = matrix_free_solve(*_ops(A), b, 40, residual_floor=floor, **kw)
    assert floored["class"] == "no_solution" and floored["decided_by"] == "residual"
    # the same system made consistent (zero on the zero rows): CGLS reaches the tolerance
    b[:10] = 0
    ok = matrix_free_solve(*_ops(A), b, 40, **{**kw, "max_iter": 400})
    assert ok["class"] == "consistent_rank_unknown" and ok["residual"] <= 1e-3


def test_cgls_stopping_rules():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(30, 10, generator=g, dtype=DT)
    b = torch.randn(30, generator=g, dtype=DT)  # inconsistent
    anorm = float(torch.linalg.matrix_norm(A, 2))
    mv, rmv = (lambda v: A @ v), (lambda u: A.T @ u)
    out = cgls(mv, rmv, b, 10, normal_tol=1e-10, anorm=anorm)
    assert out["converged"] and not out["consistent_stop"] and out["iterations"] <= 20
    assert torch.allclose(out["x"], torch.linalg.pinv(A) @ b, atol=1e-8)
    assert float((A.T @ out["r"]).norm()) <= 1e-10 * anorm * float(out["r"].norm())
    short = cgls(mv, rmv, b, 10, max_iter=1, normal_tol=1e-10, anorm=anorm)
    assert short["iterations"] == 1 and not short["converged"]
    cons = cgls(mv, rmv, A @ torch.ones(10, dtype=DT), 10, normal_tol=1e-10, anorm=anorm)
    assert cons["consistent_stop"] and float(cons["r"].norm()) < 1e-8


def _ill(seed=3):
    """Singular values 1 and 1e-6; b has a 1e-3 component along the small direction."""
    g = torch.Generator().manual_seed(seed)
    U, V = _orth(5, 2, g), _orth(2, 2, g)
    A = U @ torch.diag(torch.tensor([1.0, 1e-6], dtype=DT)) @ V.T
    return A, A @ torch.tensor([1.0, 1.0], dtype=DT) + 1e-3 * U[:, 1]


# rtol -> (rank, class): the small singular value is 1e-6: just below it rank 2 and a solution, just above
# it rank 1, and b's 1e-3 along the dropped direction makes "no solution"
ILL = {1e-8: (2, "unique"), 5e-7: (2, "unique"), 2e-6: (1, "no_solution"), 1e-4: (1, "no_solution")}


@pytest.mark.parametrize("rtol", list(ILL))
def test_ill_conditioned_near_the_tolerance(rtol):
    A, b = _ill()
    want_rank, want = ILL[rtol]
    dense = svd_solve(A, b, Tolerance(rtol=rtol))
    assert int(dense["rank"]) == want_rank and classify(dense["rank"], dense["rank_aug"], 2) == [want]
    assert float(dense["cond"]) == pytest.approx(1e6, rel=1e-6)
    # matrix-free with the sketch covering the rank (p = n = 2): the same rank and class, at every tolerance
    mf = matrix_free_solve(*_ops(A), b, 2, k=2, tol=Tolerance(rtol=rtol), sweep_rtols=list(ILL))
    assert (mf["rank"], mf["class"], mf["rank_exact"]) == (want_rank, want, True)
    assert mf["sweep"] == {rt: c for rt, (_, c) in ILL.items()}
    assert mf["residual"] == pytest.approx(float(dense["residual"]), rel=1e-6, abs=1e-12)
    # one triplet only (k = 1 < rank 2): where the range error (~1e-6) is below the cutoff the rank is still
    # exact and the inconsistency is found; where it is not, CGLS finds the system consistent and the
    # number of solutions is left open rather than guessed
    one = matrix_free_solve(*_ops(A), b, 2, k=1, oversample=0, tol=Tolerance(rtol=rtol), residual_tol=1e-6,
                            normal_tol=1e-12)
    if rtol >= 1e-4:
        assert (one["class"], one["decided_by"], one["rank"], one["rank_exact"]) == ("no_solution", "rank", 1, True)
    else:
        # the range error (~1e-5 as estimated) exceeds the cutoff: rank 1 or 2, not resolved. CGLS solves the
        # system exactly (A itself is invertible on its range), so the residual test calls it consistent; at
        # rtol 2e-6 the dense path calls the same b inconsistent, because it drops the 1e-6 direction. This is
        # the documented difference of the criteria near the cutoff, stated here so a change shows.
        assert one["range_error"] > rtol and not one["rank_exact"]
        assert (one["class"], one["decided_by"], one["rank"], one["rank_upper"]) == \
            ("consistent_rank_unknown", "residual", 1, 2)
        assert one["residual"] < 1e-10


def test_ill_conditioned_sweep_and_atol():
    A, b = _ill()
    strict = svd_solve(A, b, Tolerance(rtol=1e-8))
    sweep = sweep_classes(strict["singular_values"], strict["singular_values_aug"], 2, [1e-8, 1e-4])
    assert sweep == {1e-8: "unique", 1e-4: "no_solution"}
    # an explicit absolute cutoff works the same way, on both paths
    assert int(svd_solve(A, b, Tolerance(rtol=0.0, atol=1e-5))["rank"]) == 1
    mf = matrix_free_solve(*_ops(A), b, 2, k=2, tol=Tolerance(rtol=0.0, atol=1e-5))
    assert mf["rank"] == 1 and mf["class"] == "no_solution"


def test_batched_float32_and_zero_rhs():
    A = torch.stack([system(k)[0] for k in KINDS]).float()
    b = torch.stack([system(k)[1] for k in KINDS]).float()
    res = svd_solve(A, b)
    assert classify(res["rank"], res["rank_aug"], 8) == [system(k)[2] for k in KINDS]
    z = svd_solve(A[:1], torch.zeros(1, 12))
    assert float(z["residual"]) == 0.0 and classify(z["rank"], z["rank_aug"], 8) == ["unique"]
    assert float(effective_rank(torch.ones(4))) == pytest.approx(4.0)
    sing = svd_solve(torch.zeros(3, 2), torch.zeros(3))
    assert math.isinf(float(sing["cond"])) and int(sing["rank"]) == 0


def test_ridge_loo_matches_refits():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(30, 5, generator=g, dtype=DT)
    Y = S @ torch.randn(5, 3, generator=g, dtype=DT) + 0.05 * torch.randn(30, 3, generator=g, dtype=DT)
    Y[7] = 3 * torch.randn(3, generator=g, dtype=DT)  # one example the map cannot produce
    fit = ridge_loo(S, Y, ridge=0.01)
    for i in (0, 7, 29):
        keep = [j for j in range(30) if j != i]
        Sc, Yc = S[keep], Y[keep]
        sb, yb = Sc.mean(0), Yc.mean(0)
        lam = fit["lambda"]  # hat-matrix LOO keeps the full-data lambda; refit with the same one
        W = torch.linalg.solve((Sc - sb).T @ (Sc - sb) + lam * torch.eye(5, dtype=DT), (Sc - sb).T @ (Yc - yb))
        pred = (S[i] - sb) @ W + yb
        # exact for ordinary least squares; for ridge the centring moves it slightly
        assert torch.allclose(fit["loo"][i], Y[i] - pred, atol=0.05 * float((Y[i] - pred).norm()) + 1e-6)
    cls = relation_map_classes(fit, residual_tol=0.9)
    assert cls[7] == "no_solution" and int(fit["rel_loo"].argmax()) == 7 and cls.count("no_solution") == 1
    assert set(cls) - {"no_solution"} == {"unique"}  # n = 30 > d = 5, full rank: determined
    wide = ridge_loo(S[:4], Y[:4], ridge=0.05)
    assert set(relation_map_classes(wide, 10.0)) == {"infinitely_many"}


def test_hypothesis_description_says_when_the_chi_square_cannot_be_read():
    cats = ["Unknown"] * 40 + ["HighlyKnown"] * 40 + ["MaybeKnown"] * 20
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(100, generator=g).tolist()
    cls = ["no_solution" if c == "Unknown" else "unique" for c in cats]
    t = hypothesis_test(cls, noise, cats)
    assert "verdict" not in t  # the verdict is per arm (linear_models.hypothesis.evaluate)
    assert t["chi_square"]["min_expected"] >= 5 and "note" not in t["chi_square"]
    rare = ["infinitely_many"] * 2 + cls[2:]
    t = hypothesis_test(rare, noise, cats)
    assert t["chi_square"]["min_expected"] < 5 and t["chi_square"]["cells_expected_below_5"] >= 1
    assert "not to be read" in t["chi_square"]["note"]


def test_hypothesis_with_matrix_free_labels():
    from linear_models.hypothesis import arm_test, contingency, evaluate, format_verdict

    cats = ["Unknown"] * 30 + ["HighlyKnown"] * 30
    cls = ["no_solution"] * 25 + ["undetermined"] * 5 + ["consistent_rank_unknown"] * 27 + ["no_solution"] * 3
    res = [1.0] * 30 + [0.001 * i for i in range(30)]
    t = hypothesis_test(cls, res, cats)
    assert set(t["table"]) == {"no_solution", "unique", "infinitely_many", "consistent_rank_unknown", "undetermined"}
    assert t["class_counts"]["undetermined"] == 5 and sum(t["class_counts"].values()) == 60
    from scipy import stats

    # undetermined rows leave the chi-square table
    chi2 = stats.chi2_contingency([[25, 3], [0, 27]])[0]
    assert t["chi_square"]["chi2"] == pytest.approx(chi2)
    assert any("5 of 60 examples undetermined" in r for r in t["notes"])
    # ... and every arm; consistent_rank_unknown counts as "has a solution" in the no-solution arm and is
    # left out of the unique / infinitely-many arms (whether it is unique is unknown)
    reach = [("no_solution", "unique", "infinitely_many")] * 60
    rel = ["P1"] * 60
    ns = arm_test(cls, cats, rel, reach, "no_solution")
    assert ns["n"] == 55 and ns["table"]["class_and_category"] == 25 and ns["table"]["category_not_class"] == 0
    un = arm_test(cls, cats, rel, reach, "unique")
    assert un["n"] == 28 and un["status"] == "untestable"
    rows = [{"id": str(i), "class": c, "residual": r, "category": k, "relation": "P1", "sweep": {}}
            for i, (c, r, k) in enumerate(zip(cls, res, cats))]
    out = evaluate({"x": rows}, None, None, n_perm=199)["x"]["at_default"]
    assert out["arms"]["no_solution"]["verdict"] in ("inconclusive", "not_beyond_baseline")  # no baseline: not supported
    assert "consistent_rank_unknown" in format_verdict("x", out)
    # the three classes only when no matrix-free label occurs; an unknown label is an error
    assert set(contingency(["unique"], ["Unknown"])) == {"no_solution", "unique", "infinitely_many"}
    with pytest.raises(ValueError):
        contingency(["maybe"], ["Unknown"])


def test_ridge_loo_statistics_with_explicit_tolerance():
    """rank, condition number and effective rank of the centred subject states, at the cutoff given
    (no library default): one direction of S at 1e-7 of the others counts at rtol 1e-9, not at 1e-5."""
    g = torch.Generator().manual_seed(1)
    n, d = 40, 6
    base = torch.randn(n, d - 1, generator=g, dtype=DT)
    S = torch.cat([base, 1e-7 * torch.randn(n, 1, generator=g, dtype=DT)], 1) @ _orth(d, d, g).T
    Y = S @ torch.randn(d, 3, generator=g, dtype=DT) + 0.1 * torch.randn(n, 3, generator=g, dtype=DT)
    sig = torch.linalg.svdvals(S - S.mean(0))
    fine = ridge_loo(S, Y, ridge=0.0, tol=Tolerance(rtol=1e-9))
    coarse = ridge_loo(S, Y, ridge=0.0, tol=Tolerance(rtol=1e-5))
    assert (fine["rank"], coarse["rank"]) == (d, d - 1)
    assert fine["cond_kept"] == pytest.approx(float(sig[0] / sig[-1]), rel=1e-6)
    assert coarse["cond_kept"] == pytest.approx(float(sig[0] / sig[-2]), rel=1e-6)
    assert fine["cond"] == coarse["cond"] == pytest.approx(float(sig[0] / sig[-1]), rel=1e-6)
    assert fine["effective_rank"] == pytest.approx(float(effective_rank(sig)), rel=1e-9) and fine["effective_rank"] < d
    assert relation_map_classes(fine, 10.0)[0] == "unique"
    assert relation_map_classes(coarse, 10.0)[0] == "infinitely_many"
    # ridge 0 with the cutoff is the pseudo-inverse least-squares fit with that cutoff
    Sc, Yc = S - S.mean(0), Y - Y.mean(0)
    ref = torch.linalg.pinv(Sc, rtol=1e-5) @ Yc
    assert torch.allclose(coarse["W"], ref, atol=1e-8)
    # float32 on request (the surrogate's --dtype), the same rank at the coarse cutoff
    f32 = ridge_loo(S.float(), Y.float(), ridge=0.0, tol=Tolerance(rtol=1e-5))
    assert f32["W"].dtype == torch.float32 and f32["rank"] == d - 1


def test_device_follows_the_inputs():
    """Under a default device of "meta", every tensor the solvers create without naming its device
    would be a meta tensor and fail against the CPU inputs (or when read): so this passing means
    every allocation follows its inputs' device (what makes the code run on CUDA)."""
    A, b, _, _ = system("rank_deficient_consistent")
    Abig, bbig, _, _ = big_system("tall_full_rank_consistent")
    J = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=DT)
    bj = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=DT)
    with torch.device("meta"):
        assert torch.empty(1).device.type == "meta"  # the trap is set
        assert svd_solve(A, b)["x"].device.type == "cpu"
        assert matrix_free_solve(*_ops(A), b, 8, k=2)["class"] == "infinitely_many"
        res = matrix_free_solve(*_ops(Abig), bbig, 40, k=2, oversample=2, tol=TIGHT, sweep_rtols=[1e-3])
        assert res["x"].device.type == "cpu" and res["decided_by"] == "residual"
        feats, _ = solve_answer_system(J, bj[:16])
        assert feats["class"] == "unique"
        assert ridge_loo(Abig, Abig[:, :3], ridge=None, tol=TIGHT)["rank"] == 40
        U, S, Vh = randomized_svd(*_ops(A), 8, 2, dtype=DT, device="cpu")
        assert U.device.type == S.device.type == "cpu"
    Jm = torch.empty(16, 16, device="meta")
    U, S, Vh = randomized_svd(lambda V: Jm @ V, lambda U: Jm.T @ U, 16, 4, device="meta")
    assert U.device.type == "meta" and U.shape == (16, 14)
