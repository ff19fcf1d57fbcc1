"""Surrogates on the quick world's model: Jacobians checked independently, dense vs
matrix-free on a real system, and the `knowcat surrogate` command end to end."""

import json

import pytest
import torch

from linear_models.lstsq import Tolerance, matrix_free_solve
from linear_models.surrogates import solve_answer_system, zero_block_operators
from probes.jacobians import (answer_jacobian, answer_operators, answer_system, capture_readout, decoder_layers,
                              layer_jacobian, margin_targets, subject_position)


@pytest.fixture(scope="module")
def model_tok(quick_model):
    model, tok = quick_model
    model.requires_grad_(False)
    return model, tok


PROMPT = "Q: Which country is Bota located in?\nA: Zanland\nQ: Where was Kel Mar born?\nA:"


def _system(model_tok, answer="Vorma Rusk"):
    model, tok = model_tok
    end = tok("\n", add_special_tokens=False)["input_ids"][-1]
    return answer_system(model, tok, PROMPT, answer, end)


def test_answer_jacobian_agrees_with_products_and_is_causal(model_tok):
    model, _ = model_tok
    sysm = _system(model_tok)
    m, d = sysm.x_gen.shape
    assert m >= 2
    J = answer_jacobian(model, sysm)
    # causal: output block t does not depend on input tokens after t
    for t in range(m):
        assert torch.count_nonzero(J[t * d:(t + 1) * d, (t + 1) * d:]) == 0
    mv, rmv = answer_operators(model, sysm)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(m * d, 3, generator=g)
    assert torch.allclose(mv(V), J @ V, atol=1e-4, rtol=1e-3)
    assert mv.state["mode"] == "jvp"  # forward mode (torch.func.jvp) works on this model: no fallback taken
    assert torch.allclose(rmv(V), J.T @ V, atol=1e-4, rtol=1e-3)
    # the double-backward fallback computes the same products; float64 arguments come back float64
    mv2, _ = answer_operators(model, sysm, mode="double_backward")
    assert torch.allclose(mv2(V), J @ V, atol=1e-4, rtol=1e-3)
    assert mv(V.double()).dtype == torch.float64 and rmv(V.double()).dtype == torch.float64
    # and with a finite difference through the model itself
    v = V[:, 0].reshape(m, d)
    eps = 1e-3 * float(sysm.x_gen.norm() / v.norm())  # a small step relative to the embeddings

    def readout(x):
        from probes.jacobians import _tail_readout

        with torch.no_grad():
            return _tail_readout(model, sysm, x[None])[0].reshape(-1)

    fd = (readout(sysm.x_gen + eps * v) - readout(sysm.x_gen - eps * v)) / (2 * eps)
    jv = J @ V[:, 0]
    assert float((fd - jv).norm() / jv.norm()) < 0.05


