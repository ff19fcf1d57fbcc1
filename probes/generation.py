"""Batched few-shot generation with shared-prefix KV caches.

Every prompt is ``prefix + suffix``. Prompts that share a prefix (all questions
of a relation under one set of few-shot exemplars) share its KV cache: the
prefix is encoded once, the cache is broadcast to the batch, and only each
row's suffix and answer are computed. Rows stop at their first newline (or eos)
and leave the batch as they finish.

The shared part is taken from the tokenization of the *whole* prompt, never
from tokenizing the pieces apart: a row whose tokens do not start with the
prefix's tokens (some tokenizers merge across the boundary) falls back to the
longest common token prefix, so answers are exactly those of encoding the full
prompt.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch

from probes.sampling import topk_cdf, uniforms


@dataclass
class PromptRequest:
    """One prompt: its greedy answer (``greedy``) and one sampled answer per stream seed."""

    key: Hashable
    prefix: str
    suffix: str
    greedy: bool = True
    streams: tuple[int, ...] = ()


@dataclass
class Generation:
    greedy: str | None = None
    samples: list[str] = field(default_factory=list)


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


class PrefixEncoder:
    """Encodes token prefixes once and hands out batch-broadcast copies of their caches."""

    def __init__(self, model, max_entries: int = 64):
        self.model = model
        self.max_entries = max_entries
        self._caches: dict[tuple[int, ...], object] = {}
        self.encoded_tokens = 0

    @torch.inference_mode()
    def get(self, ids: tuple[int, ...], batch: int):
        cache = self._caches.get(ids)
        if cache is None:
            if len(self._caches) >= self.max_entries:
                self._caches.pop(next(iter(self._caches)))
            dev = self.model.device
            x = torch.tensor([ids], device=dev)
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
            cache = output_cache(out)
            self._caches[ids] = cache
            self.encoded_tokens += len(ids)
        c = copy.deepcopy(cache)
        c.reorder_cache(torch.zeros(batch, dtype=torch.long, device=self.model.device))
        return c


@torch.inference_mode()
def _decode_chunk(model, prefix_cache, prefix_len: int, suffixes: list[list[int]], branches: list[list[int]],
                  pad_id: int, stop: torch.Tensor, max_new_tokens: int, temperature: float,
                  top_k: int, fed: list[int] | None = None) -> list[list[list[int]]]:
    """Continue ``prefix + suffix`` of each request along its branches.

    ``branches[i]`` lists request ``i``'s branches: ``-1`` for the greedy answer,
    otherwise a sampling stream seed. The suffixes are computed once (one prefill
    per request); each branch then decodes from the shared state until it emits a
    stop token. Returns the generated ids per request and branch; ``fed[0]`` (if given) grows
    by the tokens fed to the model (suffixes without padding, then one per decoded node and step).
    """
    dev = model.device
    R = len(suffixes)
    S = max(len(s) for s in suffixes)
    ids = torch.full((R, S), pad_id, dtype=torch.long)
    smask = torch.zeros((R, S), dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, S - len(s):] = torch.tensor(s)
        smask[r, S - len(s):] = 1
    ids, smask = ids.to(dev), smask.to(dev)
    attn = torch.cat([torch.ones((R, prefix_len), dtype=torch.long, device=dev), smask], dim=1)
    pos = (prefix_len + smask.cumsum(1) - 1).clamp(min=prefix_len)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                **cache_kwargs(model, prefix_cache), **_last_logits_only(model))
    if fed is not None:
        fed[0] += sum(len(s) for s in suffixes)

    # Decoding runs over *nodes*: distinct (request, tokens generated so far). Branches
    # whose continuations coincide share a node, so a node's forward pass is computed
    # once however many branches stand on it (at T = 0.5 most samples share their
    # first tokens with each other and with the greedy answer). A node splits, its
    # cache row copied, only when its branches draw different tokens.
    owner = np.array([r for r, br in enumerate(branches) for _ in br], dtype=np.int64)
    streams = np.array([0 if b == -1 else b for br in branches for b in br], dtype=np.uint64)
    is_greedy = np.array([b == -1 for br in branches for b in br])
    node = owner.copy()  # branch -> node (the prefill's rows are the first nodes)
    live = np.arange(len(owner))
    cache = output_cache(out)
    logits = out.logits[:, -1, :]
    next_pos = pos[:, -1] + 1
    generated: list[list[int]] = [[] for _ in owner]
    stop_set = set(stop.tolist())
    for step in range(max_new_tokens):
        nodes_of_live = node[live]
        tok = np.empty(len(live), dtype=np.int64)
        g = is_greedy[live]
        if g.any():
            tok[g] = logits.argmax(dim=-1).cpu().numpy()[nodes_of_live[g]]
        if (~g).any():
            sn = nodes_of_live[~g]
            uniq, inv = np.unique(sn, return_inverse=True)
            idx, cdf = topk_cdf(logits[torch.from_numpy(uniq).to(dev)], temperature, top_k)
            u = torch.from_numpy(uniforms(streams[live[~g]], step)).to(cdf.device)
            inv_t = torch.from_numpy(inv).to(cdf.device)
            pick = torch.searchsorted(cdf[inv_t], u[:, None]).clamp(max=idx.shape[1] - 1)
            tok[~g] = idx[inv_t].gather(1, pick).squeeze(1).cpu().numpy()
        done = np.fromiter((t in stop_set for t in tok.tolist()), dtype=bool, count=len(tok))
        for b, t in zip(live.tolist(), tok.tolist()):
            generated[b].append(t)
        if step == max_new_tokens - 1:
            break
        live, tok, nodes_of_live = live[~done], tok[~done], nodes_of_live[~done]
        if len(live) == 0:
            break
        keys, new_of_live = np.unique(np.stack([nodes_of_live, tok], axis=1), axis=0, return_inverse=True)
        new_of_live = new_of_live.reshape(-1)
        parents = torch.from_numpy(keys[:, 0]).to(dev)
        if len(keys) != logits.shape[0] or not torch.equal(parents, torch.arange(len(keys), device=dev)):
            cache.reorder_cache(parents)
            attn, next_pos = attn[parents], next_pos[parents]
        node[live] = new_of_live
        attn = torch.cat([attn, torch.ones((len(keys), 1), dtype=torch.long, device=dev)], dim=1)
        out = model(input_ids=torch.from_numpy(keys[:, 1:]).to(dev), attention_mask=attn,
                    position_ids=next_pos[:, None], use_cache=True, **cache_kwargs(model, cache))
        if fed is not None:
            fed[0] += len(keys)
        cache = output_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    per_request: list[list[list[int]]] = [[] for _ in range(R)]
    for b, r in enumerate(owner.tolist()):
        per_request[r].append(generated[b])
    return per_request


def decode_answer(tokenizer, ids: list[int], stop: str = "\n") -> str:
    """Text of the generated ids, cut at the first ``stop``, stripped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.split(stop, 1)[0].strip()


