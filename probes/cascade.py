"""Cascade attention: the rows of a batch that share a few-shot prefix attend to one copy of its keys
and values, instead of each row holding its own copy.

A SliCK batch holds hundreds of rows (answers and samples) of a few dozen prefixes. With one copy of
the prefix per row, filling a batch copies the prefix into every row, every forward pass reads every
row's copy, and every new branch copies its row's whole cache. Here each row's cache holds only its
own positions (its prompt's suffix and its answer); the attention of a query is the softmax over the
union of its row's keys and its prefix's keys, computed in two parts that share one normalization:

- the row part: the row's queries against the row's keys (suffix and answer, causal, padding masked);
- the prefix part: the queries of all rows of a prefix, gathered into one matrix, against the
  prefix's keys (one matrix product per prefix, all prefixes at once in a padded batch).

That is for decoding (one query per row, at every step). A prefill (a batch's suffixes, once per
batch) has many queries per row, which would make the padded prefix blocks large: its prefix part
is computed prefix by prefix instead, each unpadded. Each part is normalized on its own and the two
are merged through their log-sum-exps (:func:`_merge`), so neither is copied into the other's layout.

The result equals ordinary attention over ``prefix + row`` up to float rounding (the sums are
ordered differently). It applies to models whose attention is plain scaled dot-product attention
behind transformers' attention interface, without a sliding window, logit soft-capping or attention
sinks (:func:`supported`); other models keep one copy of the prefix per row
(:mod:`probes.generation`).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import numpy as np
import torch

NAME = "knowcat_cascade"
# model types whose attention modules call transformers' attention interface with plain scaled
# dot-product semantics (queries and keys already rotated, a scale, nothing else)
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "granite", "smollm3"})

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("knowcat_cascade", default=None)


def supported(model) -> bool:
    """Whether the model's attention can be computed as a cascade (see the module's docstring)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return False
    if not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return False
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    impl = getattr(cfg, "_attn_implementation", None)
    return impl in ("sdpa", "eager", NAME)