def test_matrix_free_on_the_model_operators(model_tok):
    """The product code's operators of A = [0; J] on a real system (m = 2 answer tokens, n = 256): with
    the sketch covering the rank the matrix-free path equals the dense one; with k < n it decides
    consistency by CGLS or the structural residual floor, never contradicting the dense path."""
    model, tok = model_tok
    sysm = _system(model_tok, answer="Vorma")
    W_U = model.get_output_embeddings().weight
    delta, mu, comp = margin_targets(sysm.readout, sysm.targets, W_U, None, margin=1.0)
    m, d = sysm.x_gen.shape
    n = m * d
    assert m == 2
    J = answer_jacobian(model, sysm)
    mv, rmv = zero_block_operators(*answer_operators(model, sysm), d)
    tol = Tolerance()
    y = torch.randn(n, generator=torch.Generator().manual_seed(0))
    consistent = torch.cat([torch.zeros(d), J @ (J.T @ y)])  # in range(A), weighted to its leading directions
    inconsistent = consistent.clone()
    inconsistent[:d] = 0.1 * consistent.norm() / d ** 0.5  # on the structurally zero rows
    for name, b in (("margin", delta.reshape(-1)), ("consistent", consistent), ("inconsistent", inconsistent)):
        feats, dense = solve_answer_system(J, b, d, tol)
        full = matrix_free_solve(mv, rmv, b, n, k=n, tol=tol)
        assert full["class"] == feats["class"] and full["rank"] == feats["rank"] and full["rank_exact"], name
        assert full["residual"] == pytest.approx(feats["residual"], rel=1e-2, abs=1e-4), name
        if name == "margin":
            continue
        few = matrix_free_solve(mv, rmv, b, n, k=8, tol=tol, residual_tol=1e-3, normal_tol=1e-3,
                                max_iter=300 if name == "consistent" else 5, residual_floor=float(b[:d].norm()))
        assert few["triplets"] == 18 < n and not few["rank_exact"] and few["decided_by"] == "residual", name
        assert few["rank"] <= feats["rank"] <= few["rank_upper"], name
        if name == "consistent":
            # n = m d unknowns <= (m + 1) d equations and rank >= 18 only: solutions exist, how many is open
            assert feats["class"] == "infinitely_many" and few["class"] == "consistent_rank_unknown"
            assert few["residual"] <= 1e-3 and few["cgls"]["iterations"] > 0
        else:
            # 5 CGLS iterations do not converge; the first block, outside range(A), decides
            assert feats["class"] == few["class"] == "no_solution" and not few["cgls"]["converged"]
            assert few["residual"] >= float(b[:d].norm() / b.norm()) * (1 - 1e-6)
    # the margin step: after adding delta every target beats its strongest competitor by the margin
    logits = (sysm.readout + delta) @ W_U.T
    t = torch.tensor(sysm.targets)
    rows = torch.arange(len(t))
    assert torch.all(logits[rows, t] - logits[rows, comp] >= 1.0 - 1e-3)
    assert torch.all(delta[mu >= 1.0] == 0)
    # a wrong first token makes the first block of b non-zero: no solution, whatever the rest
    if mu[0] < 1.0:
        assert solve_answer_system(J, delta.reshape(-1), d, tol)[0]["class"] == "no_solution"


