"""Throughput and peak memory of the SFT path at scale: chat-format records read, turned into
examples, annotated and written back (``load``), filtered (``filter``, streamed JSONL), and
optionally the estimator's features with a model (``features``).

Each stage runs in its own process, so its peak RSS is its own. Prints one line per (N, stage).

    python bench/sft_scale.py --sizes 10000,100000
    python bench/sft_scale.py --sizes 10000 --model runs/demo/model --features 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATS = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def make(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"id": f"r{i}", "messages": [
                {"role": "system", "content": "You answer questions about the world briefly."},
                {"role": "user", "content": f"Where was person number {i} born, and in which year?"},
                {"role": "assistant", "content": f"Town {i % 997}"}], "source": f"s{i % 13}"}
            f.write(json.dumps(rec) + "\n")


def stage_load(src: Path, work: Path) -> dict:
    from knowcat.loaders.sft import load_sft
    from knowcat.sft import annotate_records, prepare, write_annotated

    ds = load_sft(src)
    examples, na = prepare(ds, group_by="source")
    res = {e.id: {"category": CATS[i % 4]} for i, e in enumerate(examples)}
    write_annotated(work / "cat.jsonl", annotate_records(ds, examples, res, "estimate", na))
    return {"records": len(ds.records)}


def stage_filter(src: Path, work: Path) -> dict:
    from knowcat.filtering import FilterConfig
    from knowcat.sft import filter_sft_file

    res = filter_sft_file(work / "cat.jsonl", work / "kept.jsonl", FilterConfig(drop=("Unknown",)), log=lambda *a: None)
    return {"kept": res["stats"]["kept"]}


def stage_features(src: Path, work: Path, model: str, n: int) -> dict:
    import torch

    from knowcat.estimate import EstimateConfig, features
    from knowcat.loaders.sft import load_sft
    from knowcat.sft import prepare
    from probes.loading import load_model

    m, tok = load_model(model, device="auto")
    examples, _ = prepare(load_sft(src), group_by="source")
    todo = examples[:n]
    t0 = time.perf_counter()
    f = features(m, tok, todo, examples, EstimateConfig())
    if m.device.type == "cuda":
        torch.cuda.synchronize()
    return {"examples": len(todo), "features_seconds": round(time.perf_counter() - t0, 2),
            "tokens_per_example": float(f.tokens.mean()), "device": str(m.device)}


def child(args) -> None:
    src, work = Path(args.src), Path(args.work)
    t0 = time.perf_counter()
    if args.stage == "load":
        out = stage_load(src, work)
    elif args.stage == "filter":
        out = stage_filter(src, work)
    else:
        out = stage_features(src, work, args.model, args.features)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--model", default=None, help="also time the estimator's features with this model")
    p.add_argument("--features", type=int, default=2000, help="examples whose features are timed")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        child(args)
        return
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "chat.jsonl"
            make(src, n)
            size = src.stat().st_size / 2 ** 20
            stages = ["load", "filter"] + (["features"] if args.model else [])
            for st in stages:
                cmd = [sys.executable, __file__, "--stage", st, "--src", str(src), "--work", d,
                       "--features", str(args.features)] + (["--model", args.model] if args.model else [])
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                rate = n / out["seconds"] if st != "features" else out["examples"] / out["features_seconds"]
                print(f"N={n:>7} ({size:.1f} MB)  {st:<8} {out['seconds']:>7.1f} s  {rate:>9.0f} records/s  "
                      f"peak RSS {out['peak_rss_mb']:>7.1f} MB  {json.dumps(out)}", flush=True)


if __name__ == "__main__":
    main()
