"""Resumable categorization runs.

A run directory holds::

    categorize/config.json      protocol, model, data and the ordered example ids (fingerprint)
    categorize/shards/NNNNN.jsonl   finished shards, each written atomically
    categorized.jsonl / .parquet    the input records with the SliCK fields, in input order
    categorize_summary.json         counts per relation and category, timings

Examples are cut, in input order, into shards of ``shard_size``; a shard is
categorized whole and then written (temporary name, then rename), so a run
killed at any moment loses at most the shard in flight, and a restart skips the
finished shards. Every answer is a pure function of (model, data, protocol), so
a resumed run ends with output identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from knowcat.examples import QAExample
from knowcat.io import atomic_write_json, atomic_write_text, read_json
from knowcat.slick import CATEGORIES, SliCKConfig, SliCKResult, categorize


class RunMismatch(RuntimeError):
    """The run directory holds a run made with another protocol, model or data."""


def user_record(ex: QAExample, fields=None) -> dict:
    """The example in the user's own record format: their field names, their extra fields."""
    names = {"id": "id", "relation": "relation", "question": "question", "answers": "answers",
             "subject": "subject", "split": "split"}
    if fields is not None:
        for k in names:
            v = getattr(fields, k, None)
            if v is not None:
                names[k] = v
    rec = {}
    for k, col in names.items():
        val = getattr(ex, k)
        if val is not None:
            rec[col] = val
    for k, v in ex.metadata.items():
        rec.setdefault(k, v)
    return rec


def _ids_fingerprint(examples: list[QAExample]) -> str:
    h = hashlib.sha1()
    for ex in examples:
        h.update(ex.id.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def open_run_config(cdir: Path, model_name: str, examples: list[QAExample], cfg: SliCKConfig, shard_size: int,
                    data_source: str | None, backend: str) -> dict:
    """Write ``cdir/config.json`` for a new run, or check that an existing run was made with the
    same protocol, model, examples, sharding and backend (``RunMismatch`` otherwise)."""
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"example ids must be unique; {dup!r} appears more than once")
    if data_source and Path(data_source).exists():
        data_source = str(Path(data_source).resolve())  # later stages read it from any working directory
    config = {"protocol": asdict(cfg), "model": str(model_name), "data": data_source, "n_examples": len(examples),
              "shard_size": shard_size, "ids_sha1": _ids_fingerprint(examples), "backend": backend}
    if (cdir / "config.json").exists():
        old = read_json(cdir / "config.json")
        keys = ("protocol", "model", "n_examples", "shard_size", "ids_sha1", "backend")
        old.setdefault("backend", "transformers")  # runs from before backends were recorded
        diff = [k for k in keys if old.get(k) != config[k]]
        if diff:
            raise RunMismatch(f"{cdir} holds a categorization made with another {', '.join(diff)}; "
                              f"use another run directory or delete {cdir}")
    else:
        cdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cdir / "config.json", config)
    return config


