"""The shared-prefix greedy engine gives exactly the answers of plain ``model.generate``."""

import pytest

from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for
from probes.generation import PromptRequest, decode_answer, generate_greedy


def _plain_generate(model, tok, prompt, max_new_tokens):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return decode_answer(tok, out[0, ids["input_ids"].shape[1]:].tolist())


def test_prefix_cached_greedy_equals_generate(quick_demo, quick_model):
    from knowcat.demo import world_examples

    model, tok = quick_model
    run, _ = quick_demo
    examples = world_examples(run / "world")
    pool = [e for e in examples if e.split == "dev"]
    sets = exemplar_sets(pool, FewShotConfig(n_prompts=2, k=4))
    evalset = [e for e in examples if e.split == "test"][:24]
    reqs = []
    for ex in evalset:
        for j, s in enumerate(sets[ex.relation]):
            pre, suf = prompt_for(ex, s)
            reqs.append(PromptRequest((ex.id, j), pre, suf))
    for bs in (1, 5, 64):
        got = generate_greedy(model, tok, reqs, max_new_tokens=12, batch_size=bs)
        for r in reqs[:16] if bs != 64 else reqs:
            want = _plain_generate(model, tok, r.prefix + r.suffix, 12)
            assert got[r.key] == want, (bs, r.key, got[r.key], want)


def test_rows_whose_tokens_cross_the_prefix_boundary(quick_model):
    """A prefix that does not end on a token boundary still gives the full prompt's answer."""
    model, tok = quick_model
    prefix = "Q: Which country is Tor"  # cut inside a word: tokenizing apart would differ
    reqs = [PromptRequest(i, prefix, s) for i, s in enumerate(["vik located in?\nA:", "a located in?\nA:"])]
    got = generate_greedy(model, tok, reqs, max_new_tokens=8, batch_size=4)
    for r in reqs:
        assert got[r.key] == _plain_generate(model, tok, r.prefix + r.suffix, 8)


def test_exemplars_never_include_the_example():
    from knowcat.examples import QAExample

    pool = [QAExample(f"id{i}", "P1", f"q{i}?", [f"a{i}"], split="dev") for i in range(6)]
    sets = exemplar_sets(pool, FewShotConfig(n_prompts=10, k=4, seed=3))
    for ex in pool:
        for s in sets["P1"]:
            prefix, suffix = prompt_for(ex, s)
            assert f"Q: {ex.question}\n" not in prefix
            assert prefix.count("Q: ") == 4
            assert suffix == f"Q: {ex.question}\nA:"
    # fixed per relation and prompt index: the same seed draws the same sets
    again = exemplar_sets(list(reversed(pool)), FewShotConfig(n_prompts=10, k=4, seed=3))
    assert [[e.id for e in s] for s in sets["P1"]] == [[e.id for e in s] for s in again["P1"]]


def test_out_of_memory_backs_off_to_smaller_batches(quick_demo, quick_model, monkeypatch):
    """An OOM in a batch halves the batch size and retries; the answers do not change."""
    import torch

    import probes.generation as G
    from knowcat.demo import world_examples

    model, tok = quick_model
    run, _ = quick_demo
    examples = world_examples(run / "world")
    pool = [e for e in examples if e.split == "dev"]
    sets = exemplar_sets(pool, FewShotConfig(n_prompts=1, k=4))
    reqs = [PromptRequest(ex.id, *prompt_for(ex, sets[ex.relation][0]), True, (11, 12, 13))
            for ex in examples if ex.split == "train"][:40]
    want = G.generate(model, tok, reqs, batch_size=256)
    real = G._decode_chunk
    sizes = []

    def fake(model_, prefix_kvs, suffixes, branches, *a, **k):
        rows = sum(len(b) for b in branches)
        sizes.append(rows)
        if rows > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model_, prefix_kvs, suffixes, branches, *a, **k)

    monkeypatch.setattr(G, "_decode_chunk", fake)
    logs = []
    got = G.generate(model, tok, reqs, batch_size=256, log=logs.append)
    assert any("out of memory" in l for l in logs) and max(sizes) > 16
    assert {k: (v.greedy, v.samples) for k, v in got.items()} == {k: (v.greedy, v.samples) for k, v in want.items()}


