"""Reproducible sampling: every sampled answer is a pure function of
(seed, example id, prompt index, sample index).

Each sampled row carries a 64-bit stream seed derived from those four values;
the uniform number used at decoding step ``t`` is ``splitmix64(stream + t)``.
Nothing depends on the batch a row lands in, the order rows are processed in,
or whether the run was resumed. A token is drawn by inverse-CDF sampling over
the top-k tokens of ``softmax(logits / temperature)`` (every token tied with the
k-th logit kept, as in transformers and vLLM).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64_int(x: int) -> int:
    x = (x + _GOLDEN) & _MASK
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _prompt_stream(seed: int, example_id: str, prompt_index: int) -> int:
    """The stream state before the sample index is mixed in."""
    h = int.from_bytes(hashlib.blake2b(str(example_id).encode("utf-8"), digest_size=8).digest(), "little")
    x = _splitmix64_int(seed & _MASK)
    for part in (h, prompt_index):
        x = _splitmix64_int(x ^ (part & _MASK))
    return x


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output mixing of uint64 values, vectorized (the caller has added the increment)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_seed(seed: int, example_id: str, prompt_index: int, sample_index: int) -> int:
    """The 64-bit stream of one sampled answer."""
    return _splitmix64_int(_prompt_stream(seed, example_id, prompt_index) ^ (sample_index & _MASK))


def stream_seeds(seed: int, example_id: str, prompt_index: int, n: int) -> tuple[int, ...]:
    """``stream_seed(seed, example_id, prompt_index, i)`` for ``i`` in ``range(n)``, the last mixing
    step vectorized."""
    with np.errstate(over="ignore"):
        z = (np.uint64(_prompt_stream(seed, example_id, prompt_index)) ^ np.arange(n, dtype=np.uint64)) \
            + np.uint64(_GOLDEN)
    return tuple(_mix64(z).tolist())


def uniforms(streams: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per stream for decoding step ``step`` (vectorized splitmix64)."""
    with np.errstate(over="ignore"):
        z = _mix64(streams.astype(np.uint64) + np.uint64(step + 1) * np.uint64(_GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def topk_cdf(logits: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and cumulative probabilities of ``softmax(top_k(logits) / temperature)``, per row.

    Top-k keeps every token whose logit is at least the k-th largest, ties included, as
    transformers' ``TopKLogitsWarper`` and vLLM do; so a row can keep more than ``k`` tokens.
    The kept tokens are ordered by logit (descending), ties by token id (ascending), so the
    token a uniform maps to does not depend on how ``torch.topk`` orders ties. Rows that keep
    fewer tokens than the widest row are padded with zero-probability entries (cdf 1.0), which
    ``searchsorted`` of a uniform in [0, 1) never selects.
    """
    x = logits.float()
    V = x.shape[-1]
    k = min(top_k, V) if top_k and top_k > 0 else V
    if k < V:
        # the common case, in one topk: no logit equals its neighbour among the k + 1 largest of any row,
        # so there is no tie at the k-th logit and none among the kept tokens, and topk's order (descending)
        # is already the canonical one; the same result as the general path below, in a fraction of its work
        vals, idx = torch.topk(x, k + 1, dim=-1)
        if not bool((vals[:, 1:] == vals[:, :-1]).any()):
            cdf = torch.softmax(vals[:, :k].double() / temperature, dim=-1).cumsum(dim=-1)
            cdf[:, -1] = 1.0
            return idx[:, :k], cdf
    return _topk_cdf_general(x, temperature, k)


def _topk_cdf_general(x: torch.Tensor, temperature: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_cdf` whatever the ties (``x`` float logits, ``k`` at most the vocabulary)."""
    vals, idx = torch.topk(x, k, dim=-1)
    kth = vals[:, -1:]
    n_kept = (x >= kth).sum(dim=-1, keepdim=True)
    width = int(n_kept.max())
    if width > k:  # a tie at the k-th logit: every tied token is kept
        vals, idx = torch.topk(x.masked_fill(x < kth, float("-inf")), width, dim=-1)
    # canonical order: token id ascending, then a stable sort by logit descending
    idx, o = torch.sort(idx, dim=-1)
    vals = vals.gather(1, o)
    vals, o = torch.sort(vals, dim=-1, descending=True, stable=True)
    idx = idx.gather(1, o)
    cdf = torch.softmax(vals.double() / temperature, dim=-1).cumsum(dim=-1)
    pos = torch.arange(width, device=cdf.device)[None, :]
    cdf = torch.where(pos >= n_kept.to(cdf.device) - 1, torch.ones_like(cdf), cdf)
    return idx, cdf


def sample_top_k(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Draw one token per row from the top-k of ``softmax(logits / temperature)`` with uniforms ``u``."""
    idx, cdf = topk_cdf(logits, temperature, top_k)
    pick = torch.searchsorted(cdf, u.double().to(cdf.device)[:, None]).clamp(max=idx.shape[1] - 1)
    return idx.gather(1, pick).squeeze(1)
