"""Surrogates on the quick world's model: Jacobians checked independently, dense vs
matrix-free on a real system, and the `knowcat surrogate` command end to end."""

import json

import pytest
import torch

from linear_models.lstsq import Tolerance, matrix_free_solve
from linear_models.surrogates import solve_answer_system
from probes.jacobians import (answer_jacobian, answer_operators, answer_system, capture_readout, decoder_layers,
                              final_norm, layer_jacobian, prenorm_margin_targets, subject_position)


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
    """The product code's operators of the square pre-norm system on a real example (m = 2 answer tokens,
    n = 256): with the sketch covering the rank the matrix-free path equals the dense one; with k < n a
    consistent right-hand side is never called inconsistent."""
    model, tok = model_tok
    sysm = _system(model_tok, answer="Vorma")
    delta, mu, comp, v = prenorm_margin_targets(model, sysm.prenorm, sysm.targets, margin=1.0)
    m, d = sysm.x_gen.shape
    n = m * d
    assert m == 2
    J = answer_jacobian(model, sysm)
    mv, rmv = answer_operators(model, sysm)
    tol = Tolerance()
    y = torch.randn(n, generator=torch.Generator().manual_seed(0))
    consistent = J @ (J.T @ y)  # in range(J), weighted to its leading directions
    for name, b in (("margin", delta[1:].reshape(-1)), ("consistent", consistent)):
        feats, dense = solve_answer_system(J, b, tol)
        full = matrix_free_solve(mv, rmv, b, n, k=n, tol=tol)
        assert full["class"] == feats["class"] and full["rank"] == feats["rank"] and full["rank_exact"], name
        assert full["residual"] == pytest.approx(feats["residual"], rel=1e-2, abs=1e-4), name
    few = matrix_free_solve(mv, rmv, consistent, n, k=8, tol=tol, residual_tol=1e-3, normal_tol=1e-3, max_iter=300)
    assert few["triplets"] == 18 < n and not few["rank_exact"] and few["class"] != "no_solution"


def test_prenorm_margin_step_and_the_norms_null_direction(model_tok):
    """b is built in pre-norm coordinates: v = J_norm^T (w_y - w_c) is orthogonal to r (RMSNorm ignores
    scaling), the step moves each margin by exactly what it lacks to first order, and the pre-norm system
    has no null direction from the norm while the post-norm one has one per answer block."""
    model, tok = model_tok
    sysm = _system(model_tok)
    m, d = sysm.x_gen.shape
    delta, mu, comp, v = prenorm_margin_targets(model, sysm.prenorm, sysm.targets, margin=1.0)
    r = sysm.prenorm
    cos = (v * r).sum(-1).abs() / (v.norm(dim=-1) * r.norm(dim=-1))
    assert float(cos.max()) < 1e-4
    assert torch.allclose((v * delta).sum(-1), torch.clamp(1.0 - mu, min=0), atol=1e-4)
    # the margins recomputed through the model's own norm and head agree with mu
    W_U = model.get_output_embeddings().weight
    logits = final_norm(model)(r) @ W_U.T
    t = torch.tensor(sysm.targets)
    assert torch.allclose(logits[torch.arange(m + 1), t] - logits[torch.arange(m + 1), comp], mu, atol=1e-4)
    # first order: a small step along delta moves the margin by (step) * need
    eps = 1e-3
    moved = final_norm(model)(r + eps * delta) @ W_U.T
    dmu = (moved[torch.arange(m + 1), t] - moved[torch.arange(m + 1), comp] - mu) / eps
    assert torch.allclose(dmu, torch.clamp(1.0 - mu, min=0), atol=2e-2, rtol=2e-2)
    # the norm's null direction r_t / g: in the left null space of the post-norm Jacobian, not of the pre-norm one
    J = answer_jacobian(model, sysm)
    norm = final_norm(model)
    post = torch.block_diag(*[torch.func.jacrev(norm)(r[t + 1]) for t in range(m)]) @ J
    for t in range(m):
        u = torch.zeros(m * d)
        u[t * d:(t + 1) * d] = r[t + 1] / norm.weight
        u = u / u.norm()
        assert float((post.T @ u).norm() / post.norm()) < 1e-5  # annihilated: rank <= m (d - 1) after the norm
        assert float((J.T @ u).norm() / J.norm()) > 1e-3  # not before it


