"""Batched few-shot generation with shared-prefix KV caches.

Every prompt is ``prefix + suffix``. Prompts that share a prefix (all questions
of a relation under one set of few-shot exemplars) share its KV cache: the
prefix is encoded once (:class:`PrefixCache`, kept by the engine across calls)
and only each row's suffix and answer are computed. Rows of different prefixes
share a batch: each prefix's keys and values are left-padded to the longest,
each row keeps its own positions and attention mask, so a batch is filled
whatever the mix of prefixes. The keys and values live in buffers allocated once
per batch and written in place (:class:`_BufferLayer`, a transformers cache
layer); a row is copied only when its answers split into different tokens, or
when a live row takes the place of a finished one. Rows stop at their first
newline (or eos) and leave the batch at once. The same :class:`PrefixCache`
serves teacher-forced scoring (:mod:`probes.scoring`), as a batch-broadcast
transformers cache.

The shared part is taken from the tokenization of the *whole* prompt, never
from tokenizing the pieces apart: a row whose tokens do not start with the
prefix's tokens (some tokenizers merge across the boundary) falls back to the
longest common token prefix, so answers are exactly those of encoding the full
prompt.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch

from transformers.cache_utils import Cache, CacheLayerMixin

from probes.cascade import active as cascade_active, supported as cascade_supported
from probes.sampling import topk_cdf, uniforms


@dataclass
class PromptRequest:
    """One prompt: its greedy answer (``greedy``) and one sampled answer per stream seed.
    ``keep_state``: a later request of the same prompt will follow (an engine may keep the state
    after the prompt for it, so that request skips its prefill). ``abandon``: a test of a sample's
    text so far (its first tokens decoded); an engine may stop a sample as soon as it is true and
    return ``None`` for it (the caller decided it cannot matter whatever follows); the greedy
    answer is always completed."""

    key: Hashable
    prefix: str
    suffix: str
    greedy: bool = True
    streams: tuple[int, ...] = ()
    keep_state: bool = False
    abandon: Callable[[str], bool] | None = None


@dataclass
class Generation:
    greedy: str | None = None
    samples: list[str | None] = field(default_factory=list)  # None: a sample abandoned (PromptRequest.abandon)


def _forward_params(model) -> frozenset:
    import inspect

    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands a KV cache to ``model.forward``: ``cache`` (transformers' current
    name), or ``past_key_values`` for a model whose forward predates it."""
    params = _forward_params(model)
    return {"past_key_values": cache} if "past_key_values" in params and "cache" not in params else {"cache": cache}


def output_cache(out):
    """The KV cache a forward pass returned (``out.cache``; ``past_key_values`` in older outputs)."""
    if "cache" in out:
        return out["cache"]
    return out["past_key_values"]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_STOP_CACHE: dict[tuple, set[int]] = {}


def stop_token_ids(tokenizer, stop: str = "\n") -> set[int]:
    """Ids of every vocabulary token whose text contains ``stop`` (plus eos)."""
    key = (id(tokenizer), len(tokenizer), stop)
    if key in _STOP_CACHE:
        return _STOP_CACHE[key]
    ids = set()
    vocab = tokenizer.get_vocab()
    for tok_str, idx in vocab.items():
        text = tokenizer.convert_tokens_to_string([tok_str])
        if stop in text:
            ids.add(idx)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    _STOP_CACHE[key] = ids
    return ids


def _weights_version(model) -> int:
    """Changes whenever a parameter is modified in place (an optimizer step): cached prefixes are stale."""
    return sum(p._version for p in model.parameters())


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(y) for y in x)


class KVStore:
    """Tensors keyed by token ids, least recently used first out once ``max_entries`` entries or
    ``max_bytes`` are held; emptied when the model's weights change (they were computed with the old ones)."""

    def __init__(self, model, max_entries: int, max_bytes: int):
        self.model, self.max_entries, self.max_bytes = model, max_entries, max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._version = None

    def sync(self) -> None:
        """Empty the store if the model's weights changed since it was last synced."""
        version = _weights_version(self.model)
        if version != self._version:
            self._items.clear()
            self._bytes, self._version = 0, version

    def get(self, key, pop: bool = False, sync: bool = True):
        if sync:
            self.sync()
        item = self._items.pop(key, None) if pop else self._items.get(key)
        if item is not None:
            if pop:
                self._bytes -= _nbytes(item)
            else:
                self._items.move_to_end(key)
        return item

    def put(self, key, item) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._items[key] = item
        self._bytes += _nbytes(item)
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self._bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._items)


