"""Teacher-forced scoring (probes.scoring) equals scoring each text alone, unpadded, on
Llama-, Qwen2-, Mistral- and GPT-2-style models; margins and greedy flags follow the logits."""

import pytest
import torch

from probes.scoring import ScoreRequest, score, split_tokens
from tests.test_architectures import _tiny

REQS = [ScoreRequest("a", "Q: Where was Kel Mar born?\nA:", " Vorma Rusk"),
        ScoreRequest("b", "Q: Who founded Tessa Lind?\nA:", " Oren Vale\n"),
        ScoreRequest("c", "Answer the following question. What is the capital of Dorn?\n", "Dorn City"),
        ScoreRequest("d", "Q: Where was Kel Mar born?\nA:", " Q")]


def _alone(model, ids: list[int], n: int, layer: int):
    x = torch.tensor([ids])
    got = {}
    from probes.jacobians import decoder_layers

    h = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, o: got.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0, n - 1]))
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    h.remove()
    logp = torch.log_softmax(logits, -1)
    lps = [logp[t - 1, ids[t]].item() for t in range(n, len(ids))]
    first = logits[n - 1].clone()
    gold = first[ids[n]].item()
    first[ids[n]] = -float("inf")
    greedy = all(int(logits[t - 1].argmax()) == ids[t] for t in range(n, len(ids)))
    return lps, gold - first.max().item(), greedy, got["h"].numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("max_batch_tokens", [None, 40])
