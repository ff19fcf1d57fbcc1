"""Categorization throughput: knowcat against a plain generate loop and lm-evaluation-harness.

One run, one model, the same prompts, the same machine. For N examples of a
knowledge world (default: the demo run's), each under the SliCK protocol
(10 prompts x (1 greedy + 16 samples at T=0.5, top-k 40)):

  (a) knowcat   ``knowcat.slick.categorize`` (lazy, and exact), a fresh engine each
  (b) plain     a loop calling ``model.generate`` once per prompt greedily, then once
                with ``num_return_sequences=16`` sampled
  (c) lm-eval   lm-evaluation-harness's hf backend (``HFLM.generate_until``), each
                sampled request replicated 16 times as ``repeats`` does

and a matmul benchmark of the machine's peak. Every forward pass of the model is
timed and counted: a pass that computes more than one token per row is *prefill*
(prompts, prefixes), one token per row is *decode*; the rest of a method's time is
*overhead* (Python, tokenization, sampling, cache copies between passes). FLOPs are
2 x (parameters of the linear layers but the LM head) x forward tokens (padding included)
+ 2 x (LM head parameters) x positions whose logits were computed; the share
of peak is given over the method's whole time and over its time in forward passes, beside what the
model's own forward reaches without a KV cache on prefill-like and decode-like shapes (an upper bound).

    python bench/categorize_throughput.py --run runs/demo --questions 100 400 [--device auto|cpu|cuda]
        [--methods knowcat_lazy knowcat_exact plain_generate lm_eval] [--profile] [--out FILE]

Prints JSON and one summary line per question count.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import Counter

import numpy as np
import torch

METHODS = ("knowcat_lazy", "knowcat_exact", "plain_generate", "lm_eval")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class ForwardMeter:
    """Wraps ``model.forward``: counts the calls and tokens (``input_ids.numel()``) and times each
    call (synchronized on CUDA), as prefill (more than one token per row) or decode (one)."""

    def __init__(self, model):
        self.model = model
        real = model.forward
        self.reset()

        @functools.wraps(real)
        def forward(*a, **k):
            ids = k.get("input_ids", a[0] if a else None)
            kind = "decode" if ids is not None and ids.dim() == 2 and ids.shape[1] == 1 else "prefill"
            _sync(model.device)
            t = time.perf_counter()
            out = real(*a, **k)
            _sync(model.device)
            self.seconds[kind] += time.perf_counter() - t
            self.calls[kind] += 1
            self.tokens[kind] += 0 if ids is None else ids.numel()
            logits = getattr(out, "logits", None)
            self.head_positions[kind] += 0 if logits is None else logits.shape[0] * logits.shape[1]
            if kind == "decode":
                self.decode_rows.append(ids.shape[0])
            return out

        model.forward = forward

    def reset(self) -> None:
        self.seconds, self.calls, self.tokens, self.head_positions = Counter(), Counter(), Counter(), Counter()
        self.decode_rows: list[int] = []  # rows of each decode call (how full the batches are)


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product per token (the linear layers, the LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


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


@torch.inference_mode()
def forward_ceiling(model, flops_of, peak, shapes=((64, 16), (256, 16), (512, 16), (256, 1), (512, 1), (2048, 1)),
                    seconds: float = 0.5) -> dict:
    """The share of the matmul peak the model's own forward reaches without a KV cache (random token
    ids, ``rows x tokens``, the last position's logits; the median of its passes over ``seconds``): what a
    method's passes could reach at best on shapes like its prefills (16 tokens a row) and decode steps (1,
    without the context a decode step attends to, so an upper bound)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    out = {}
    for rows, tokens in shapes:
        ids = torch.randint(0, vocab, (rows, tokens), device=model.device)
        kw = {"logits_to_keep": 1} if tokens > 1 else {}
        model(input_ids=ids, use_cache=False, **kw)
        _sync(model.device)
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(times) < 3:
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, **kw)
            _sync(model.device)
            times.append(time.perf_counter() - t)
        # the median pass: a pass slowed by other work on the machine does not pull the ceiling down
        out[f"{rows}x{tokens}"] = flops_of(rows * tokens, rows) / float(np.median(times)) / peak
    return out


