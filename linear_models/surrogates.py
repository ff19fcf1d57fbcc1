"""The linearized surrogates of a model, as linear systems A x = b per example.

(a) ``answer_jacobian``: the blog's own system. Linearize the model at the
teacher-forced input x* = [x_bos; x_prefill; x_gen(gold)]. With h_t the readout
state (logits = W_U h_t) at the answer positions t = P-1 (last prompt position)
... P-1+m (last answer token), and x_gen the m answer tokens' input embeddings::

    A = d[h_{P-1}; ...; h_{P-1+m}] / d x_gen        ((m+1) d  x  m d)
    b_t = max(0, delta - (w_y - w_c).h_t - (b_y - b_c)) / ||w_y - w_c||^2 * (w_y - w_c)

where y is position t's target (the next gold token, then the end token), c its
strongest competitor and delta the margin: b is the smallest change of the
readout states that makes every gold token win by ``delta`` logits (zero where it
already does). A x = b asks for a change of the answer embeddings that produces
it. Causality makes A's first block row zero (h_{P-1} does not see x_gen), so a
first gold token that does not win is a true inconsistency: b_{P-1} != 0 lies
outside the range of A, rank([A|b]) > rank(A), "no solution". Note what this
implies: the class of an example depends on whether the model's greedy first
token under the linearization prompt is the gold one; the surrogate's verdict
must be read with that in mind (it is close to a restatement of greedy
correctness under one prompt, which SliCK's categories are built from).

(b) ``relation_map``: a relation-level linear map, as linear relational
embeddings do. For the relation's examples i = 1..n, s_i is the subject's state
at a middle layer (the last subject token) and y_i the gold answer's target
features: the unembedding row W_U[g_i] of its first token. Ridge least squares::

    [W; c] = argmin sum_i ||y_i - W^T s_i - c||^2 + lambda ||W||^2
    lambda = ridge * trace(S_c^T S_c) / d    (S_c: centred subject states)

with ``ridge`` chosen per relation from a grid by the smallest leave-one-out error
(or given).

Each example's leave-one-out residual comes from the hat matrix
H = S_c (S_c^T S_c + lambda I)^{-1} S_c^T + 11^T/n without n refits:
e_(i) = e_i / (1 - H_ii). The per-example system is "is y_i produced by the map
fitted on the others": relative LOO residual ||e_(i)|| / ||y_i - y_bar|| above
``residual_tol`` -> no_solution; otherwise unique when the relation's system
for W is overdetermined with full rank (rank(S_c) = d, n > d) and
infinitely_many when it is not (n <= d: a wide system that always has exact
solutions, which is why only held-out residuals mean anything here).

(b') ``relation_jacobian``: the local Jacobian variant (Hernandez et al. 2023).
W = the mean over a few of the relation's examples of dz/ds (z: the readout state
at the last prompt position; s: the subject state), bias beta = mean(z - W s).
Per example the system is W s' = z*_i - beta with z*_i = z_i + b_i (b_i as in
(a), the margin step for the gold first token) and unknown s': a square d x d
system, numerically full rank at default tolerances, so "unique" nearly always,
unless the tolerance is raised; the tolerance sweep shows where that changes.
"""

from __future__ import annotations

import torch

from linear_models.lstsq import Tolerance, classify, svd_solve


def solve_answer_system(J: torch.Tensor, b: torch.Tensor, d: int, tol: Tolerance = Tolerance()) -> tuple[dict, dict]:
    """Surrogate (a) from the answer-position Jacobian ``J`` ([m d, m d], without the zero first
    block row) and the margin targets ``b`` ([(m+1) d]). Returns (per-example features, the
    solver's full result)."""
    A = torch.cat([torch.zeros(d, J.shape[1], dtype=J.dtype, device=J.device), J], dim=0)
    res = svd_solve(A, b.to(J.dtype), tol)
    cls = classify(res["rank"], res["rank_aug"], res["n_unknowns"])[0]
    bn = b.norm()
    return _features(res, cls) | {"first_block_norm": float(b[:d].norm() / bn) if bn > 0 else 0.0}, res


