"""Constructed systems with known answers, on the dense and the matrix-free paths."""

import math

import pytest
import torch

from linear_models.hypothesis import hypothesis_test
from linear_models.lstsq import (Tolerance, classify, effective_rank, matrix_free_solve, svd_solve,
                                 sweep_classes)
from linear_models.surrogates import relation_map_classes, ridge_loo

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


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_free_agrees_with_dense(kind):
    A, b, want, rank = system(kind)
    mf = matrix_free_solve(lambda V: A @ V, lambda U: A.T @ U, b, A.shape[1], k=A.shape[1])
    dense = svd_solve(A, b)
    assert mf["class"] == want
    assert mf["rank"] == rank
    assert mf["residual"] == pytest.approx(float(dense["residual"]), abs=1e-8)
    assert torch.allclose(mf["x"], dense["x"], atol=1e-6)
    assert torch.allclose(mf["singular_values"][:rank], dense["singular_values"][:rank], rtol=1e-8)
    # with fewer triplets than the rank, CGLS takes over and still finds the least-squares residual
    few = matrix_free_solve(lambda V: A @ V, lambda U: A.T @ U, b, A.shape[1], k=2, max_iter=200)
    assert few["rank_is_lower_bound"] == (rank > 2)
    assert few["residual"] == pytest.approx(float(dense["residual"]), abs=1e-6)


def test_ill_conditioned_near_the_tolerance():
    """Singular values 1 and 1e-6: rank 2 below rtol 1e-6, rank 1 above it; the class moves with it."""
    g = torch.Generator().manual_seed(3)
    U, V = _orth(5, 2, g), _orth(2, 2, g)
    A = U @ torch.diag(torch.tensor([1.0, 1e-6], dtype=DT)) @ V.T
    b = A @ torch.tensor([1.0, 1.0], dtype=DT) + 1e-3 * U[:, 1]  # along the small direction
    strict = svd_solve(A, b, Tolerance(rtol=1e-8))
    loose = svd_solve(A, b, Tolerance(rtol=1e-4))
    assert int(strict["rank"]) == 2 and classify(strict["rank"], strict["rank_aug"], 2) == ["unique"]
    assert int(loose["rank"]) == 1 and classify(loose["rank"], loose["rank_aug"], 2) == ["no_solution"]
    assert float(strict["cond"]) == pytest.approx(1e6, rel=1e-6)
    sweep = sweep_classes(strict["singular_values"], strict["singular_values_aug"], 2, [1e-8, 1e-4])
    assert sweep == {1e-8: "unique", 1e-4: "no_solution"}
    # an explicit absolute cutoff works the same way
    assert int(svd_solve(A, b, Tolerance(rtol=0.0, atol=1e-5))["rank"]) == 1


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


def test_hypothesis_verdicts():
    cats = ["Unknown"] * 40 + ["HighlyKnown"] * 40 + ["MaybeKnown"] * 20
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(100, generator=g).tolist()
    res_pro = [1 + n if c == "Unknown" else n for c, n in zip(cats, noise)]
    cls_pro = ["no_solution" if c == "Unknown" else "unique" for c in cats]
    assert hypothesis_test(cls_pro, res_pro, cats)["verdict"] == "supported"
    res_con = [n if c == "Unknown" else 1 + n for c, n in zip(cats, noise)]
    cls_con = ["unique" if c == "Unknown" else "no_solution" for c in cats]
    assert hypothesis_test(cls_con, res_con, cats)["verdict"] == "contradicted"
    cls_deg = ["unique"] * 99 + ["no_solution"]
    t = hypothesis_test(cls_deg, res_pro, cats)
    assert t["verdict"] == "inconclusive" and "degenerate" in t["reasons"][0]
    rand = hypothesis_test(["unique", "no_solution"] * 50, noise, cats)
    assert rand["verdict"] == "inconclusive"
