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
is computed prefix by prefix instead, each unpadded. On a CPU each part is one call of the fused
attention kernel, which also returns each query's log-sum-exp, and the parts are merged through it
(:func:`_merge`); elsewhere by matrix products and an explicit softmax.

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
        self._additive = None

    def select(self, lo: int, hi: int) -> None:
        """The rows ``lo:hi`` are the batch of the next forward pass: where each row's queries go
        in its prefix's block (the rows of a prefix side by side, ``m`` slots per prefix)."""
        g = self.row_group[lo:hi]
        counts = np.bincount(g, minlength=self.G)
        order = np.argsort(g, kind="stable")
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.empty(len(g), dtype=np.int64)
        pos[order] = np.arange(len(g)) - start[g[order]]
        m = int(counts.max())
        dev = self.valid.device
        self._rows = (torch.from_numpy(g * m + pos).to(dev), m, g)
        self._members = None  # the rows of each prefix in the batch (a prefill's, made on first use)

    def additive_valid(self) -> torch.Tensor:
        """:attr:`valid` as an additive float32 mask ``[G, 1, 1, L]`` (0: a key, the float32 minimum: padding)."""
        if self._additive is None:
            self._additive = _masked(self.valid[:, None, None, :])
        return self._additive

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
    Returns ``([B, T, Hq, d], None)``."""
    shared = _ACTIVE.get()
    if shared is None:
        raise RuntimeError("cascade attention outside probes.cascade.active()")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("cascade attention has no sliding window or logit soft-capping")
    fi, m, _ = shared._rows
    li = module.layer_idx
    KP, VP = shared.keys[li], shared.values[li]
    B, Hq, T, d = query.shape
    H = key.shape[1]
    rep = Hq // H
    scale = scaling if scaling is not None else d ** -0.5
    if T > 1:
        fused = _fused_attention(query.device)
        if fused is not None:
            return _prefill_fused(fused, shared, KP, VP, query, key, value, attention_mask, scale, rep), None
        return _prefill(shared, KP, VP, query, key, value, attention_mask, scale, rep), None
    fused = _fused_attention(query.device)
    if fused is not None:
        return _decode_fused(fused, shared, KP, VP, query, key, value, attention_mask, scale, rep), None
    q, value, sr = _row_part(query, key, value, attention_mask, scale, rep)
    KP, VP = KP.to(q.dtype), VP.to(q.dtype)
    G, L = KP.shape[0], KP.shape[-2]
    neg = torch.finfo(q.dtype).min
    # the prefix part: each prefix's rows side by side, one product per prefix
    qg = q.new_zeros((G * m, H, rep * T, d)).index_copy_(0, fi, q)
    qg = qg.view(G, m, H, rep * T, d).transpose(1, 2).reshape(G, H, m * rep * T, d)
    sp = torch.matmul(qg, KP.transpose(-1, -2)).mul_(scale)
    sp = sp.masked_fill_(~shared.valid[:, None, None, :], neg)
    sp = sp.view(G, H, m, rep * T, L).transpose(1, 2).reshape(G * m, H, rep * T, L).index_select(0, fi)
    top = torch.maximum(sr.amax(-1, keepdim=True), sp.amax(-1, keepdim=True))
    er, ep = (sr - top).exp_(), (sp - top).exp_()
    den = er.sum(-1, keepdim=True) + ep.sum(-1, keepdim=True)
    out = torch.matmul(er, value)
    epg = ep.new_zeros((G * m, H, rep * T, L)).index_copy_(0, fi, ep)
    epg = epg.view(G, m, H, rep * T, L).transpose(1, 2).reshape(G, H, m * rep * T, L)
    op = torch.matmul(epg, VP).view(G, H, m, rep * T, d).transpose(1, 2)
    out = out + op.reshape(G * m, H, rep * T, d).index_select(0, fi)
    out = (out / den).to(query.dtype)
    return out.view(B, H, rep, T, d).reshape(B, Hq, T, d).transpose(1, 2).contiguous(), None


def _row_part(query, key, value, attention_mask, scale: float, rep: int):
    """The queries (``[B, H, rep * T, d]``: a key head's query heads one after another), the values and
    the row part's masked scores, in float32 throughout (a no-op for a float32 model): half-precision
    scores and weights would round far more than fused attention does, which keeps its scores in float32."""
    B, _, T, d = query.shape
    H = key.shape[1]
    f32 = torch.float32
    q = query.reshape(B, H, rep * T, d).to(f32)
    mask = attention_mask if rep == 1 else attention_mask.repeat(1, 1, rep, 1)
    sr = torch.matmul(q, key.to(f32).transpose(-1, -2)).mul_(scale).masked_fill_(~mask, torch.finfo(f32).min)
    return q, value.to(f32), sr


def _prefill(shared: SharedPrefix, KP, VP, query, key, value, attention_mask, scale: float, rep: int):
    """A prefill's attention (many queries per row, once per batch), in the same two parts as a
    decode step: the row part for every row at once, the prefix part prefix by prefix (the queries of
    its rows as one matrix against its keys, unpadded: a prefill's many queries per row would make
    the padded prefix blocks of a decode step large, and gathering each row's prefix in front of its
    own keys copies the prefix into every row, at every layer)."""
    B, Hq, T, d = query.shape
    H = key.shape[1]
    rT = rep * T
    f32 = torch.float32
    # (a query whose own keys are all padding gets weight 0 in the row part: its prefix's maximum is finite)
    q, value, sr = _row_part(query, key, value, attention_mask, scale, rep)
    top = sr.amax(-1, keepdim=True)
    mp, sp = torch.empty_like(top), torch.empty_like(top)  # the prefix part's maximum and sum of weights
    op = q.new_empty((B, H, rT, d))  # and its weighted values (relative to its maximum)
    for g, rows in shared.members():
        c, L = len(rows), shared.lens[g]
        qg = q.index_select(0, rows).transpose(0, 1).reshape(H, c * rT, d)
        s = torch.matmul(qg, KP[g, :, :L].to(f32).transpose(-1, -2)).mul_(scale)
        m = s.amax(-1, keepdim=True)
        e = s.sub_(m).exp_()
        mp.index_copy_(0, rows, m.view(H, c, rT, 1).transpose(0, 1))
        sp.index_copy_(0, rows, e.sum(-1, keepdim=True).view(H, c, rT, 1).transpose(0, 1))
        op.index_copy_(0, rows, torch.matmul(e, VP[g, :, :L].to(f32)).view(H, c, rT, d).transpose(0, 1))
    top = torch.maximum(top, mp)
    er = sr.sub_(top).exp_()
    wp = mp.sub_(top).exp_()
    den = er.sum(-1, keepdim=True).add_(sp.mul_(wp))
    out = torch.matmul(er, value).add_(op.mul_(wp)).div_(den).to(query.dtype)
    return out.view(B, H, rep, T, d).reshape(B, Hq, T, d).transpose(1, 2).contiguous()


# devices whose fused attention kernel also returns each query's log-sum-exp, through which the two
# parts are merged: a CPU's (the demo model's shapes, one layer, two threads: a 512-row decode step's
# attention over 40 prefixes 2.1 -> 1.5 ms; a prefill of 128 rows x 16 tokens 2.7 -> 2.5 ms, of 64 rows
# x 32 tokens 3.2 -> 1.7 ms); elsewhere the parts are computed by matrix products
FUSED_DEVICES = frozenset({"cpu"})


def _fused_attention(device):
    """The fused attention kernel that returns ``(output, logsumexp)`` on ``device``, or None."""
    if torch.device(device).type not in FUSED_DEVICES:
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _masked(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: attend) as the additive float32 mask the fused kernel takes."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


def _merge(o_row, lse_row, o_pre, lse_pre):
    """Softmax attention over the union of two key sets from each set's own (normalized output,
    log-sum-exp): weights ``exp(lse)`` of each set. A query whose row part is all padding has a
    log-sum-exp near the float32 minimum there: its weight goes to the prefix part."""
    return torch.lerp(o_pre, o_row, torch.sigmoid(lse_row - lse_pre).unsqueeze(-1))


def _fused_row_part(fused, query, key, value, attention_mask, scale: float, rep: int):
    B, _, T, d = query.shape
    H = key.shape[1]
    f32 = torch.float32
    q = query.reshape(B, H, rep * T, d).to(f32)
    mask = attention_mask if rep == 1 else attention_mask.repeat(1, 1, rep, 1)
    o, lse = fused(q, key.to(f32), value.to(f32), 0.0, False, attn_mask=_masked(mask), scale=scale)[:2]
    return q, o, lse


def _decode_fused(fused, shared: SharedPrefix, KP, VP, query, key, value, attention_mask, scale: float, rep: int):
    """A decode step with the fused kernel: the row part for all rows at once, the prefix part for all
    prefixes at once (each prefix's rows side by side in a padded block, as :func:`cascade_attention`)."""
    B, Hq, T, d = query.shape
    H = key.shape[1]
    rT = rep * T
    f32 = torch.float32
    q, o_row, lse_row = _fused_row_part(fused, query, key, value, attention_mask, scale, rep)
    fi, m, _ = shared._rows
    G, L = KP.shape[0], KP.shape[-2]
    qg = q.new_zeros((G * m, H, rT, d)).index_copy_(0, fi, q)
    qg = qg.view(G, m, H, rT, d).transpose(1, 2).reshape(G, H, m * rT, d)
    o, lse = fused(qg, KP.to(f32), VP.to(f32), 0.0, False, attn_mask=shared.additive_valid(), scale=scale)[:2]
    o_pre = o.reshape(G, H, m, rT, d).transpose(1, 2).reshape(G * m, H, rT, d).index_select(0, fi)
    lse_pre = lse.reshape(G, H, m, rT).transpose(1, 2).reshape(G * m, H, rT).index_select(0, fi)
    out = _merge(o_row, lse_row, o_pre, lse_pre).to(query.dtype)
    return out.reshape(B, H, rep, T, d).reshape(B, Hq, T, d).transpose(1, 2).contiguous()


def _prefill_fused(fused, shared: SharedPrefix, KP, VP, query, key, value, attention_mask, scale: float, rep: int):
    """:func:`_prefill` with the fused kernel: the row part for every row at once, the prefix part
    prefix by prefix (its rows' queries against its keys, unpadded)."""
    B, Hq, T, d = query.shape
    H = key.shape[1]
    rT = rep * T
    f32 = torch.float32
    q, o_row, lse_row = _fused_row_part(fused, query, key, value, attention_mask, scale, rep)
    o_pre, lse_pre = torch.empty_like(o_row), torch.empty_like(lse_row)
    for g, rows in shared.members():
        c, L = len(rows), shared.lens[g]
        qg = q.index_select(0, rows).transpose(0, 1).reshape(1, H, c * rT, d)
        o, lse = fused(qg, KP[g:g + 1, :, :L].to(f32), VP[g:g + 1, :, :L].to(f32), 0.0, False, scale=scale)[:2]
        o_pre.index_copy_(0, rows, o.reshape(H, c, rT, d).transpose(0, 1))
        lse_pre.index_copy_(0, rows, lse.reshape(H, c, rT).transpose(0, 1))
    out = _merge(o_row, lse_row, o_pre, lse_pre).to(query.dtype)
    return out.reshape(B, H, rep, T, d).reshape(B, Hq, T, d).transpose(1, 2).contiguous()


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
