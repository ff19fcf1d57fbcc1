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
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import torch


@dataclass
class PromptRequest:
    key: Hashable
    prefix: str
    suffix: str


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stop_token_ids(tokenizer, stop: str = "\n") -> set[int]:
    """Ids of every vocabulary token whose text contains ``stop`` (plus eos)."""
    ids = set()
    vocab = tokenizer.get_vocab()
    for tok_str, idx in vocab.items():
        text = tokenizer.convert_tokens_to_string([tok_str])
        if stop in text:
            ids.add(idx)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
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
            cache = out.past_key_values
            self._caches[ids] = cache
            self.encoded_tokens += len(ids)
        c = copy.deepcopy(cache)
        c.reorder_cache(torch.zeros(batch, dtype=torch.long, device=self.model.device))
        return c


@torch.inference_mode()
def _decode_batch(model, prefix_cache, prefix_len: int, suffixes: list[list[int]], pad_id: int,
                  stop_ids: set[int], max_new_tokens: int,
                  choose: Callable[[torch.Tensor, int, list[int]], torch.Tensor]) -> list[list[int]]:
    """Greedy/sampled continuation of ``prefix + suffix`` for each row.

    ``choose(logits[B, V], step, rows)`` returns the next token of each live row;
    ``rows`` are the original row indices still in the batch.
    """
    dev = model.device
    B = len(suffixes)
    S = max(len(s) for s in suffixes)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    smask = torch.zeros((B, S), dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, S - len(s):] = torch.tensor(s)
        smask[r, S - len(s):] = 1
    ids, smask = ids.to(dev), smask.to(dev)
    attn = torch.cat([torch.ones((B, prefix_len), dtype=torch.long, device=dev), smask], dim=1)
    pos = (prefix_len + smask.cumsum(1) - 1).clamp(min=prefix_len)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=prefix_cache, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = pos[:, -1] + 1
    rows = list(range(B))
    generated: list[list[int]] = [[] for _ in range(B)]
    stop = torch.tensor(sorted(stop_ids), device=dev)
    for step in range(max_new_tokens):
        tok = choose(logits.float(), step, rows)
        done = torch.isin(tok, stop)
        tok_list = tok.tolist()
        for j, r in enumerate(rows):
            generated[r].append(tok_list[j])
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0 or step == max_new_tokens - 1:
            break
        if keep.numel() < len(rows):
            cache.reorder_cache(keep)
            attn, next_pos, tok = attn[keep], next_pos[keep], tok[keep]
            rows = [rows[j] for j in keep.tolist()]
        attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return generated


def greedy_choice(logits: torch.Tensor, step: int, rows: list[int]) -> torch.Tensor:
    return logits.argmax(dim=-1)


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


def generate_greedy(model, tokenizer, requests: Iterable[PromptRequest], max_new_tokens: int = 32,
                    batch_size: int = 64, stop: str = "\n", progress=None) -> dict[Hashable, str]:
    """Greedy answers for every request, keyed by ``request.key``.

    ``progress``: a callable taking the number of rows just finished (e.g. ``tqdm.update``).
    """
    stop_ids = stop_token_ids(tokenizer, stop)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = PrefixEncoder(model)
    answers: dict[Hashable, str] = {}
    for pre, rows in group_requests(tokenizer, requests).items():
        # batch by length so rows of one batch pad little
        rows.sort(key=lambda rs: len(rs[1]))
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            cache = encoder.get(pre, len(chunk))
            gen = _decode_batch(model, cache, len(pre), [s for _, s in chunk], pad_id, stop_ids,
                                max_new_tokens, greedy_choice)
            for (req, _), g in zip(chunk, gen):
                answers[req.key] = decode_answer(tokenizer, g, stop)
            if progress is not None:
                progress(len(chunk))
    return answers