class SharedPrefix:
    """The prefixes of one batch, each stored once per layer (padded to the longest:
    ``keys[l]``: ``[G, heads, L, head_dim]``, ``valid``: ``[G, L]``), and which prefix each row
    attends to (:attr:`row_group`, kept by the caller as rows move and split)."""

    def __init__(self, prefix_kvs: list, rows_cap: int, device):
        index: dict[int, int] = {}
        firsts = []
        groups = np.zeros(max(rows_cap, len(prefix_kvs)), dtype=np.int64)
        for r, kv in enumerate(prefix_kvs):
            g = index.setdefault(id(kv), len(index))
            if g == len(firsts):
                firsts.append(kv)
            groups[r] = g
        self.row_group = groups
        self.G = len(firsts)
        lens = self.lens = [kv[0][0].shape[-2] for kv in firsts]
        L = max(lens)
        self.valid = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        self.keys, self.values = [], []
        for li in range(len(firsts[0])):
            k0 = firsts[0][li][0]
            K = k0.new_zeros((self.G, k0.shape[1], L, k0.shape[-1]), device=device)
            V = K.clone()
            for g, kv in enumerate(firsts):
                k, v = kv[li]
                K[g, :, :k.shape[-2]] = k[0]
                V[g, :, :v.shape[-2]] = v[0]
            self.keys.append(K)
            self.values.append(V)
        self._rows = None

    def select(self, lo: int, hi: int) -> None:
        """The rows ``lo:hi`` are the batch of the next forward pass: the prefixes they attend to
        (:meth:`blocks`) and where each row's queries go in its prefix's block (the rows of a prefix
        side by side, ``m`` slots per prefix)."""
        g = self.row_group[lo:hi]
        present, gi = np.unique(g, return_inverse=True)  # the prefixes of these rows; each row's among them
        gi = gi.reshape(-1)
        counts = np.bincount(gi)
        order = np.argsort(gi, kind="stable")
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.empty(len(g), dtype=np.int64)
        pos[order] = np.arange(len(g)) - start[gi[order]]
        m = int(counts.max())
        dev = self.valid.device
        self._rows = (torch.from_numpy(gi * m + pos).to(dev), m, g)
        L = max(self.lens[x] for x in present.tolist())
        self._present = (None if len(present) == self.G else torch.from_numpy(present).to(dev), L)
        self._members = None  # the rows of each prefix in the batch (a prefill's, made on first use)

    def blocks(self, li: int):
        """Layer ``li``'s keys, values and valid positions of the prefixes the selected rows attend to
        (``[P, heads, L, head_dim]``, ``[P, L]``; ``L`` their longest), in the order of :attr:`_rows`."""
        present, L = self._present
        K, V, valid = self.keys[li][:, :, :L], self.values[li][:, :, :L], self.valid[:, :L]
        if present is None:
            return K, V, valid
        return K.index_select(0, present), V.index_select(0, present), valid.index_select(0, present)

    def members(self) -> list[tuple[int, torch.Tensor]]:
        if self._members is None:
            g = self._rows[2]
            dev = self.valid.device
            self._members = [(int(x), torch.from_numpy(np.flatnonzero(g == x)).to(dev)) for x in np.unique(g)]
        return self._members


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface, registered as :data:`NAME`: ``query`` ``[B, Hq, T, d]``,
    ``key``/``value`` the rows' own positions ``[B, H, n, d]``, ``attention_mask`` a boolean
    ``[B, 1, T, n]`` over them (True: attend); the prefix comes from the active :class:`SharedPrefix`.
    Returns ``([B, T, Hq, d], None)``.

    Each part is softmax attention over its own keys, giving its normalized output and each query's
    log-sum-exp (:func:`_attend`); the two are merged through the log-sum-exps (:func:`_merge`). The
    prefix part of a decode step takes the prefixes of its rows at once (each prefix's rows side by side
    in a padded block, :meth:`SharedPrefix.blocks`); a prefill's, prefix by prefix."""
    shared = _ACTIVE.get()
    if shared is None:
        raise RuntimeError("cascade attention outside probes.cascade.active()")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("cascade attention has no sliding window or logit soft-capping")
    li = module.layer_idx
    B, Hq, T, d = query.shape
    H = key.shape[1]
    rep = Hq // H
    rT = rep * T
    scale = scaling if scaling is not None else d ** -0.5
    f32 = torch.float32
    # a key head's query heads one after another; float32 throughout (a no-op for a float32 model):
    # half-precision scores and weights would round far more than fused attention does, which keeps
    # its scores in float32
    q = query.reshape(B, H, rT, d).to(f32)
    mask = attention_mask if rep == 1 else attention_mask.repeat(1, 1, rep, 1)
    o_row, lse_row = _attend(q, key.to(f32), value.to(f32), scale, mask)
    if T > 1:
        # (all prefixes at once in padded blocks, as a decode step does, took longer: 400 demo questions'
        # prefill 1.34-1.38 instead of 1.30 s)
        KP, VP = shared.keys[li], shared.values[li]
        o_pre, lse_pre = torch.empty_like(o_row), torch.empty_like(lse_row)
        for g, rows in shared.members():
            c, L = len(rows), shared.lens[g]
            qg = q.index_select(0, rows).transpose(0, 1).reshape(H, c * rT, d)
            o, lse = _attend(qg, KP[g, :, :L].to(f32), VP[g, :, :L].to(f32), scale)
            o_pre.index_copy_(0, rows, o.view(H, c, rT, d).transpose(0, 1))
            lse_pre.index_copy_(0, rows, lse.view(H, c, rT).transpose(0, 1))
    else:
        fi, m, _ = shared._rows
        KP, VP, valid = shared.blocks(li)
        G = KP.shape[0]
        qg = q.new_zeros((G * m, H, rT, d)).index_copy_(0, fi, q)
        qg = qg.view(G, m, H, rT, d).transpose(1, 2).reshape(G, H, m * rT, d)
        o, lse = _attend(qg, KP.to(f32), VP.to(f32), scale, valid[:, None, None, :])
        o_pre = o.view(G, H, m, rT, d).transpose(1, 2).reshape(G * m, H, rT, d).index_select(0, fi)
        lse_pre = lse.view(G, H, m, rT).transpose(1, 2).reshape(G * m, H, rT).index_select(0, fi)
    out = _merge(o_row, lse_row, o_pre, lse_pre).to(query.dtype)
    return out.view(B, H, rep, T, d).reshape(B, Hq, T, d).transpose(1, 2).contiguous(), None


def _attend(q, k, v, scale: float, mask=None):
    """Softmax attention of ``q`` over ``k``, ``v`` (``mask``: boolean, True: attend, broadcast over the
    scores; None: every key): its output and each query's log-sum-exp of scores. A query with no key
    left gets uniform weights and a log-sum-exp near the float32 minimum, so it takes no weight when
    merged. (A fused kernel that returns the log-sum-exp, a CPU's
    ``_scaled_dot_product_flash_attention_for_cpu``, took longer on the demo model's shapes: a decode
    step's row part 0.71 instead of 0.45 ms, a prefill's 1.00 instead of 0.38 ms.)"""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s = s.masked_fill_(~mask, torch.finfo(s.dtype).min)
    top = s.amax(-1, keepdim=True)
    e = s.sub_(top).exp_()
    den = e.sum(-1, keepdim=True)
    return torch.matmul(e, v).div_(den), top.add_(den.log_()).squeeze(-1)


def _merge(o_row, lse_row, o_pre, lse_pre):
    """Softmax attention over the union of two key sets, from each set's own normalized output and
    log-sum-exp: the sets weigh ``exp(lse)`` each."""
    return torch.lerp(o_pre, o_row, torch.sigmoid(lse_row - lse_pre).unsqueeze(-1))


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, cascade_attention)


_register()


@contextmanager
def active(model, shared: SharedPrefix):
    """The model computes its attention as a cascade over ``shared`` inside the block (its own
    attention implementation is restored after)."""
    before = model.config._attn_implementation
    token = _ACTIVE.set(shared)
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.reset(token)