def group_requests(tokenizer, requests: Iterable[PromptRequest]):
    """Tokenize each whole prompt and group rows by their shared token prefix.

    Returns ``{prefix_ids: [(request, suffix_ids), ...]}``.
    """
    requests = list(requests)
    prefix_ids: dict[str, list[int]] = {}
    for p in {r.prefix for r in requests}:
        prefix_ids[p] = tokenizer(p, add_special_tokens=True)["input_ids"]
    full = tokenizer([r.prefix + r.suffix for r in requests], add_special_tokens=True)["input_ids"]
    groups: dict[tuple[int, ...], list] = {}
    for r, ids in zip(requests, full):
        pre = prefix_ids[r.prefix]
        n = len(pre) if ids[:len(pre)] == pre else _common_prefix_len(pre, ids)
        n = min(n, len(ids) - 1)  # at least one token is computed with the row
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
    :func:`probes.engine.run_rounds`): rows grouped by shared token prefix, batched by length,
    decoded together. ``batch_size`` counts decoded rows (a request with 1 greedy + 16 samples
    is 17 rows); ``None`` picks one for the device, halved on out-of-memory (kept for later
    rounds). ``prefix_reuse=False`` prefills every prompt whole (the comparison the benchmarks make).
    :attr:`forward_tokens` counts the tokens fed to the model so far (padding excluded): each
    prefix once per encoding, every row's suffix, every decoded node's token."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 32, batch_size: int | None = None,
                 temperature: float = 0.5, top_k: int = 40, stop: str = "\n", log=None, prefix_reuse: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.stop = max_new_tokens, temperature, top_k, stop
        self.log, self.prefix_reuse = log, prefix_reuse
        self.stop_t = torch.tensor(sorted(stop_token_ids(tokenizer, stop)), device=model.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows_per_batch = batch_size or default_batch_size(model)
        self.encoder = PrefixEncoder(model)
        self._fed = [0]

    @property
    def forward_tokens(self) -> int:
        return self.encoder.encoded_tokens + self._fed[0]

    def __call__(self, requests: list[PromptRequest], progress: Callable[[int], object] | None = None
                 ) -> dict[Hashable, Generation]:
        model, tokenizer = self.model, self.tokenizer
        if not self.prefix_reuse:  # for benchmarks: every row prefills its whole prompt
            requests = [PromptRequest(r.key, "", r.prefix + r.suffix, r.greedy, r.streams) for r in requests]
        results: dict[Hashable, Generation] = {}
        for pre, items in group_requests(tokenizer, requests).items():
            items.sort(key=lambda rs: len(rs[1]))  # batch by length: little padding
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
                branches = [([-1] if r.greedy else []) + list(r.streams) for r, _ in chunk]
                try:
                    cache = self.encoder.get(pre, len(chunk))
                    gen = _decode_chunk(model, cache, len(pre), [s for _, s in chunk], branches, self.pad_id,
                                        self.stop_t, self.max_new_tokens, self.temperature, self.top_k,
                                        fed=self._fed)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err) or self.rows_per_batch <= 1:
                        raise
                    self.rows_per_batch = max(1, self.rows_per_batch // 2)
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if self.log:
                        self.log(f"out of memory: batch size now {self.rows_per_batch} rows")
                    continue
                for (req, _), outs in zip(chunk, gen):
                    texts = [decode_answer(tokenizer, g, self.stop) for g in outs]
                    results[req.key] = Generation(texts[0] if req.greedy else None, texts[int(req.greedy):])
                i += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        return results


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
