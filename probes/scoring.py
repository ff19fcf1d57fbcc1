"""Teacher-forced scoring: what a model thinks of a given continuation, in one forward pass.

For each request ``shared + prefix + continuation`` (a few-shot block, a question and a
reference answer) one forward pass gives:

- the log-probability of every continuation token given everything before it, and their sum;
- the first-token margin: the logit of the continuation's first token minus the largest
  other logit at that position (positive exactly when greedy decoding starts with it);
- whether greedy decoding would reproduce every continuation token (teacher-forced);
- optionally, hidden states at chosen blocks, taken at the last prefix token (the position
  that predicts the first answer token; by causality it does not depend on the answer).

Requests with the same ``shared`` text (every question of a relation under one few-shot
prompt) share its KV cache, as generation does: it is encoded once per call and broadcast
to each batch, and only each row's own tokens are computed. :class:`ScoreStats` counts the
tokens fed to the model (padding apart), in total and per request (its own tokens plus its
share of its shared prefix), so the cost of scoring is measured, not estimated.

Like generation, every split is taken from the tokenization of the *whole* text: continuation
tokens are those past the longest common token prefix of ``shared + prefix`` and the whole
text, the shared tokens those of the longest common token prefix of ``shared`` and the whole
text (never reaching the last prefix token), so scores are those of the text the model would see.

A row feeds its tokens up to the one before the last: the last token is only ever a target
(no position after it is scored, and the hidden state is taken at the last prefix token), so
feeding it would cost a token and change nothing. Rows are left-padded (the continuation sits
at the end of every row), so only the last ``max continuation`` positions need logits; position
ids are derived from the attention mask so padding does not shift positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch


@dataclass
class ScoreRequest:
    key: Hashable
    prefix: str
    continuation: str
    shared: str = ""  # text before ``prefix`` whose KV cache requests with the same ``shared`` share


@dataclass
class Score:
    token_logprobs: list[float]
    first_token_margin: float
    greedy_match: bool
    hidden: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)


@dataclass
class ScoreStats:
    """Tokens fed to the model by :func:`score` (accumulated over calls)."""

    forward_tokens: int = 0  # tokens computed, padding excluded: shared prefixes once each, then every row's own
    shared_tokens: int = 0  # of which, shared prefixes
    padded_tokens: int = 0  # positions computed including padding (rows only)
    whole_tokens: int = 0  # what encoding every request's whole text would have cost (all but its last token)
    per_key: dict = field(default_factory=dict)  # request key -> its own tokens + its share of its shared prefix
    per_key_whole: dict = field(default_factory=dict)  # request key -> its whole text's tokens fed (all but the last)


def fed_len(ids: Sequence[int]) -> int:
    """Tokens a row of ``ids`` feeds: all but the last, which is only a target."""
    return len(ids) - 1


def split_tokens(tokenizer, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], int]]:
    """Token ids of each whole text and the index where its continuation starts (>= 1:
    the first token is never scored, and at least one continuation token is)."""
    return [(ids, n) for ids, n, _ in _split(tokenizer, requests)]


def _split(tokenizer, requests: Sequence[ScoreRequest], chunk: int = 512) -> list[tuple[list[int], int, int]]:
    """(whole text's ids, where the continuation starts, how many leading tokens are shared). Texts are
    tokenized ``chunk`` requests at a time: memory holds the prefixes' ids of one chunk only."""
    shared = _encode(tokenizer, (r.shared for r in requests if r.shared))
    out = []
    for c in range(0, len(requests), chunk):
        out += _split_chunk(tokenizer, requests[c:c + chunk], shared)
    return out


def _encode(tokenizer, texts) -> dict[str, list[int]]:
    """``{text: token ids}`` of the distinct ``texts``, tokenized in one call."""
    texts = sorted(set(texts))
    return dict(zip(texts, tokenizer(texts, add_special_tokens=True)["input_ids"])) if texts else {}


def _split_chunk(tokenizer, requests, shared: dict[str, list[int]]) -> list[tuple[list[int], int, int]]:
    from probes.generation import _common_prefix_len

    pre = _encode(tokenizer, (r.shared + r.prefix for r in requests))
    full = tokenizer([r.shared + r.prefix + r.continuation for r in requests], add_special_tokens=True)["input_ids"]
    out = []
    for r, ids in zip(requests, full):
        p = pre[r.shared + r.prefix]
        n = len(p) if ids[:len(p)] == p else _common_prefix_len(p, ids)
        if n >= len(ids):
            raise ValueError(f"request {r.key!r}: the continuation {r.continuation!r} adds no token to its prefix")
        n = max(1, n)
        ns = 0
        if r.shared:
            sp = shared[r.shared]
            ns = len(sp) if ids[:len(sp)] == sp else _common_prefix_len(sp, ids)
            ns = min(ns, n - 1)  # the row computes at least the position that predicts the continuation
        out.append((ids, n, ns))
    return out


@contextlib.contextmanager
def _capture_blocks(model, layers: Sequence[int], store: dict):
    """Forward hooks storing block ``i``'s output hidden states in ``store[i]``."""
    if not layers:
        yield
        return
    from probes.jacobians import decoder_layers

    blocks = decoder_layers(model)
    handles = []
    for i in layers:
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"layer {i} out of range: the model has {len(blocks)} blocks")

        def hook(mod, args, out, i=i):
            store[i] = out[0] if isinstance(out, tuple) else out

        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _score_batch(model, rows: list[tuple[list[int], int]], pad_id: int, layers: Sequence[int],
                 cache=None, cache_len: int = 0) -> list[Score]:
    """Score rows (``(ids, continuation start)``, ids without the ``cache_len`` tokens already in
    ``cache``, a KV cache broadcast to the batch, or None). Each row feeds ``ids[:-1]``
    (:func:`fed_len`): position ``t`` predicts token ``t + 1``, so the last ``c`` positions fed
    predict the ``c`` continuation tokens, and the first of them is the last prefix token."""
    from probes.generation import cache_kwargs

    dev = model.device
    T = max(fed_len(ids) for ids, _ in rows)
    C = max(len(ids) - n for ids, n in rows)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        m = fed_len(ids)
        ids_t[r, T - m:] = torch.tensor(ids[:m])
        mask[r, T - m:] = 1
    ids_t, mask = ids_t.to(dev), mask.to(dev)
    pos = (cache_len + mask.cumsum(-1) - 1).clamp(min=cache_len)
    kwargs = {"logits_to_keep": C} if _takes_logits_to_keep(model) else {}
    if cache is not None:
        mask = torch.cat([torch.ones((len(rows), cache_len), dtype=torch.long, device=dev), mask], dim=1)
        kwargs.update(use_cache=True, **cache_kwargs(model, cache))
    store: dict[int, torch.Tensor] = {}
    with _capture_blocks(model, layers, store):
        logits = model(input_ids=ids_t, attention_mask=mask, position_ids=pos, **kwargs).logits
    logits = logits[:, -C:].float()  # position t predicts token t + 1: the last C targets
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for r, (ids, n) in enumerate(rows):
        c = len(ids) - n
        tgt = torch.tensor(ids[n:], device=dev)
        lp = logp[r, C - c:].gather(-1, tgt[:, None])[:, 0]
        lg = logits[r, C - c:]
        first = lg[0].clone()
        gold = first[tgt[0]].item()
        first[tgt[0]] = -float("inf")
        margin = gold - first.max().item()
        greedy = bool((lg.argmax(-1) == tgt).all())
        # the last prefix token's state, copied: a view would keep the whole batch's block output alive
        hidden = {i: store[i][r, -c].float().cpu().numpy().copy() for i in layers}
        out.append(Score(lp.cpu().tolist(), float(margin), greedy, hidden))
    return out