def test_scores_equal_each_text_alone(kind, max_batch_tokens, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _tiny(kind, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    got = score(model, tok, REQS, layers=(0, -1), max_batch_tokens=max_batch_tokens)
    assert set(got) == {r.key for r in REQS}
    for r, (ids, n) in zip(REQS, split_tokens(tok, REQS)):
        lps, margin, greedy, h = _alone(model, ids, n, -1)
        s = got[r.key]
        assert s.n_tokens == len(ids) - n >= 1
        assert s.token_logprobs == pytest.approx(lps, abs=1e-4)
        assert s.logprob == pytest.approx(sum(lps), abs=1e-3)
        assert s.first_token_margin == pytest.approx(margin, abs=1e-4)
        assert s.greedy_match == greedy
        assert s.hidden[-1] == pytest.approx(h, abs=1e-4)
        assert s.hidden[0].shape == h.shape


def test_margin_sign_is_greedy_first_token(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _tiny("llama", len(tok))
    prefix = "Q: Where was Kel Mar born?\nA:"
    ids = tok(prefix)["input_ids"]
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    other = (top + 1) % len(tok)
    reqs = [ScoreRequest("top", prefix, tok.decode([top])), ScoreRequest("other", prefix, tok.decode([other]))]
    s = score(model, tok, reqs)
    # decoding a single token and re-encoding can merge differently; only compare when it round-trips
    for key, want in (("top", top), ("other", other)):
        full = tok(prefix + reqs[0 if key == "top" else 1].continuation)["input_ids"]
        if full[len(ids):] == [want]:
            assert (s[key].first_token_margin > 0) == (key == "top")
            assert s[key].greedy_match == (key == "top")


def test_empty_continuation_is_refused(tiny_tokenizer):
    model = _tiny("llama", len(tiny_tokenizer))
    with pytest.raises(ValueError, match="adds no token"):
        score(model, tiny_tokenizer, [ScoreRequest("x", "Q: a?\nA:", "")])


SHARED = "Q: Who founded Tessa Lind?\nA: Oren Vale\nQ: What is the capital of Dorn?\nA: Dorn City\n"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_shared_prefix_is_encoded_once_and_scores_are_unchanged(kind, tiny_tokenizer):
    from probes.scoring import ScoreStats

    tok = tiny_tokenizer
    model = _tiny(kind, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    reqs = [ScoreRequest(r.key, r.prefix, r.continuation, shared=SHARED) for r in REQS]
    reqs.append(ScoreRequest("alone", "Q: Where was Kel Mar born?\nA:", " Vorma"))
    whole = [ScoreRequest(r.key, r.shared + r.prefix, r.continuation) for r in reqs]
    st, st_whole = ScoreStats(), ScoreStats()
    got = score(model, tok, reqs, layers=(0, -1), max_batch_tokens=60, stats=st)
    want = score(model, tok, whole, layers=(0, -1), stats=st_whole)
    for r in reqs:
        a, b = got[r.key], want[r.key]
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.first_token_margin == pytest.approx(b.first_token_margin, abs=1e-4)
        assert a.greedy_match == b.greedy_match
        assert a.hidden[-1] == pytest.approx(b.hidden[-1], abs=1e-4)
    # the shared text is fed once; each row feeds only its own tokens, all but the last; the counts add up
    n_shared = len(tok(SHARED)["input_ids"])
    lens = [len(ids) - 1 for ids, _ in split_tokens(tok, whole)]
    assert st.shared_tokens == n_shared and st.whole_tokens == sum(lens) == st_whole.forward_tokens
    assert st.forward_tokens == sum(lens) - n_shared * (len(REQS) - 1)
    assert sum(st.per_key.values()) == pytest.approx(st.forward_tokens)
    assert st.per_key["alone"] == lens[-1]
    assert st.per_key["a"] == pytest.approx(lens[0] - n_shared + n_shared / len(REQS))
    # without reuse the same requests feed every whole text but its last token
    st_off = ScoreStats()
    off = score(model, tok, reqs, stats=st_off, prefix_reuse=False)
    assert st_off.forward_tokens == sum(lens) and off["a"].logprob == pytest.approx(got["a"].logprob, abs=1e-4)


def _count_fed(model):
    """A forward pre-hook counting the tokens fed to ``model`` (attention mask ones of the new positions)."""
    fed = [0]

    def hook(mod, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        fed[0] += int(mask[:, -ids.shape[1]:].sum()) if mask is not None else ids.numel()

    return fed, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("reuse", [False, True])
def test_the_last_token_is_not_fed_and_scores_are_those_of_the_whole_text(kind, reuse, tiny_tokenizer):
    """Each request feeds one token fewer than its whole text (its last token is only a target), the
    count the stats give is what the model was fed, and the scores equal those of the whole text fed."""
    from probes.scoring import ScoreStats

    tok = tiny_tokenizer
    model = _tiny(kind, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    reqs = [ScoreRequest(r.key, r.prefix, r.continuation, shared=SHARED) for r in REQS]
    whole = [ids for ids, _ in split_tokens(tok, [ScoreRequest(r.key, r.shared + r.prefix, r.continuation)
                                                  for r in reqs])]
    fed, handle = _count_fed(model)
    st = ScoreStats()
    try:
        got = score(model, tok, reqs, layers=(-1,), stats=st, prefix_reuse=reuse)
    finally:
        handle.remove()
    assert fed[0] == st.forward_tokens
    n_shared = len(tok(SHARED)["input_ids"]) if reuse else 0
    assert st.forward_tokens == sum(len(ids) - 1 for ids in whole) - n_shared * (len(reqs) - 1)
    assert st.per_key_whole == {r.key: len(ids) - 1 for r, ids in zip(reqs, whole)}
    for r, (ids, n) in zip(reqs, split_tokens(tok, reqs)):
        lps, margin, greedy, h = _alone(model, ids, n, -1)  # the whole text, its last token fed too
        assert got[r.key].token_logprobs == pytest.approx(lps, abs=1e-4)
        assert got[r.key].first_token_margin == pytest.approx(margin, abs=1e-4)
        assert got[r.key].greedy_match == greedy
        assert got[r.key].hidden[-1] == pytest.approx(h, abs=1e-4)
        # its own memory: a view into the batch's block output would keep the whole batch's states alive
        assert got[r.key].hidden[-1].flags.owndata


def test_a_sliding_window_shorter_than_the_text_scores_whole_texts(tiny_tokenizer):
    """A Mistral-style model whose sliding window is shorter than shared prefix + question cannot attend
    through a shared prefix cache (the buffers attend to every position); its requests are scored from
    whole texts with the model's own sliding-window attention, and said once, instead of failing."""
    tok = tiny_tokenizer
    n_shared = len(tok(SHARED)["input_ids"])
    model = _tiny(f"mistral_window_{n_shared}", len(tok))
    model.config.pad_token_id = tok.pad_token_id
    reqs = [ScoreRequest(r.key, r.prefix, r.continuation, shared=SHARED) for r in REQS]
    whole = [ScoreRequest(r.key, r.shared + r.prefix, r.continuation) for r in reqs]
    said, seen = [], []
    got = score(model, tok, reqs, layers=(-1,), log=said.append, progress=seen.append)
    want = score(model, tok, whole, layers=(-1,), prefix_reuse=False)
    assert len(said) == 1 and "sliding" in said[0]
    assert sum(seen) == len(reqs)
    for r in reqs:
        assert got[r.key].token_logprobs == pytest.approx(want[r.key].token_logprobs, abs=1e-4)
        assert got[r.key].hidden[-1] == pytest.approx(want[r.key].hidden[-1], abs=1e-4)
    # the window matters: the whole texts are longer than it, so full attention would score them otherwise
    full = _tiny("mistral", len(tok))
    full.load_state_dict(model.state_dict())
    full.config.pad_token_id = tok.pad_token_id
    other = score(full, tok, whole, prefix_reuse=False)
    assert any(abs(other[r.key].logprob - want[r.key].logprob) > 1e-3 for r in reqs)
