"""The linearized surrogates of a model, as linear systems A x = b per example.

Every surrogate states what is unknown, what the equations are, where the model is
linearized and which of the three classes (no solution, unique, infinitely many) its
systems can reach. The classes follow Rouché–Capelli at an explicit tolerance
(:mod:`linear_models.lstsq`); for a system of ``m_eq`` equations, ``n`` unknowns and
rank r at that tolerance, *whatever b is*::

    no_solution      reachable iff r < m_eq   (b can have a component outside range(A))
    unique           reachable iff r = n      (no null space; needs m_eq >= n)
    infinitely_many  reachable iff r < n      (a null space of dimension n - r)

:func:`reachable_classes` applies this rule; a class outside an example's reachable set
says nothing about the example, and the hypothesis tests leave such examples out of
that class's arm (:mod:`linear_models.hypothesis`).

(a) ``answer_jacobian``: the blog's own system, with x_gen unknown (the denoising view).
Linearize at the teacher-forced input x* = [x_bos; x_prefill; x_gen(gold)]. With m
answer tokens, P prompt tokens and r_t the *pre-norm* state (the last block's output,
the input of the final RMSNorm/LayerNorm) at position t::

    unknown   x_gen: the m answer tokens' input embeddings              (n = m d)
    A         d[r_P; ...; r_{P-1+m}] / d x_gen                        (m d x m d, block lower-triangular)
    b_t       the smallest change of r_t that makes the next gold token (then the end
              token) beat its strongest competitor c by ``delta`` logits, to first order
              through the final norm and the unembedding:
              v_t = J_norm(r_t)^T (w_y - w_c),   b_t = max(0, delta - mu_t) v_t / ||v_t||^2

Two corrections of the naive system (states after the final norm, all m+1 positions):

- *the final norm*: a state taken after RMSNorm has a null radial direction (scaling r
  does not change norm(r)), so every block of d(norm(r))/dx has rank <= d - 1 and the
  system's rank is m(d-1) whatever the example. Before the norm there is no such
  structural null direction: a rank deficit of A is the model's, not the norm's. (v_t is
  orthogonal to r_t for RMSNorm, so b never asks for the radial change the norm ignores.)
- *the forced first block*: the state r_{P-1} that predicts the first answer token
  depends on positions < P only (causal attention), none of which is in x_gen: its block
  row of A is zero. Proof in two lines: d r_{P-1} / d x_gen = 0 by causality, so any
  b_{P-1} != 0 lies outside range(A) and makes the system inconsistent; hence with that
  block included the class is "no solution" exactly when the first gold token does not
  win by the margin, i.e. first-token greedy correctness. So that block is not part of
  the system: it is reported as its own component (``first_token_margin``,
  ``first_token_greedy``) and only the m blocks that depend on x_gen are classified.

What is left is square (m d x m d) and block lower-triangular (position t sees answer
tokens 1..t), so det A = prod_t det(d r_t / d x_t) and all three classes are reachable
in principle: unique when every diagonal block is non-singular at the tolerance; when
one is singular, infinitely many if b has no component along the lost direction and no
solution if it has. Each diagonal block is I + (what the blocks add) by the residual
stream, so at small tolerances it is usually non-singular: the measured class is then
"unique" for every example, which the tests report as untestable arms rather than
support (the tolerance sweep shows where that changes). ``solution_norm`` = ||x|| /
||x_gen|| (how far the embeddings must move) is the continuous reading.

(b) ``relation_map``: a relation-level linear map, as linear relational embeddings do.
For the relation's examples i = 1..n, s_i is the subject's state at a middle layer
(the last subject token) and y_i the gold answer's target features: the unembedding row
W_U[g_i] of its first token. Unknown: W (d x k) and c. Equations: S_c W = Y_c (n
equations per output coordinate, d unknowns), solved by ridge least squares::

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

Not linearized (the map is fitted, not derived): the states are the model's own. Each
example's leave-one-out residual comes from the hat matrix without n refits:
e_(i) = e_i / (1 - H_ii). Per example: "is y_i produced by the map fitted on the
others": relative LOO residual ||e_(i)|| / ||y_i - y_bar|| above ``residual_tol`` ->
no_solution (an explicit, swept tolerance: at the exact rank test every held-out
example of a noisy relation would be inconsistent). Otherwise unique when rank(S_c) = d
and infinitely many when rank(S_c) < d. Reachability by shape: S_c has rank <= n - 1,
so a relation with n <= d examples can never say "unique" (unknowns outnumber
independent equations); only relations with n > d can reach all three.

(b') ``relation_jacobian``: the local Jacobian variant (Hernandez et al. 2023). Unknown:
the subject state s'. W = the mean over a few of the relation's examples of dz/ds (z:
the readout state at the last prompt position; s: the subject state), linearized at
those examples' subject states; bias beta = mean(z - W s). Per example the system is
W s' = z*_i - beta with z*_i = z_i + b_i (b_i the margin step of the gold first token,
as in (a) but on the readout state): square d x d, so all three classes are reachable
and decided by rank(W) at the tolerance: unique whenever W is full rank (nearly always
at default tolerances), no solution or infinitely many only when the tolerance drops
directions of W; the class then depends on the relation's W more than on the example,
which is why the tests are stratified by relation.

(c) ``weight_update``: the weight-space reading (what SFT solves). Unknown: a weight
update of the last MLP's down projection W_down (d x d_ff) restricted to a fixed
k-dimensional subspace, the span of its own top-k singular pairs::

    dW = sum_j theta_j u_j v_j^T,   theta in R^k   (u_j, v_j: W_down's j-th singular pair)

Linearized at the base model: the block output r_t moves by dW a_t (a_t: the down
projection's input at position t) and a margin mu_t by, to first order,

    g_t . theta,   g_t[j] = (v_t . u_j) (v_j . a_t),   v_t = J_norm(r_t)^T (w_y - w_c)

Equations, per example: its own m+1 positions (the first answer token included: a
weight update, unlike x_gen, reaches it) with targets max(0, delta - mu_t), stacked with
R *anchor* rows (the first-token margins of R fixed other examples) with target 0:
"an update in the subspace that makes this example's gold answer win by the margin
without moving the others' margins". A is (m + 1 + R) x k with R >= k, so every
example's system is tall: no solution is reachable (b outside range(A): the update
that would fit this example moves the anchors), unique when the k directions act
independently on these rows (rank k), infinitely many when some combination of them
moves none of the rows (rank < k: e.g. a direction whose input v_j is silent on every
row's activations). Consistency is the relative least-squares residual against an
explicit, swept ``residual_tol`` (a tall noisy system is never exactly consistent
unless b = 0). Also per example: the minimum-norm update fitting its own rows only
(``update_norm`` = ||theta||) and the RMS change it causes in the anchors' margins
(``interference``, logits), which connect to how fine-tuning treats the example.
"""