def middle_block(model) -> int:
    """The index of the model's middle transformer block (the hidden state a linear probe reads)."""
    from probes.jacobians import decoder_layers

    return len(decoder_layers(model)) // 2


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score(model, tokenizer, requests: Iterable[ScoreRequest], layers: Sequence[int] = (),
          max_batch_tokens: int | None = None, progress: Callable[[int], object] | None = None,
          log=None, stats: ScoreStats | None = None, prefix_reuse: bool = True) -> dict[Hashable, Score]:
    """Score every request's continuation given its prefix, keyed by ``request.key``.

    ``layers`` are block indices (``0`` is the first transformer block's output, ``-1`` the
    last's, before any final norm); ``max_batch_tokens`` bounds padded row tokens per forward
    pass (``None``: 16,384 on an accelerator, 4,096 on a CPU; halved on out-of-memory).
    Requests sharing a ``shared`` text share its KV cache (``prefix_reuse=False`` encodes every
    whole text instead, for comparisons; a model whose cache cannot be shared, such as a sliding window
    shorter than the text, gets every whole text scored, said once through ``log``); ``stats``
    accumulates the tokens fed.
    """
    requests = list(requests)
    if not requests:
        return {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    split = _split(tokenizer, requests)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (ids, n, ns) in enumerate(split):
        groups.setdefault(tuple(ids[:ns]) if prefix_reuse else (), []).append(k)
    budget = max_batch_tokens or (16384 if model.device.type == "cuda" else 4096)
    results: dict[Hashable, Score] = {}
    reported: set[int] = set()
    share = True
    for shared, members in groups.items():
        try:
            budget = _score_group(model, requests, split, shared if share else (), members, pad_id, layers, budget,
                                  progress, log, stats, results, reported)
        except NotImplementedError as err:
            # a cache that cannot be shared (a sliding window shorter than the text, another kind of cache):
            # this group's and every later group's whole texts are scored, with the model's own attention
            if not shared or not share:
                raise
            share = False
            if log:
                log(f"scoring whole texts, without shared prefixes: {err}")
            for k in members:
                results.pop(requests[k].key, None)
            budget = _score_group(model, requests, split, (), members, pad_id, layers, budget, progress, log,
                                  stats, results, reported)
    return results


def _score_group(model, requests, split, shared, members, pad_id, layers, budget, progress, log, stats,
                 results, reported: set) -> int:
    """Score ``members`` (indices of ``requests``) after the shared token prefix ``shared`` (encoded once,
    its KV cache broadcast to each batch; ``()``: whole texts); returns the token budget, halved on each
    out-of-memory. Token counts reach ``stats`` only once the group is done; ``progress`` hears of each
    request once (``reported``: those it heard of already)."""
    from probes.generation import PrefixCache, _is_oom, default_batch_size

    P = len(shared)
    rows = {k: (split[k][0][P:], split[k][1] - P) for k in members}
    order = sorted(members, key=lambda k: len(rows[k][0]))
    encoder = PrefixCache(model, max_entries=1) if P else None
    max_rows = default_batch_size(model, P + len(rows[order[-1]][0])) if P else None
    i, fed, padded = 0, 0, 0
    while i < len(order):
        j = i + 1
        while j < len(order) and len(rows[order[j]][0]) * (j + 1 - i) <= budget and (
                max_rows is None or j + 1 - i <= max_rows):
            j += 1
        chunk = order[i:j]
        try:
            cache = encoder.batch_cache(shared, len(chunk)) if P else None
            scores = _score_batch(model, [rows[k] for k in chunk], pad_id, tuple(layers), cache, P)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or j - i == 1:
                raise
            budget = max(1, budget // 2)
            max_rows = None if max_rows is None else max(1, (j - i) // 2)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            if log:
                log(f"out of memory: scoring batches now at most {budget} tokens")
            continue
        for k, s in zip(chunk, scores):
            results[requests[k].key] = s
        fed += sum(fed_len(rows[k][0]) for k in chunk)
        padded += fed_len(rows[chunk[-1]][0]) * len(chunk)
        if progress is not None:
            progress(sum(k not in reported for k in chunk))
        reported.update(chunk)
        i = j
    if stats is not None:
        stats.forward_tokens += fed
        stats.padded_tokens += padded
        stats.forward_tokens += encoder.encoded_tokens if encoder else 0
        stats.shared_tokens += encoder.encoded_tokens if encoder else 0
        share = (encoder.encoded_tokens if encoder else 0) / len(members)
        for k in members:
            stats.per_key[requests[k].key] = fed_len(rows[k][0]) + share
            stats.whole_tokens += fed_len(split[k][0])
            stats.per_key_whole[requests[k].key] = fed_len(split[k][0])
    return budget