def test_prefix_reuse_off_gives_the_same_answers_and_samples(quick_demo, quick_model):
    """The benchmarks' comparison: without prefix reuse every row prefills its whole prompt, and the
    greedy answers and seeded samples are the same."""
    from knowcat.demo import world_examples
    from probes.generation import generate

    model, tok = quick_model
    run, _ = quick_demo
    examples = world_examples(run / "world")
    sets = exemplar_sets([e for e in examples if e.split == "dev"], FewShotConfig(n_prompts=2, k=4))
    reqs = [PromptRequest((ex.id, j), *prompt_for(ex, s), True, (11 + j, 29 + j))
            for ex in [e for e in examples if e.split == "test"][:12] for j, s in enumerate(sets[ex.relation])]
    on = generate(model, tok, reqs, max_new_tokens=10)
    off = generate(model, tok, reqs, max_new_tokens=10, prefix_reuse=False)
    assert {k: (g.greedy, g.samples) for k, g in on.items()} == {k: (g.greedy, g.samples) for k, g in off.items()}


def _quick_requests(run, n_prompts=2, split="test", streams=0, limit=None):
    from knowcat.demo import world_examples

    examples = world_examples(run / "world")
    sets = exemplar_sets([e for e in examples if e.split == "dev"], FewShotConfig(n_prompts=n_prompts, k=4))
    todo = [e for e in examples if e.split == split][:limit]
    return [PromptRequest((ex.id, j), *prompt_for(ex, s), True, tuple(7000 + 31 * i + j for i in range(streams)))
            for ex in todo for j, s in enumerate(sets[ex.relation])]


def test_greedy_equals_generate_on_every_quick_question(quick_demo, quick_model):
    """Greedy answers of batches that mix every prefix (left-padded) equal plain ``model.generate``
    on every train and test question of the quick world."""
    from probes.generation import generate

    model, tok = quick_model
    run, _ = quick_demo
    reqs = [r for split in ("train", "test") for r in _quick_requests(run, n_prompts=1, split=split)]
    got = generate(model, tok, reqs, max_new_tokens=12, batch_size=512)
    assert len({r.prefix for r in reqs}) > 4  # batches mix prefixes
    differ = [r.key for r in reqs if got[r.key].greedy != _plain_generate(model, tok, r.prefix + r.suffix, 12)]
    assert not differ, f"{len(differ)}/{len(reqs)} greedy answers differ from model.generate: {differ[:5]}"


def test_mixed_prefix_batches_equal_one_prefix_batches(quick_demo, quick_model):
    """Rows of different prefixes in one batch give the answers and samples of batches of one prefix."""
    from probes.generation import generate

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, n_prompts=2, streams=4, limit=30)
    mixed = generate(model, tok, reqs, max_new_tokens=10, batch_size=256)
    by_prefix: dict = {}
    for r in reqs:
        by_prefix.setdefault(r.prefix, []).append(r)
    assert len(by_prefix) > 2
    alone = {}
    for group in by_prefix.values():
        alone.update(generate(model, tok, group, max_new_tokens=10, batch_size=256))
    assert {k: (g.greedy, g.samples) for k, g in mixed.items()} == {k: (g.greedy, g.samples) for k, g in alone.items()}
    assert any(len(set(g.samples)) > 1 for g in mixed.values())  # samples that differ: the test is not vacuous


def test_samples_asked_after_the_greedy_round_reuse_its_prompt_state(quick_demo, quick_model, monkeypatch):
    """Greedy answers in one round and the samples of the same prompts in a later round (lazy SliCK)
    give the answers of one round asking both; the later round computes no prefill."""
    from probes.engine import TransformersEngine

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, n_prompts=2, streams=5, limit=20)
    together = TransformersEngine(model, tok, batch_size=64).generate([reqs], max_new_tokens=10)
    engine = TransformersEngine(model, tok, batch_size=64)
    engine.generate([[PromptRequest(r.key, r.prefix, r.suffix, True, ()) for r in reqs]], max_new_tokens=10)
    assert len(engine._states) == 0  # kept only where asked
    greedy = engine.generate([[PromptRequest(r.key, r.prefix, r.suffix, True, (), keep_state=True) for r in reqs]],
                             max_new_tokens=10)
    assert len(engine._states) == len(reqs)
    widths = []
    real = model.forward

    import functools

    @functools.wraps(real)
    def forward(*a, **k):
        widths.append(k["input_ids"].shape[1])
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", forward)
    samples = engine.generate([[PromptRequest(r.key, r.prefix, r.suffix, False, r.streams) for r in reqs]],
                              max_new_tokens=10)
    assert widths and set(widths) == {1} and len(engine._states) == 0  # decode steps only
    for r in reqs:
        assert (greedy[r.key].greedy, samples[r.key].samples) == (together[r.key].greedy, together[r.key].samples)


