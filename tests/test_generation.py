"""The shared-prefix greedy engine gives exactly the answers of plain ``model.generate``."""

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
