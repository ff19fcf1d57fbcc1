"""Categorization over several engines: a Ray cluster, or vLLM data-parallel replicas on one machine.

Both are executors of a :class:`knowcat.runs.CategorizeRun`: they hand its unfinished
shards to workers that each open the engine once (:func:`probes.engine.open_engine`) and
compute each shard they get with :meth:`~knowcat.runs.CategorizeRun.compute_shard`, the
same function a single-process run calls; the shard files are the checkpoint (one resume
rule, one identity check), and the output is a single-machine run's.

**Ray** (``pip install knowcat[ray]``; ``--backend ray`` or ``--ray-address``):

A Ray Data pipeline: the unfinished shards of the run (the same partition of the
examples into shards as :func:`knowcat.runs.run_categorize`) are the rows of a
dataset; ``map_batches`` sends them to a pool of actors, each loading the model
once (with the transformers engine, or vLLM with ``engine="vllm"``) and writing
every shard it finishes atomically into ``RUN/categorize/shards/``. The shard
files are the checkpoint: a restarted job, or a worker lost mid-run (its actor is
restarted and the shard retried; the shard's lock died with it), redoes only the
shards not written. Categories and answers are a
pure function of (model, data, protocol) per example, independent of batch,
worker and order, so the output equals a single-machine run's.

**vLLM data parallelism** (``--backend vllm --data-parallel-size N``,
:func:`run_categorize_data_parallel`): vLLM's offline ``LLM()`` is one replica per
process (it refuses ``data_parallel_size > 1`` in one process; its own offline example
starts a process per rank). So N processes are started, each with
``CUDA_VISIBLE_DEVICES`` set to its own ``tensor_parallel_size`` GPUs, each building
one independent engine and taking shards from a shared queue until none is left (the
fast replicas take more: no rank waits for another). A replica that dies loses only its
shard in progress: the others finish theirs, and a rerun redoes only what is missing.
"""

from __future__ import annotations

import time
import warnings

from knowcat.runs import CategorizeRun, open_run
from knowcat.slick import SliCKConfig


class _ShardWorker:
    """A worker (a Ray Data actor, or a data-parallel process): opens its engine once, then computes
    the shards it is handed with :meth:`knowcat.runs.CategorizeRun.compute_shard`."""

    def __init__(self, spec: dict, model_name: str, engine: str, engine_options: dict):
        from probes.engine import open_engine

        self.run = CategorizeRun.from_spec(spec)
        self.engine = open_engine(engine, model_name, **{"seed": self.run.cfg.seed, **(engine_options or {})})
        self.run.commit()  # the model is loaded: the run's identity may be recorded

    def run_shard(self, i: int) -> int:
        self.run.compute_shard(self.engine, i, wait=True)
        return i

    def __call__(self, batch):
        return {"shard": [self.run_shard(int(i)) for i in batch["shard"]]}


def _open(run_dir, model_name, examples, exemplar_pool, cfg, shard_size, data_source, backend, log, name):
    """Open and check the run; (the run, its unfinished shards)."""
    run = open_run(run_dir, model_name, examples, exemplar_pool, cfg, shard_size, data_source, backend)
    todo = run.todo()
    if len(todo) < run.n_shards:
        log(f"categorize ({name}): {run.n_shards - len(todo)}/{run.n_shards} shards already finished; resuming")
    return run, todo


