"""Resumable categorization runs: the run's identity, its shards, the one resume rule, the final files.

The run directory's layout is :class:`knowcat.rundir.RunDir`'s. Examples are cut, in input
order, into shards of ``shard_size``; a shard is categorized whole and then written
(temporary name, then rename), so a run killed at any moment loses at most the shard in
flight, and a restart skips the finished shards (the one resume rule:
:meth:`RunDir.shard_done`). Every answer is a pure function of (model, data, protocol), so a
resumed run ends with output identical to an uninterrupted one.

**Identity by content.** ``categorize/config.json`` records what the shards depend on: the
protocol, the records' content (id, relation, question, answers, in order), the exemplar
pool's content, the model's identity (:func:`probes.loading.model_identity`: its resolved
path and a digest of its config, tokenizer and weight files), the sharding and the engine.
A rerun into the same directory with any of these changed is refused (:class:`RunMismatch`,
naming what changed). Nothing is written before the inputs are checked and the model is
loaded, so a failed attempt leaves nothing that blocks the corrected rerun.

**Concurrency.** A process computes shard ``i`` only while it holds the shard's lock
(``flock``, released when the process ends, however it ends) and only if the shard is not
finished: two runs on one directory share the shards, none computed twice.

**Executors** (:func:`run_categorize` in this process; :mod:`knowcat.ray_runner`: data-parallel
processes and Ray Data) only hand out shard indices; every one of them calls
:meth:`CategorizeRun.compute_shard`, the one place that categorizes and writes a shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knowcat.examples import QAExample
from knowcat.rundir import RunDir
from knowcat.slick import CATEGORIES, SliCKConfig, categorize


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


def content_fingerprint(examples: list[QAExample]) -> str:
    """SHA-256 of what categorization reads of each example (id, relation, question, answers), in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.relation, ex.question, list(ex.answers)], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# what a run's identity compares, and how a mismatch is named
_IDENTITY = (
    ("protocol", "protocol (SliCK settings)"),
    ("ids_sha1", "example ids or their order"),
    ("records_sha256", "records (a question, answer or relation changed for the same ids)"),
    ("exemplars_sha256", "exemplar pool (the few-shot exemplars' questions or answers)"),
    ("model_digest", "model (other weights, config or tokenizer files)"),
    ("shard_size", "shard size"),
    ("backend", "backend"),
)


def run_identity(model_name: str, examples: list[QAExample], exemplar_pool: list[QAExample], cfg: SliCKConfig,
                 shard_size: int, data_source: str | None, backend: str) -> dict:
    """The config a run records: its identity (what the shards depend on) and what later stages read."""
    from probes.loading import model_identity

    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"example ids must be unique; {dup!r} appears more than once")
    if data_source and Path(data_source).exists():
        data_source = str(Path(data_source).resolve())  # later stages read it from any working directory
    model = model_identity(model_name)
    protocol = asdict(cfg)
    if not protocol.get("chat_template"):
        protocol.pop("chat_template", None)  # the default: runs recorded before the option still match
    return {"protocol": protocol, "model": model["name"], "data": data_source, "n_examples": len(examples),
            "shard_size": shard_size, "ids_sha1": _ids_fingerprint(examples),
            "records_sha256": content_fingerprint(examples), "exemplars_sha256": content_fingerprint(exemplar_pool),
            "model_digest": model["digest"] or model["name"], "backend": backend}


def check_identity(old: dict, new: dict, where) -> None:
    """``RunMismatch`` naming every component of the identity that changed."""
    old = dict(old)
    old.setdefault("backend", "transformers")  # runs from before backends were recorded
    diff = [name for key, name in _IDENTITY if old.get(key) != new[key]]
    if diff:
        missing = [key for key, _ in _IDENTITY if key not in old]
        why = (" (the run was made by an earlier knowcat, which did not record "
               + ", ".join(missing) + ")") if missing else ""
        raise RunMismatch(f"{where} holds a categorization made with another {'; another '.join(diff)}{why}. "
                          f"To start over, delete {where} or give another --out directory")


