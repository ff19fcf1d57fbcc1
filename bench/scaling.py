"""Categorization: prefix reuse on and off, throughput as the number of examples grows, peak memory.

    python bench/scaling.py --model runs/demo/model --sizes 1000,4000,16000 [--n-prompts 10 --n-samples 16]

Builds a knowledge world with enough train questions (the same relations and
templates as the demo's; the model need not have seen its facts: most are then
Unknown, the costliest category, every sample drawn), and in one run:
- prefix reuse on vs off on the first ``--prefix-n`` examples (same answers required);
- for each size, categorizes that many examples in a fresh subprocess and records
  wall time, examples/s and the subprocess's peak resident memory (ru_maxrss).
Throughput should stay flat (time linear in the number of examples). Prints JSON
and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _world(out: Path, n_per_relation: int) -> Path:
    from knowcat.world.build import WorldConfig, build_world
    from knowcat.world.relations import IN_DISTRIBUTION

    cfg = WorldConfig(seed=7, relations=IN_DISTRIBUTION, ood_relations=(), n_train=n_per_relation, n_dev=20,
                      n_test=0, objects_per_relation=1000)
    build_world(out, cfg, log=lambda *a: None)
    return out


def _child(args) -> None:
    """One size, in its own process: time and peak memory."""
    import resource

    from knowcat.demo import world_examples
    from knowcat.slick import SliCKConfig, categorize
    from probes.engine import TransformersEngine
    from probes.loading import load_model

    ex = world_examples(args.world)
    todo = [e for e in ex if e.split == "train"][:args.size]
    pool = [e for e in ex if e.split == "dev"]
    model, tok = load_model(args.model, device=args.device)
    cfg = SliCKConfig(n_prompts=args.n_prompts, n_samples=args.n_samples)
    t = time.perf_counter()
    res = categorize(TransformersEngine(model, tok), todo, pool, cfg)
    sec = time.perf_counter() - t
    cats = {}
    for r in res:
        cats[r.category] = cats.get(r.category, 0) + 1
    print(json.dumps({"size": len(todo), "seconds": sec, "examples_per_s": len(todo) / sec,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "categories": cats}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--prefix-n", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--world", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is not None:
        return _child(args)

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="knowcat_scaling_"))
    world = _world(tmp / "world", -(-max(sizes + [args.prefix_n]) // 12))

    from knowcat.demo import world_examples
    from knowcat.slick import SliCKConfig, categorize
    from probes.engine import TransformersEngine
    from probes.loading import load_model

    ex = world_examples(world)
    todo = [e for e in ex if e.split == "train"][:args.prefix_n]
    pool = [e for e in ex if e.split == "dev"]
    model, tok = load_model(args.model, device=args.device)
    cfg = SliCKConfig(n_prompts=args.n_prompts, n_samples=args.n_samples, keep_answers=True)
    out = {"device": str(model.device), "protocol": {"n_prompts": args.n_prompts, "n_samples": args.n_samples}}
    pr = {}
    for reuse in (True, False):
        t = time.perf_counter()
        res = categorize(TransformersEngine(model, tok, prefix_reuse=reuse), todo, pool, cfg)
        pr[reuse] = (time.perf_counter() - t, res)
    same = all(a.greedy_answers == b.greedy_answers and a.category == b.category
               for a, b in zip(pr[True][1], pr[False][1]))
    out["prefix_reuse"] = {"n": len(todo), "on_s": pr[True][0], "off_s": pr[False][0],
                           "speedup": pr[False][0] / pr[True][0], "same_answers_and_categories": same}
    del model
    runs = []
    for n in sizes:
        r = subprocess.run([sys.executable, __file__, "--model", args.model, "--world", str(world), "--size", str(n),
                            "--n-prompts", str(args.n_prompts), "--n-samples", str(args.n_samples),
                            "--device", args.device], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out["scaling"] = runs
    base = runs[0]["examples_per_s"]
    out["throughput_ratio_to_smallest"] = [r["examples_per_s"] / base for r in runs]
    print(json.dumps(out, indent=2))
    print(f"prefix reuse: {out['prefix_reuse']['speedup']:.2f}x faster on {len(todo)} examples "
          f"(same answers: {same}); throughput " + ", ".join(
              f"{r['size']}: {r['examples_per_s']:.1f} ex/s ({r['peak_rss_mb']:.0f} MB peak)" for r in runs)
          + " (ratio to smallest " + ", ".join(f"{x:.2f}" for x in out["throughput_ratio_to_smallest"]) + ")")


if __name__ == "__main__":
    main()
