"""Least squares, rank and solvability of linear systems A x = b, in torch, batched.

Dense path: the SVD A = U S V^T with an explicit cutoff. Singular values at or
below ``cutoff = max(atol, rtol * s_max)`` count as zero; ``rtol`` defaults to
``max(m, n) * eps`` of the dtype (numpy's ``matrix_rank`` rule). Then

    x = V S_r^+ U^T b                      (minimum-norm least-squares solution)
    rank(A) = #{s_i > cutoff},  rank([A|b]) the same rule on the augmented matrix
    relative residual = ||A x - b|| / ||b||   (0 when b = 0)

and the Rouché–Capelli test classifies the system: ``no_solution`` when
rank([A|b]) > rank(A) (b has a component outside the range of A above the
tolerance), else ``unique`` when rank(A) = n (the number of unknowns) and
``infinitely_many`` when rank(A) < n (a null space of dimension n - rank(A)).
``torch.linalg.lstsq`` is never used: on CUDA its only driver (gels) assumes full
rank and returns wrong answers for rank-deficient systems.

Also reported: the condition number s_max / s_min over all singular values
(inf when s_min = 0) and over the kept ones, and the effective rank
exp(H(p)) with p_i = s_i / sum s (Roy & Vetterli 2007).

Matrix-free path (for systems that do not fit in memory): A is given by
``matvec(v) = A v`` and ``rmatvec(u) = A^T u`` (jvp / vjp products of a model).
``randomized_svd`` finds the leading singular triplets (Halko, Martinsson & Tropp
2011, with power iterations) and the least-squares solution is taken in their
span with the dense path's cutoff; when all ``k`` exceed the cutoff (the rank is
then a lower bound) ``cgls``, conjugate gradients on the normal equations,
refines it. Solvability there: consistent when the part of b outside the range
of A, ||A x - b||, is within the rank cutoff (the Rouché–Capelli condition
measured by distance), or within a relative ``residual_tol`` when one is given.

TF32 is switched off for all of this (``no_tf32``): its 10-bit mantissa moves
singular values by far more than the tolerances used here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

CLASSES = ("no_solution", "unique", "infinitely_many")


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls on CUDA for the duration (TF32 off), restored afterwards."""
    old_mm = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    old_prec = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm
        torch.backends.cudnn.allow_tf32 = old_cudnn
        torch.set_float32_matmul_precision(old_prec)


