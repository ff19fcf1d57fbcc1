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

Matrix-free path (for systems that do not fit in memory): A (m x n) is given only
by ``matvec(V) = A V`` and ``rmatvec(U) = A^T U`` (Jacobian-vector products of a
model). What it computes, and what that can decide:

1. *Randomized SVD* (Halko, Martinsson & Tropp 2011, Alg. 4.4 with ``q`` power
   iterations): Y = (A A^T)^q A Omega with Omega an n x p Gaussian sketch,
   p = min(n, k + oversample); Q = orth(Y); the SVD of Q^T A = U_b S V^T gives p
   triplets (U = Q U_b, S, V) of the projection Q Q^T A. All p are used (the
   ``oversample`` extra ones too): they are exact triplets of Q Q^T A.
2. *Range error*: e = ||(I - Q Q^T) A||, estimated a posteriori from ``probes``
   Gaussian vectors w_i (Halko et al. 2011, eq. 4.3)::

       e <= 10 sqrt(2/pi) max_i ||(I - Q Q^T) A w_i||    (probability >= 1 - 10^-probes)

   and e = 0 when p >= min(m, n) (the sketch then spans all of range(A)).
3. *Bounds on the rank*. Singular values of a projection never exceed those of A,
   and Weyl's inequality on A = Q Q^T A + (I - Q Q^T) A bounds them from above::

       S_i <= sigma_i(A) <= S_i + e   (i <= p),      sigma_i(A) <= e   (i > p)

   so with the dense path's cutoff c = max(atol, rtol * S_1)::

       rank_lower = #{S_i > c}
       rank_upper = #{S_i + e > c} + (min(m, n) - p  if e > c  else 0)

   (c itself is known only within [max(atol, rtol S_1), max(atol, rtol (S_1 + e))]:
   lower bounds count against its upper end, upper bounds against its lower end)

   and the rank is exact (``rank_exact``) when the two agree: every computed
   singular value is clear of the cutoff by more than e, and e <= c. When all p
   computed values exceed c and e > c (A has more than p singular values above
   the cutoff), the rank is only known to be >= p: "rank >= k".
