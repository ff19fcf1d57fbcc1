"""Categorization throughput: knowcat against a plain generate loop and lm-evaluation-harness.

One run, one model, the same prompts, the same machine. For N examples of a
knowledge world (default: the demo run's), each under the SliCK protocol
(10 prompts x (1 greedy + 16 samples at T=0.5, top-k 40)):

  (a) knowcat   ``knowcat.slick.categorize`` (lazy, and exact)
  (b) plain     a loop calling ``model.generate`` once per prompt greedily, then once
                with ``num_return_sequences=16`` sampled
  (c) lm-eval   lm-evaluation-harness's hf backend (``HFLM.generate_until``), each
                sampled request replicated 16 times as ``repeats`` does

and a matmul benchmark of the machine's peak, against which the FLOPs of the
model forward passes each method ran (2 x parameters x tokens) are compared.
Prints JSON and a one-line summary (with the lazy/exact speed ratio).

    python bench/categorize_throughput.py --run runs/demo --n 60 [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch


class TokenCounter:
    """Counts tokens passed through the model's forward (FLOPs = 2 * params * tokens)."""

    def __init__(self, model):
        self.model, self.tokens, self._orig = model, 0, model.forward

        def fwd(*a, **k):
            ids = k.get("input_ids", a[0] if a else None)
            if ids is not None:
                self.tokens += ids.numel()
            return self._orig(*a, **k)

        model.forward = fwd


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(seconds: float = 3.0, n: int = 2048, device="cpu") -> float:
    """float32 matmul FLOP/s on the device (TF32 off: the models run in float32)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        n = max(n, 8192)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ b
        k += 1
        _sync(device)
    return 2 * n ** 3 * k / (time.perf_counter() - t)


def plain_loop(model, tok, examples, prompts, cfg):
    from knowcat.matching import is_correct

    greedy, cats = {}, {}
    for ex in examples:
        ng = ns = 0
        answers = []
        for pre, suf in prompts[ex.id]:
            ids = tok(pre + suf, return_tensors="pt").to(model.device)
            n = ids["input_ids"].shape[1]
            out = model.generate(**ids, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
            a = tok.decode(out[0, n:], skip_special_tokens=True).split("\n", 1)[0].strip()
            answers.append(a)
            ng += is_correct(a, ex.answers, cfg.match)
            out = model.generate(**ids, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                                 num_return_sequences=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
            for row in out:
                s = tok.decode(row[n:], skip_special_tokens=True).split("\n", 1)[0].strip()
                ns += is_correct(s, ex.answers, cfg.match)
        greedy[ex.id] = answers
        from knowcat.slick import category_of
        cats[ex.id] = category_of(ng, len(answers), ns)
    return greedy, cats


def lm_eval_run(model, tok, examples, prompts, cfg, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from knowcat.matching import is_correct
    from knowcat.slick import category_of

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=1024)
    reqs, owners = [], []
    for ex in examples:
        for j, (pre, suf) in enumerate(prompts[ex.id]):
            ctx = pre + suf
            reqs.append(Instance("generate_until", {}, (ctx, {"until": ["\n"], "do_sample": False,
                                                              "max_gen_toks": cfg.max_new_tokens}), 0))
            owners.append((ex.id, j, "g"))
            for r in range(cfg.n_samples):  # `repeats`: the same request replicated
                reqs.append(Instance("generate_until", {}, (ctx, {
                    "until": ["\n"], "do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k,
                    "max_gen_toks": cfg.max_new_tokens}), 0))
                owners.append((ex.id, j, "s"))
    outs = lm.generate_until(reqs, disable_tqdm=True)
    by = {ex.id: ex for ex in examples}
    ng, ns, greedy = Counter(), Counter(), {}
    for (eid, j, kind), text in zip(owners, outs):
        a = text.split("\n", 1)[0].strip()
        if kind == "g":
            greedy.setdefault(eid, [None] * cfg.n_prompts)[j] = a
            ng[eid] += is_correct(a, by[eid].answers, cfg.match)
        else:
            ns[eid] += is_correct(a, by[eid].answers, cfg.match)
    return greedy, {e.id: category_of(ng[e.id], cfg.n_prompts, ns[e.id]) for e in examples}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a demo run directory (world/ and model/)")
    p.add_argument("--n", type=int, default=60, help="examples (train split, spread over relations)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: cuda if available, else cpu)")
    p.add_argument("--skip-lm-eval", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)

    from knowcat.demo import world_examples
    from knowcat.prompts import exemplar_sets, prompt_for
    from knowcat.slick import SliCKConfig, categorize
    from probes.engine import TransformersEngine
    from probes.loading import load_model

    torch.manual_seed(0)
    ex = world_examples(f"{args.run}/world")
    pool = [e for e in ex if e.split == "dev"]
    train = [e for e in ex if e.split == "train"]
    rng = np.random.default_rng(0)
    examples = [train[i] for i in sorted(rng.choice(len(train), min(args.n, len(train)), replace=False))]
    from probes.loading import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    model, tok = load_model(f"{args.run}/model", device=device, dtype="float32")
    n_params = sum(p.numel() for p in model.parameters())
    cfg = SliCKConfig(keep_answers=True)
    sets = exemplar_sets(pool, cfg.fewshot)
    prompts = {e.id: [prompt_for(e, s) for s in sets[e.relation]] for e in examples}
    counter = TokenCounter(model)
    res = {"n_examples": len(examples), "model_params": n_params, "device": str(model.device),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    peak = matmul_peak(device=model.device)
    res["matmul_peak_gflops"] = peak / 1e9

    def timed(name, fn):
        counter.tokens = 0
        _sync(model.device)
        t = time.perf_counter()
        out = fn()
        _sync(model.device)
        dt = time.perf_counter() - t
        res[name] = {"seconds": dt, "examples_per_s": len(examples) / dt, "forward_tokens": counter.tokens,
                     "forward_tokens_per_s": counter.tokens / dt,
                     "share_of_peak": 2 * n_params * counter.tokens / dt / peak}
        print(f"{name}: {dt:.1f} s, {len(examples) / dt:.2f} examples/s", flush=True)
        return out

    # untimed warm-up, so the first timed method does not pay for thread pools, allocator and kernel selection
    engine = TransformersEngine(model, tok, batch_size=args.batch_size)
    categorize(engine, examples[:8], pool, cfg)
    lazy = timed("knowcat_lazy", lambda: categorize(engine, examples, pool, cfg))
    exact = timed("knowcat_exact", lambda: categorize(engine, examples, pool, SliCKConfig(keep_answers=True, exact=True)))
    gen_tokens = sum(1 for r in exact for a in (r.greedy_answers or []) + sum(r.sampled_answers or [], []))
    res["knowcat_exact"]["answers_generated"] = gen_tokens
    plain_greedy, plain_cats = timed("plain_generate", lambda: plain_loop(model, tok, examples, prompts, cfg))
    k_cats = {r.id: r.category for r in lazy}
    k_greedy = {r.id: r.greedy_answers for r in lazy}
    res["agreement_plain"] = _agreement(k_greedy, k_cats, plain_greedy, plain_cats)
    if not args.skip_lm_eval:
        try:
            le_greedy, le_cats = timed("lm_eval", lambda: lm_eval_run(model, tok, examples, prompts, cfg,
                                                                      batch_size=64))
            res["agreement_lm_eval"] = _agreement(k_greedy, k_cats, le_greedy, le_cats)
        except ImportError as e:
            res["lm_eval"] = {"error": f"lm-eval not installed ({e}); pip install lm-eval"}
    res["lazy_over_exact"] = res["knowcat_lazy"]["examples_per_s"] / res["knowcat_exact"]["examples_per_s"]
    res["lazy_exact_same_categories"] = float(np.mean([a.category == b.category for a, b in zip(lazy, exact)]))
    res["speedup_vs_plain"] = res["knowcat_lazy"]["examples_per_s"] / res["plain_generate"]["examples_per_s"]
    if "examples_per_s" in res.get("lm_eval", {}):
        res["speedup_vs_lm_eval"] = res["knowcat_lazy"]["examples_per_s"] / res["lm_eval"]["examples_per_s"]
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    le = f", {res['speedup_vs_lm_eval']:.1f}x lm-eval" if "speedup_vs_lm_eval" in res else ""
    print(f"SUMMARY on {res['device']}: knowcat lazy {res['knowcat_lazy']['examples_per_s']:.2f} ex/s = "
          f"{res['lazy_over_exact']:.1f}x knowcat exact (categories identical: "
          f"{res['lazy_exact_same_categories']:.0%}) = "
          f"{res['speedup_vs_plain']:.1f}x plain generate loop{le}; greedy answers identical to plain: "
          f"{res['agreement_plain']['greedy_identical']:.1%}; HK/MK labels agree "
          f"{res['agreement_plain']['known_labels_agree']:.1%}; forward passes at "
          f"{res['knowcat_lazy']['share_of_peak']:.1%} of matmul peak ({peak / 1e9:.0f} GFLOP/s)")


def _agreement(k_greedy, k_cats, o_greedy, o_cats):
    ids = list(k_cats)
    same_greedy = np.mean([k_greedy[i] == o_greedy[i] for i in ids])
    hk_mk = [i for i in ids if k_cats[i] in ("HighlyKnown", "MaybeKnown") or o_cats[i] in ("HighlyKnown", "MaybeKnown")]
    known_agree = np.mean([k_cats[i] == o_cats[i] for i in hk_mk]) if hk_mk else 1.0
    return {"greedy_identical": float(same_greedy), "known_labels_agree": float(known_agree),
            "categories_knowcat": dict(Counter(k_cats.values())), "categories_other": dict(Counter(o_cats.values())),
            "weakly_unknown_confusion": dict(Counter(f"knowcat {k_cats[i]} / other {o_cats[i]}" for i in ids
                                                     if k_cats[i] in ("WeaklyKnown", "Unknown")))}


if __name__ == "__main__":
    main()