def test_prefix_cache_is_bounded_and_follows_the_weights(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from probes.generation import PrefixCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cache = PrefixCache(model, max_entries=2)
    a = cache.get((1, 5, 9))
    cache.get((1, 6))
    assert cache.get((1, 5, 9)) is a  # kept, and now the most recently used
    cache.get((1, 7, 7, 7))
    assert len(cache) == 2 and cache.encoded_tokens == 9
    assert cache.get((1, 5, 9)) is a  # (1, 6) went first
    assert cache.encoded_tokens == 9
    with torch.no_grad():  # the weights change in place (an optimizer step): cached prefixes are stale
        next(model.parameters()).add_(0.5)
    b = cache.get((1, 5, 9))
    assert b is not a and len(cache) == 1 and not torch.equal(b[0][0], a[0][0])


def test_indexed_row_copies_give_the_same_answers(quick_demo, quick_model, monkeypatch):
    """The accelerator path (one indexed copy for prefix fill and row copies) and the CPU's paths (a copy per
    row on one thread, a gather and an indexed copy on several) give the same answers, run here on the CPU. (T = 1.5: answers long and varied enough that rows split
    and finish at different steps, so live rows move into finished rows' places.)"""
    import probes.generation as G

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, n_prompts=2, streams=6, limit=20)
    moves = []
    real = G._Buffers.fork
    monkeypatch.setattr(G._Buffers, "fork", lambda self, dst, src: (moves.append((dst.copy(), src.copy())),
                                                                     real(self, dst, src))[1])
    monkeypatch.setattr(G, "_threads", lambda: 1)  # one copy per row
    rows = G.generate(model, tok, reqs, max_new_tokens=10, batch_size=96, temperature=1.5)
    monkeypatch.setattr(G, "_threads", lambda: 2)  # a gather and an indexed copy
    gathered = G.generate(model, tok, reqs, max_new_tokens=10, batch_size=96, temperature=1.5)
    assert any((s > d).any() for d, s in moves) and any((s < d).any() for d, s in moves)  # moves down and splits
    assert {k: (g.greedy, g.samples) for k, g in rows.items()} == {k: (g.greedy, g.samples) for k, g in gathered.items()}
    monkeypatch.setattr(G, "ROW_COPY_DEVICES", frozenset())
    indexed = G.generate(model, tok, reqs, max_new_tokens=10, batch_size=96, temperature=1.5)
    assert {k: (g.greedy, g.samples) for k, g in rows.items()} == {k: (g.greedy, g.samples) for k, g in indexed.items()}


def test_prefixes_are_encoded_together(tiny_model_dir, monkeypatch):
    """``PrefixCache.get_many``: the prefixes not held yet in one forward pass, padded on the right to the
    longest, none for held ones; each prefix's keys and values are those of encoding it alone (its own
    length, unchanged by the padding after it); duplicates and order are kept."""
    import functools

    import torch
    from transformers import AutoModelForCausalLM

    from probes.generation import PrefixCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    alone = PrefixCache(model)
    want = {ids: alone.get(ids) for ids in [(1, 5, 9), (1, 6, 7), (1, 8), (1, 5, 9, 4)]}
    cache = PrefixCache(model)
    cache.get((1, 8))
    widths = []
    real = model.forward

    @functools.wraps(real)
    def forward(*a, **k):
        widths.append(tuple(k["input_ids"].shape))
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", forward)
    asked = [(1, 5, 9), (1, 8), (1, 6, 7), (1, 5, 9, 4), (1, 5, 9)]
    got = cache.get_many(asked)
    assert widths == [(3, 4)]  # (1, 8) was held; two of length 3 and one of length 4 in one pass
    assert cache.encoded_tokens == 2 + 3 + 3 + 4
    for ids, kv in zip(asked, got):
        for (k, v), (k0, v0) in zip(kv, want[ids]):
            assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
    assert got[0] is got[4] and got[1] is cache.get((1, 8))
    assert cache.get_many(asked) and len(widths) == 1  # everything held now: no forward pass


