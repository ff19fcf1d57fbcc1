"""Teacher-forced scoring: what a model thinks of a given continuation, in one forward pass.

For each request ``prefix + continuation`` (a few-shot prompt and a reference answer) one
forward pass over the whole text gives:

- the log-probability of every continuation token given everything before it, and their sum;
- the first-token margin: the logit of the continuation's first token minus the largest
  other logit at that position (positive exactly when greedy decoding starts with it);
- whether greedy decoding would reproduce every continuation token (teacher-forced);
- optionally, hidden states at chosen blocks, taken at the last prefix token (the position
  that predicts the first answer token; by causality it does not depend on the answer).

Like generation, the split between prefix and continuation is taken from the tokenization of
the *whole* text: continuation tokens are those past the longest common token prefix of the
prefix alone and the whole text, so scores are those of the text the model would see.

Rows are left-padded (the continuation sits at the end of every row), so only the last
``max continuation + 1`` positions need logits; position ids are derived from the attention
mask so padding does not shift positions.
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


def split_tokens(tokenizer, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], int]]:
    """Token ids of each whole text and the index where its continuation starts (>= 1:
    the first token is never scored, and at least one continuation token is)."""
    from probes.generation import _common_prefix_len

    pre = {p: tokenizer(p, add_special_tokens=True)["input_ids"] for p in {r.prefix for r in requests}}
    full = tokenizer([r.prefix + r.continuation for r in requests], add_special_tokens=True)["input_ids"]
    out = []
    for r, ids in zip(requests, full):
        p = pre[r.prefix]
        n = len(p) if ids[:len(p)] == p else _common_prefix_len(p, ids)
        if n >= len(ids):
            raise ValueError(f"request {r.key!r}: the continuation {r.continuation!r} adds no token to its prefix")
        out.append((list(ids), max(1, n)))
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
def _score_batch(model, rows: list[tuple[list[int], int]], pad_id: int, layers: Sequence[int]) -> list[Score]:
    dev = model.device
    T = max(len(ids) for ids, _ in rows)
    C = max(len(ids) - n for ids, n in rows)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        ids_t[r, T - len(ids):] = torch.tensor(ids)
        mask[r, T - len(ids):] = 1
    ids_t, mask = ids_t.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": C + 1} if _takes_logits_to_keep(model) else {}
    store: dict[int, torch.Tensor] = {}
    with _capture_blocks(model, layers, store):
        logits = model(input_ids=ids_t, attention_mask=mask, position_ids=pos, **kwargs).logits
    logits = logits[:, -(C + 1):-1].float()  # position t predicts token t + 1: the last C targets
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
        hidden = {i: store[i][r, -c - 1].float().cpu().numpy() for i in layers}
        out.append(Score(lp.cpu().tolist(), float(margin), greedy, hidden))
    return out


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score(model, tokenizer, requests: Iterable[ScoreRequest], layers: Sequence[int] = (),
          max_batch_tokens: int | None = None, progress: Callable[[int], object] | None = None,
          log=None) -> dict[Hashable, Score]:
    """Score every request's continuation given its prefix, keyed by ``request.key``.

    ``layers`` are block indices (``0`` is the first transformer block's output, ``-1`` the
    last's, before any final norm); ``max_batch_tokens`` bounds padded tokens per forward pass
    (``None``: 16,384 on an accelerator, 4,096 on a CPU; halved on out-of-memory).
    """
    from probes.generation import _is_oom

    requests = list(requests)
    if not requests:
        return {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = split_tokens(tokenizer, requests)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    budget = max_batch_tokens or (16384 if model.device.type == "cuda" else 4096)
    results: dict[Hashable, Score] = {}
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and len(rows[order[j]][0]) * (j + 1 - i) <= budget:
            j += 1
        chunk = order[i:j]
        try:
            scores = _score_batch(model, [rows[k] for k in chunk], pad_id, tuple(layers))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or j - i == 1:
                raise
            budget = max(1, budget // 2)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            if log:
                log(f"out of memory: scoring batches now at most {budget} tokens")
            continue
        for k, s in zip(chunk, scores):
            results[requests[k].key] = s
        if progress is not None:
            progress(len(chunk))
        i = j
    return results
