"""Categorization over a Ray cluster (``pip install knowcat[ray]``; ``--backend ray`` or ``--ray-address``).

A Ray Data pipeline: the unfinished shards of the run (the same partition of the
examples into shards as :func:`knowcat.runs.run_categorize`) are the rows of a
dataset; ``map_batches`` sends them to a pool of actors, each loading the model
once (with the transformers engine, or vLLM with ``engine="vllm"``) and writing
every shard it finishes atomically into ``RUN/categorize/shards/``. The shard
files are the checkpoint: each lists the example ids it holds, so a restarted
job, or a worker lost mid-run (its actor is restarted and the shard retried),
redoes only the examples no finished shard holds. Categories and answers are a
pure function of (model, data, protocol) per example, independent of batch,
worker and order, so the output equals a single-machine run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from knowcat.io import atomic_write_text
from knowcat.slick import SliCKConfig


class _ShardWorker:
    """A Ray Data actor: categorizes whole shards and writes them."""

    def __init__(self, model_name, examples, pool, cfg_dict, shards_dir, shard_size, device, dtype, engine,
                 engine_options, fail_once_marker=None):
        from knowcat.examples import QAExample

        self.examples = [QAExample(**e) for e in examples]
        self.pool = [QAExample(**e) for e in pool]
        self.cfg = SliCKConfig(**cfg_dict)
        self.shards_dir = Path(shards_dir)
        self.shard_size = shard_size
        self.fail_once_marker = fail_once_marker
        self.generate_fn = None
        if engine == "vllm":
            from probes.vllm_backend import VLLMEngine

            self.model = VLLMEngine(model_name, seed=self.cfg.seed, **(engine_options or {}))
            self.tok, self.generate_fn = None, self.model.generate
        else:
            from probes.loading import load_model

            self.model, self.tok = load_model(model_name, device=device, dtype=dtype)

    def __call__(self, batch):
        import os

        from knowcat.slick import categorize

        done = []
        for i in batch["shard"].tolist():
            shard = self.examples[i * self.shard_size:(i + 1) * self.shard_size]
            res = categorize(self.model, self.tok, shard, self.pool, self.cfg, generate_fn=self.generate_fn)
            if self.fail_once_marker and not Path(self.fail_once_marker).exists():
                Path(self.fail_once_marker).write_text(str(os.getpid()))  # tests: a worker dies mid-run, once
                os._exit(1)
            atomic_write_text(self.shards_dir / f"{i:05d}.jsonl", "".join(
                json.dumps({"id": r.id, **r.fields()}, ensure_ascii=False) + "\n" for r in res))
            done.append(i)
        return {"shard": done}


def run_categorize_ray(model_name: str, examples, exemplar_pool, run_dir, cfg: SliCKConfig = SliCKConfig(),
                       shard_size: int = 256, ray_address: str | None = None, num_workers: int = 2,
                       cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, device: str = "auto",
                       dtype: str = "auto", engine: str = "transformers", engine_options: dict | None = None,
                       fields=None, data_source: str | None = None, log=print, _fail_once_marker=None) -> dict:
    """Like :func:`knowcat.runs.run_categorize`, with the shards computed by Ray workers."""
    import ray

    from knowcat.runs import finalize, open_run_config

    run = Path(run_dir)
    cdir = run / "categorize"
    shards_dir = cdir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    open_run_config(cdir, model_name, examples, cfg, shard_size, data_source, engine)
    n_shards = (len(examples) + shard_size - 1) // shard_size
    # the checkpoint: example ids already held by finished shards
    finished = set()
    for p in shards_dir.glob("*.jsonl"):
        finished.update(json.loads(line)["id"] for line in open(p, encoding="utf-8"))
    todo = [i for i in range(n_shards)
            if any(e.id not in finished for e in examples[i * shard_size:(i + 1) * shard_size])]
    if len(todo) < n_shards:
        log(f"categorize (ray): {n_shards - len(todo)}/{n_shards} shards already finished; resuming")
    t0 = time.time()
    if todo:
        started = False
        if not ray.is_initialized():
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False,
                     include_dashboard=False, **({} if ray_address else {"num_cpus": max(1, int(num_workers * cpus_per_worker))}))
            started = True
        try:
            ds = ray.data.from_items([{"shard": i} for i in todo])
            args = (str(model_name), [asdict(e) for e in examples], [asdict(e) for e in exemplar_pool], asdict(cfg),
                    str(shards_dir), shard_size, device, dtype, engine, engine_options, _fail_once_marker)
            out = ds.map_batches(_ShardWorker, fn_constructor_args=args, batch_size=1, compute=None,
                                 concurrency=max(1, min(num_workers, len(todo))), num_cpus=cpus_per_worker,
                                 num_gpus=gpus_per_worker or None,
                                 ray_remote_args_fn=None, max_restarts=-1, max_task_retries=-1)
            n_done = 0
            for row in out.iter_rows():
                n_done += 1
                log(f"categorize (ray): shard {row['shard']} done ({n_done}/{len(todo)})")
        finally:
            if started:
                ray.shutdown()
    missing = [i for i in range(n_shards) if not (shards_dir / f"{i:05d}.jsonl").exists()]
    if missing:
        raise RuntimeError(f"shards {missing} were not written; rerun to resume")
    return finalize(run, examples, n_shards, fields=fields, seconds=time.time() - t0, log=log)