def test_tokenizations_are_kept_between_rounds(tiny_tokenizer):
    """``group_requests`` with a memo gives the groups of tokenizing afresh, and a later round of the same
    prompts tokenizes nothing again."""
    from probes.generation import group_requests

    calls = []

    class Counting:
        def __call__(self, texts, **kw):
            calls.append(list(texts) if isinstance(texts, list) else [texts])
            return tiny_tokenizer(texts, **kw)

    reqs = [PromptRequest(i, "Q: Where was Kel", s) for i, s in enumerate([" Mar born?\nA:", "ma born?\nA:"])]
    reqs.append(PromptRequest(2, "", "Q: Who founded Tessa Lind?\nA:"))
    fresh = group_requests(tiny_tokenizer, reqs)
    memo: dict = {}
    assert group_requests(Counting(), reqs, memo) == fresh and calls
    n = len(calls)
    assert group_requests(Counting(), reqs[1:], memo) == group_requests(tiny_tokenizer, reqs[1:])
    assert len(calls) == n  # every text was held


def test_row_copies_are_exact_on_every_path(monkeypatch):
    """``_copy_rows`` copies the first ``n`` positions of the given rows and nothing else, row by row, by a
    gather and an indexed copy, or by advanced indexing."""
    import numpy as np
    import torch

    import probes.generation as G

    g = torch.Generator().manual_seed(0)
    src = torch.randn(12, 2, 9, 3, generator=g)
    dst_rows, src_rows = np.array([0, 5, 7]), np.array([9, 11, 2])
    want = src.clone()
    for d, s_ in zip(dst_rows, src_rows):
        want[d, :, :6] = src[s_, :, :6]
    for threads, devices in ((1, {"cpu"}), (2, {"cpu"}), (1, set())):
        monkeypatch.setattr(G, "_threads", lambda t=threads: t)
        monkeypatch.setattr(G, "ROW_COPY_DEVICES", frozenset(devices))
        got = src.clone()
        G._copy_rows(got, dst_rows, got, src_rows, 6)
        assert torch.equal(got, want), (threads, devices)


def test_abandoned_samples_stop_and_the_rest_are_unchanged(quick_demo, quick_model):
    """``PromptRequest.abandon``: a sample stops at the first step its text makes the test true and
    comes back as None; every other sample and every greedy answer is what it is without the test;
    the test sees each sample's text so far, growing one token at a time."""
    from dataclasses import replace

    from probes.generation import generate

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, streams=6, limit=10)
    plain = generate(model, tok, reqs, max_new_tokens=10)
    seen: list[str] = []

    def longer_than_four(text):  # abandons every sample whose text grows past 4 characters
        seen.append(text)
        return len(text.strip()) > 4

    tested = generate(model, tok, [replace(r, abandon=longer_than_four) for r in reqs], max_new_tokens=10)
    dropped = kept = 0
    for k, g in plain.items():
        assert tested[k].greedy == g.greedy
        for a, b in zip(tested[k].samples, g.samples, strict=True):
            if a is None:
                dropped += 1
                assert len(b) > 4
            else:
                kept += 1
                assert a == b and len(a) <= 4
    assert dropped and kept, (dropped, kept)
    assert seen and all("\n" not in t for t in seen)
    # a test that abandons nothing changes nothing
    never = generate(model, tok, [replace(r, abandon=lambda t: False) for r in reqs], max_new_tokens=10)
    assert {k: (g.greedy, g.samples) for k, g in never.items()} == {k: (g.greedy, g.samples) for k, g in plain.items()}


def test_a_character_still_incomplete_is_never_tested():
    from probes.generation import _abandoned

    assert _abandoned(lambda t: True, "Par") and not _abandoned(lambda t: True, "Par\ufffd")
    assert not _abandoned(lambda t: False, "Par")


def test_no_sample_is_abandoned_where_decoding_rewrites_earlier_text(quick_demo, quick_model, monkeypatch):
    """A tokenizer that cleans up spaces before punctuation rewrites text already decoded ("do n't" becomes
    "don't"): there, a sample's first words are not final, so no test of them is ever asked."""
    from dataclasses import replace

    from probes.generation import generate

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, streams=4, limit=3)
    asked = []
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", True, raising=False)
    out = generate(model, tok, [replace(r, abandon=lambda t: asked.append(t) or True) for r in reqs], max_new_tokens=6)
    assert not asked and all(s is not None for g in out.values() for s in g.samples)
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", False, raising=False)
    out = generate(model, tok, [replace(r, abandon=lambda t: asked.append(t) or True) for r in reqs], max_new_tokens=6)
    assert asked and all(s is None for g in out.values() for s in g.samples)


