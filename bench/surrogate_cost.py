"""Cost of each surrogate per example against one forward + backward pass of the same model.

    python bench/surrogate_cost.py --run runs/demo --model runs/demo/model [--n 24] [--device auto]

For ``n`` train examples of a categorized run, times (one after the other, same
process, same prompts):
- one forward + backward pass of the model on the example's SliCK prompt with its
  gold answer (the unit of cost);
- surrogate (a), answer_jacobian, dense path and matrix-free path (its rows say how each
  example was decided: from the sketch's rank bounds or by the CGLS residual test, and how
  many are consistent_rank_unknown / undetermined);
- the matrix-free path's Jacobian products, one batch of k + oversample vectors: forward
  mode (torch.func.jvp, what the path uses) against double backward (its fallback), and
  the transposed product (torch.func.vjp);
- surrogate (b), relation_map (subject states + ridge/LOO), per example;
- surrogate (b'), relation_jacobian (local Jacobians + solves), per example;
- surrogate (c), weight_update (one teacher-forced pass with hooks + a small SVD), per example;
- the trivial baseline (teacher-forced log-probability and first-token margin, batched), per example.
Prints JSON and a one-line summary of the ratios (CPU seconds when the device is the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from knowcat.surrogate import (SurrogateConfig, _answer_jacobian, _load_examples, _prompts, _relation_jacobian,
                                   _relation_map, _weight_update, baseline_scores)
    from probes.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    cfg = SurrogateConfig(max_examples=args.n, answer_jacobian_per_category=0)
    run = Path(args.run)
    todo, cats, pool, protocol = _load_examples(run, cfg, None)
    prompts = _prompts(todo, pool, protocol, cfg.prompt_index)
    model, tok = load_model(args.model, device=args.device, dtype="float32")
    model.requires_grad_(True)

    def fwd_bwd():
        for e in todo:
            ids = torch.tensor([tok(prompts[e.id] + " " + e.answers[0])["input_ids"]], device=model.device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

    def timed(fn):
        fn()  # warm-up
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(todo)

    unit = timed(fwd_bwd)
    model.requires_grad_(False)
    quiet = lambda *a: None  # noqa: E731
    tmp = run / "bench_surrogates"
    tmp.mkdir(exist_ok=True)

    mf_rows: list[dict] = []

    def surrogate(fn, c):
        def go():
            for p in tmp.glob("answer_jacobian.shards/*.jsonl"):
                p.unlink()
            rows = fn(model, tok, todo, prompts, cats, c, tmp, quiet, False)
            if fn is _answer_jacobian and c.matrix_free:
                mf_rows[:] = rows
        return go

    res = {"device": str(model.device), "n": len(todo), "forward_backward_s": unit, "surrogates": {}}
    for name, fn, c in (("answer_jacobian_dense", _answer_jacobian, replace(cfg, matrix_free=False)),
                        ("answer_jacobian_matrix_free", _answer_jacobian, replace(cfg, matrix_free=True)),
                        ("relation_map", _relation_map, cfg),
                        ("relation_jacobian", _relation_jacobian, cfg),
                        ("weight_update", _weight_update, cfg)):
        s = timed(surrogate(fn, c))
        res["surrogates"][name] = {"seconds_per_example": s, "ratio_to_forward_backward": s / unit}
    s = timed(lambda: baseline_scores(model, tok, todo, prompts))
    res["surrogates"]["baseline_scores"] = {"seconds_per_example": s, "ratio_to_forward_backward": s / unit}
    res["surrogates"]["answer_jacobian_matrix_free"]["decided_by"] = _count(mf_rows, "decided_by")
    res["surrogates"]["answer_jacobian_matrix_free"]["classes"] = _count(mf_rows, "class")
    res["products"] = products(model, tok, todo, prompts, cfg)
    print(json.dumps(res, indent=2))
    print("surrogate cost per example / one forward+backward: " + ", ".join(
        f"{k} {v['ratio_to_forward_backward']:.0f}x ({v['seconds_per_example'] * 1000:.0f} ms)"
        for k, v in res["surrogates"].items()) + f"; forward+backward {unit * 1000:.1f} ms on {res['device']}")
    pr = res["products"]
    print(f"Jacobian products, {pr['vectors_per_batch']} vectors: jvp {pr['jvp_s'] * 1000:.0f} ms, double backward "
          f"{pr['double_backward_s'] * 1000:.0f} ms, vjp {pr['vjp_s'] * 1000:.0f} ms per example")


def _count(rows, key):
    return dict(Counter(str(r.get(key)) for r in rows))


def products(model, tok, todo, prompts, cfg) -> dict:
    """Seconds per batch of p = k + oversample Jacobian products, per example, by each mode."""
    from probes.jacobians import answer_operators, answer_system
    from probes.surrogate_inputs import answer_end_token

    p = cfg.matrix_free_k + cfg.matrix_free_oversample
    tot = {"jvp": 0.0, "double_backward": 0.0, "vjp": 0.0}
    g = torch.Generator().manual_seed(0)
    for e in todo:
        sysm = answer_system(model, tok, prompts[e.id], e.answers[0], answer_end_token(tok))
        V = torch.randn(sysm.x_gen.numel(), p, generator=g).to(model.device)
        for mode in ("jvp", "double_backward"):
            mv, rmv = answer_operators(model, sysm, mode=mode)
            mv(V)  # warm-up
            t = time.perf_counter()
            mv(V)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            tot[mode] += time.perf_counter() - t
        t = time.perf_counter()
        rmv(V)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        tot["vjp"] += time.perf_counter() - t
    return {"vectors_per_batch": p, **{f"{k}_s": v / max(1, len(todo)) for k, v in tot.items()}}


if __name__ == "__main__":
    main()
