"""The vLLM backend, run against a faithful fake of vLLM's offline interface (``tests/fake_vllm.py``):
vLLM itself does not install on this machine (its wheels need a CUDA build of torch)."""

import json
import sys

import pytest

import fake_vllm
from knowcat.slick import SliCKConfig, categorize
from probes.engine import TransformersEngine
from probes.sampling import stream_seed


@pytest.fixture
def vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    fake_vllm.CALLS.clear()
    return fake_vllm


@pytest.fixture(scope="module")
def small(quick_split):
    from conftest import first_per_relation

    run, train, pool = quick_split
    return run, first_per_relation(train, 3), pool


CFG = SliCKConfig(n_prompts=3, n_samples=4, keep_answers=True, max_new_tokens=12)


def test_vllm_backend_matches_the_protocol(vllm, small, quick_model):
    from probes.vllm_backend import VLLMEngine, request_seed

    run, todo, pool = small
    engine = VLLMEngine(str(run / "model"), seed=CFG.seed, tensor_parallel_size=2)
    init = vllm.CALLS[0]["init"]
    assert init["enable_prefix_caching"] is True and init["tensor_parallel_size"] == 2 and init["seed"] == 0
    exact = categorize(engine, todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}))
    # greedy answers: the same as the transformers engine's (both are argmax decoding of the same model)
    model, tok = quick_model
    ref = {r.id: r for r in categorize(TransformersEngine(model, tok), todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}))}
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
    exact = categorize(engine, todo, pool, SliCKConfig(**{**CFG.__dict__, "exact": True}))
    n_sampling_exact = sum(1 for c in vllm.CALLS if "generate" in c for _, sp in c["generate"] if sp.temperature > 0)
    vllm.CALLS.clear()
    lazy = categorize(engine, todo, pool, CFG)
    n_sampling_lazy = sum(1 for c in vllm.CALLS if "generate" in c for _, sp in c["generate"] if sp.temperature > 0)
    assert [r.category for r in lazy] == [r.category for r in exact]
    assert n_sampling_lazy <= n_sampling_exact
    # reversed order, a fresh engine: the same answers (per-request seeds)
    engine2 = VLLMEngine(str(run / "model"), seed=0)
    again = {r.id: r for r in categorize(engine2, list(reversed(todo)), pool,
                                         SliCKConfig(**{**CFG.__dict__, "exact": True}))}
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


def test_fake_refuses_what_vllm_refuses(vllm, quick_demo):
    """The fake's constructor is vLLM's: keyword-only arguments, unknown engine arguments refused by
    EngineArgs, and data parallelism refused inside one process (vLLM >= 0.11.1)."""
    from probes.vllm_backend import VLLMEngine

    run, _ = quick_demo
    model = str(run / "model")
    with pytest.raises(TypeError, match="unexpected keyword argument 'data_parallel'"):
        vllm.LLM(model, data_parallel=2)
    with pytest.raises(TypeError):
        vllm.LLM(model, 0)  # seed is keyword-only
    with pytest.raises(ValueError, match=r"LLM\(data_parallel_size=2\) is not supported for single-process"):
        vllm.LLM(model, data_parallel_size=2)
    with pytest.raises(TypeError):
        vllm.SamplingParams(n=2, best_of_n=3)
    assert vllm.CALLS == []  # nothing was built
    # knowcat's engine is one replica and says how to get several
    with pytest.raises(ValueError, match="--data-parallel-size N"):
        VLLMEngine(model, data_parallel_size=2)
    VLLMEngine(model, data_parallel_size=1, max_num_seqs=8)
    assert "data_parallel_size" not in vllm.CALLS[-1]["init"] and vllm.CALLS[-1]["init"]["max_num_seqs"] == 8


def test_cli_vllm_data_parallel(vllm, quick_demo, tmp_path, monkeypatch, capsys):
    """--data-parallel-size 2: two engine processes, each on its own GPU of CUDA_VISIBLE_DEVICES, none given
    data_parallel_size (which vLLM refuses in one process), writing what one engine writes."""
    from knowcat.cli import main

    shim = tmp_path / "shim" / "vllm"  # `import vllm` in the engine processes: the fake
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("from fake_vllm import *  # noqa\nfrom fake_vllm import CALLS, LOG_ENV  # noqa\n")
    monkeypatch.syspath_prepend(str(shim.parent))  # spawned processes start with the parent's sys.path
    log = tmp_path / "engines.jsonl"
    monkeypatch.setenv(vllm.LOG_ENV, str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")

    run, _ = quick_demo
    common = ["categorize", "--model", str(run / "model"), str(run / "world" / "data"), "--splits", "train",
              "--per-relation", "2", "--n-prompts", "2", "--n-samples", "3", "--keep-answers", "--no-progress",
              "--backend", "vllm", "--shard-size", "4"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    log.unlink()
    assert main(common + ["--out", str(tmp_path / "dp"), "--data-parallel-size", "2"]) == 0
    engines = [json.loads(line) for line in open(log)]
    assert len(engines) == 2 and len({e["pid"] for e in engines}) == 2
    assert sorted(e["cuda_visible_devices"] for e in engines) == ["3", "5"]
    assert all("data_parallel_size" not in e["init"] and e["init"]["enable_prefix_caching"] is True for e in engines)
    one, dp = (open(tmp_path / d / "categorized.jsonl").read() for d in ("one", "dp"))
    assert dp == one  # the same records, answers and categories, in the same order
    assert json.loads((tmp_path / "dp" / "categorize" / "config.json").read_text())["backend"] == "vllm"
    # more replicas than GPUs is refused before anything starts; so is data parallelism on another backend
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "dp3"), "--data-parallel-size", "3"]) == 2
    assert "needs 3 GPUs; 2 visible" in capsys.readouterr().err
    assert main(common[:-4] + ["--backend", "ray", "--data-parallel-size", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--ray-workers" in capsys.readouterr().err


def test_vllm_engine_counts_the_tokens_it_asked_for(vllm, tiny_model_dir):
    """Every submitted prompt's tokens (greedy and sampling requests each) and every generated token."""
    from transformers import AutoTokenizer

    from probes.generation import PromptRequest
    from probes.vllm_backend import VLLMEngine

    engine = VLLMEngine(str(tiny_model_dir), seed=0)
    seen = []
    real = engine.llm.generate

    def spy(prompts, params, **kw):
        outs = real(prompts, params, **kw)
        seen.extend(outs)
        return outs

    engine.llm.generate = spy
    pre = "Q: Where was Kel Mar born?\nA: Vorma Rusk\n"
    reqs = [PromptRequest("a", pre, "Q: Who founded Tessa Lind?\nA:", True, (1, 2, 3)),
            PromptRequest("b", pre, "Q: What is the capital of Dorn?\nA:", True, ())]
    assert engine.forward_tokens == 0
    engine.generate([reqs], max_new_tokens=5)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompts = [len(tok(r.prefix + r.suffix)["input_ids"]) for r in reqs]
    generated = sum(len(o.token_ids) for out in seen for o in out.outputs)
    assert len(seen) == 3 and generated > 0  # a's greedy and samples are two requests, b's greedy one
    assert engine.forward_tokens == 2 * prompts[0] + prompts[1] + generated
