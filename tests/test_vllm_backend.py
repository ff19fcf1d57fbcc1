"""The vLLM backend, run against a faithful fake of vLLM's offline interface (``tests/fake_vllm.py``):
vLLM itself does not install on this machine (its wheels need a CUDA build of torch)."""

import json
import sys

import pytest

import fake_vllm
from knowcat.slick import SliCKConfig, categorize
from probes.sampling import stream_seed


@pytest.fixture
def vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    fake_vllm.CALLS.clear()
    return fake_vllm


@pytest.fixture(scope="module")
def small(quick_demo):
    from knowcat.demo import world_examples

    run, _ = quick_demo
    ex = world_examples(run / "world")
    train = [e for e in ex if e.split == "train"]
    by_rel = {}
    todo = [e for e in train if by_rel.setdefault(e.relation, []).append(e) or len(by_rel[e.relation]) <= 3]
    pool = [e for e in ex if e.split == "dev"]
    return run, todo, pool


CFG = SliCKConfig(n_prompts=3, n_samples=4, keep_answers=True, max_new_tokens=12)


def test_vllm_backend_matches_the_protocol(vllm, small, quick_model):
    from probes.vllm_backend import VLLMEngine, request_seed

    run, todo, pool = small
    engine = VLLMEngine(str(run / "model"), seed=CFG.seed, tensor_parallel_size=2)
    init = vllm.CALLS[0]["init"]
    assert init["enable_prefix_caching"] is True and init["tensor_parallel_size"] == 2 and init["seed"] == 0
    exact = categorize(engine, None, todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}),
                       generate_fn=engine.generate)
    # greedy answers: the same as the transformers engine's (both are argmax decoding of the same model)
    model, tok = quick_model
    ref = {r.id: r for r in categorize(model, tok, todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}))}
    for r in exact:
        assert r.greedy_answers == ref[r.id].greedy_answers
        assert r.n_sampled == CFG.n_prompts * CFG.n_samples and all(len(s) == CFG.n_samples for s in r.sampled_answers)
    # one sampling request per (example, prompt), seeded from (seed, example id, prompt index)
    sampled = [sp for call in vllm.CALLS if "generate" in call for _, sp in call["generate"] if sp.temperature > 0]
    seeds = sorted(sp.seed for sp in sampled)
    want = sorted(stream_seed(CFG.seed, e.id, j, 0) & ((1 << 63) - 1) for e in todo for j in range(CFG.n_prompts))
    assert seeds == want
    assert all(sp.n == CFG.n_samples and sp.top_k == CFG.top_k and sp.temperature == CFG.temperature
               and sp.stop == ["\n"] for sp in sampled)
    greedy = [sp for call in vllm.CALLS if "generate" in call for _, sp in call["generate"] if sp.temperature == 0]
    assert len(greedy) == len(todo) * CFG.n_prompts and all(sp.n == 1 for sp in greedy)
    assert request_seed.__doc__


def test_vllm_lazy_equals_exact_and_is_reproducible(vllm, small):
    from probes.vllm_backend import VLLMEngine

    run, todo, pool = small
    engine = VLLMEngine(str(run / "model"), seed=0)
    exact = categorize(engine, None, todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}),
                       generate_fn=engine.generate)
    n_sampling_exact = sum(1 for c in vllm.CALLS if "generate" in c for _, sp in c["generate"] if sp.temperature > 0)
    vllm.CALLS.clear()
    lazy = categorize(engine, None, todo, pool, CFG, generate_fn=engine.generate)
    n_sampling_lazy = sum(1 for c in vllm.CALLS if "generate" in c for _, sp in c["generate"] if sp.temperature > 0)
    assert [r.category for r in lazy] == [r.category for r in exact]
    assert n_sampling_lazy <= n_sampling_exact
    # reversed order, a fresh engine: the same answers (per-request seeds)
    engine2 = VLLMEngine(str(run / "model"), seed=0)
    again = {r.id: r for r in categorize(engine2, None, list(reversed(todo)), pool,
                                         SliCKConfig(**{**CFG.__dict__, "exact": True}), generate_fn=engine2.generate)}
    for r in exact:
        assert again[r.id].sampled_answers == r.sampled_answers and again[r.id].category == r.category


def test_cli_categorize_with_vllm_backend(vllm, quick_demo, tmp_path):
    from knowcat.cli import main

    run, _ = quick_demo
    out = tmp_path / "v"
    rc = main(["categorize", "--model", str(run / "model"), str(run / "world" / "data"), "--splits", "train",
               "--per-relation", "2", "--n-prompts", "2", "--n-samples", "2", "--out", str(out), "--backend", "vllm",
               "--tensor-parallel-size", "1", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "categorized.jsonl")]
    from knowcat.demo import world_examples

    n_rel = len({e.relation for e in world_examples(run / "world") if e.split == "train"})
    assert len(rows) == 2 * n_rel and all(r["category"] for r in rows)
    assert json.loads((out / "categorize" / "config.json").read_text())["backend"] == "vllm"
    # the same directory refuses the other backend rather than mixing samples
    rc = main(["categorize", "--model", str(run / "model"), str(run / "world" / "data"), "--splits", "train",
               "--per-relation", "2", "--n-prompts", "2", "--n-samples", "2", "--out", str(out), "--no-progress"])
    assert rc == 2
