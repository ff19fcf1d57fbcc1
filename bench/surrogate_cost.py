"""Cost of each surrogate per example against one forward + backward pass of the same model.

    python bench/surrogate_cost.py --run runs/demo --model runs/demo/model [--n 24] [--device auto]

For ``n`` train examples of a categorized run, times (one after the other, same
process, same prompts):
- one forward + backward pass of the model on the example's SliCK prompt with its
  gold answer (the unit of cost);
- surrogate (a), answer_jacobian, dense path and matrix-free path;
- surrogate (b), relation_map (subject states + ridge/LOO), per example;
- surrogate (b'), relation_jacobian (local Jacobians + solves), per example.
Prints JSON and a one-line summary of the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from knowcat.surrogate import (SurrogateConfig, _answer_jacobian, _load_examples, _prompts, _relation_jacobian,
                                   _relation_map)
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

    def surrogate(fn, c):
        def go():
            for p in tmp.glob("answer_jacobian.shards/*.jsonl"):
                p.unlink()
            fn(model, tok, todo, prompts, cats, c, tmp, quiet, False)
        return go

    res = {"device": str(model.device), "n": len(todo), "forward_backward_s": unit, "surrogates": {}}
    for name, fn, c in (("answer_jacobian_dense", _answer_jacobian, replace(cfg, matrix_free=False)),
                        ("answer_jacobian_matrix_free", _answer_jacobian, replace(cfg, matrix_free=True)),
                        ("relation_map", _relation_map, cfg),
                        ("relation_jacobian", _relation_jacobian, cfg)):
        s = timed(surrogate(fn, c))
        res["surrogates"][name] = {"seconds_per_example": s, "ratio_to_forward_backward": s / unit}
    print(json.dumps(res, indent=2))
    print("surrogate cost per example / one forward+backward: " + ", ".join(
        f"{k} {v['ratio_to_forward_backward']:.0f}x ({v['seconds_per_example'] * 1000:.0f} ms)"
        for k, v in res["surrogates"].items()) + f"; forward+backward {unit * 1000:.1f} ms on {res['device']}")


if __name__ == "__main__":
    main()