class PrefixCache(KVStore):
    """Keys and values of encoded token prefixes (:class:`KVStore`), the one prefix cache of generation
    and scoring. Each prefix is encoded once (``get_many`` encodes the new prefixes together, sorted by length
    and padded on the right: under causal attention a position never sees the padding after it, so each
    prefix's keys and values are those of encoding it alone); ``get`` returns one
    ``(keys, values)`` pair per layer, each ``[1, heads, len(ids), head_dim]`` (the batched decoder lays
    them into its buffers), ``batch_cache`` a transformers ``Cache`` holding the prefix for a batch of
    rows that share it (teacher-forced scoring)."""

    def __init__(self, model, max_entries: int = 256, max_bytes: int = 2 << 30):
        super().__init__(model, max_entries, max_bytes)
        self.encoded_tokens = 0

    @torch.inference_mode()
    def get(self, ids: tuple[int, ...], sync: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.get_many([ids], sync=sync)[0]

    @torch.inference_mode()
    def get_many(self, prefixes: Sequence[tuple[int, ...]], sync: bool = True) -> list:
        """``[get(ids) for ids in prefixes]``, the prefixes not held yet encoded together, in passes of at most
        :data:`PREFILL_TOKENS` tokens (padding included) on the device, not one pass per length (lazy SliCK
        on the demo model, 400 questions: one pass per batch instead of 35 passes of one to eleven
        prefixes, 0.15 instead of 0.19 s)."""
        if sync:
            self.sync()
        found = {ids: super(PrefixCache, self).get(ids, sync=False) for ids in set(prefixes)}
        todo = sorted((ids for ids, kv in found.items() if kv is None), key=lambda ids: (len(ids), ids))
        dev = self.model.device
        for lo, hi in _length_groups([len(ids) for ids in todo], max_tokens=PREFILL_TOKENS.get(dev.type)):
            group = todo[lo:hi]
            longest = group[-1]  # (sorted by length)
            # padded with the longest prefix's own tokens: any token would do, and these are in the vocabulary
            # (a model's pad_token_id may be unset, negative or past its embeddings)
            x = torch.tensor([list(ids) + list(longest[len(ids):]) for ids in group], device=dev)
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True,
                             **_last_logits_only(self.model))  # only the keys and values are kept
            kv = _layer_kv(output_cache(out))
            for i, ids in enumerate(group):
                L = len(ids)
                found[ids] = [(k[i:i + 1, :, :L].clone(), v[i:i + 1, :, :L].clone()) for k, v in kv]
                self.encoded_tokens += L
                self.put(ids, found[ids])
        return [found[ids] for ids in prefixes]

    @torch.inference_mode()
    def batch_cache(self, ids: tuple[int, ...], batch: int, sync: bool = True) -> Cache:
        """A transformers ``Cache`` whose ``batch`` rows all hold prefix ``ids`` (one broadcast copy per
        layer; a forward pass appends its positions to it)."""
        layers, window = [], _sliding_window(self.model)
        for k, v in self.get(ids, sync=sync):
            K = torch.empty((batch,) + tuple(k.shape[1:]), dtype=k.dtype, device=k.device)
            V = torch.empty((batch,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
            K.copy_(k.expand_as(K))
            V.copy_(v.expand_as(V))
            layers.append(_BufferLayer(K, V, k.shape[-2], window))
        return Cache(layers=layers)


class PromptStates(KVStore):
    """The state after a whole prompt (its suffix's keys and values, every layer's in one tensor
    ``[suffix length, width]``: at each position, layer 0's keys (heads x head_dim), its values, layer 1's keys
    ... one after another, so keys and values of different shapes fit, as a multi-head latent attention
    model's do; and the logits of the first answer token), kept from a request with ``keep_state`` for a later request of the
    same prompt (lazy SliCK asks the samples of a prompt in a later round than its greedy answer):
    that request skips its prefill, as a shared prefill of its greedy answer and samples would."""

    def __init__(self, model, max_entries: int = 1 << 16, max_bytes: int = 1 << 30):
        super().__init__(model, max_entries, max_bytes)


def _layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(keys, values)`` per layer of a full-attention cache (transformers' ``DynamicCache``). A
    sliding-window layer counts while it still holds every position (a sequence shorter than its window,
    as few-shot prompts are: Mistral's window is 4,096): its attention is then full attention
    (:func:`_check_window` keeps the whole decode inside the window)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    def whole(l) -> bool:
        if type(l) is DynamicLayer:
            return True
        return type(l) is DynamicSlidingWindowLayer and l.keys.shape[-2] == getattr(l, "cumulative_length", -1)

    layers = getattr(cache, "layers", None)
    if layers is None or not all(whole(l) for l in layers):
        kinds = sorted({type(l).__name__ for l in layers or ()}) or [type(cache).__name__]
        raise NotImplementedError(f"shared-prefix KV caches need full-attention layers (or sliding windows longer "
                                  f"than the prompt); this model's are {kinds}")
    return [(l.keys, l.values) for l in layers]


def _sliding_window(model) -> int | None:
    """The model's sliding attention window, or None where it attends to every position."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None) if cfg is not None else None
    uses = getattr(cfg, "use_sliding_window", True) and (
        "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))
    return window if window and uses else None


def _check_window(model, positions: int) -> None:
    """Refuse a decode longer than the model's sliding attention window: the buffers attend to every
    position, which equals sliding-window attention only inside the window."""
    window = _sliding_window(model)
    if window and positions > window:
        raise NotImplementedError(f"prompt and answer ({positions} positions) exceed the model's sliding attention "
                                  f"window ({window}): batched generation attends to every position")


class _BufferLayer(CacheLayerMixin):
    """One layer's keys and values in buffers allocated once for a whole decode
    (``[rows, heads, positions, head_dim]``): a forward pass writes its positions in place and
    attends over a view of the rows it computes, instead of concatenating a new cache per step."""

    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, window: int | None = None):
        super().__init__()
        self.keys, self.values, self.n = keys, values, length
        self.window = window  # a sliding attention window the positions must stay within (None: no limit)
        self.row0 = 0  # the first row a forward pass computes
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        r0, q = self.row0, key_states.shape[-2]
        r1 = r0 + key_states.shape[0]
        if self.n + q > self.keys.shape[-2]:  # more positions than allocated: grow to exactly what is needed
            if self.window and self.n + q > self.window:
                raise NotImplementedError(f"prompt and answer ({self.n + q} positions) exceed the model's sliding "
                                          f"attention window ({self.window}): the prefix cache attends to every position")
            self.keys, self.values = (torch.cat([t[:, :, :self.n], t.new_empty(t.shape[:2] + (q,) + t.shape[3:])],
                                                dim=-2) for t in (self.keys, self.values))
        self.keys[r0:r1, :, self.n:self.n + q] = key_states
        self.values[r0:r1, :, self.n:self.n + q] = value_states
        self.n += q
        return self.keys[r0:r1, :, :self.n], self.values[r0:r1, :, :self.n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


# devices where KV rows are copied one by one on one thread (elsewhere: one indexed copy, one kernel)
ROW_COPY_DEVICES = frozenset({"cpu"})
_threads = torch.get_num_threads


def _copy_rows(dst: torch.Tensor, dst_rows, src: torch.Tensor, src_rows, n: int) -> None:
    """``dst[dst_rows[i], ..., :n, :] = src[src_rows[i], ..., :n, :]`` for every ``i`` (positions on
    the second-to-last axis). On a CPU with one thread, one copy per row: advanced-index assignment
    gathers into a temporary and scatters it back, 4 to 20 times slower (measured on the demo model's
    caches), and a gather then an indexed copy 1.8 times slower; with two threads that gather and copy,
    split across the threads, take 0.7 times the row-by-row copies' time (100 rows of the demo model's
    keys)."""
    if dst.device.type in ROW_COPY_DEVICES:
        if _threads() > 1 and len(dst_rows) > 1:
            # several threads: a gather and an indexed copy, each split across the threads
            dev = dst.device
            rows = src[..., :n, :].index_select(0, torch.as_tensor(src_rows, device=dev))
            dst[..., :n, :].index_copy_(0, torch.as_tensor(dst_rows, device=dev), rows)
            return
        for d, s_ in zip(dst_rows.tolist(), src_rows.tolist()):
            dst[d, ..., :n, :].copy_(src[s_, ..., :n, :])
    else:
        dev = dst.device
        dst[torch.as_tensor(dst_rows, device=dev), ..., :n, :] = src[torch.as_tensor(src_rows, device=dev), ..., :n, :]


class _Buffers:
    """The decode's state for every row: its KV cache (a transformers ``Cache`` of :class:`_BufferLayer`),
    its attention mask and its next position. Rows are copied only when a branch splits off or a
    live row moves into a finished one's place (:meth:`fork`).

    With ``shared`` (:mod:`probes.cascade`), the prefixes are kept once each (:attr:`shared`) and a
    row's buffers hold only its own positions; otherwise each row holds a copy of its prefix,
    left-padded to the longest. :attr:`base` is where the rows' own positions start in the buffers."""

    def __init__(self, prefix_kvs: list, suffix_lens: list[int], row_capacity: int, positions: int, device,
                 shared: bool = False):
        R = len(prefix_kvs)
        first = prefix_kvs[0]
        plens = [kv[0][0].shape[-2] for kv in prefix_kvs]
        P = self.P = max(plens)
        base = self.base = 0 if shared else P
        S = max(suffix_lens)
        self.rows_cap, self.pos_cap = max(row_capacity, R), base + S + positions
        self.shared = None
        if shared:
            from probes.cascade import SharedPrefix

            self.shared = SharedPrefix(prefix_kvs, self.rows_cap, device)
        layers = []
        # the rows of each prefix, copied in one indexed copy per prefix (a broadcast view, not a
        # tensor per row: 2.1x faster than one copy per row with two threads, 1.3x with one, on the
        # demo model's caches); left padding zeroed the same way (masked, but finite)
        by_prefix: dict[int, list[int]] = {}
        for r, kv in enumerate([] if shared else prefix_kvs):
            by_prefix.setdefault(id(kv), []).append(r)
        groups = [(prefix_kvs[rows[0]], torch.tensor(rows, device=device)) for rows in by_prefix.values()]
        for li, (k0, v0) in enumerate(first):
            K = torch.empty((self.rows_cap, k0.shape[1], self.pos_cap, k0.shape[-1]), dtype=k0.dtype, device=device)
            V = torch.empty((self.rows_cap, v0.shape[1], self.pos_cap, v0.shape[-1]), dtype=v0.dtype, device=device)
            for kv, idx in groups:
                k, v = kv[li]
                L, n = k.shape[-2], len(idx)
                for dst, src in ((K, k), (V, v)):
                    if L < P:
                        dst[:, :, :P - L].index_copy_(0, idx, src.new_zeros(()).expand(n, src.shape[1], P - L,
                                                                                        src.shape[-1]))
                    dst[:, :, P - L:P].index_copy_(0, idx, src.expand(n, -1, -1, -1))
            layers.append(_BufferLayer(K, V, base))
        self.cache = Cache(layers=layers)
        self.attn = torch.zeros((self.rows_cap, self.pos_cap), dtype=torch.long, device=device)
        self.plens = torch.tensor(plens, device=device)
        if not shared:
            self.attn[:R, :P] = torch.arange(P, device=device) >= (P - self.plens)[:, None]  # right-aligned at P
        self.next_pos = torch.zeros(self.rows_cap, dtype=torch.long, device=device)

    @property
    def n(self) -> int:
        return self.cache.layers[0].n

    def mask(self, lo: int, hi: int, n: int, q: int = 1):
        """The attention mask of rows ``lo:hi`` whose ``q`` new positions end at ``n``: the 2D
        padding mask (transformers adds causality), or with :attr:`shared` the 4D boolean mask of
        the rows' own positions, causal, that cascade attention takes (its prefix part is
        :attr:`shared`'s, whose rows of the pass this selects)."""
        attn = self.attn[lo:hi, :n]
        if self.shared is None:
            return attn
        self.shared.select(lo, hi)
        m = attn.bool()[:, None, None, :].expand(-1, 1, q, -1)
        if q > 1:
            qpos = torch.arange(n - q, n, device=attn.device)[:, None]
            m = m & (torch.arange(n, device=attn.device)[None, :] <= qpos)
        return m

    def fork(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows ``dst`` become copies of rows ``src`` (new branches of their nodes)."""
        n = self.n
        for layer in self.cache.layers:
            _copy_rows(layer.keys, dst, layer.keys, src, n)
            _copy_rows(layer.values, dst, layer.values, src, n)
        d, s_ = torch.as_tensor(dst, device=self.attn.device), torch.as_tensor(src, device=self.attn.device)
        self.attn[d, :n] = self.attn[s_, :n]
        self.next_pos[d] = self.next_pos[s_]
        if self.shared is not None:
            self.shared.row_group[dst] = self.shared.row_group[src]


def _state_columns(cache):
    """Each layer's keys, then its values (``[rows, heads, positions, head_dim]`` buffers), with the columns
    they take in a kept prompt state (:class:`PromptStates`: ``[suffix length, width]``, heads x head_dim
    columns each, one after another)."""
    at = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            width = t.shape[1] * t.shape[-1]
            yield t, slice(at, at + width)
            at += width


def _abandoned(test, text: str) -> bool:
    """``test(text)``, except while the text ends in an incomplete character (bytes of a
    character not all generated yet decode to U+FFFD): its last character is not known."""
    return "\ufffd" not in text and bool(test(text))


# the most tokens (padding included) a prefill computes in one forward pass, per device type: on a
# CPU, a pass's activations that outgrow its caches cost more than another pass (the demo model's
# suffix prefills, 400 questions, three runs each: whole batches of 512 rows 1.56-1.67 s, passes of at
# most 2,048 tokens 1.30-1.37 s; of 1,024, 1.43-1.44 s; of 512, 1.46-1.61 s); an accelerator takes
# the whole batch
PREFILL_TOKENS = {"cpu": 2048}


def _draw(logits: torch.Tensor, row: np.ndarray, streams: np.ndarray, step: int, temperature: float,
          top_k: int) -> np.ndarray:
    """The token each stream draws at ``step`` from its row of ``logits`` (``row[i]``: stream ``i``'s),
    by inverse-CDF sampling over the top-k (:mod:`probes.sampling`)."""
    idx, cdf = topk_cdf(logits, temperature, top_k)
    u = torch.from_numpy(uniforms(streams, step)).to(cdf.device)
    row_t = torch.from_numpy(row).to(cdf.device)
    pick = torch.searchsorted(cdf[row_t], u[:, None]).clamp(max=idx.shape[1] - 1)
    return idx[row_t].gather(1, pick).squeeze(1).cpu().numpy()


def _length_groups(lengths: list[int], min_tokens: int = 256, waste: float = 0.15,
                   max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges to prefill together: a range grows while its padding stays within
    ``waste`` of its tokens and its padded tokens within ``max_tokens``, or while it holds fewer
    than ``min_tokens`` (a small forward pass costs its latency more than its padding)."""
    groups, lo = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths):
            groups.append((lo, i))
            break
        rows = lengths[lo:i + 1]
        real, padded = sum(rows), max(rows) * len(rows)
        full = padded > (1 + waste) * real or (max_tokens is not None and padded > max_tokens)
        if full and sum(lengths[lo:i]) >= min_tokens:
            groups.append((lo, i))
            lo = i
    return groups


@torch.inference_mode()
def _decode_chunk(model, prefix_kvs: list, suffixes: list[list[int]], branches: list[list[int]],
                  pad_id: int, stop: torch.Tensor, max_new_tokens: int, temperature: float,
                  top_k: int, states: list | None = None, keep: list[bool] | None = None,
                  fed: list[int] | None = None, abandon: list | None = None, decode=None,
                  shared_prefix: bool | None = None):
    """Continue ``prefix + suffix`` of each request along its branches.

    ``prefix_kvs[i]``: request ``i``'s prefix keys and values (:class:`PrefixCache`); requests
    of different prefixes share the batch, each prefix left-padded to the longest. ``branches[i]``
    lists request ``i``'s branches: ``-1`` for the greedy answer, otherwise a sampling stream seed.
    The suffixes are computed once (one prefill per request, none for a request whose
    ``states[i]`` holds its state after the prompt, :class:`PromptStates`); each branch then
    decodes from the shared state until it emits a stop token. Returns the generated ids per
    request and branch, and ``{i: state}`` for the requests ``i`` with ``keep[i]``; ``fed[0]``
    (if given) grows by the tokens fed to the model (the suffixes prefilled, without padding, then one
    per decoded node and step). ``abandon[i]`` (with ``decode``, token ids -> text): request ``i``'s
    test of a sample's text so far (:attr:`PromptRequest.abandon`); a sample it rejects stops at
    once and comes back as ``None``.
    """
    R = len(suffixes)
    states = states or [None] * R
    # the requests to prefill take the first rows
    order = sorted(range(R), key=lambda i: states[i] is not None)
    if order != list(range(R)):
        gen, kept = _decode_chunk(model, [prefix_kvs[i] for i in order], [suffixes[i] for i in order],
                                  [branches[i] for i in order], pad_id, stop, max_new_tokens, temperature, top_k,
                                  [states[i] for i in order], [keep[i] for i in order] if keep else None, fed=fed,
                                  abandon=[abandon[i] for i in order] if abandon else None, decode=decode,
                                  shared_prefix=shared_prefix)
        out_gen: list = [None] * R
        for j, i in enumerate(order):
            out_gen[i] = gen[j]
        return out_gen, {order[j]: st for j, st in kept.items()}
    dev = model.device
    S = max(len(s) for s in suffixes)
    owner = np.array([r for r, br in enumerate(branches) for _ in br], dtype=np.int64)
    streams = np.array([0 if b == -1 else b for br in branches for b in br], dtype=np.uint64)
    is_greedy = np.array([b == -1 for br in branches for b in br])
    n_branches = len(owner)
    if shared_prefix is None:
        shared_prefix = cascade_supported(model)
    buf = _Buffers(prefix_kvs, [len(s) for s in suffixes], n_branches, max_new_tokens, dev, shared=shared_prefix)
    shared = buf.shared
    with (cascade_active(model, shared) if shared is not None else nullcontext()):
        _check_window(model, buf.pos_cap)
        base = buf.base  # where the rows' own positions start in the buffers

        ids = torch.full((R, S), pad_id, dtype=torch.long)
        smask = torch.zeros((R, S), dtype=torch.long)
        for r, s in enumerate(suffixes):
            ids[r, S - len(s):] = torch.tensor(s)
            smask[r, S - len(s):] = 1
        ids, smask = ids.to(dev), smask.to(dev)
        buf.attn[:R, base:base + S] = smask
        pos = buf.plens[:, None] + (smask.cumsum(1) - 1).clamp(min=0)
        b = sum(st is None for st in states)
        logits = []
        # the prefill in groups of similar suffix lengths (little padding), each right-aligned at base + S
        for lo, hi in _length_groups([len(s) for s in suffixes[:b]], max_tokens=PREFILL_TOKENS.get(dev.type)):
            w = max(len(s) for s in suffixes[lo:hi])
            for layer in buf.cache.layers:
                # padding left of the group's window (masked, but finite)
                layer.keys[lo:hi, :, base:base + S - w].zero_()
                layer.values[lo:hi, :, base:base + S - w].zero_()
                layer.n, layer.row0 = base + S - w, lo
            out = model(input_ids=ids[lo:hi, S - w:], attention_mask=buf.mask(lo, hi, base + S, w),
                        position_ids=pos[lo:hi, S - w:], use_cache=True, **cache_kwargs(model, buf.cache),
                        **_last_logits_only(model))
            logits.append(out.logits[:, -1, :])
        for layer in buf.cache.layers:
            layer.n, layer.row0 = base + S, 0
        if b < R:
            # the kept suffixes right-aligned in one zero-padded block (padding masked, but finite), then
            # one copy per layer's keys and values
            first = states[b][0]
            block = first.new_zeros((R - b, S, first.shape[-1]))
            for j in range(R - b):
                own = states[b + j][0]
                block[j, S - own.shape[0]:] = own
            block = block.to(dev)
            for t, cols in _state_columns(buf.cache):
                t[b:R, :, base:base + S] = block[:, :, cols].view(R - b, S, t.shape[1], t.shape[-1]).transpose(1, 2)
            del block  # (not held through the decode)
            stored = torch.stack([states[r][1] for r in range(b, R)]).to(dev)
            logits.append(stored.to(logits[0].dtype) if logits else stored)
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        buf.next_pos[:R] = pos[:, -1] + 1
        if fed is not None:
            fed[0] += sum(len(s) for s in suffixes[:b])
        kept = {}
        if keep and any(keep[:b]):
            # every layer's keys and values of the kept rows in one block, then one copy per kept row
            # (its suffix's positions of every layer, :class:`PromptStates`) and one of its logits, instead
            # of one per layer's keys and values; the block is not held through the decode
            kept_rows = [r for r in range(b) if keep[r]]
            idx = torch.tensor(kept_rows, device=dev)
            columns = list(_state_columns(buf.cache))
            block = columns[0][0].new_empty((len(kept_rows), S, columns[-1][1].stop))
            for t, cols in columns:
                block[:, :, cols].view(len(kept_rows), S, t.shape[1], t.shape[-1]).copy_(
                    t[:b, :, base:base + S].index_select(0, idx).transpose(1, 2))
            for i, r in enumerate(kept_rows):
                kept[r] = (block[i, S - len(suffixes[r]):].clone(), logits[r].clone())
            del block

        # Decoding runs over *nodes*: distinct (request, tokens generated so far), one buffer row
        # each. Branches whose continuations coincide share a node, so a node's forward pass is
        # computed once however many branches stand on it (at T = 0.5 most samples share their
        # first tokens with each other and with the greedy answer). When a node's branches draw
        # different tokens, one keeps the row and each other token gets a new row, a copy.
        # A finished row's place is taken by a live node at once (a copy of that row only).
        slot = owner.copy()  # branch -> row
        live = np.arange(n_branches)
        rows = R  # rows the forward computes
        generated = np.zeros((n_branches, max_new_tokens), dtype=np.int64)
        length = np.zeros(n_branches, dtype=np.int64)
        V = int(logits.shape[-1])
        stop_ids = stop.cpu().numpy()
        is_stop = np.zeros(max(V, int(stop_ids.max()) + 1 if len(stop_ids) else 0), dtype=bool)
        is_stop[stop_ids] = True
        any_greedy, any_sampled = bool(is_greedy.any()), not bool(is_greedy.all())
        # the sampled branches whose request may abandon them (a test of their text so far)
        tests = abandon if abandon and decode is not None else [None] * R
        testable = ~is_greedy & np.array([tests[r] is not None for r in owner.tolist()], dtype=bool)
        any_testable = bool(testable.any())
        dropped = np.zeros(n_branches, dtype=bool)
        ckw = cache_kwargs(model, buf.cache)
        for step in range(max_new_tokens):
            slots = slot[live]
            tok = np.empty(len(live), dtype=np.int64)
            g = is_greedy[live]
            n_greedy = int(g.sum()) if any_greedy else 0
            if n_greedy:
                gs = slots[g] if n_greedy < len(live) else slots
                if 2 * n_greedy < logits.shape[0]:  # few greedy rows: the argmax of theirs only
                    tok[g] = logits[torch.from_numpy(gs).to(dev)].argmax(dim=-1).cpu().numpy()
                else:
                    tok[g] = logits.argmax(dim=-1).cpu().numpy()[gs]
            if any_sampled and n_greedy < len(live):
                sampled = ~g if n_greedy else slice(None)
                uniq, inv = np.unique(slots[sampled], return_inverse=True)
                tok[sampled] = _draw(logits[torch.from_numpy(uniq).to(dev)], inv.reshape(-1), streams[live[sampled]],
                                     step, temperature, top_k)
            generated[live, step] = tok
            length[live] = step + 1
            if step == max_new_tokens - 1:
                break
            keep = ~is_stop[tok]
            if any_testable:
                cand = keep & testable[live]
                if cand.any():
                    # branches on one node share their tokens: each node's text is tested once
                    _, first, inv_c = np.unique(slots[cand] * V + tok[cand], return_index=True, return_inverse=True)
                    branch = live[cand]
                    verdict = np.array([_abandoned(tests[owner[b]], decode(generated[b, :step + 1].tolist()))
                                        for b in branch[first]], dtype=bool)
                    gone = branch[verdict[inv_c.reshape(-1)]]
                    if len(gone):
                        dropped[gone] = True
                        keep &= ~dropped[live]
            live, tok, slots = live[keep], tok[keep], slots[keep]
            if len(live) == 0:
                break
            # the nodes of the next step: distinct (row, token) pairs, ordered by row, then token
            ukey, inv = np.unique(slots * V + tok, return_inverse=True)
            inv = inv.reshape(-1)
            key_row, key_tok = ukey // V, ukey % V
            new_row = np.r_[True, key_row[1:] != key_row[:-1]]
            n_keys = len(ukey)
            # the nodes take rows 0 .. n_keys - 1: a row that is still a node's below n_keys stays where it
            # is; the other nodes (rows above n_keys, and the new branches of split nodes) are copied into
            # the rows left free (finished, or above n_keys), so no finished row is ever computed again
            row_of_key = np.full(n_keys, -1, dtype=np.int64)
            stay = new_row & (key_row < n_keys)
            row_of_key[stay] = key_row[stay]
            free = np.ones(n_keys, dtype=bool)
            free[key_row[stay]] = False
            moved = np.flatnonzero(~stay)
            if len(moved):
                row_of_key[moved] = np.flatnonzero(free)
                buf.fork(row_of_key[moved], key_row[moved])
            rows = n_keys
            slot[live] = row_of_key[inv]
            step_ids = np.full(rows, pad_id, dtype=np.int64)
            step_ids[row_of_key] = key_tok
            n = buf.n
            buf.attn[:rows, n] = 1
            out = model(input_ids=torch.from_numpy(step_ids).to(dev)[:, None], attention_mask=buf.mask(0, rows, n + 1),
                        position_ids=buf.next_pos[:rows, None], use_cache=True, **ckw)
            buf.next_pos[:rows] += 1
            if fed is not None:
                fed[0] += n_keys
            logits = out.logits[:, -1, :]
        per_request: list[list[list[int]]] = [[] for _ in range(R)]
        for b, r in enumerate(owner.tolist()):
            per_request[r].append(None if dropped[b] else generated[b, :length[b]].tolist())
        return per_request, kept


def decode_answer(tokenizer, ids: list[int], stop: str = "\n") -> str:
    """Text of the generated ids, cut at the first ``stop``, stripped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.split(stop, 1)[0].strip()


def group_requests(tokenizer, requests: Iterable[PromptRequest], memo: dict | None = None):
    """Tokenize each whole prompt and group rows by their shared token prefix.

    Returns ``{prefix_ids: [(request, suffix_ids), ...]}``. ``memo`` (text -> token ids) keeps the
    tokenizations between calls (later rounds ask the same prompts again).
    """
    requests = list(requests)
    memo = {} if memo is None else memo
    todo = sorted(({r.prefix for r in requests} | {r.prefix + r.suffix for r in requests}) - memo.keys())
    if todo:
        memo.update(zip(todo, tokenizer(todo, add_special_tokens=True)["input_ids"]))
    prefix_ids = {r.prefix: memo[r.prefix] for r in requests}
    full = [memo[r.prefix + r.suffix] for r in requests]
    groups: dict[tuple[int, ...], list] = {}
    for r, ids in zip(requests, full):
        pre = prefix_ids[r.prefix]
        n = len(pre) if ids[:len(pre)] == pre else _common_prefix_len(pre, ids)
        n = max(min(n, len(ids) - 1), min(1, len(ids) - 1))  # at least one token in each part
        groups.setdefault(tuple(ids[:n]), []).append((r, ids[n:]))
    return groups


def _last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it: the prefill needs only
    the last position's logits, and the vocabulary projection of every other position
    is a large share of a small model's work."""
    import inspect

    fwd = getattr(model, "forward", None)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return {}
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    return {}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def default_batch_size(model, context_tokens: int = 256) -> int:
    """Rows decoded together. On an accelerator: 1024, halved on out-of-memory. On a
    CPU (where running out of memory kills the process instead of raising): as many
    rows as a quarter of the free memory holds KV caches of ``context_tokens``, at most 512."""
    if model.device.type == "cuda":
        return 1024
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None) \
        or getattr(cfg, "n_head", 12)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
    head_dim = getattr(cfg, "head_dim", None) or hidden // (getattr(cfg, "num_attention_heads", None) or heads)
    per_row = 2 * layers * heads * head_dim * context_tokens * next(model.parameters()).element_size()
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 8 << 30
    return int(max(8, min(512, free // 4 // max(1, per_row))))


class RoundGenerator:
    """One round of requests on a transformers model (an engine's part of
    :func:`probes.engine.run_rounds`): requests of every prefix batched together by length
    (prefixes from a :class:`PrefixCache`, each encoded once), decoded together. ``batch_size``
    counts decoded rows (a request with 1 greedy + 16 samples is 17 rows); ``None`` picks one for
    the device, halved on out-of-memory (kept for later rounds). ``prefix_reuse=False`` prefills
    every prompt whole (the comparison the benchmarks make). ``prefixes``: a :class:`PrefixCache`
    to share between rounds and calls (an engine keeps one). :attr:`forward_tokens` counts the
    tokens this generator fed to the model (padding excluded): each prefix it encoded, every suffix
    prefilled, every decoded node's token."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 32, batch_size: int | None = None,
                 temperature: float = 0.5, top_k: int = 40, stop: str = "\n", log=None, prefix_reuse: bool = True,
                 prefixes: PrefixCache | None = None, states: PromptStates | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.stop = max_new_tokens, temperature, top_k, stop
        self.log, self.prefix_reuse = log, prefix_reuse
        self.stop_t = torch.tensor(sorted(stop_token_ids(tokenizer, stop)), device=model.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows_per_batch = batch_size or default_batch_size(model)
        self.prefixes = prefixes if prefixes is not None else PrefixCache(model)
        self.states = states if states is not None else PromptStates(model)
        self._enc0 = self.prefixes.encoded_tokens
        self._fed = [0]
        self._token_text: dict[int, str] = {}  # a first token's text, for PromptRequest.abandon
        self._tokens: dict[str, list[int]] = {}  # prompt text -> token ids, for every round of this generator
        # a sample's text so far, for PromptRequest.abandon: only where decoding more tokens never changes
        # the text already decoded (no clean-up of spaces before punctuation, which rewrites it)
        self._decode = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else \
            (lambda ids: tokenizer.decode(ids, skip_special_tokens=True).split(stop, 1)[0])

    @property
    def forward_tokens(self) -> int:
        return self.prefix_tokens + self._fed[0]

    @property
    def prefix_tokens(self) -> int:
        """Of :attr:`forward_tokens`, the shared prefixes' (each encoded once)."""
        return self.prefixes.encoded_tokens - self._enc0

    def __call__(self, requests: list[PromptRequest], progress: Callable[[int], object] | None = None
                 ) -> dict[Hashable, Generation]:
        model, tokenizer = self.model, self.tokenizer
        if not self.prefix_reuse:  # for benchmarks: every row prefills its whole prompt
            requests = [replace(r, prefix="", suffix=r.prefix + r.suffix) for r in requests]
        items = [(req, pre, suf) for pre, group in group_requests(tokenizer, requests, self._tokens).items()
                 for req, suf in group]
        # batches by prefix, each sorted by suffix length (little padding in its prefill): a decode step's
        # prefix part then has few prefixes, with as many rows each (cascade attention pads them to the
        # most rows of one prefix; the demo model's 512-row decode steps took 17 instead of 21 ms, 400
        # questions), and the copy layout's prefixes have similar lengths
        items.sort(key=lambda it: (len(it[1]), it[1], len(it[2])))
        results: dict[Hashable, Generation] = {}
        n_items = len(items)
        items, first = self._first_tokens(items)
        if progress is not None and len(items) < n_items:
            progress(n_items - len(items))  # requests whose every sample ended at its first token
        i = 0
        while i < len(items):
            chunk, rows = [], 0
            while i + len(chunk) < len(items):
                req = items[i + len(chunk)][0]
                n = int(req.greedy) + len(req.streams)
                if chunk and rows + n > self.rows_per_batch:
                    break
                chunk.append(items[i + len(chunk)])
                rows += n
            chunk.sort(key=lambda it: len(it[2]))
            branches = [([-1] if r.greedy else []) + list(r.streams) for r, _, _ in chunk]
            keys, states = [], []
            try:
                self.prefixes.sync()
                self.states.sync()
                kvs = self.prefixes.get_many([pre for _, pre, _ in chunk], sync=False)
                keys = [(pre, tuple(suf)) for _, pre, suf in chunk]
                states = [self.states.get(k, pop=True, sync=False) for k in keys]
                keep = [r.keep_state for r, _, _ in chunk]
                tests = [r.abandon for r, _, _ in chunk] if self._decode is not None else None
                gen, kept = _decode_chunk(model, kvs, [s for _, _, s in chunk], branches, self.pad_id,
                                          self.stop_t, self.max_new_tokens, self.temperature, self.top_k,
                                          states, keep, fed=self._fed, abandon=tests, decode=self._decode)
                for j, st in kept.items():
                    self.states.put(keys[j], st)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err) or self.rows_per_batch <= 1:
                    raise
                for k, st in zip(keys, states):  # taken by this batch: the retry decodes from them again
                    if st is not None:
                        self.states.put(k, st)
                self.rows_per_batch = max(1, self.rows_per_batch // 2)
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.log:
                    self.log(f"out of memory: batch size now {self.rows_per_batch} rows")
                continue
            for (req, _, _), outs in zip(chunk, gen):
                texts = [None if g is None else decode_answer(tokenizer, g, self.stop) for g in outs]
                results[req.key] = Generation(texts[0] if req.greedy else None, texts[int(req.greedy):])
            i += len(chunk)
            if progress is not None:
                progress(len(chunk))
        for key, (streams, done) in first.items():
            rest = iter(results[key].samples if key in results else ())
            results[key] = Generation(None, [
                (None if done[s] is None else decode_answer(tokenizer, done[s], self.stop)) if s in done else next(rest)
                for s in streams])
        return results

    def _first_tokens(self, items: list) -> tuple[list, dict]:
        """Draw the first token of every sample of a request whose state after the prompt is kept
        (:class:`PromptStates`: its logits are known without a forward pass) and whose samples may be
        abandoned, before any batch is formed: a sample that stops at its first token, or that its
        request abandons there, needs no row. Returns the items left to decode (such requests keep
        only their other samples; a request with none left is dropped) and, per request drawn,
        ``(its streams, {stream: ids generated, or None where abandoned})`` for those resolved.
        So batches are filled with the samples that go on (in lazy SliCK most are abandoned at
        their first token), not with rows that would leave the batch at once."""
        if self._decode is None or self.max_new_tokens < 2:  # (one token: a sample is never abandoned)
            return items, {}
        self.states.sync()
        todo = []
        for j, (req, pre, suf) in enumerate(items):
            if req.streams and not req.greedy and req.abandon is not None:
                st = self.states.get((pre, tuple(suf)), sync=False)
                if st is not None:
                    todo.append((j, st[1]))
        if not todo:
            return items, {}
        counts = np.array([len(items[j][0].streams) for j, _ in todo])
        streams = np.array([s for j, _ in todo for s in items[j][0].streams], dtype=np.uint64)
        # drawn for at most a batch's worth of requests at a time: their logits stacked take no more memory
        # than a decode step's (a sample's draw depends on its stream only, not on what is drawn beside it)
        n = max(1, self.rows_per_batch)
        offs = np.concatenate([[0], np.cumsum(counts)])
        toks = np.concatenate([
            _draw(torch.stack([lg for _, lg in todo[i:i + n]]), np.repeat(np.arange(len(counts[i:i + n])), counts[i:i + n]),
                  streams[offs[i]:offs[min(i + n, len(todo))]], 0, self.temperature, self.top_k)
            for i in range(0, len(todo), n)])
        stops = set(self.stop_t.tolist())
        first, drop, keep_items = {}, set(), {}
        at = 0
        for (j, _), c in zip(todo, counts):
            req, pre, suf = items[j]
            done, left, verdicts = {}, [], {}
            for s, t in zip(req.streams, toks[at:at + c].tolist()):
                if t in stops:
                    done[s] = [t]
                    continue
                if t not in verdicts:
                    if t not in self._token_text:
                        self._token_text[t] = self._decode([t])
                    verdicts[t] = _abandoned(req.abandon, self._token_text[t])
                if verdicts[t]:
                    done[s] = None
                else:
                    left.append(s)
            at += c
            if not done:
                continue
            first[req.key] = (req.streams, done)
            if left:
                keep_items[j] = (replace(req, streams=tuple(left)), pre, suf)
            else:
                drop.add(j)
                self.states.get((pre, tuple(suf)), pop=True, sync=False)  # no batch will take it
        return [keep_items.get(j, it) for j, it in enumerate(items) if j not in drop], first


def generate(model, tokenizer, requests: Iterable[PromptRequest], max_new_tokens: int = 32,
             batch_size: int | None = None, temperature: float = 0.5, top_k: int = 40, stop: str = "\n",
             progress: Callable[[int], object] | None = None, log=None,
             prepare: Callable[[PromptRequest], PromptRequest | None] | None = None,
             on_result: Callable[[PromptRequest, Generation], object] | None = None,
             prefix_reuse: bool = True) -> dict[Hashable, Generation]:
    """Greedy and sampled answers for every request, keyed by ``request.key``: the requests as
    one round of :meth:`probes.engine.TransformersEngine.generate` (``prepare`` is asked for
    each request before any is computed; ``on_result`` sees each result). ``progress`` is
    called with the number of requests just finished."""
    from probes.engine import run_rounds

    gen = RoundGenerator(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         temperature=temperature, top_k=top_k, stop=stop, log=log, prefix_reuse=prefix_reuse)
    return run_rounds(gen, [list(requests)], prepare, on_result, progress)


def generate_greedy(model, tokenizer, requests: Iterable[PromptRequest], max_new_tokens: int = 32,
                    batch_size: int | None = None, stop: str = "\n", progress=None) -> dict[Hashable, str]:
    """Greedy answers only, keyed by ``request.key``."""
    out = generate(model, tokenizer, requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   stop=stop, progress=progress)
    return {k: g.greedy for k, g in out.items()}