def run_categorize_ray(model_name: str, examples, exemplar_pool, run_dir, cfg: SliCKConfig = SliCKConfig(),
                       shard_size: int = 256, ray_address: str | None = None, num_workers: int = 2,
                       cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, device: str = "auto",
                       dtype: str = "auto", engine: str = "transformers", engine_options: dict | None = None,
                       fields=None, data_source: str | None = None, log=print) -> dict:
    """Like :func:`knowcat.runs.run_categorize`, with the shards computed by Ray workers."""
    import ray
    from ray.data import ActorPoolStrategy

    run, todo = _open(run_dir, model_name, examples, exemplar_pool, cfg, shard_size, data_source, engine, log, "ray")
    t0 = time.time()
    if todo:
        started = False
        if not ray.is_initialized():
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False,
                     include_dashboard=False, **({} if ray_address else {"num_cpus": max(1, int(num_workers * cpus_per_worker))}))
            started = True
        try:
            # Ray Data's DataContext sets its own deprecated fields (``use_arrow_tensor_v2``, ``use_push_based_shuffle``,
            # ``use_polars``) whenever one is built; knowcat sets none of them: those warnings are Ray's to fix, so
            # the deprecation warnings raised inside ray.data.context are filtered here, nothing else
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
            ds = ray.data.from_items([{"shard": i} for i in todo])
            options = {"device": device, "dtype": dtype, **(engine_options or {})}
            # each worker loads the model, then records the run's identity (if no one has), then writes shards
            out = ds.map_batches(_ShardWorker, fn_constructor_args=(run.spec(), str(model_name), engine, options),
                                 batch_size=1, compute=ActorPoolStrategy(size=max(1, min(num_workers, len(todo)))),
                                 num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
            # Ray Data's actor pools restart a lost actor and retry its task by default
            n_done = 0
            for row in out.iter_rows():
                n_done += 1
                log(f"categorize (ray): shard {row['shard']} done ({n_done}/{len(todo)})")
        finally:
            if started:
                ray.shutdown()
    run.commit()
    return run.finalize(fields=fields, seconds=time.time() - t0, log=log)


# ---------------------------------------------------------------------------------------------
# vLLM data parallelism on one machine: one engine process per replica


def replica_devices(data_parallel_size: int, tensor_parallel_size: int = 1, device_ids=None) -> list[list[str]]:
    """The GPUs of each replica: ``tensor_parallel_size`` consecutive ids each, from ``device_ids``, else
    ``CUDA_VISIBLE_DEVICES``, else every GPU torch sees."""
    import os

    if device_ids is None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            device_ids = [d.strip() for d in env.split(",") if d.strip()]
        else:
            import torch

            device_ids = list(range(torch.cuda.device_count()))
    ids = [str(d) for d in device_ids]
    need = data_parallel_size * tensor_parallel_size
    if len(ids) < need:
        raise ValueError(f"data parallel size {data_parallel_size} x tensor parallel size {tensor_parallel_size} "
                         f"needs {need} GPUs; {len(ids)} visible ({','.join(ids) or 'none'})")
    return [ids[r * tensor_parallel_size:(r + 1) * tensor_parallel_size] for r in range(data_parallel_size)]


def _replica_main(rank: int, devices: list[str], worker_args: tuple, tasks, events) -> None:
    """One data-parallel replica (a spawned process): its GPUs, its engine, shards until the queue is empty."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)  # before vLLM (or torch) touches a GPU
    worker = _ShardWorker(*worker_args)
    events.put(("ready", rank, os.getpid()))
    while True:
        i = tasks.get()
        if i is None:
            break
        events.put(("start", rank, i))
        worker.run_shard(i)
        events.put(("done", rank, i))


def run_categorize_data_parallel(model_name: str, examples, exemplar_pool, run_dir,
                                 cfg: SliCKConfig = SliCKConfig(), data_parallel_size: int = 2,
                                 shard_size: int = 256, engine_options: dict | None = None, device_ids=None,
                                 fields=None, data_source: str | None = None, log=print) -> dict:
    """``knowcat categorize --backend vllm --data-parallel-size N``: N vLLM engines, one process each on its
    own ``tensor_parallel_size`` GPUs (:func:`replica_devices`), sharing the run's unfinished shards. The run
    directory is a ``--backend vllm`` run's (either resumes the other): the answers do not depend on which
    replica computed them. Returns the summary, with ``replicas``: each replica's GPUs and shards."""
    import multiprocessing as mp
    import queue as queue_mod

    opts = dict(engine_options or {})
    opts.pop("data_parallel_size", None)
    devices = replica_devices(data_parallel_size, int(opts.get("tensor_parallel_size", 1)), device_ids)
    run, todo = _open(run_dir, model_name, examples, exemplar_pool, cfg, shard_size, data_source, "vllm", log,
                      "vllm data parallel")
    t0 = time.time()
    replicas = [{"rank": r, "devices": d, "pid": None, "shards": []} for r, d in enumerate(devices)]
    if todo:
        ctx = mp.get_context("spawn")  # a fresh interpreter per replica: no CUDA state inherited
        tasks, events = ctx.Queue(), ctx.Queue()
        for i in todo:
            tasks.put(i)
        n_procs = min(data_parallel_size, len(todo))
        for _ in range(n_procs):
            tasks.put(None)
        args = (run.spec(), str(model_name), "vllm", opts)
        # not daemonic: a vLLM engine starts processes of its own (its engine core, its tensor-parallel workers)
        procs = [ctx.Process(target=_replica_main, args=(r, devices[r], args, tasks, events),
                             name=f"knowcat-vllm-dp{r}") for r in range(n_procs)]
        log(f"categorize (vllm data parallel): {len(todo)} shards over {n_procs} engines on GPUs "
            + "; ".join(",".join(d) for d in devices[:n_procs]))
        for p in procs:
            p.start()
        n_done, in_flight = 0, {}
        try:
            while True:
                try:
                    kind, rank, val = events.get(timeout=1.0)
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs):
                        break
                    continue
                if kind == "ready":
                    replicas[rank]["pid"] = val
                elif kind == "start":
                    in_flight[rank] = val
                elif kind == "done":
                    in_flight.pop(rank, None)
                    n_done += 1
                    replicas[rank]["shards"].append(val)
                    log(f"categorize (vllm data parallel): shard {val} done by engine {rank} ({n_done}/{len(todo)})")
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        missing = run.todo()
        if failed and missing:
            raise RuntimeError(f"shards {missing} were not written (engine process " + ", ".join(
                f"{r} exited with {c}" + (f" during shard {in_flight[r]}" if r in in_flight else "")
                for r, c in failed) + "); rerun the same command to resume")
    run.commit()
    summary = run.finalize(fields=fields, seconds=time.time() - t0, log=log)
    summary["replicas"] = replicas
    return summary
