"""Throughput and peak memory of the SFT path at scale on chat-format records: read, turned into
examples, annotated and written back (``load``); filtered (``filter``, streamed JSONL); and
``knowcat estimate`` on every record (``estimate``: :func:`knowcat.sft.estimate_sft`, features in
shards on disk, the classifier calibrated on ``--calibrate`` records whose SliCK labels are given
(synthetic: the bench measures cost, not agreement), every other record predicted, the annotated
file written). The estimate stage uses ``--model`` or, by default, a tiny random Llama (2 blocks of
width 64, a BPE vocabulary of 512 trained on the records) built in the temporary folder.

Each stage runs in its own process (and the parent imports no model library), so its peak RSS is its own. Prints one line per (N, stage).

    python bench/sft_scale.py --sizes 10000,100000
    python bench/sft_scale.py --sizes 10000 --stages estimate --model runs/demo/model
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


def _label(i: str) -> str:
    """A synthetic SliCK category of an example id (a hash of it)."""
    import hashlib

    return CATS[hashlib.sha1(i.encode()).digest()[0] % 4]


def stage_load(src: Path, work: Path) -> dict:
    """The path ``knowcat estimate`` takes: the turns read (records not kept), the records written back
    annotated one at a time from the file."""
    from knowcat.loaders.sft import scan_sft, write_sft_stream
    from knowcat.sft import annotated_stream

    scan = scan_sft(src, group_by="source")
    n = write_sft_stream(work / "cat.jsonl", annotated_stream(scan, scan.examples, lambda i: {"category": _label(i)},
                                                              "estimate"))
    return {"records": n, "examples": len(scan.examples)}


def stage_filter(src: Path, work: Path) -> dict:
    from knowcat.filtering import FilterConfig
    from knowcat.sft import filter_sft_file

    res = filter_sft_file(work / "cat.jsonl", work / "kept.jsonl", FilterConfig(drop=("Unknown",)), log=lambda *a: None)
    return {"kept": res["stats"]["kept"]}


def tiny_model(src: Path, out: Path) -> Path:
    """A tiny random Llama and a BPE tokenizer trained on the records' text, saved like any model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def lines():
        with open(src, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 5000:
                    break
                yield " ".join(m["content"] for m in json.loads(line)["messages"])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines(), trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def stage_estimate(src: Path, work: Path, model: str, calibrate: int) -> dict:
    from knowcat.estimate import EstimateConfig
    from knowcat.loaders.sft import iter_raw
    from knowcat.rundir import RunDir
    from knowcat.sft import estimate_sft

    # synthetic SliCK labels for every record (a hash of its id; the records' ids are the examples'), in a
    # labels file as ``knowcat estimate --labels`` takes it (indexed, not held): the calibration sample takes
    # its own
    labels = work / "labels.jsonl"
    with open(labels, "w", encoding="utf-8") as f:
        for rr in iter_raw(src):
            f.write(json.dumps({"id": rr.value["id"], "category": _label(rr.value["id"])}) + "\n")
    t0 = time.perf_counter()
    _, res = estimate_sft(model, src, work / "est", EstimateConfig(calibrate=calibrate), group_by="source",
                          labels=labels, device="auto", log=log, progress=False)
    cost = res.summary["cost"]
    return {"examples": res.summary["n"], "estimate_seconds": round(time.perf_counter() - t0, 2),
            "tokens_per_example": round(cost["estimate_tokens_per_example"], 1),
            "whole_text_tokens_per_example": round(cost["estimate_tokens_per_example_whole_texts"], 1),
            "feature_shards": len(list(RunDir(work / "est").estimate_feature_shards.dir.glob("*.npz")))}


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


def log(*a) -> None:
    """Progress on stderr (the stage's result is stdout's last line)."""
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def child(args) -> None:
    src, work = Path(args.src), Path(args.work)
    if args.stage == "tiny_model":
        tiny_model(src, work)
        print("{}")
        return
    t0 = time.perf_counter()
    if args.stage == "load":
        out = stage_load(src, work)
    elif args.stage == "filter":
        out = stage_filter(src, work)
    elif args.stage == "estimate":
        out = stage_estimate(src, work, args.model, args.calibrate)
    else:
        out = stage_features(src, work, args.model, args.features)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--stages", default="load,filter,estimate", help="comma-separated: load, filter, estimate, "
                                                                    "features (features and estimate need a model)")
    p.add_argument("--model", default=None, help="the model of the estimate and features stages (default for "
                                                 "estimate: a tiny random Llama built here)")
    p.add_argument("--features", type=int, default=2000, help="examples whose features are timed (features stage)")
    p.add_argument("--calibrate", type=int, default=2000, help="estimate: calibration records")
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
            stages = [x for x in args.stages.split(",") if x]
            model = args.model
            if model is None and "estimate" in stages:
                # built in a process of its own: a child's peak RSS starts from its parent's at fork
                model = str(Path(d) / "tiny_model")
                subprocess.run([sys.executable, __file__, "--stage", "tiny_model", "--src", str(src), "--work", model],
                               check=True, capture_output=True)
            if "filter" in stages and "load" not in stages:
                stages.insert(0, "load")  # filter reads what load writes
            for st in stages:
                if st == "features" and not args.model:
                    continue
                cmd = [sys.executable, __file__, "--stage", st, "--src", str(src), "--work", d,
                       "--features", str(args.features), "--calibrate", str(args.calibrate)] + (
                    ["--model", model] if model else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"stage {st} failed:\n{r.stderr[-3000:]}")
                out = json.loads(r.stdout.splitlines()[-1])
                rate = {"features": lambda: out["examples"] / out["features_seconds"],
                        "estimate": lambda: out["examples"] / out["estimate_seconds"]}.get(st, lambda: n / out["seconds"])()
                print(f"N={n:>7} ({size:.1f} MB)  {st:<8} {out['seconds']:>7.1f} s  {rate:>9.0f} records/s  "
                      f"peak RSS {out['peak_rss_mb']:>7.1f} MB  {json.dumps(out)}", flush=True)


if __name__ == "__main__":
    main()
