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
On the matrix-free path the same structure gives a lower bound of the
least-squares residual: min_x ||A x - b|| >= ||b_{P-1}|| (the zero rows), passed to
:func:`linear_models.lstsq.matrix_free_solve` as ``residual_floor``, so a losing
first token is "no solution" there too once ||b_{P-1}|| / ||b|| exceeds the
residual tolerance, whether or not CGLS has converged (:func:`zero_block_operators`
builds A's products from J's).

(b) ``relation_map``: a relation-level linear map, as linear relational
embeddings do. For the relation's examples i = 1..n, s_i is the subject's state
at a middle layer (the last subject token) and y_i the gold answer's target
features: the unembedding row W_U[g_i] of its first token. Ridge least squares::

    [W; c] = argmin sum_i ||y_i - W^T s_i - c||^2 + lambda ||W||^2
    lambda = ridge * trace(S_c^T S_c) / d    (S_c: centred subject states)

with ``ridge`` chosen per relation from a grid by the smallest leave-one-out error
(or given). Computed from the SVD S_c = U diag(sigma) V^T with the explicit cutoff
c = max(atol, rtol * sigma_1) of :class:`linear_models.lstsq.Tolerance` (directions
with sigma_j <= c are dropped, as a pseudo-inverse with that cutoff would)::

    W = V diag(f) U^T Y_c,   f_j = sigma_j / (sigma_j^2 + lambda)   (sigma_j > c, else 0)
    H = U diag(sigma_j^2 / (sigma_j^2 + lambda)) U^T + 11^T / n
    rank(S_c) = #{sigma_j > c},  cond_kept = sigma_1 / sigma_rank,
    effective rank = exp(H(p)), p_j = sigma_j / sum sigma   (of S_c's singular values)

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

import math

import torch

from linear_models.lstsq import Tolerance, classify, effective_rank, no_tf32, svd_solve


def solve_answer_system(J: torch.Tensor, b: torch.Tensor, d: int, tol: Tolerance = Tolerance()) -> tuple[dict, dict]:
    """Surrogate (a) from the answer-position Jacobian ``J`` ([m d, m d], without the zero first
    block row) and the margin targets ``b`` ([(m+1) d]). Returns (per-example features, the
    solver's full result)."""
    A = torch.cat([J.new_zeros(d, J.shape[1]), J], dim=0)
    res = svd_solve(A, b.to(dtype=J.dtype, device=J.device), tol)
    cls = classify(res["rank"], res["rank_aug"], res["n_unknowns"])[0]
    bn = b.norm()
    return _features(res, cls) | {"first_block_norm": float(b[:d].norm() / bn) if bn > 0 else 0.0}, res


def zero_block_operators(matvec, rmatvec, d: int):
    """The products of A = [0; J] (surrogate (a): ``d`` structurally zero rows on top, the last
    prompt position's block) from those of J, on the device and in the dtype of their arguments."""

    def mv(V: torch.Tensor) -> torch.Tensor:
        return torch.cat([V.new_zeros(d, V.shape[1]), matvec(V).to(dtype=V.dtype, device=V.device)], 0)

    def rmv(U: torch.Tensor) -> torch.Tensor:
        return rmatvec(U[d:]).to(dtype=U.dtype, device=U.device)

    return mv, rmv


def _features(res: dict, cls: str) -> dict:
    return {"residual": float(res["residual"]), "rank": int(res["rank"]), "rank_aug": int(res["rank_aug"]),
            "n_unknowns": int(res["n_unknowns"]), "nullity": int(res["nullity"]), "cond": float(res["cond"]),
            "cond_kept": float(res["cond_kept"]), "effective_rank": float(res["effective_rank"]), "class": cls}


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def ridge_loo(S: torch.Tensor, Y: torch.Tensor, ridge: float | None = None, grid=RIDGE_GRID,
              tol: Tolerance = Tolerance(), dtype: torch.dtype | None = None) -> dict:
    """Ridge regression of Y [n, k] on S [n, d] with an intercept; leave-one-out residuals from
    the hat matrix. ``ridge=None`` picks it from ``grid`` by the smallest mean squared LOO
    residual (efficient leave-one-out cross-validation, as RidgeCV does). ``tol``: the rank
    cutoff on S_c's singular values; ``dtype``: of the computation (default S's), on S's device. Returns W [d, k],
    c [k], residuals, LOO residuals, leverages, the relative LOO residual per example, rank(S_c),
    its condition numbers (all singular values; the kept ones) and effective rank."""
    n, d = S.shape
    dtype = dtype or S.dtype
    S_, Y_ = S.to(dtype), Y.to(dtype=dtype, device=S.device)
    s_bar, y_bar = S_.mean(0), Y_.mean(0)
    Sc, Yc = S_ - s_bar, Y_ - y_bar
    tiny = torch.finfo(dtype).tiny
    with no_tf32():
        # one SVD serves every ridge value of the grid
        U, sig, Vh = torch.linalg.svd(Sc, full_matrices=False)
        smax = sig[0] if len(sig) else sig.new_zeros(())
        cut = tol.cutoff(smax, (n, d), dtype)
        keep = sig > cut
        rank = int(keep.sum())
        sig2 = sig * sig
        UtY = U.transpose(0, 1) @ Yc
        denom_y = torch.linalg.vector_norm(Yc, dim=1).clamp(min=tiny)
        smin = sig[-1] if len(sig) else smax
        common = {"rank": rank, "n": n, "d": d, "singular_values": sig, "cutoff": float(cut),
                  "cond": float(smax / smin) if float(smin) > 0 else math.inf,
                  "cond_kept": float(smax / sig[rank - 1]) if rank else math.inf,
                  "effective_rank": float(effective_rank(sig))}

        def fit(r: float) -> dict:
            lam = r * sig2.sum() / d  # = ridge * trace(S_c^T S_c) / d
            denom = torch.where(keep, sig2 + lam, torch.ones_like(sig))
            f = torch.where(keep, sig / denom, torch.zeros_like(sig))
            W = Vh.transpose(0, 1) @ (f[:, None] * UtY)
            c = y_bar - s_bar @ W
            h = torch.where(keep, sig2 / denom, torch.zeros_like(sig))
            lev = (U * U) @ h + 1.0 / n
            E = Yc - Sc @ W
            loo = E / (1 - lev).clamp(min=max(1e-12, torch.finfo(dtype).eps))[:, None]
            return {"W": W, "c": c, "residuals": E, "loo": loo, "leverage": lev, "lambda": float(lam), "ridge": r,
                    "rel_loo": torch.linalg.vector_norm(loo, dim=1) / denom_y,
                    "rel_fit": torch.linalg.vector_norm(E, dim=1) / denom_y, **common}

        if ridge is not None:
            return fit(ridge)
        fits = [fit(r) for r in grid]
    mse = [float((f["loo"] ** 2).sum(1).mean()) for f in fits]
    best = min(range(len(grid)), key=mse.__getitem__)
    return {**fits[best], "ridge_grid": list(grid), "loo_mse_grid": mse}


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