def test_weight_update_gradients_match_a_real_weight_change(model_tok):
    """Surrogate (c)'s rows g_t . theta equal the margins' change when W_down really moves by
    eps sum_j theta_j u_j v_j^T (central finite difference through the model)."""
    from probes.jacobians import down_projection, down_projection_basis, margin_gradients

    model, tok = model_tok
    end = tok("\n", add_special_tokens=False)["input_ids"][-1]
    U, V = down_projection_basis(model, 4)
    g = margin_gradients(model, tok, PROMPT, "Vorma Rusk", end, U, V, margin=1.0)
    assert g["G"].shape == (g["answer_tokens"] + 1, 4)
    theta = torch.tensor([1.0, -0.5, 0.25, 2.0])
    mod, W = down_projection(model)
    dW = (U * theta) @ V.T
    eps = 1e-3 * float(W.norm() / dW.norm())
    mus = []
    for sign in (1, -1):
        with torch.no_grad():
            mod.weight += sign * eps * dW
        try:
            mus.append(margin_gradients(model, tok, PROMPT, "Vorma Rusk", end, U, V, margin=1.0)["mu"])
        finally:
            with torch.no_grad():
                mod.weight -= sign * eps * dW
    fd = (mus[0] - mus[1]) / (2 * eps)
    lin = g["G"] @ theta
    assert float((fd - lin).norm() / lin.norm()) < 0.05
    # first_only: the first answer position's row alone, the same numbers
    first = margin_gradients(model, tok, PROMPT, "Vorma Rusk", end, U, V, margin=1.0, first_only=True)
    assert torch.allclose(first["G"][0], g["G"][0], atol=1e-5)


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
    assert all(r["class"] in r["reachable"] and r["n_equations"] == r["n_unknowns"] for r in dense)
    for a, b in zip(dense, free):
        assert b["rank_exact"] and b["decided_by"] == "rank" and b["product"] == "jvp"
        assert (b["class"], b["rank"], b["n_unknowns"]) == (a["class"], a["rank"], a["n_unknowns"])
        # residuals at float32's noise floor (about 1e-4 relative on these systems) differ with the thread count's
        # summation order (7.97e-5 against 6.55e-5 on 2 threads); a tenth of the matrix-free residual tolerance
        # (1e-3), far below any decision, is the agreement that means something
        assert b["residual"] == pytest.approx(a["residual"], rel=1e-3, abs=1e-4)
        assert b["sweep"] == a["sweep"] and set(a["sweep"]) == {str(t) for t in SWEEP_AJ}
    few, _ = _answer_rows(model_tok, quick_examples, tmp_path / "few", memory_budget_mb=1e-3)
    for a, b in zip(dense, few):
        assert b["path"] == "matrix_free" and b["triplets"] == min(74, b["n_unknowns"])
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
        assert set(s["arms"]) == {"no_solution", "unique", "infinitely_many"}
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

    from knowcat.surrogate import SurrogateConfig, _answer_jacobian, _relation_jacobian, _relation_map, _weight_update

    model, tok = model_tok
    todo, cats, prompts = quick_examples
    cfg = SurrogateConfig(answer_jacobian_per_category=1, matrix_free_k=4, matrix_free_iters=5, jacobian_examples=1)
    todo = todo[:40]
    with torch.device("meta"):
        for fn, c in ((_answer_jacobian, replace(cfg, matrix_free=True)),
                      (_answer_jacobian, replace(cfg, matrix_free=False)), (_relation_map, cfg), (_relation_jacobian, cfg),
                      (_weight_update, cfg)):
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
    shutil.copytree(run / "finetune", work / "finetune", ignore=shutil.ignore_patterns("checkpoints"))
    rc = main(["surrogate", str(work), "--model", str(run / "model"), "--max-examples", "40",
               "--answer-jacobian-per-category", "4", "--no-progress"])
    assert rc == 0
    tests = json.loads((work / "surrogates" / "tests.json").read_text())
    assert set(tests) == {"answer_jacobian", "relation_map", "relation_jacobian", "weight_update"}
    for name, t in tests.items():
        d = t["at_default"]
        assert d["verdict"] in ("supported", "contradicted", "inconclusive")
        for arm, a in d["arms"].items():
            assert a["verdict"] in ("supported", "contradicted", "inconclusive", "untestable", "not_beyond_baseline")
            if a["verdict"] == "supported":  # only with a test that ran and information beyond the baseline
                assert a["p_holm"] < d["alpha"] and d["incremental_validity"]["adds_information"]
            if t["reachable"]["examples_that_can_reach"][arm] == 0:
                assert a["verdict"] == "untestable"
        assert "p" in d["incremental_validity"] or "error" in d["incremental_validity"]
        assert t["fit_epoch_link"] is not None and t["fit_epoch_link"]["n"] > 0
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
    # (a): the forced first block is reported apart, the class is the square system's and one it can reach
    assert all(r["first_token_greedy"] == (r["first_token_margin"] > 0) and r["class"] in r["reachable"]
               and r["n_equations"] == r["n_unknowns"] == r["answer_tokens"] * 128 for r in aj)
    base = [json.loads(line) for line in open(work / "surrogates" / "baseline.jsonl")]
    assert {b["id"] for b in base} >= {r["id"] for r in aj}
    # the baseline's first-token margin is the forced block's margin (same prompt, same answer tokens)
    bm = {b["id"]: b["first_token_margin"] for b in base}
    assert all(abs(bm[r["id"]] - r["first_token_margin"]) < 1e-3 for r in aj)
    # resume: the answer_jacobian shards are reused
    msgs = []
    from knowcat.surrogate import SurrogateConfig, run_surrogates

    run_surrogates(work, str(run / "model"), SurrogateConfig(surrogates=("answer_jacobian",), max_examples=40,
                                                              answer_jacobian_per_category=4),
                   log=msgs.append, progress=False)
    again = [json.loads(line) for line in open(work / "surrogates" / "answer_jacobian.jsonl")]
    assert [r["id"] for r in again] == [r["id"] for r in aj] and [r["seconds"] for r in again] == [r["seconds"] for r in aj]