@dataclass
class CategorizeRun:
    """One categorization run: its directory, inputs and identity (:func:`open_run`)."""

    dir: RunDir
    examples: list[QAExample]
    exemplar_pool: list[QAExample]
    cfg: SliCKConfig
    shard_size: int
    config: dict = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return (len(self.examples) + self.shard_size - 1) // self.shard_size

    def shard_examples(self, i: int) -> list[QAExample]:
        return self.examples[i * self.shard_size:(i + 1) * self.shard_size]

    def todo(self) -> list[int]:
        """The unfinished shards."""
        return [i for i in range(self.n_shards) if not self.dir.shard_done(i)]

    def commit(self) -> None:
        """Record the run's identity (after the inputs were checked and the model loaded); a run
        that another process committed meanwhile is checked again."""
        with self.dir.run_lock():
            old = self.dir.read_categorize_config()
            if old is None:
                self.dir.write_categorize_config(self.config)
            else:
                check_identity(old, self.config, self.dir.categorize_dir)

    def compute_shard(self, engine, i: int, wait: bool = True) -> bool:
        """Categorize shard ``i`` with ``engine`` and write it, unless it is finished; the one place
        that writes a shard. Holds the shard's lock meanwhile (``wait=False``: return ``False`` at
        once when another process holds it). Returns whether this call computed it."""
        with self.dir.shard_lock(i, wait=wait) as taken:
            if not taken or self.dir.shard_done(i):
                return False
            res = categorize(engine, self.shard_examples(i), self.exemplar_pool, self.cfg)
            self.dir.write_shard(i, [{"id": r.id, **r.fields()} for r in res])
            return True

    def finalize(self, fields=None, seconds: float = 0.0, log=print) -> dict:
        missing = self.todo()
        if missing:
            raise RuntimeError(f"shards {missing} were not written; rerun the same command to resume")
        return finalize(self.dir.root, self.examples, self.n_shards, fields=fields, seconds=seconds, log=log)

    def spec(self) -> dict:
        """What a worker process needs to rebuild this run (plain data: nothing is pickled)."""
        return {"run_dir": str(self.dir.root), "examples": [asdict(e) for e in self.examples],
                "exemplar_pool": [asdict(e) for e in self.exemplar_pool], "cfg": asdict(self.cfg),
                "shard_size": self.shard_size, "config": self.config}

    @classmethod
    def from_spec(cls, spec: dict) -> "CategorizeRun":
        return cls(RunDir(spec["run_dir"]), [QAExample(**e) for e in spec["examples"]],
                   [QAExample(**e) for e in spec["exemplar_pool"]], SliCKConfig(**spec["cfg"]), spec["shard_size"],
                   spec["config"])


def open_run(run_dir, model_name: str, examples: list[QAExample], exemplar_pool: list[QAExample],
             cfg: SliCKConfig, shard_size: int = 256, data_source: str | None = None,
             backend: str = "transformers") -> CategorizeRun:
    """Open a categorization run: compute its identity and check it against a run already in
    ``run_dir`` (``RunMismatch``). Writes nothing (:meth:`CategorizeRun.commit` does, once the
    model is loaded)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    rd = RunDir(run_dir)
    config = run_identity(model_name, examples, exemplar_pool, cfg, shard_size, data_source, backend)
    old = rd.read_categorize_config()
    if old is not None:
        check_identity(old, config, rd.categorize_dir)
    return CategorizeRun(rd, list(examples), list(exemplar_pool), cfg, shard_size, config)


def check_chat_template(model_name, cfg, tokenizer=None) -> None:
    """``chat_template`` needs a tokenizer that has one: refused (:class:`~knowcat.errors.UsageError`) before
    anything is written. ``tokenizer``: the one in use, else ``model_name``'s (a model that cannot be read
    is left to the model's loading to report)."""
    if not getattr(cfg, "chat_template", False):
        return
    from knowcat.errors import UsageError

    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_name))
        except (OSError, ValueError):
            return
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat-template: the tokenizer of {model_name} has no chat template (tokenizer.chat_template "
                         f"is empty): a chat template needs a chat model")


def run_categorize(model_name: str, examples: list[QAExample], exemplar_pool: list[QAExample], run_dir,
                   cfg: SliCKConfig = SliCKConfig(), shard_size: int = 256, device: str = "auto",
                   dtype: str = "auto", batch_size: int | None = None, fields=None, engine=None,
                   data_source: str | None = None, log=print, progress: bool = True, stop_after_shards=None,
                   backend: str = "transformers", backend_options: dict | None = None) -> dict:
    """Categorize ``examples`` into ``run_dir`` in this process, resuming finished shards.

    ``engine`` may be given already open (a :class:`probes.engine.Engine`); otherwise
    :func:`probes.engine.open_engine` opens ``backend`` on ``model_name`` (``backend_options`` go to
    it). ``stop_after_shards`` stops after that many new shards, as a killed run would (for tests).
    Returns the summary.
    """
    from tqdm.auto import tqdm

    check_chat_template(model_name, cfg, getattr(engine, "tokenizer", None))
    run = open_run(run_dir, model_name, examples, exemplar_pool, cfg, shard_size, data_source, backend)
    n_shards, todo = run.n_shards, run.todo()
    if len(todo) < n_shards:
        log(f"categorize: {n_shards - len(todo)}/{n_shards} shards already finished in {run.dir.shards_dir}; "
            "resuming")
    t0 = time.time()
    if todo:
        if engine is None:
            from probes.engine import open_engine

            engine = open_engine(backend, model_name, **{**dict(device=device, dtype=dtype, batch_size=batch_size,
                                                                 log=log, seed=cfg.seed), **(backend_options or {})})
        run.commit()
        log(f"categorize: {len(examples)} examples, {n_shards} shards of {shard_size}, on {engine.device}; "
            f"{cfg.n_prompts} prompts x (1 greedy + {cfg.n_samples} samples at T={cfg.temperature}), "
            f"{'exact' if cfg.exact else 'lazy'}")
        bar = tqdm(total=len(examples), initial=len(examples) - sum(len(run.shard_examples(i)) for i in todo),
                   desc="categorize", unit="ex", disable=not progress)
        n_new, deferred = 0, []
        # first every shard no other process holds, then (waiting for their locks) the rest
        for i, wait in [(i, False) for i in todo] + [(None, True)]:
            for j in ([i] if i is not None else deferred):
                if stop_after_shards is not None and n_new >= stop_after_shards:
                    bar.close()
                    log(f"categorize: stopped after {n_new} new shards")
                    return {}
                if run.compute_shard(engine, j, wait=wait):
                    n_new += 1
                elif not wait and not run.dir.shard_done(j):
                    deferred.append(j)
                    continue
                bar.update(len(run.shard_examples(j)))
        bar.close()
    else:
        run.commit()
    return run.finalize(fields=fields, seconds=time.time() - t0, log=log)