def _features(res: dict, cls: str) -> dict:
    return {"residual": float(res["residual"]), "rank": int(res["rank"]), "rank_aug": int(res["rank_aug"]),
            "n_unknowns": int(res["n_unknowns"]), "nullity": int(res["nullity"]), "cond": float(res["cond"]),
            "cond_kept": float(res["cond_kept"]), "effective_rank": float(res["effective_rank"]), "class": cls}


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def ridge_loo(S: torch.Tensor, Y: torch.Tensor, ridge: float | None = None, grid=RIDGE_GRID) -> dict:
    """Ridge regression of Y [n, k] on S [n, d] with an intercept; leave-one-out residuals from
    the hat matrix. ``ridge=None`` picks it from ``grid`` by the smallest mean squared LOO
    residual (efficient leave-one-out cross-validation, as RidgeCV does). Returns W [d, k],
    c [k], residuals, LOO residuals, leverages, the relative LOO residual per example and rank(S_c)."""
    if ridge is None:
        fits = [ridge_loo(S, Y, r) for r in grid]
        best = min(range(len(grid)), key=lambda i: float((fits[i]["loo"] ** 2).sum(1).mean()))
        return {**fits[best], "ridge": grid[best], "ridge_grid": list(grid),
                "loo_mse_grid": [float((f["loo"] ** 2).sum(1).mean()) for f in fits]}
    n, d = S.shape
    S64, Y64 = S.double(), Y.double()
    s_bar, y_bar = S64.mean(0), Y64.mean(0)
    Sc, Yc = S64 - s_bar, Y64 - y_bar
    gram = Sc.T @ Sc
    lam = ridge * torch.trace(gram) / d if ridge > 0 else torch.tensor(0.0, dtype=torch.float64)
    M = gram + lam * torch.eye(d, dtype=torch.float64, device=S.device)
    Minv_St = torch.linalg.pinv(M, hermitian=True) @ Sc.T
    W = Minv_St @ Yc
    c = y_bar - s_bar @ W
    H = Sc @ Minv_St + 1.0 / n
    lev = torch.diagonal(H)
    E = Yc - Sc @ W
    loo = E / (1 - lev).clamp(min=1e-12)[:, None]
    denom = torch.linalg.vector_norm(Yc, dim=1).clamp(min=1e-30)
    rank = int(torch.linalg.matrix_rank(Sc))
    return {"W": W, "c": c, "residuals": E, "loo": loo, "leverage": lev, "lambda": float(lam), "ridge": ridge,
            "rel_loo": torch.linalg.vector_norm(loo, dim=1) / denom,
            "rel_fit": torch.linalg.vector_norm(E, dim=1) / denom, "rank": rank, "n": n, "d": d}


def relation_map_classes(fit: dict, residual_tol: float) -> list[str]:
    determined = fit["rank"] == fit["d"] and fit["n"] > fit["d"]
    return ["no_solution" if r > residual_tol else ("unique" if determined else "infinitely_many")
            for r in fit["rel_loo"].tolist()]


def relation_jacobian_systems(W: torch.Tensor, targets: torch.Tensor,
                              tol: Tolerance = Tolerance()) -> tuple[list[dict], dict]:
    """Surrogate (b'): for each row of ``targets`` ([N, d], already minus the bias), the
    solvability of W s = target. Returns (per-example features, the solver's full result)."""
    A = W.expand(targets.shape[0], *W.shape)
    res = svd_solve(A, targets.to(W.dtype), tol)
    classes = classify(res["rank"], res["rank_aug"], res["n_unknowns"])
    return [_features({k: (v[i] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in res.items()}, classes[i])
            for i in range(targets.shape[0])], res