@pytest.mark.parametrize("batch_size", [64, 3])
def test_first_tokens_drawn_before_batching_change_no_sample(quick_demo, quick_model, monkeypatch, batch_size):
    """A sampled request whose prompt state is kept has its samples' first tokens drawn before any batch
    is formed (``RoundGenerator._first_tokens``): those abandoned or stopped there take no row. Every
    sample is what the batched decode gives it without that step, the requests whose samples all
    ended there still come back (and count as progress), and fewer rows are decoded."""
    from dataclasses import replace

    from probes.generation import RoundGenerator

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, streams=8, limit=12)
    greedy = [replace(r, streams=(), keep_state=True) for r in reqs]

    def odd_start(text):  # abandons a sample whose first character's code is odd, from its first token
        t = text.strip()
        return bool(t) and ord(t[0]) % 2 == 1

    # and half the requests abandon every sample at its first token
    sampled = [replace(r, key=("s",) + r.key, greedy=False, abandon=odd_start if i % 2 else (lambda t: True))
               for i, r in enumerate(reqs)]

    import probes.generation as G

    drawn, inside = [], []  # the rows of logits each draw of first tokens takes (at most a batch's worth of requests)
    real_draw = G._draw

    def draw(logits, *a, **k):
        if inside:
            drawn.append(logits.shape[0])
        return real_draw(logits, *a, **k)

    monkeypatch.setattr(G, "_draw", draw)

    def run_two_rounds(prepass: bool):
        gen = RoundGenerator(model, tok, max_new_tokens=10, batch_size=batch_size)
        real_first = gen._first_tokens

        def first_tokens(items):
            inside.append(1)
            try:
                return real_first(items)
            finally:
                inside.clear()

        monkeypatch.setattr(gen, "_first_tokens", first_tokens)
        if not prepass:
            monkeypatch.setattr(gen, "_first_tokens", lambda items: (items, {}))
        gen(greedy)
        fed, calls = gen._fed[0], []
        done = gen(sampled, progress=calls.append)
        return done, gen._fed[0] - fed, sum(calls)

    with_first, fed_with, progress_with = run_two_rounds(True)
    first_draws = list(drawn)
    without, fed_without, progress_without = run_two_rounds(False)
    if batch_size < len(sampled):  # the first-token draw went in chunks of at most batch_size requests
        assert first_draws and max(first_draws) <= batch_size
    assert {k: (g.greedy, g.samples) for k, g in with_first.items()} == \
        {k: (g.greedy, g.samples) for k, g in without.items()}
    assert progress_with == progress_without == len(sampled)
    samples = [s for g in with_first.values() for s in g.samples]
    assert None in samples and any(s is not None for s in samples)  # not vacuous: both outcomes
    assert any(all(s is None for s in g.samples) for g in with_first.values())  # requests resolved whole
    assert fed_with == fed_without  # the same nodes decoded: a sample ended at its first token costs no forward


def test_prefill_groups_cover_every_row_within_their_token_bound():
    """``_length_groups``: consecutive ranges covering every row once; with ``max_tokens``, no range's
    padded tokens exceed it unless the range is a single row or still under ``min_tokens``."""
    import random

    from probes.generation import _length_groups

    rnd = random.Random(0)
    lengths = sorted(rnd.randint(5, 30) for _ in range(700))
    for cap in (None, 2048, 300):
        groups = _length_groups(lengths, max_tokens=cap)
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        for lo, hi in groups:
            padded = max(lengths[lo:hi]) * (hi - lo)
            if cap is not None and hi - lo > 1:
                assert padded <= cap or sum(lengths[lo:hi - 1]) < 256, (lo, hi, padded)
    assert len(_length_groups(lengths, max_tokens=2048)) > len(_length_groups(lengths))


