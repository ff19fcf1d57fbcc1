"""Surrogates on the quick world's model: Jacobians checked independently, dense vs
matrix-free on a real system, and the `knowcat surrogate` command end to end."""

import json

import pytest
import torch

from linear_models.lstsq import matrix_free_solve, svd_solve
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
    assert torch.allclose(rmv(V), J.T @ V, atol=1e-4, rtol=1e-3)
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


def test_dense_and_matrix_free_agree_on_the_model(model_tok):
    model, tok = model_tok
    sysm = _system(model_tok)
    W_U = model.get_output_embeddings().weight
    delta, mu, comp = margin_targets(sysm.readout, sysm.targets, W_U, None, margin=1.0)
    m, d = sysm.x_gen.shape
    n = m * d
    b = delta.reshape(-1)
    J = answer_jacobian(model, sysm)
    A = torch.cat([torch.zeros(d, n), J])
    dense = svd_solve(A, b)
    mv, rmv = answer_operators(model, sysm)
    mf = matrix_free_solve(lambda V: torch.cat([torch.zeros(d, V.shape[1]), mv(V)]), lambda U: rmv(U[d:]), b, n,
                           k=n)
    assert mf["residual"] == pytest.approx(float(dense["residual"]), rel=1e-2, abs=1e-4)
    assert mf["rank"] == int(dense["rank"])
    dense_cls = "no_solution" if int(dense["rank_aug"]) > int(dense["rank"]) else (
        "unique" if int(dense["rank"]) == n else "infinitely_many")
    assert mf["class"] == dense_cls
    # the margin step: after adding delta every target beats its strongest competitor by the margin
    logits = (sysm.readout + delta) @ W_U.T
    t = torch.tensor(sysm.targets)
    rows = torch.arange(len(t))
    assert torch.all(logits[rows, t] - logits[rows, comp] >= 1.0 - 1e-3)
    assert torch.all(delta[mu >= 1.0] == 0)
    # a wrong first token makes the first block of b non-zero: no solution, whatever the rest
    if mu[0] < 1.0:
        assert dense_cls == "no_solution"


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