def plain_loop(model, tok, examples, prompts, cfg):
    from knowcat.matching import is_correct
    from knowcat.slick import category_of

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
            if cfg.n_samples:
                out = model.generate(**ids, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                                     num_return_sequences=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                                     pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
                for row in out:
                    s = tok.decode(row[n:], skip_special_tokens=True).split("\n", 1)[0].strip()
                    ns += is_correct(s, ex.answers, cfg.match)
        greedy[ex.id] = answers
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


def profile_knowcat(model, tok, examples, pool, cfg, batch_size, rows: int = 25) -> dict:
    """Where the time of one categorization (``cfg``: lazy or exact) goes: torch operators by self time,
    and Python functions by own time (cProfile), both printed; the top entries returned."""
    import cProfile
    import io
    import pstats

    from knowcat.slick import categorize
    from probes.engine import TransformersEngine

    acts = [torch.profiler.ProfilerActivity.CPU]
    if model.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        categorize(TransformersEngine(model, tok, batch_size=batch_size), examples, pool, cfg)
    sort = "self_device_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), flush=True)
    ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, sort))[:rows]
    pr = cProfile.Profile()
    pr.enable()
    categorize(TransformersEngine(model, tok, batch_size=batch_size), examples, pool, cfg)
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s).sort_stats("tottime")
    st.print_stats(rows)
    print(s.getvalue(), flush=True)
    funcs = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:rows]
    return {"torch_ops_self_s": {e.key: getattr(e, sort) / 1e6 for e in ops},
            "python_functions_own_s": {f"{f[0]}:{f[1]}({f[2]})": v[2] for f, v in funcs}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a demo run directory (world/ and model/)")
    p.add_argument("--questions", type=int, nargs="+", default=[100, 400],
                   help="question counts to run (train split, a seeded random choice each); default 100 400")
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)  # older name of one --questions
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=512, help="knowcat's rows per batch")
    p.add_argument("--n-prompts", type=int, default=10, help="SliCK prompts (default: the paper's 10)")
    p.add_argument("--n-samples", type=int, default=16, help="samples per prompt (default: the paper's 16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: cuda if available, else cpu)")
    p.add_argument("--skip-lm-eval", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also profile one knowcat lazy and one exact run (torch.profiler operators and cProfile functions)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    if args.n is not None:
        args.questions = [args.n]
    methods = [m for m in args.methods if not (m == "lm_eval" and args.skip_lm_eval)]

    from knowcat.demo import world_examples
    from knowcat.prompts import exemplar_sets, prompt_for
    from knowcat.slick import SliCKConfig, categorize
    from probes.engine import TransformersEngine
    from probes.loading import load_model, resolve_device

    torch.manual_seed(0)
    ex = world_examples(f"{args.run}/world")
    pool = [e for e in ex if e.split == "dev"]
    train = [e for e in ex if e.split == "train"]
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    model, tok = load_model(f"{args.run}/model", device=device, dtype="float32")
    n_mm = matmul_params(model)
    n_head = model.get_output_embeddings().weight.numel()
    cfg = SliCKConfig(keep_answers=True, n_prompts=args.n_prompts, n_samples=args.n_samples)
    exact_cfg = SliCKConfig(**{**cfg.__dict__, "exact": True})
    sets = exemplar_sets(pool, cfg.fewshot)
    res = {"model_params": sum(p.numel() for p in model.parameters()), "matmul_params": n_mm,
           "device": str(model.device), "threads": torch.get_num_threads(),
           "protocol": {"n_prompts": cfg.n_prompts, "n_samples": cfg.n_samples}, "runs": {}}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    peak = matmul_peak(device=model.device)
    res["matmul_peak_gflops"] = peak / 1e9
    res["forward_ceiling_share_of_peak"] = forward_ceiling(
        model, lambda tokens, heads: 2 * (n_mm - n_head) * tokens + 2 * n_head * heads, peak)
    meter = ForwardMeter(model)

    # untimed warm-up, so the first timed method does not pay for thread pools, allocator and kernel selection
    categorize(TransformersEngine(model, tok, batch_size=args.batch_size), train[:8], pool, cfg)

    for nq in args.questions:
        rng = np.random.default_rng(0)
        examples = [train[i] for i in sorted(rng.choice(len(train), min(nq, len(train)), replace=False))]
        prompts = {e.id: [prompt_for(e, s) for s in sets[e.relation]] for e in examples}
        out = {"n_examples": len(examples)}

        def timed(name, fn):
            meter.reset()
            _sync(model.device)
            t = time.perf_counter()
            value = fn()
            _sync(model.device)
            dt = time.perf_counter() - t
            tokens = sum(meter.tokens.values())
            fwd_s = sum(meter.seconds.values())
            # the LM head only where logits were computed (a prefill asks for the last position's only)
            flops = 2 * (n_mm - n_head) * tokens + 2 * n_head * sum(meter.head_positions.values())
            out[name] = {
                "seconds": dt, "examples_per_s": len(examples) / dt,
                "prefill_s": meter.seconds["prefill"], "decode_s": meter.seconds["decode"],
                "overhead_s": dt - fwd_s,
                "forward_calls": dict(meter.calls), "forward_tokens": dict(meter.tokens),
                "share_of_peak": flops / dt / peak,
                "forward_share_of_peak": flops / fwd_s / peak if fwd_s else None,
                "decode_rows_mean": float(np.mean(meter.decode_rows)) if meter.decode_rows else None,
                "decode_calls_under_8_rows": int(sum(r < 8 for r in meter.decode_rows)),
            }
            o = out[name]
            print(f"[{len(examples)} questions] {name}: {dt:.1f} s ({len(examples) / dt:.2f} ex/s): prefill "
                  f"{o['prefill_s']:.1f} s, decode {o['decode_s']:.1f} s, overhead {o['overhead_s']:.1f} s; "
                  f"{tokens} forward tokens in {sum(meter.calls.values())} calls; decode calls of fewer than 8 rows "
                  f"{o['decode_calls_under_8_rows']} of {meter.calls['decode']}; "
                  f"{o['share_of_peak']:.1%} of matmul peak overall", flush=True)
            return value

        lazy = exact = None
        if "knowcat_lazy" in methods:
            lazy = timed("knowcat_lazy", lambda: categorize(TransformersEngine(model, tok, batch_size=args.batch_size),
                                                           examples, pool, cfg))
        if "knowcat_exact" in methods:
            exact = timed("knowcat_exact", lambda: categorize(TransformersEngine(model, tok, batch_size=args.batch_size),
                                                             examples, pool, exact_cfg))
        ref = lazy or exact
        k_cats = {r.id: r.category for r in ref} if ref else None
        k_greedy = {r.id: r.greedy_answers for r in ref} if ref else None
        if lazy and exact:
            out["lazy_over_exact"] = out["knowcat_lazy"]["examples_per_s"] / out["knowcat_exact"]["examples_per_s"]
            out["lazy_exact_same_categories"] = float(np.mean([a.category == b.category for a, b in zip(lazy, exact)]))
        if "plain_generate" in methods:
            pg, pc = timed("plain_generate", lambda: plain_loop(model, tok, examples, prompts, cfg))
            if ref:
                out["agreement_plain"] = _agreement(k_greedy, k_cats, pg, pc)
        if "lm_eval" in methods:
            try:
                lg, lc = timed("lm_eval", lambda: lm_eval_run(model, tok, examples, prompts, cfg, batch_size=64))
                if ref:
                    out["agreement_lm_eval"] = _agreement(k_greedy, k_cats, lg, lc)
            except ImportError as e:
                out["lm_eval"] = {"error": f"lm-eval not installed ({e}); pip install lm-eval"}
        for other in ("plain_generate", "lm_eval"):
            if lazy and "examples_per_s" in out.get(other, {}):
                out[f"lazy_speedup_vs_{other}"] = out["knowcat_lazy"]["examples_per_s"] / out[other]["examples_per_s"]
        res["runs"][str(len(examples))] = out

    if args.profile:
        rng = np.random.default_rng(0)
        nq = args.questions[0]
        examples = [train[i] for i in sorted(rng.choice(len(train), min(nq, len(train)), replace=False))]
        for name, c in (("lazy", cfg), ("exact", exact_cfg)):
            print(f"profile of knowcat {name} on {len(examples)} questions", flush=True)
            res[f"profile_knowcat_{name}"] = profile_knowcat(model, tok, examples, pool, c, args.batch_size)

    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    for nq, out in res["runs"].items():
        parts = []
        for name in METHODS:
            o = out.get(name, {})
            if "examples_per_s" in o:
                parts.append(f"{name} {o['examples_per_s']:.2f} ex/s ({o['share_of_peak']:.0%} of peak overall, "
                             f"{o['forward_share_of_peak']:.0%} in forward passes; "
                             f"prefill/decode/overhead {o['prefill_s']:.1f}/{o['decode_s']:.1f}/{o['overhead_s']:.1f} s)")
        extra = []
        if "lazy_over_exact" in out:
            extra.append(f"lazy/exact {out['lazy_over_exact']:.2f}x (categories identical: "
                         f"{out['lazy_exact_same_categories']:.0%})")
        for other in ("plain_generate", "lm_eval"):
            if f"lazy_speedup_vs_{other}" in out:
                extra.append(f"lazy vs {other} {out[f'lazy_speedup_vs_{other}']:.1f}x")
        if "agreement_plain" in out:
            extra.append(f"greedy identical to plain: {out['agreement_plain']['greedy_identical']:.1%}")
        ceil = res["forward_ceiling_share_of_peak"]
        best = max(ceil, key=ceil.get)
        print(f"SUMMARY {nq} questions on {res['device']} (matmul peak {peak / 1e9:.0f} GFLOP/s; the model's own "
              f"forward without a cache at best {ceil[best]:.0%}, {best}): " + "; ".join(parts + extra))


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