def read_shards(run_dir, n_shards: int) -> dict[str, dict]:
    return RunDir(run_dir).read_shards(n_shards)


def finalize(run_dir, examples: list[QAExample], n_shards: int, fields=None, seconds: float = 0.0, log=print) -> dict:
    """Join the shards with the input records; write JSONL, Parquet and the summary."""
    rd = RunDir(run_dir)
    res = rd.read_shards(n_shards)
    records = []
    for ex in examples:
        rec = user_record(ex, fields)
        for k, v in res[ex.id].items():
            rec[k] = list(v) if isinstance(v, tuple) else v
        records.append(rec)
    rd.write_categorized(records)
    summary = summarize(examples, res)
    summary["seconds"] = round(seconds, 1)
    rd.write_categorize_summary(summary)
    log(format_summary(summary))
    log(f"categorize: wrote {rd.categorized_jsonl} and {rd.categorized_parquet}")
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


def categorize_with(backend: str, model_name: str, examples: list[QAExample], exemplar_pool: list[QAExample],
                    run_dir, cfg: SliCKConfig = SliCKConfig(), shard_size: int = 256, device: str = "auto",
                    dtype: str = "auto", batch_size: int | None = None, fields=None, data_source: str | None = None,
                    progress: bool = True, ray_address: str | None = None, ray_workers: int = 2,
                    ray_gpus_per_worker: float = 0.0, ray_engine: str = "transformers", tensor_parallel_size: int = 1,
                    data_parallel_size: int = 1, command: dict | None = None, log=print) -> dict:
    """Categorize with the executor ``backend`` names (the one place that chooses it): ``transformers``
    or ``vllm`` in this process (:func:`run_categorize`), ``vllm`` with ``data_parallel_size`` > 1 as one
    engine process per replica, ``ray`` (or any ``ray_address``) over Ray workers running ``ray_engine``
    (:mod:`knowcat.ray_runner`). ``command``: the options the run was asked with beyond its identity
    (recorded in ``categorize/command.json`` once it finishes, for the report's rerun command)."""
    from knowcat.errors import UsageError

    check_chat_template(model_name, cfg)
    opts = {}
    if backend == "vllm" or (backend == "ray" and ray_engine == "vllm"):
        opts = {"tensor_parallel_size": tensor_parallel_size, "dtype": dtype}
    if data_parallel_size > 1 and (backend != "vllm" or ray_address):
        raise UsageError("--data-parallel-size runs several vLLM engines on this machine (--backend vllm); "
                         "with --backend ray the replicas are --ray-workers (--ray-engine vllm)")
    if backend == "vllm" and data_parallel_size > 1:
        from knowcat.ray_runner import run_categorize_data_parallel

        summary = run_categorize_data_parallel(model_name, examples, exemplar_pool, run_dir, cfg,
                                               data_parallel_size=data_parallel_size, shard_size=shard_size,
                                               engine_options=opts, fields=fields, data_source=data_source, log=log)
    elif backend == "ray" or ray_address:
        from knowcat.ray_runner import run_categorize_ray

        summary = run_categorize_ray(model_name, examples, exemplar_pool, run_dir, cfg, shard_size=shard_size,
                                     ray_address=ray_address, num_workers=ray_workers,
                                     gpus_per_worker=ray_gpus_per_worker, device=device, dtype=dtype,
                                     engine=ray_engine, engine_options=opts, fields=fields, data_source=data_source,
                                     log=log)
    else:
        summary = run_categorize(model_name, examples, exemplar_pool, run_dir, cfg, shard_size=shard_size,
                                 device=device, dtype=dtype, batch_size=batch_size, fields=fields,
                                 data_source=data_source, progress=progress, backend=backend, backend_options=opts,
                                 log=log)
    if command and summary:
        RunDir(run_dir).write_categorize_command(command)
    return summary