from __future__ import annotations

import math

import torch

from linear_models.lstsq import Tolerance, classify, effective_rank, no_tf32, svd_solve


def reachable_classes(m_eq: int, n: int, rank: int, rank_upper: int | None = None) -> tuple[str, ...]:
    """The classes a system of ``m_eq`` equations and ``n`` unknowns whose matrix has rank ``rank``
    (at the tolerance used) can take over all right-hand sides b (the module docstring's rule):
    no_solution iff rank < m_eq, unique iff rank = n, infinitely_many iff rank < n. When the rank
    is only bounded (matrix-free path: ``rank`` <= true rank <= ``rank_upper``) a class is kept if
    some rank in the bounds reaches it."""
    hi = rank if rank_upper is None else rank_upper
    out = []
    if rank < m_eq:
        out.append("no_solution")
    if hi >= n and n <= m_eq:
        out.append("unique")
    if rank < n:
        out.append("infinitely_many")
    return tuple(out)


def reachable_by_shape(m_eq: int, n: int) -> tuple[str, ...]:
    """The classes reachable for *some* matrix of this shape (rank anything from 0 to min(m_eq, n)):
    "unique" needs m_eq >= n; the other two are always reachable (by a rank deficit)."""
    return reachable_classes(m_eq, n, 0, min(m_eq, n))