@dataclass(frozen=True)
class Tolerance:
    """The rank cutoff is ``max(atol, rtol * s_max)``; ``rtol=None`` means max(m, n) * eps."""

    rtol: float | None = None
    atol: float = 0.0

    def cutoff(self, s_max: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        rtol = self.rtol if self.rtol is not None else max(shape) * torch.finfo(dtype).eps
        return torch.clamp(s_max * rtol, min=self.atol)


def _rank(s: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    return (s > cut[..., None]).sum(-1)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalized singular values (Roy & Vetterli 2007)."""
    total = s.sum(-1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    return torch.exp(h)


def svd_solve(A: torch.Tensor, b: torch.Tensor, tol: Tolerance = Tolerance()) -> dict:
    """Minimum-norm least squares and solvability of ``A x = b``, batched over leading dims.

    ``A``: [..., m, n]; ``b``: [..., m]. Returns tensors: ``x`` [..., n], ``residual``
    (relative), ``rank``, ``rank_aug``, ``nullity``, ``cond``, ``cond_kept``,
    ``effective_rank``, ``singular_values`` and ``cutoff``.
    """
    if A.dim() < 2 or b.shape != A.shape[:-1]:
        raise ValueError(f"shapes do not match: A {tuple(A.shape)}, b {tuple(b.shape)}")
    m, n = A.shape[-2:]
    with no_tf32():
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        smax = S[..., 0] if S.shape[-1] else torch.zeros(A.shape[:-2], dtype=A.dtype, device=A.device)
        cut = tol.cutoff(smax, (m, n), A.dtype)
        keep = S > cut[..., None]
        inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
        utb = (U.transpose(-1, -2) @ b[..., None])[..., 0]
        x = (Vh.transpose(-1, -2) @ (inv * utb)[..., None])[..., 0]
        r = (A @ x[..., None])[..., 0] - b
        bn = torch.linalg.vector_norm(b, dim=-1)
        rel = torch.where(bn > 0, torch.linalg.vector_norm(r, dim=-1) / bn.clamp(min=torch.finfo(A.dtype).tiny),
                          torch.zeros_like(bn))
        # rank([A|b]) by the same rule, with the cutoff of A (the tolerance is A's, not the augmented matrix's)
        Sa = torch.linalg.svdvals(torch.cat([A, b[..., None]], dim=-1))
        rank_aug = _rank(Sa, cut)
        rank = keep.sum(-1)
        smin = S[..., -1] if S.shape[-1] else smax
        inf = torch.full_like(smax, math.inf)
        cond = torch.where(smin > 0, smax / smin.clamp(min=torch.finfo(A.dtype).tiny), inf)
        s_r = torch.gather(S, -1, (rank - 1).clamp(min=0)[..., None])[..., 0]
        cond_kept = torch.where(rank > 0, smax / s_r.clamp(min=torch.finfo(A.dtype).tiny), inf)
    return {"x": x, "residual": rel, "rank": rank, "rank_aug": rank_aug, "nullity": n - rank, "cond": cond,
            "cond_kept": cond_kept, "effective_rank": effective_rank(S), "singular_values": S,
            "singular_values_aug": Sa, "cutoff": cut, "n_unknowns": n}


def sweep_classes(S: torch.Tensor, S_aug: torch.Tensor, n_unknowns: int, rtols, atol: float = 0.0) -> dict:
    """The class of one system at each relative tolerance, from its singular values and those of
    the augmented matrix (no new SVD): ``{rtol: class}``."""
    smax = float(S[0]) if len(S) else 0.0
    out = {}
    for rt in rtols:
        cut = max(atol, rt * smax)
        r, ra = int((S > cut).sum()), int((S_aug > cut).sum())
        out[rt] = "no_solution" if ra > r else ("unique" if r == n_unknowns else "infinitely_many")
    return out


def classify(rank: torch.Tensor, rank_aug: torch.Tensor, n_unknowns: int) -> list[str]:
    """Rouché–Capelli: rank([A|b]) > rank(A) -> no solution; else unique iff rank(A) = n."""
    out = []
    for r, ra in zip(rank.reshape(-1).tolist(), rank_aug.reshape(-1).tolist()):
        out.append("no_solution" if ra > r else ("unique" if r == n_unknowns else "infinitely_many"))
    return out


def classify_by_residual(residual: torch.Tensor, rank: torch.Tensor, n_unknowns: int,
                         residual_tol: float) -> list[str]:
    """The matrix-free form of the test: consistent iff the least-squares residual is within tolerance."""
    out = []
    for res, r in zip(residual.reshape(-1).tolist(), rank.reshape(-1).tolist()):
        out.append("no_solution" if res > residual_tol else ("unique" if r == n_unknowns else "infinitely_many"))
    return out


# ---------------------------------------------------------------------------------------------
# matrix-free


def randomized_svd(matvec, rmatvec, n: int, k: int, oversample: int = 10, power_iters: int = 2,
                   dtype=torch.float32, device="cpu", seed: int = 0):
    """Leading ``k`` singular triplets of an operator A (m x n) given batched products:
    ``matvec(V)`` = A V for V [n, p] and ``rmatvec(U)`` = A^T U for U [m, p].
    Returns (U [m, k], S [k], Vh [k, n])."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = min(n, k + oversample)
    omega = torch.randn(n, p, generator=g, dtype=dtype).to(device)
    Y = matvec(omega)
    Q, _ = torch.linalg.qr(Y)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(rmatvec(Q))
        Q, _ = torch.linalg.qr(matvec(Z))
    B = rmatvec(Q).transpose(0, 1)  # = Q^T A, [p, n]
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k]


def cgls(matvec, rmatvec, b: torch.Tensor, n: int, max_iter: int | None = None, tol: float = 1e-10,
         x0: torch.Tensor | None = None):
    """Least squares min ||A x - b|| by CGLS (from x0 = 0 it converges to the minimum-norm
    solution). ``matvec``/``rmatvec`` act on single vectors here ([n] -> [m], [m] -> [n])."""
    x = torch.zeros(n, dtype=b.dtype, device=b.device) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    s = rmatvec(r)
    p = s.clone()
    gamma = s.dot(s)
    g0 = rmatvec(b).dot(rmatvec(b)) if x0 is not None else gamma.clone()
    for _ in range(max_iter if max_iter is not None else 2 * n):
        if gamma <= tol ** 2 * g0 or gamma == 0:
            break
        q = matvec(p)
        qq = q.dot(q)
        if qq == 0:
            break
        alpha = gamma / qq
        x = x + alpha * p
        r = r - alpha * q
        s = rmatvec(r)
        gamma_new = s.dot(s)
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
    return x, r


def matrix_free_solve(matvec, rmatvec, b: torch.Tensor, n: int, k: int, tol: Tolerance = Tolerance(),
                      residual_tol: float | None = None, seed: int = 0, max_iter: int = 300) -> dict:
    """Solvability of A x = b from products only.

    A randomized SVD finds the leading ``k`` singular triplets; with the same cutoff rule as
    the dense path, x = V_r S_r^-1 U_r^T b is the truncated-SVD least-squares solution (equal
    to the dense one when k exceeds the numerical rank). When every one of the k singular
    values exceeds the cutoff, the rank is only a lower bound and CGLS refines x from there
    (at most ``max_iter`` iterations). The residual r = b - A x is then measured by one product.
    Consistency (Rouché–Capelli within the tolerance): b's component outside the range of A,
    ||r||, at most the rank cutoff (the size at which the augmented matrix would gain a
    singular value), or, with ``residual_tol``, the relative residual at most that."""
    m = b.shape[0]
    with no_tf32():
        k = min(k, n, m)
        U, S, Vh = randomized_svd(matvec, rmatvec, n, k, dtype=b.dtype, device=b.device, seed=seed)
        smax = S[0]
        cut = tol.cutoff(smax, (m, n), b.dtype)
        keep = S > cut
        rank = int(keep.sum())
        x = Vh[keep].T @ ((U[:, keep].T @ b) / S[keep])
        lower_bound = rank == k and k < min(m, n)
        if lower_bound and max_iter:
            x, _ = cgls(lambda v: matvec(v[:, None])[:, 0], lambda u: rmatvec(u[:, None])[:, 0], b, n,
                        max_iter=max_iter, x0=x)
        r = b - matvec(x[:, None])[:, 0]
        bn = torch.linalg.vector_norm(b)
        rn = float(torch.linalg.vector_norm(r))
        rel = rn / float(bn) if bn > 0 else 0.0
    kept = S[keep]
    consistent = (rel <= residual_tol) if residual_tol is not None else (rn <= float(cut))
    cls = "no_solution" if not consistent else ("unique" if rank == n else "infinitely_many")
    return {"x": x, "residual": rel, "residual_norm": rn, "rank": rank, "rank_is_lower_bound": lower_bound,
            "nullity": n - rank, "cond_kept": float(smax / kept[-1]) if len(kept) else math.inf,
            "effective_rank": float(effective_rank(S)), "singular_values": S, "cutoff": float(cut),
            "n_unknowns": n, "class": cls}
