"""Cascade attention (probes/cascade.py): rows that share a prefix attend to one copy of it. It must
equal attention over ``prefix + row`` (up to float rounding), give the same answers and samples as
the copy-per-row layout, and leave the model's own attention implementation as it was."""

import pytest
import torch

from probes import cascade
from probes.cascade import SharedPrefix, cascade_attention


class _Module:
    layer_idx = 0


def _reference(q, prefixes, groups, k_rows, v_rows, row_mask, scale):
    """Per row: plain softmax attention over its prefix's keys then its own (GQA by repeating heads)."""
    B, Hq, T, d = q.shape
    H = k_rows.shape[1]
    out = torch.empty(B, T, Hq, d, dtype=torch.float64)
    for b in range(B):
        kp, vp = prefixes[groups[b]]
        K = torch.cat([kp[0], k_rows[b]], dim=1).double().repeat_interleave(Hq // H, dim=0)  # [Hq, L + n, d]
        V = torch.cat([vp[0], v_rows[b]], dim=1).double().repeat_interleave(Hq // H, dim=0)
        allowed = torch.cat([torch.ones(T, kp.shape[-2], dtype=torch.bool), row_mask[b, 0]], dim=1)  # [T, L + n]
        s = (q[b].double() @ K.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        out[b] = (s.softmax(-1) @ V).transpose(0, 1)
    return out


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("rep", [1, 2])
def test_cascade_equals_attention_over_prefix_and_row(T, rep):
    g = torch.Generator().manual_seed(T * 10 + rep)
    H, d, n = 2, 8, 6
    lens = [5, 9, 2]
    prefixes = [(torch.randn(1, H, L, d, generator=g), torch.randn(1, H, L, d, generator=g)) for L in lens]
    groups = [2, 0, 0, 1, 2, 2, 0]  # rows of a prefix are not side by side
    B = len(groups)
    shared = SharedPrefix([[prefixes[x]] for x in groups], B, "cpu")
    q = torch.randn(B, H * rep, T, d, generator=g)
    k_rows, v_rows = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    pad = torch.tensor([0, 2, 1, 0, 3, 0, 1])  # left padding of each row's own positions
    mask = torch.arange(n)[None, :] >= pad[:, None]
    mask = mask[:, None, None, :].expand(B, 1, T, n)
    if T > 1:  # the last T positions are the queries: causal among them
        mask = mask & (torch.arange(n)[None, :] <= torch.arange(n - T, n)[:, None])
    shared.select(0, B)
    token = cascade._ACTIVE.set(shared)
    try:
        out, _ = cascade_attention(_Module(), q, k_rows, v_rows, mask, scaling=d ** -0.5)
    finally:
        cascade._ACTIVE.reset(token)
    ref = _reference(q, prefixes, groups, k_rows, v_rows, mask, d ** -0.5)
    assert out.shape == (B, T, H * rep, d)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    # a row part that is all padding for a query still attends to its prefix (no NaN)
    assert torch.isfinite(out).all()


def _tiny(kind, vocab):
    from test_architectures import _tiny as build

    return build(kind, vocab)


@pytest.mark.parametrize("kind", ["quick", "qwen2"])
def test_generation_is_the_same_with_one_copy_of_each_prefix(kind, quick_demo, quick_model, monkeypatch):
    """Greedy answers and seeded samples, over many prefixes in one batch: the cascade layout and the
    copy-per-row layout agree (the quick model: Llama, 4 heads; a tiny Qwen2 with grouped-query heads)."""
    import probes.generation as gen
    from knowcat.demo import world_examples
    from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for
    from probes.generation import PromptRequest, generate

    model, tok = quick_model
    if kind != "quick":
        model = _tiny(kind, len(tok))
        model.config.pad_token_id = tok.pad_token_id
    run, _ = quick_demo
    examples = world_examples(run / "world")
    sets = exemplar_sets([e for e in examples if e.split == "dev"], FewShotConfig(n_prompts=3, k=4))
    by_relation: dict = {}
    for e in examples:
        if e.split == "train" and len(by_relation.setdefault(e.relation, [])) < 3:
            by_relation[e.relation].append(e)
    todo = [e for exs in list(by_relation.values())[:6] for e in exs]
    reqs = [PromptRequest((ex.id, j), *prompt_for(ex, s), True, tuple(500 + 17 * i + j for i in range(5)))
            for ex in todo for j, s in enumerate(sets[ex.relation])]
    assert len({r.prefix for r in reqs}) > 3

    selected = []
    real_select = SharedPrefix.select
    def counting_select(self, lo, hi):
        selected.append(hi - lo)
        real_select(self, lo, hi)

    monkeypatch.setattr(SharedPrefix, "select", counting_select)
    before = model.config._attn_implementation
    assert cascade.supported(model)
    shared = generate(model, tok, reqs, max_new_tokens=8, batch_size=40)
    assert selected and model.config._attn_implementation == before
    monkeypatch.setattr(gen, "cascade_supported", lambda m: False)
    n = len(selected)
    copied = generate(model, tok, reqs, max_new_tokens=8, batch_size=40)
    assert len(selected) == n  # the copy-per-row layout never used the cascade
    answers = {k: (g.greedy, g.samples) for k, g in shared.items()}
    assert answers == {k: (g.greedy, g.samples) for k, g in copied.items()}


def test_which_models_take_the_cascade(quick_model):
    _, tok = quick_model
    assert cascade.supported(_tiny("llama", len(tok))) and cascade.supported(_tiny("qwen2", len(tok)))
    assert not cascade.supported(_tiny("gpt2", len(tok)))  # its own attention (no shared interface semantics)
    assert not cascade.supported(_tiny("mistral_window_4096", len(tok)))  # a sliding window
    from transformers import Qwen2Config, Qwen2ForCausalLM

    windowed = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            use_sliding_window=True, sliding_window=64, max_window_layers=1))
    assert not cascade.supported(windowed)  # some layers slide


def test_the_models_attention_is_restored_after_an_error(quick_model, monkeypatch):
    from probes.generation import PromptRequest, generate

    model, tok = quick_model
    before = model.config._attn_implementation

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(SharedPrefix, "select", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, tok, [PromptRequest("a", "Q: Where", " is Oslo?\nA:")], max_new_tokens=3)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_no_more_than_fused_attention(dtype):
    """In bfloat16 or float16 the cascade's error against a float64 reference is within twice that of
    fused attention in the same precision over the same keys (its scores are kept in float32), so its
    answers differ from the copy-per-row layout's only as rounding does (as a batch size change does)."""
    g = torch.Generator().manual_seed(3)
    H, rep, d, n, T = 2, 3, 16, 5, 1
    lens = [30, 12]
    prefixes = [(4 * torch.randn(1, H, L, d, generator=g), torch.randn(1, H, L, d, generator=g)) for L in lens]
    groups = [0, 1, 1, 0, 0]
    B = len(groups)
    q = 4 * torch.randn(B, H * rep, T, d, generator=g)
    k_rows, v_rows = 4 * torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    mask = torch.ones(B, 1, T, n, dtype=torch.bool)
    ref = _reference(q, prefixes, groups, k_rows, v_rows, mask, d ** -0.5)
    half = [(k.to(dtype), v.to(dtype)) for k, v in prefixes]
    shared = SharedPrefix([[half[x]] for x in groups], B, "cpu")
    shared.select(0, B)
    token = cascade._ACTIVE.set(shared)
    try:
        out, _ = cascade_attention(_Module(), q.to(dtype), k_rows.to(dtype), v_rows.to(dtype), mask, scaling=d ** -0.5)
    finally:
        cascade._ACTIVE.reset(token)
    assert out.dtype == dtype
    fused = torch.cat([torch.nn.functional.scaled_dot_product_attention(  # each row over its prefix and its own keys
        q[b:b + 1].to(dtype), torch.cat([half[x][0], k_rows[b:b + 1].to(dtype)], dim=2),
        torch.cat([half[x][1], v_rows[b:b + 1].to(dtype)], dim=2), enable_gqa=True) for b, x in enumerate(groups)])
    fused = fused.transpose(1, 2)
    err, err_fused = (out.double() - ref).abs().max(), (fused.double() - ref).abs().max()
    assert err <= 2 * err_fused, (err, err_fused)


@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prefill_of_a_row_range_equals_attention_over_prefix_and_row(rep, dtype, tol):
    """A prefill pass computes rows ``lo:hi`` of the batch (:meth:`SharedPrefix.select`): each row attends to
    its own prefix (prefixes of different lengths, a row's index counted from ``lo``), including a row whose
    own positions are all padding and queries that come before a row's first own position."""
    g = torch.Generator().manual_seed(rep)
    H, d, n, T = 2, 8, 7, 4
    lens = [5, 9, 1, 12]
    prefixes = [(torch.randn(1, H, L, d, generator=g), torch.randn(1, H, L, d, generator=g)) for L in lens]
    groups = [2, 0, 0, 1, 3, 2, 0, 3, 1]
    lo, hi = 2, 8
    B = hi - lo
    shared = SharedPrefix([[(k.to(dtype), v.to(dtype))] for k, v in (prefixes[x] for x in groups)], len(groups), "cpu")
    q = 3 * torch.randn(B, H * rep, T, d, generator=g)
    k_rows, v_rows = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    pad = torch.tensor([1, 0, 7, 0, 5, 6])  # 7: no own position; 5, 6: the first queries see none of their own
    mask = (torch.arange(n)[None, :] >= pad[:, None])[:, None, None, :] \
        & (torch.arange(n)[None, :] <= torch.arange(n - T, n)[:, None])
    shared.select(lo, hi)
    token = cascade._ACTIVE.set(shared)
    try:
        out, _ = cascade_attention(_Module(), q.to(dtype), k_rows.to(dtype), v_rows.to(dtype), mask, scaling=d ** -0.5)
    finally:
        cascade._ACTIVE.reset(token)
    ref = _reference(q, prefixes, groups[lo:hi], k_rows, v_rows, mask, d ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < tol


def test_a_decode_step_attends_only_to_the_prefixes_of_its_rows():
    """Rows ``lo:hi`` whose prefixes are a subset of the batch's (and shorter than its longest): the
    prefix part takes only those prefixes, cut to their longest, and still equals attention over
    ``prefix + row``."""
    g = torch.Generator().manual_seed(7)
    H, d, n = 2, 8, 5
    lens = [4, 11, 6, 3]
    prefixes = [(torch.randn(1, H, L, d, generator=g), torch.randn(1, H, L, d, generator=g)) for L in lens]
    groups = [1, 0, 2, 0, 3, 2, 1]
    kvs = [[p] for p in prefixes]  # the rows of a prefix share its object, as the prefix cache's do
    shared = SharedPrefix([kvs[x] for x in groups], len(groups), "cpu")
    lo, hi = 1, 6  # prefixes 0, 2, 0, 3 and 2: not prefix 1, the longest; two rows of prefixes 0 and 2
    shared.select(lo, hi)
    K, V, valid = shared.blocks(0)
    assert K.shape[0] == 3 and K.shape[2] == 6 and sorted(valid.sum(1).tolist()) == [3, 4, 6]
    assert shared._rows[1] == 2  # two query slots per prefix
    B = hi - lo
    q = torch.randn(B, H, 1, d, generator=g)
    k_rows, v_rows = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    token = cascade._ACTIVE.set(shared)
    try:
        out, _ = cascade_attention(_Module(), q, k_rows, v_rows, mask, scaling=d ** -0.5)
    finally:
        cascade._ACTIVE.reset(token)
    ref = _reference(q, prefixes, groups[lo:hi], k_rows, v_rows, mask, d ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-5