4. *Rouché–Capelli from the sketch*. With g = U^T b, beta = ||b - U g|| and q the unit
   vector along b - U g, [Q Q^T A | b] = [U, q] [[diag(S), g], [0, beta]] blockdiag(V^T, 1),
   so the singular values S_aug of the small (p+1) x (p+1) matrix [[diag(S), g], [0, beta]]
   are those of [Q Q^T A | b], and sigma_i([A|b]) lies within e of them. rank([A|b])
   is bounded like rank(A) (lower: #{S_aug_i - e > c}). The test is decided when the
   bounds separate: no solution when rank_aug_lower > rank_upper, a solution when
   rank_aug_upper <= rank_lower; with e = 0 this is exactly the dense test. x is then
   the truncated-SVD solution V_r S_r^-1 g_r (r = rank_lower) and the residual
   ||b - A x|| / ||b|| is measured by one product, as on the dense path.
5. *Residual test* (when step 4 cannot decide, i.e. the rank is not resolved by the
   sketch): CGLS (conjugate gradients on A^T A x = A^T b, warm-started at the
   truncated-SVD solution) minimizes ||b - A x||, stopping at ``max_iter`` iterations, at
   ||r|| <= normal_tol ||b|| or at convergence (below). Its residual r = b - A x is always
   an upper bound of the least-squares residual rho = min_x ||b - A x||, and::

       consistent      iff ||r|| / ||b|| <= residual_tol                (certain)
       no solution     iff ||r|| / ||b|| >  residual_tol and CGLS converged:
                           ||A^T r|| <= normal_tol * S_1 * ||r||        (LSQR's stopping rule 2:
                           x is the least-squares solution of a matrix within relative
                           distance normal_tol of A, Stewart 1977), or
                           residual_floor / ||b|| > residual_tol         (a known lower bound of rho,
                           e.g. b's part on rows of A that are structurally zero)
       otherwise       "undetermined" (CGLS stopped at max_iter before either held).

   This is not the dense criterion (rank([A|b]) > rank(A) at the cutoff c): that needs
   the whole spectrum, and CGLS does not reach residuals of order c in float32; here
   the tolerance is the explicit relative residual ``residual_tol``. It also judges A
   itself, every singular value however small, where the dense test judges A with the
   values below c dropped: when b has a component along a singular value just below c
   that CGLS resolves, the dense path says "no solution" and this test "consistent".
6. *How many solutions*, for a consistent system, from the rank bounds:
   unique when rank_lower = n; infinitely many when rank_upper < n (the nullity is at
   least n - rank_upper; in particular whenever n > m, nullity >= n - m); otherwise
   ``consistent_rank_unknown``: solutions exist, but whether the null space is empty
   cannot be told from p < n triplets.

So, compared with the dense path: when the sketch resolves the rank (p at least the
numerical rank, or the range error below the cutoff) the matrix-free path reaches the
same class on the same system, up to singular values within e of the cutoff. When
k < rank it can still decide consistency (by the residual test), and the number of
solutions only when n > m or the rank bounds fall short of n; a tall system of full
column rank is then ``consistent_rank_unknown``, never "unique" (that needs all n
singular values above the cutoff). Every decision made is certain up to the stated
tolerances and the range estimate's 10^-probes failure probability; what cannot be
decided is labelled so rather than guessed. The tolerance sweep reuses the sketch: at
each swept rtol the same bounds decide, and CGLS (independent of the cutoff) runs at
most once per system.

TF32 is switched off for all of this (``no_tf32``): its 10-bit mantissa moves
singular values by far more than the tolerances used here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from linear_models.names import CLASSES, CONSISTENT_RANK_UNKNOWN, UNDETERMINED  # noqa: F401


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


# ---------------------------------------------------------------------------------------------
# matrix-free

MATRIX_FREE_LABELS = CLASSES + (CONSISTENT_RANK_UNKNOWN, UNDETERMINED)


def randomized_svd(matvec, rmatvec, n: int, k: int, oversample: int = 10, power_iters: int = 2,
                   dtype=torch.float32, device="cpu", seed: int = 0):
    """Singular triplets of an operator A (m x n) given batched products: ``matvec(V)`` = A V for
    V [n, p] and ``rmatvec(U)`` = A^T U for U [m, p]. Sketches p = min(n, k + oversample)
    columns and returns all the triplets of Q Q^T A it finds, leading first:
    (U [m, p'], S [p'], Vh [p', n]) with p' = min(p, m). The sketch is drawn on the CPU from
    ``seed`` (the same numbers on every device) and moved to ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = min(n, k + oversample)
    omega = torch.randn(n, p, generator=g, dtype=dtype, device="cpu").to(device)
    Q, _ = torch.linalg.qr(matvec(omega))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(rmatvec(Q))
        Q, _ = torch.linalg.qr(matvec(Z))
    B = rmatvec(Q).transpose(0, 1)  # = Q^T A, [p', n]
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub, S, Vh


def range_error(matvec, U: torch.Tensor, n: int, probes: int = 10, seed: int = 0) -> float:
    """A posteriori bound of ||(I - U U^T) A|| from ``probes`` Gaussian vectors (Halko et al.
    2011, eq. 4.3): 10 sqrt(2/pi) max_i ||(I - U U^T) A w_i||, true with probability at least
    1 - 10^-probes. ``U``: orthonormal columns."""
    g = torch.Generator(device="cpu").manual_seed(seed + 7919)
    W = torch.randn(n, probes, generator=g, dtype=U.dtype, device="cpu").to(U.device)
    AW = matvec(W)
    E = AW - U @ (U.transpose(0, 1) @ AW)
    return float(10 * math.sqrt(2 / math.pi) * torch.linalg.vector_norm(E, dim=0).max())


def cgls(matvec, rmatvec, b: torch.Tensor, n: int, max_iter: int | None = None, normal_tol: float = 1e-6,
         anorm: float | None = None, x0: torch.Tensor | None = None) -> dict:
    """Least squares min ||A x - b|| by CGLS (Hestenes–Stiefel on A^T A x = A^T b; from x0 = 0 it
    converges to the minimum-norm solution). ``matvec``/``rmatvec`` act on single vectors here
    ([n] -> [m], [m] -> [n]). Stops at ``max_iter`` (default 2 n) iterations or when

        ||A^T r|| <= normal_tol * anorm * ||r||   (converged: LSQR's rule 2; ``anorm`` ~ ||A||)
        ||r|| <= normal_tol * ||b||                (LSQR's rule 1 with atol = 0: b reached)

    Returns x, r = b - A x, the iterations taken, ``converged`` (rule 2, or r = 0),
    ``consistent_stop`` (rule 1) and the ratio ||A^T r|| / (anorm ||r||)."""
    x = torch.zeros(n, dtype=b.dtype, device=b.device) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    s = rmatvec(r)
    if anorm is None:
        anorm = float(torch.linalg.vector_norm(s) / torch.linalg.vector_norm(r).clamp(min=torch.finfo(b.dtype).tiny))
    bn = float(torch.linalg.vector_norm(b))
    p = s.clone()
    gamma = float(s.dot(s))
    it, converged, consistent_stop = 0, False, False
    limit = max_iter if max_iter is not None else 2 * n

    def check():
        rn = float(torch.linalg.vector_norm(r))
        if rn == 0.0:
            return True, False, 0.0
        ratio = math.sqrt(gamma) / (anorm * rn) if anorm > 0 else 0.0
        return ratio <= normal_tol, rn <= normal_tol * bn, ratio

    converged, consistent_stop, ratio = check()
    while it < limit and not (converged or consistent_stop):
        q = matvec(p)
        qq = float(q.dot(q))
        if qq == 0.0 or gamma == 0.0:
            break
        alpha = gamma / qq
        x = x + alpha * p
        r = r - alpha * q
        s = rmatvec(r)
        gamma_new = float(s.dot(s))
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
        it += 1
        converged, consistent_stop, ratio = check()
    return {"x": x, "r": r, "iterations": it, "converged": converged, "consistent_stop": consistent_stop,
            "normal_ratio": ratio}


def _count_bounds(S: torch.Tensor, e: float, cut: float, full: int) -> tuple[int, int]:
    """(lower, upper) bounds of #{sigma_i > cut} for ``full`` singular values of which the first
    len(S) are within e of S and the rest at most e (Weyl)."""
    lo = int((S - e > cut).sum())
    hi = int((S + e > cut).sum()) + (max(0, full - len(S)) if e > cut else 0)
    return lo, min(hi, full)


def _rank_bounds(S: torch.Tensor, e: float, cut_lo: float, cut_hi: float, m: int, n: int) -> tuple[int, int]:
    # the sketch's singular values are lower bounds of A's (S_i <= sigma_i(A)), so the lower
    # bound needs no e
    lo = int((S > cut_hi).sum())
    hi = int((S + e > cut_lo).sum()) + (max(0, min(m, n) - len(S)) if e > cut_lo else 0)
    return lo, min(hi, min(m, n))


def _decide(S, S_aug, e, cut_lo, cut_hi, m, n, residual_test) -> dict:
    """The class at one cutoff, known to lie in [cut_lo, cut_hi], from the sketch's bounds;
    ``residual_test()`` (CGLS, computed at most once) when the bounds leave consistency open."""
    r_lo, r_hi = _rank_bounds(S, e, cut_lo, cut_hi, m, n)
    a_lo = max(_count_bounds(S_aug, e, cut_hi, min(m, n + 1))[0], r_lo)  # rank([A|b]) >= rank(A)
    a_hi = _count_bounds(S_aug, e, cut_lo, min(m, n + 1))[1]
    if a_lo > r_hi:
        consistent, by = False, "rank"
    elif a_hi <= r_lo:
        consistent, by = True, "rank"
    else:
        consistent, by = residual_test(), "residual"
    if consistent is None:
        cls = UNDETERMINED
    elif not consistent:
        cls = "no_solution"
    elif r_lo == n:
        cls = "unique"
    elif r_hi < n:
        cls = "infinitely_many"
    else:
        cls = CONSISTENT_RANK_UNKNOWN
    return {"class": cls, "decided_by": by, "rank": r_lo, "rank_upper": r_hi, "rank_exact": r_lo == r_hi,
            "rank_aug": a_lo if a_lo == a_hi else None}


def matrix_free_solve(matvec, rmatvec, b: torch.Tensor, n: int, k: int, tol: Tolerance = Tolerance(),
                      residual_tol: float = 1e-3, seed: int = 0, max_iter: int = 300, oversample: int = 10,
                      power_iters: int = 2, normal_tol: float = 1e-4, residual_floor: float = 0.0,
                      probes: int = 10, sweep_rtols=()) -> dict:
    """Solvability of A x = b (A: m x n, m = len(b)) from batched products only, as the module
    docstring states: a randomized SVD of k + ``oversample`` triplets and its range error bound
    the rank; Rouché–Capelli from the sketch where the bounds decide it, CGLS (at most
    ``max_iter`` iterations, stopping rule ``normal_tol``) and the relative ``residual_tol``
    where they do not. ``residual_floor``: a known lower bound of min_x ||A x - b|| (0 when none).
    ``sweep_rtols``: the class at each of these rank rtols too (same sketch, CGLS run at most once).

    Returns the class (one of ``MATRIX_FREE_LABELS``), what decided it (``decided_by``: "rank"
    or "residual"), ``rank`` (a lower bound; exact when ``rank_exact``), ``rank_upper``,
    ``rank_aug`` (None unless exact), ``nullity`` (None unless the rank is exact) and
    ``nullity_lower`` (n - rank_upper), the relative ``residual`` of x, ``range_error``,
    the computed singular values (of A and of the small augmented matrix), ``cond_kept``
    (S_1 / smallest kept: a lower bound of A's when the rank is not exact), the effective rank
    of the computed values, the CGLS record when it ran, and ``sweep`` ({rtol: class})."""
    m = b.shape[0]
    dt, dev = b.dtype, b.device
    with no_tf32():
        U, S, Vh = randomized_svd(matvec, rmatvec, n, k, oversample, power_iters, dtype=dt, device=dev, seed=seed)
        p = S.shape[0]
        e = 0.0 if p >= min(m, n) else range_error(matvec, U, n, probes, seed)
        smax = S[0] if p else torch.zeros((), dtype=dt, device=dev)
        g = U.transpose(0, 1) @ b
        beta = torch.linalg.vector_norm(b - U @ g)
        small = torch.zeros(p + 1, p + 1, dtype=dt, device=dev)
        small[:p, :p] = torch.diag(S)
        small[:p, p] = g
        small[p, p] = beta
        S_aug = torch.linalg.svdvals(small)
        bn = float(torch.linalg.vector_norm(b))
        tiny = torch.finfo(dt).tiny

        def rel(v):
            return float(torch.linalg.vector_norm(v)) / bn if bn > 0 else 0.0

        ls: dict = {}

        def residual_test():
            if not ls:
                x0 = _truncated(U, S, Vh, g, int((S > cut).sum()))
                out = cgls(lambda v: matvec(v[:, None])[:, 0], lambda u: rmatvec(u[:, None])[:, 0], b, n,
                           max_iter=max_iter, normal_tol=normal_tol, anorm=float(smax), x0=x0)
                res = rel(out["r"])
                floor = residual_floor / bn if bn > 0 else 0.0
                consistent = True if res <= residual_tol else (
                    False if (out["converged"] or floor > residual_tol) else None)
                ls.update(out, residual=res, residual_floor=floor, consistent=consistent)
            return ls["consistent"]

        # the cutoff max(atol, rtol sigma_1) is known within [.. rtol S_1, .. rtol (S_1 + e)]
        rtol = tol.rtol if tol.rtol is not None else max(m, n) * torch.finfo(dt).eps
        s1 = float(smax)
        cut = max(tol.atol, rtol * s1)
        dec = _decide(S, S_aug, e, cut, max(tol.atol, rtol * (s1 + e)), m, n, residual_test)
        sweep = {}
        for rt in sweep_rtols:
            sweep[rt] = _decide(S, S_aug, e, max(tol.atol, rt * s1), max(tol.atol, rt * (s1 + e)), m, n,
                                residual_test)["class"]
        if dec["decided_by"] == "residual":
            x, residual = ls["x"], ls["residual"]
        else:
            x = _truncated(U, S, Vh, g, dec["rank"])
            residual = rel(b - matvec(x[:, None])[:, 0])
        kept = S[:dec["rank"]]
    return {"x": x, "residual": residual, **dec, "nullity": n - dec["rank"] if dec["rank_exact"] else None,
            "nullity_lower": n - dec["rank_upper"], "range_error": e,
            "cond_kept": float(smax / kept[-1].clamp(min=tiny)) if len(kept) else math.inf,
            "effective_rank": float(effective_rank(S)), "singular_values": S, "singular_values_aug": S_aug,
            "cutoff": float(cut), "n_unknowns": n, "triplets": p,
            "cgls": {k_: ls[k_] for k_ in ("iterations", "converged", "consistent_stop", "normal_ratio", "residual",
                                           "residual_floor")} if ls else None,
            "sweep": sweep}


def _truncated(U, S, Vh, g, r: int) -> torch.Tensor:
    """x = V_r S_r^-1 U_r^T b (``g`` = U^T b), the minimum-norm solution within the r leading triplets."""
    return Vh[:r].transpose(0, 1) @ (g[:r] / S[:r])