def solve_answer_system(J: torch.Tensor, b: torch.Tensor, tol: Tolerance = Tolerance(),
                        x_norm: float | None = None) -> tuple[dict, dict]:
    """Surrogate (a): the square system J x = b, J = d r(answer positions) / d x_gen ([m d, m d]) and b
    the pre-norm margin steps at those positions ([m d]; the forced first block is not part of it).
    ``x_norm``: ||x_gen||, to report the solution's relative size. Returns (per-example features, the
    solver's full result)."""
    res = svd_solve(J, b.to(dtype=J.dtype, device=J.device), tol)
    cls = classify(res["rank"], res["rank_aug"], res["n_unknowns"])[0]
    feats = _features(res, cls)
    xn = float(torch.linalg.vector_norm(res["x"]))
    feats["solution_norm"] = xn / x_norm if x_norm else xn
    feats["reachable"] = list(reachable_classes(J.shape[0], J.shape[1], feats["rank"]))
    feats["n_equations"] = int(J.shape[0])
    return feats, res


def weight_update_system(G_own: torch.Tensor, need: torch.Tensor, G_anchor: torch.Tensor,
                         tol: Tolerance = Tolerance(), residual_tol: float = 0.5,
                         residual_sweep=()) -> dict:
    """Surrogate (c) for one example: A = [G_own; G_anchor] ((m+1+R) x k), b = [need; 0].

    ``G_own`` [m+1, k]: the example's margin gradients in the subspace; ``need`` [m+1]: how much each
    margin must grow (max(0, delta - mu)); ``G_anchor`` [R, k]: the anchors' first-token margin
    gradients (kept unchanged). Consistent iff the relative least-squares residual
    ||A theta - b|| / ||b|| <= ``residual_tol`` (0 when b = 0); then unique iff rank(A) = k at
    ``tol``, else infinitely many. Also the minimum-norm update fitting the own rows only
    (``update_norm``) and the RMS change of the anchors' margins it causes (``interference``).
    ``residual_sweep``: the class at each of these residual tolerances too."""
    A = torch.cat([G_own, G_anchor], 0)
    b = torch.cat([need, need.new_zeros(G_anchor.shape[0])])
    res = svd_solve(A, b, tol)
    rank, k = int(res["rank"]), A.shape[1]
    resid = float(res["residual"])

    def cls_at(t: float) -> str:
        return "no_solution" if resid > t else ("unique" if rank == k else "infinitely_many")

    own = svd_solve(G_own, need, tol)
    theta = own["x"]
    R = G_anchor.shape[0]
    interf = float(torch.linalg.vector_norm(G_anchor @ theta) / math.sqrt(R)) if R else 0.0
    feats = _features(res, cls_at(residual_tol))
    feats.update(reachable=list(reachable_classes(A.shape[0], k, rank)), n_equations=int(A.shape[0]),
                 update_norm=float(torch.linalg.vector_norm(theta)), interference=interf,
                 own_residual=float(own["residual"]), joint_update_norm=float(torch.linalg.vector_norm(res["x"])),
                 need_norm=float(torch.linalg.vector_norm(need)),
                 sweep={str(t): cls_at(t) for t in residual_sweep})
    return feats


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


def relation_map_reachable(fit: dict) -> tuple[str, ...]:
    """Classes the relation's system S_c W = Y_c can reach (n equations per output, d unknowns,
    rank(S_c) <= n - 1): "unique" only when rank(S_c) = d, which needs n > d."""
    return reachable_classes(fit["n"], fit["d"], fit["rank"])


def relation_map_classes(fit: dict, residual_tol: float) -> list[str]:
    """Per example: no_solution when its relative leave-one-out residual exceeds ``residual_tol``,
    else unique when rank(S_c) = d (and n > d), else infinitely_many."""
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
    out = []
    for i in range(targets.shape[0]):
        f = _features({k: (v[i] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in res.items()}, classes[i])
        f["reachable"] = list(reachable_classes(W.shape[0], W.shape[1], f["rank"]))
        f["n_equations"] = int(W.shape[0])
        out.append(f)
    return out, res