def test_out_of_memory_retry_keeps_the_prompt_states_it_took(quick_demo, quick_model, monkeypatch):
    """A batch that runs out of memory had already taken its requests' kept prompt states
    (:class:`PromptStates`); the retry with fewer rows decodes from those states again instead of
    prefilling those prompts: the same samples and the same tokens fed as without the error."""
    from dataclasses import replace

    import torch

    import probes.generation as G

    model, tok = quick_model
    run, _ = quick_demo
    reqs = _quick_requests(run, streams=4, limit=12)
    greedy = [replace(r, streams=(), keep_state=True) for r in reqs]
    sampled = [replace(r, key=("s",) + r.key, greedy=False) for r in reqs]  # no abandon: every state goes to a batch
    real = G._decode_chunk

    def sample_round(fail: bool):
        calls = []

        def flaky(*a, **k):
            calls.append(1)
            if fail and len(calls) == 2:  # the sample round's first batch
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*a, **k)

        monkeypatch.setattr(G, "_decode_chunk", flaky)
        gen = G.RoundGenerator(model, tok, max_new_tokens=8, batch_size=256)
        gen(greedy)
        assert len(calls) == 1 and len(gen.states) == len(reqs)
        fed = gen._fed[0]
        out = gen(sampled)
        return {k: (g.greedy, g.samples) for k, g in out.items()}, gen._fed[0] - fed, gen.rows_per_batch

    want, fed_want, _ = sample_round(False)
    got, fed_got, rows = sample_round(True)
    assert rows == 128  # the error was met and the batch halved
    assert got == want
    assert fed_got == fed_want  # no prompt prefilled again


@pytest.mark.parametrize("pad", [None, -1, "vocab"])
def test_prefixes_encoded_together_whatever_the_models_pad_token(pad):
    """``PrefixCache.get_many`` pads shorter prefixes on the right with tokens of the vocabulary even where
    the model's ``pad_token_id`` is unset, negative or past its embeddings: each prefix's keys and values
    are those of encoding it alone."""
    import torch
    from test_architectures import _tiny

    from probes.generation import PrefixCache

    model = _tiny("llama", 50)
    model.config.pad_token_id = 50 if pad == "vocab" else pad
    asked = [(1, 5, 9), (1, 6, 7, 8, 2)]
    got = PrefixCache(model).get_many(asked)
    for ids, kv in zip(asked, got):
        for (k, v), (k0, v0) in zip(kv, PrefixCache(model).get(ids)):
            assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)


def test_kept_prompt_states_hold_no_extra_copy_while_decoding(monkeypatch):
    """Keeping some rows' states (and decoding from kept states) leaves no block of every layer's suffix keys
    and values alive during the decode steps: only each kept row's own state, as large as its suffix."""
    import gc

    import torch
    from test_architectures import _tiny

    import probes.generation as G

    model = _tiny("llama", 50)
    layers = model.config.num_hidden_layers
    cache = G.PrefixCache(model)
    kvs = cache.get_many([(1, 2, 3), (1, 2, 3), (1, 4)])
    width = sum(t.shape[1] * t.shape[-1] for kv in kvs[0] for t in kv)  # a position's keys and values, every layer's
    suffixes = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    seen = []
    real = model.forward

    def forward(*a, **k):
        if k["input_ids"].shape[1] == 1:  # a decode step: the tensors of every layer's keys and values alive
            seen.append(sorted(o.shape[0] for o in gc.get_objects() if type(o) is torch.Tensor and (
                (o.dim() == 5 and o.shape[1] == 2 * layers) or (o.dim() == 3 and o.shape[-1] == width))))
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", forward)
    stop = torch.tensor([0])
    _, kept = G._decode_chunk(model, kvs, suffixes, [[-1]] * 3, 0, stop, 4, 0.5, 40, keep=[True, False, True])
    assert sorted(kept) == [0, 2] and [st[0].shape[-2] for st in kept.values()] == [4, 3]
    states = [kept[0], None, kept[2]]
    G._decode_chunk(model, kvs, suffixes, [[-1, 7]] * 3, 0, stop, 4, 0.5, 40, states=states)
    assert seen and all(s == [] for s in seen), seen


def test_kept_prompt_states_of_keys_and_values_of_different_widths():
    """A model whose cached keys and values differ in shape (multi-head latent attention, DeepSeek-V3): a
    prompt's kept state gives the greedy answer and samples of prefilling it again."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import probes.generation as G

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                           max_position_embeddings=128)
    model = DeepseekV3ForCausalLM(cfg).eval()
    kvs = G.PrefixCache(model).get_many([(1, 2, 3), (1, 4)])
    assert kvs[0][0][0].shape[1:] != kvs[0][0][1].shape[1:]
    suffixes, branches, stop = [[5, 6, 7], [8]], [[-1, 11, 12], [-1, 13]], torch.tensor([0])
    want, kept = G._decode_chunk(model, kvs, suffixes, branches, 0, stop, 6, 1.0, 40, keep=[True, True])
    got, _ = G._decode_chunk(model, kvs, suffixes, branches, 0, stop, 6, 1.0, 40, states=[kept[0], kept[1]])
    assert got == want