def run_categorize(model_name: str, examples: list[QAExample], exemplar_pool: list[QAExample], run_dir,
                   cfg: SliCKConfig = SliCKConfig(), shard_size: int = 256, device: str = "auto",
                   dtype: str = "auto", batch_size: int | None = None, fields=None, model=None, tokenizer=None,
                   data_source: str | None = None, log=print, progress: bool = True, stop_after_shards=None,
                   backend: str = "transformers", backend_options: dict | None = None) -> dict:
    """Categorize ``examples`` into ``run_dir``, resuming finished shards.

    ``model``/``tokenizer`` may be given already loaded; otherwise ``model_name``
    (hub id or folder) is loaded. ``backend="vllm"`` generates with vLLM instead
    (``backend_options`` go to :class:`probes.vllm_backend.VLLMEngine`). ``stop_after_shards`` stops after that many new
    shards, as a killed run would (for tests). Returns the summary.
    """
    from tqdm.auto import tqdm

    run = Path(run_dir)
    cdir = run / "categorize"
    shards_dir = cdir / "shards"
    open_run_config(cdir, model_name, examples, cfg, shard_size, data_source, backend)

    n_shards = (len(examples) + shard_size - 1) // shard_size
    done = {int(p.stem) for p in shards_dir.glob("*.jsonl")} if shards_dir.exists() else set()
    todo = [i for i in range(n_shards) if i not in done]
    if done:
        log(f"categorize: {len(done)}/{n_shards} shards already finished in {shards_dir}; resuming")
    t0 = time.time()
    if todo:
        generate_fn = None
        if backend == "vllm":
            from probes.vllm_backend import VLLMEngine

            model = model if isinstance(model, VLLMEngine) else VLLMEngine(model_name, seed=cfg.seed,
                                                                            **(backend_options or {}))
            generate_fn, tokenizer = model.generate, None
        elif backend != "transformers":
            raise ValueError(f"unknown backend {backend!r}; choose transformers or vllm")
        elif model is None:
            from probes.loading import load_model

            model, tokenizer = load_model(model_name, device=device, dtype=dtype)
        log(f"categorize: {len(examples)} examples, {n_shards} shards of {shard_size}, on {model.device}; "
            f"{cfg.n_prompts} prompts x (1 greedy + {cfg.n_samples} samples at T={cfg.temperature}), "
            f"{'exact' if cfg.exact else 'lazy'}")
        bar = tqdm(total=len(examples), initial=len(examples) - sum(
            len(examples[i * shard_size:(i + 1) * shard_size]) for i in todo),
            desc="categorize", unit="ex", disable=not progress)
        counts: Counter = Counter()
        for n_new, i in enumerate(todo):
            if stop_after_shards is not None and n_new >= stop_after_shards:
                bar.close()
                log(f"categorize: stopped after {n_new} new shards")
                return {}
            shard = examples[i * shard_size:(i + 1) * shard_size]
            res = categorize(model, tokenizer, shard, exemplar_pool, cfg, batch_size=batch_size, log=log,
                             generate_fn=generate_fn)
            counts.update(r.category for r in res)
            atomic_write_text(shards_dir / f"{i:05d}.jsonl", "".join(
                json.dumps({"id": r.id, **r.fields()}, ensure_ascii=False) + "\n" for r in res))
            bar.update(len(shard))
            bar.set_postfix({c[:4]: counts[c] for c in CATEGORIES})
        bar.close()
    return finalize(run, examples, n_shards, fields=fields, seconds=time.time() - t0, log=log)


def read_shards(run_dir, n_shards: int) -> dict[str, dict]:
    shards_dir = Path(run_dir) / "categorize" / "shards"
    out = {}
    for i in range(n_shards):
        with open(shards_dir / f"{i:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out[r.pop("id")] = r
    return out


def finalize(run_dir, examples: list[QAExample], n_shards: int, fields=None, seconds: float = 0.0, log=print) -> dict:
    """Join the shards with the input records; write JSONL, Parquet and the summary."""
    run = Path(run_dir)
    res = read_shards(run, n_shards)
    records = []
    for ex in examples:
        rec = user_record(ex, fields)
        for k, v in res[ex.id].items():
            rec[k] = list(v) if isinstance(v, tuple) else v
        records.append(rec)
    atomic_write_text(run / "categorized.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    from knowcat.filtering import write_records

    write_records(run / "categorized.parquet", records)
    summary = summarize(examples, res)
    summary["seconds"] = round(seconds, 1)
    atomic_write_json(run / "categorize_summary.json", summary)
    log(format_summary(summary))
    log(f"categorize: wrote {run / 'categorized.jsonl'} and {run / 'categorized.parquet'}")
    return summary


def summarize(examples: list[QAExample], res: dict[str, dict]) -> dict:
    per_rel: dict[str, Counter] = {}
    total: Counter = Counter()
    for ex in examples:
        c = res[ex.id]["category"]
        per_rel.setdefault(ex.relation, Counter())[c] += 1
        total[c] += 1
    n = sum(total.values())
    return {
        "n": n,
        "categories": {c: total[c] for c in CATEGORIES},
        "shares": {c: (total[c] / n if n else 0.0) for c in CATEGORIES},
        "by_relation": {r: {c: per_rel[r][c] for c in CATEGORIES} for r in sorted(per_rel)},
        "match_mode": next(iter(res.values()))["match_mode"] if res else None,
    }


def format_summary(s: dict) -> str:
    head = f"{'relation':<10}" + "".join(f"{c:>13}" for c in CATEGORIES) + f"{'total':>8}"
    lines = [head, "-" * len(head)]
    for r, cs in s["by_relation"].items():
        lines.append(f"{r:<10}" + "".join(f"{cs[c]:>13}" for c in CATEGORIES) + f"{sum(cs.values()):>8}")
    lines.append("-" * len(head))
    lines.append(f"{'all':<10}" + "".join(f"{s['categories'][c]:>13}" for c in CATEGORIES) + f"{s['n']:>8}")
    lines.append(f"{'share':<10}" + "".join(f"{s['shares'][c]:>13.1%}" for c in CATEGORIES))
    return "\n".join(lines)
