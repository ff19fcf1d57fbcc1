"""Top-k sampling: the distribution is softmax(top_k(logits) / T) with ties kept, as in
transformers' TopKLogitsWarper and vLLM; draws are row-wise pure (batch and order invariant)."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper

from probes.sampling import sample_top_k, stream_seed, topk_cdf, uniforms


def _probs(idx: torch.Tensor, cdf: torch.Tensor, vocab: int) -> torch.Tensor:
    """The per-row distribution over the vocabulary that (idx, cdf) encodes."""
    p = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1]))
    out = torch.zeros(idx.shape[0], vocab, dtype=torch.float64)
    return out.scatter_add_(1, idx, p)


def _reference(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    warped = TopKLogitsWarper(top_k)(None, logits.float() / temperature)
    return torch.softmax(warped.double(), dim=-1)


@pytest.mark.parametrize("top_k", [1, 3, 40, 0])
def test_distribution_is_softmax_of_top_k(top_k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 97, generator=g) * 3
    idx, cdf = topk_cdf(logits, 0.5, top_k)
    want = _reference(logits, 0.5, top_k if top_k else 97)
    assert torch.allclose(_probs(idx, cdf, 97), want, atol=1e-9)
    assert torch.all(cdf[:, -1] == 1.0)


def test_tied_logits_are_all_kept_like_transformers_and_vllm():
    # row 0: the 2nd largest logit is shared by four tokens: top-2 keeps five tokens, not two
    logits = torch.tensor([[5.0, 3.0, 1.0, 3.0, 3.0, 0.0, 3.0],
                           [4.0, 2.0, 2.0, 1.0, 0.0, -1.0, -2.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    idx, cdf = topk_cdf(logits, 0.5, 2)
    p = _probs(idx, cdf, 7)
    assert torch.allclose(p, _reference(logits, 0.5, 2), atol=1e-12)
    assert [(p[r] > 0).sum().item() for r in range(3)] == [5, 3, 7]
    # bfloat16 logits tie often: the same rule holds after rounding
    lb = (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    assert torch.allclose(_probs(*topk_cdf(lb, 0.7, 40), 64), _reference(lb, 0.7, 40), atol=1e-9)
    # an exhaustive grid of uniforms reaches every kept token and nothing else
    u = torch.linspace(0, 1, 20001)[:-1]
    drawn = sample_top_k(logits[:1].expand(len(u), -1), u, 0.5, 2)
    assert set(drawn.tolist()) == {0, 1, 3, 4, 6}
    freq = np.bincount(drawn.numpy(), minlength=7) / len(u)
    assert np.allclose(freq, p[0].numpy(), atol=1e-3)


def test_tie_order_is_canonical_and_draws_are_row_wise():
    """The same row gives the same token for the same uniform in any batch and order."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(-3, 3, (32, 50), generator=g).float()  # many ties
    streams = np.array([stream_seed(7, f"q{i}", i % 3, i % 5) for i in range(32)], dtype=np.uint64)
    u = torch.from_numpy(uniforms(streams, 0))
    whole = sample_top_k(logits, u, 0.5, 10)
    perm = torch.randperm(32, generator=g)
    shuffled = sample_top_k(logits[perm], u[perm], 0.5, 10)
    assert torch.equal(shuffled, whole[perm])
    single = torch.cat([sample_top_k(logits[i:i + 1], u[i:i + 1], 0.5, 10) for i in range(32)])
    assert torch.equal(single, whole)
    # a row's token does not depend on the widest row of its batch (padding never drawn)
    ties = torch.zeros(1, 50)
    both = sample_top_k(torch.cat([logits[:1], ties]), u[:2], 0.5, 10)
    assert both[0] == whole[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_the_general_path(dtype):
    """Rows without ties take one topk; rows with ties the general path: the ids and cdf are exactly those of
    the general path either way (so a batch's draws do not depend on which path it took)."""
    from probes.sampling import _topk_cdf_general

    g = torch.Generator().manual_seed(3)
    for scale in (3.0, 0.05):  # 0.05 in bfloat16: ties among the largest logits in most rows
        logits = (torch.randn(64, 300, generator=g) * scale).to(dtype)
        for k in (1, 5, 40):
            idx, cdf = topk_cdf(logits, 0.5, k)
            gi, gc = _topk_cdf_general(logits.float(), 0.5, k)
            assert torch.equal(idx, gi) and torch.equal(cdf, gc)
            for r in range(0, 64, 7):  # a row alone (fast path when it has no tie) gives its batch's row
                ri, rc = topk_cdf(logits[r:r + 1], 0.5, k)
                w = ri.shape[1]
                assert torch.equal(ri, gi[r:r + 1, :w]) and torch.equal(rc, gc[r:r + 1, :w])
                assert torch.all(gc[r, w:] == 1.0)


def test_stream_seeds_are_the_stream_seeds_one_by_one():
    """``stream_seeds`` (the last mixing step vectorized) gives each sample exactly ``stream_seed``'s
    stream, including seeds and ids whose values use all 64 bits."""
    from probes.sampling import stream_seeds

    for seed, ex_id, j, n in ((0, "q1", 0, 16), (2**64 - 1, "Q\u00e9 2", 9, 5), (12345, "", 3, 0), (7, "x", 2**40, 33)):
        assert stream_seeds(seed, ex_id, j, n) == tuple(stream_seed(seed, ex_id, j, i) for i in range(n))