# swept rank rtols above float32 rounding of these Jacobians (max(m, n) eps is 3e-5 to 6e-5 here): below
# it, the classes of near-null directions are rounding noise, on either path
SWEEP_AJ = (1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def quick_examples(quick_demo):
    from knowcat.surrogate import SurrogateConfig, _load_examples, _prompts

    run, _ = quick_demo
    todo, cats, pool, protocol = _load_examples(run, SurrogateConfig(max_examples=120), None)
    return todo, cats, _prompts(todo, pool, protocol, 0)


def _answer_rows(model_tok, quick_examples, out, **over):
    """Surrogate (a) through the product code (knowcat.surrogate._answer_jacobian): 2 examples per
    category, margin 0 (so the examples whose tokens all win have b = 0 and a solution)."""
    from knowcat.surrogate import SurrogateConfig, _answer_jacobian

    model, tok = model_tok
    todo, cats, prompts = quick_examples
    cfg = SurrogateConfig(max_examples=120, answer_jacobian_per_category=2, margin=0.0, rtol_sweep=SWEEP_AJ, **over)
    out.mkdir(parents=True, exist_ok=True)
    return _answer_jacobian(model, tok, todo, prompts, cats, cfg, out, lambda *a: None, False), cfg


def test_answer_jacobian_paths_chosen_by_memory_budget_agree(model_tok, quick_examples, tmp_path):
    """The path is chosen per example by --memory-budget-mb: a large budget gives the dense path, a tiny one
    the matrix-free path; with k >= n triplets the two agree on class, rank, residual and sweep; with the
    default k = 64 < n the matrix-free classes never contradict the dense ones."""
    dense, _ = _answer_rows(model_tok, quick_examples, tmp_path / "dense", memory_budget_mb=1e6)
    free, _ = _answer_rows(model_tok, quick_examples, tmp_path / "free", memory_budget_mb=1e-3,
                           matrix_free_k=10 ** 6)
    assert {r["path"] for r in dense} == {"dense"} and {r["path"] for r in free} == {"matrix_free"}
    assert [r["id"] for r in dense] == [r["id"] for r in free] and len(dense) >= 6
    classes = {r["class"] for r in dense}
    assert "no_solution" in classes and classes & {"unique", "infinitely_many"}  # both kinds occur
    for a, b in zip(dense, free):
        assert b["rank_exact"] and b["decided_by"] == "rank" and b["product"] == "jvp"
        assert (b["class"], b["rank"], b["n_unknowns"]) == (a["class"], a["rank"], a["n_unknowns"])
        assert b["residual"] == pytest.approx(a["residual"], rel=1e-3, abs=1e-5)
        assert b["sweep"] == a["sweep"] and set(a["sweep"]) == {str(t) for t in SWEEP_AJ}
    few, _ = _answer_rows(model_tok, quick_examples, tmp_path / "few", memory_budget_mb=1e-3)
    for a, b in zip(dense, few):
        assert b["path"] == "matrix_free" and b["triplets"] == 74 < b["n_unknowns"]
        assert b["class"] != "undetermined"
        assert (b["class"] == "no_solution") == (a["class"] == "no_solution")
        if b["class"] in ("unique", "infinitely_many"):
            assert b["class"] == a["class"]
        assert b["rank"] <= a["rank"] <= b["rank_upper"]


def test_mixed_dense_and_matrix_free_run(model_tok, quick_examples, tmp_path):
    """A budget between the systems' sizes: short answers dense, long ones matrix-free, in one run; the
    tests and the tolerance sweep cover every row."""
    from knowcat.surrogate import _tests, dense_fits

    rows, cfg = _answer_rows(model_tok, quick_examples, tmp_path, memory_budget_mb=1.0, matrix_free_k=8)
    assert dense_fits(128, 128, 4, 2 ** 20) and not dense_fits(256, 128, 4, 2 ** 20)
    paths = {r["path"] for r in rows}
    assert paths == {"dense", "matrix_free"}
    assert all((r["path"] == "dense") == (r["n_unknowns"] <= 128) for r in rows)
    t = _tests(rows, cfg, "answer_jacobian")
    assert t["paths"] == {p: sum(r["path"] == p for r in rows) for p in paths}
    assert set(t["sweep"]) == {str(x) for x in SWEEP_AJ} and "sweep_left_out" not in t
    for tol, s in t["sweep"].items():
        assert sum(s["class_counts"].values()) == len(rows)
        assert s["class_counts"] == {c: sum(r["sweep"][tol] == c for r in rows) for c in s["class_counts"]}
    assert sum(t["at_default"]["class_counts"].values()) == t["at_default"]["n"] == len(rows)
    # rows from an older run without a sweep entry: that tolerance is left out, and said so
    rows[0]["sweep"].pop(str(SWEEP_AJ[0]))
    t = _tests(rows, cfg, "answer_jacobian")
    assert t["sweep_left_out"] == [str(SWEEP_AJ[0])] and len(t["sweep"]) == len(SWEEP_AJ) - 1


def test_surrogates_follow_the_model_device(model_tok, quick_examples, tmp_path):
    """Every surrogate's product code run with "meta" as the default device: a tensor created without
    the model's device would be a meta tensor and fail against the CPU model's (how the matrix-free path
    used to fail on CUDA: a zero block made on the CPU, concatenated with device tensors)."""
    from dataclasses import replace

    from knowcat.surrogate import SurrogateConfig, _answer_jacobian, _relation_jacobian, _relation_map

    model, tok = model_tok
    todo, cats, prompts = quick_examples
    cfg = SurrogateConfig(answer_jacobian_per_category=1, matrix_free_k=4, matrix_free_iters=5, jacobian_examples=1)
    todo = todo[:40]
    with torch.device("meta"):
        for fn, c in ((_answer_jacobian, replace(cfg, matrix_free=True)),
                      (_answer_jacobian, replace(cfg, matrix_free=False)), (_relation_map, cfg), (_relation_jacobian, cfg)):
            out = tmp_path / f"{fn.__name__}{c.matrix_free}"
            out.mkdir()
            rows = fn(model, tok, todo, prompts, cats, c, out, lambda *a: None, False)
            assert rows and all(r["class"] in ("no_solution", "unique", "infinitely_many", "consistent_rank_unknown",
                                               "undetermined") for r in rows)


def test_layer_jacobian_matches_direct_autograd(model_tok):
    model, tok = model_tok
    pos = subject_position(tok, PROMPT, "Kel Mar")
    ids = tok(PROMPT)["input_ids"]
    assert 0 < pos < len(ids) - 1
    layer = len(decoder_layers(model)) // 2
    J = layer_jacobian(model, tok, PROMPT, pos, layer)
    # direct: the whole prompt, one copy, torch.autograd.functional.jacobian over the patched state
    blocks = decoder_layers(model)
    got = {}

    def grab(mod, a, o):
        got["h"] = (o[0] if isinstance(o, tuple) else o)[0, pos].clone()

    with torch.no_grad():
        h_ = blocks[layer].register_forward_hook(grab)
        model(input_ids=torch.tensor([ids]))
        h_.remove()

    def f(h):
        def hook(mod, a, o):
            x = o[0] if isinstance(o, tuple) else o
            x = torch.cat([x[:, :pos], h[None, None], x[:, pos + 1:]], dim=1)
            return (x, *o[1:]) if isinstance(o, tuple) else x

        hh = blocks[layer].register_forward_hook(hook)
        try:
            with capture_readout(model) as store:
                model(input_ids=torch.tensor([ids]))
        finally:
            hh.remove()
        return store[-1][0, -1]

    direct = torch.autograd.functional.jacobian(f, got["h"])
    assert torch.allclose(J, direct, atol=1e-4, rtol=1e-3)


def test_surrogate_command_on_the_quick_run(quick_demo, tmp_path):
    import shutil

    from knowcat.cli import main

    run, _ = quick_demo
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(run / "categorized.jsonl", work)
    shutil.copytree(run / "categorize", work / "categorize", ignore=shutil.ignore_patterns("shards"))
    rc = main(["surrogate", str(work), "--model", str(run / "model"), "--max-examples", "40",
               "--answer-jacobian-per-category", "4", "--no-progress"])
    assert rc == 0
    tests = json.loads((work / "surrogates" / "tests.json").read_text())
    assert set(tests) == {"answer_jacobian", "relation_map", "relation_jacobian"}
    for name, t in tests.items():
        d = t["at_default"]
        assert d["verdict"] in ("supported", "contradicted", "inconclusive")
        assert sum(d["class_counts"].values()) == d["n"] > 0
        assert len(t["sweep"]) >= 5
        rows = [json.loads(line) for line in open(work / "surrogates" / f"{name}.jsonl")]
        assert len(rows) == d["n"]
        assert all(r["class"] in ("no_solution", "unique", "infinitely_many") for r in rows)
        assert (work / "surrogates" / f"{name}.parquet").exists()
    # relation_map: the statistics of each relation's centred subject states, not placeholders
    rm = [json.loads(line) for line in open(work / "surrogates" / "relation_map.jsonl")]
    assert all(r["cond_kept"] > 1 and 1 <= r["effective_rank"] < r["rank"] <= r["n_unknowns"] for r in rm)
    assert all(r["cutoff"] > 0 for r in rm)
    assert tests["answer_jacobian"]["paths"] == {"dense": tests["answer_jacobian"]["at_default"]["n"]}
    aj = [json.loads(line) for line in open(work / "surrogates" / "answer_jacobian.jsonl")]
    cats = {}
    for r in aj:
        cats[r["category"]] = cats.get(r["category"], 0) + 1
    assert max(cats.values()) <= 4  # the stratified sample
    # Rouché–Capelli on (a): a first gold token that does not win by the margin is always "no solution"
    assert all(r["class"] == "no_solution" for r in aj if r["first_token_margin"] < 1.0)
    # resume: the answer_jacobian shards are reused
    msgs = []
    from knowcat.surrogate import SurrogateConfig, run_surrogates

    run_surrogates(work, str(run / "model"), SurrogateConfig(surrogates=("answer_jacobian",), max_examples=40,
                                                              answer_jacobian_per_category=4),
                   log=msgs.append, progress=False)
    again = [json.loads(line) for line in open(work / "surrogates" / "answer_jacobian.jsonl")]
    assert [r["id"] for r in again] == [r["id"] for r in aj] and [r["seconds"] for r in again] == [r["seconds"] for r in aj]
