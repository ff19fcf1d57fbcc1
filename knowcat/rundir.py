"""The run directory: every path of a run, and the readers and writers of its files.

A run directory (``knowcat categorize --out RUN``, ``knowcat demo --out RUN``) holds::

    categorize/config.json           the categorization's identity (protocol, model, data fingerprints)
    categorize/run.lock              held while a run checks or writes config.json
    categorize/shards/NNNNN.jsonl    finished shards (each written atomically)
    categorize/shards/NNNNN.lock     held while a process computes that shard
    categorized.jsonl / .parquet     the input records with the SliCK fields, in input order
    categorize_summary.json          counts per relation and category, timings
    greedy.jsonl, exposure_check.json   few-shot greedy evaluation (``knowcat greedy``)
    world/, model/                   a demo's world and pretrained model
    config.json, demo_summary.json   a demo's configuration and summary
    mixtures/, finetune/VARIANT/     the fine-tuning study's mixtures and runs
    analysis.json                    the study's analysis
    surrogates/                      the Ax=b surrogates' outputs
    report.html                      the report

Nothing else builds a path inside a run or parses a run's JSONL: ask :class:`RunDir`.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from knowcat.io import atomic_write_json, atomic_write_text, read_json


def read_jsonl(path) -> list[dict]:
    """Every line of a JSONL file as a dict (an absent file: no rows)."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: Iterable[dict]) -> None:
    """Write rows as JSONL, atomically (temporary name, then rename)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class RunDir:
    """The paths of one run directory and its file readers/writers."""

    def __init__(self, root):
        self.root = Path(root)

    # -- categorization ------------------------------------------------------------------
    @property
    def categorize_dir(self) -> Path:
        return self.root / "categorize"

    @property
    def categorize_config(self) -> Path:
        return self.categorize_dir / "config.json"

    @property
    def shards_dir(self) -> Path:
        return self.categorize_dir / "shards"

    def shard(self, i: int) -> Path:
        return self.shards_dir / f"{i:05d}.jsonl"

    def shard_done(self, i: int) -> bool:
        """The one resume rule: shard ``i`` is finished when its file exists (it is written atomically,
        and the run's identity, checked first, guarantees it holds this run's examples)."""
        return self.shard(i).exists()

    def write_shard(self, i: int, rows: list[dict]) -> None:
        write_jsonl(self.shard(i), rows)

    def read_shards(self, n_shards: int) -> dict[str, dict]:
        """``{example id: SliCK fields}`` over shards ``0 .. n_shards - 1``."""
        out = {}
        for i in range(n_shards):
            for r in read_jsonl(self.shard(i)):
                out[r.pop("id")] = r
        return out

    @contextmanager
    def lock(self, path: Path, wait: bool = True) -> Iterator[bool]:
        """An exclusive ``flock`` on ``path`` (created if absent); yields whether it was taken
        (``wait=False``: ``False`` when another process holds it). The lock dies with its process,
        so a killed run leaves nothing to clean up."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                taken = True
            except BlockingIOError:
                taken = False
            yield taken
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def run_lock(self, wait: bool = True):
        return self.lock(self.categorize_dir / "run.lock", wait)

    def shard_lock(self, i: int, wait: bool = True):
        return self.lock(self.shards_dir / f"{i:05d}.lock", wait)

    def read_categorize_config(self) -> dict | None:
        return read_json(self.categorize_config) if self.categorize_config.exists() else None

    def write_categorize_config(self, config: dict) -> None:
        self.categorize_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.categorize_config, config)

    @property
    def categorized_jsonl(self) -> Path:
        return self.root / "categorized.jsonl"

    @property
    def categorized_parquet(self) -> Path:
        return self.root / "categorized.parquet"

    @property
    def categorize_summary(self) -> Path:
        return self.root / "categorize_summary.json"

    def read_categorized(self) -> list[dict]:
        return read_jsonl(self.categorized_jsonl)

    def write_categorized(self, records: list[dict]) -> None:
        from knowcat.filtering import write_records

        write_jsonl(self.categorized_jsonl, records)
        write_records(self.categorized_parquet, records)

    # -- few-shot greedy evaluation --------------------------------------------------------
    @property
    def greedy_jsonl(self) -> Path:
        return self.root / "greedy.jsonl"

    @property
    def exposure_check(self) -> Path:
        return self.root / "exposure_check.json"

    # -- demo, study, surrogates, report ---------------------------------------------------
    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def demo_config(self) -> Path:
        return self.root / "config.json"

    @property
    def demo_summary(self) -> Path:
        return self.root / "demo_summary.json"

    @property
    def mixtures(self) -> Path:
        return self.root / "mixtures"

    def finetune(self, variant: str) -> Path:
        return self.root / "finetune" / variant

    @property
    def analysis(self) -> Path:
        return self.root / "analysis.json"

    @property
    def surrogates(self) -> Path:
        return self.root / "surrogates"

    @property
    def report(self) -> Path:
        return self.root / "report.html"
