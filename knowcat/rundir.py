"""The run directory: every path of a run, and the readers and writers of its files.

A run directory (``knowcat categorize --out RUN``, ``knowcat demo --out RUN``) holds::

    categorize/config.json           the categorization's identity (protocol, model, data fingerprints)
    categorize/run.lock              held while a run checks or writes config.json
    categorize/shards/NNNNN.jsonl    finished shards (each written atomically)
    categorize/shards/NNNNN.lock     held while a process computes that shard
    categorized.jsonl / .parquet     the input records with the SliCK fields, in input order
    categorize_summary.json          counts per relation and category, timings
    greedy.jsonl, exposure_check.json   few-shot greedy evaluation (``knowcat greedy``), the demo's check
    world/, model/                   a demo's world (:class:`WorldDir`) and pretrained model
    config.json, demo_summary.json   a demo's configuration and summary
    mixtures/                        the fine-tuning study's training sets (:class:`MixturesDir`)
    finetune/VARIANT/                one fine-tuning run per set (:class:`FinetuneDir`);
    replicates/rep_NN/finetune/      the same for fine-tuning seed + NN
    analysis.json                    the study's analysis
    surrogates/                      the Ax=b surrogates' outputs (:class:`SurrogatesDir`)
    report.html                      the report

Nothing else builds a path inside a run or parses a run's JSONL: ask :class:`RunDir` (or, for a
folder that can also stand alone, :class:`MixturesDir`, :class:`FinetuneDir`, :class:`WorldDir`).
Every file is written atomically (temporary name, then rename); numbered shards are written by
:class:`Shards` only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from knowcat.io import atomic_write_json, atomic_write_text, read_json


# what each command that takes a model writes inside its output folder (``None``: the whole folder is the
# command's): :func:`knowcat.paths.check_output_separate` refuses a model folder among them, in any nesting
WRITES = {
    "categorize": ("categorize", "categorized.jsonl", "categorized.parquet", "categorize_summary.json",
                   "rejects.jsonl"),
    "greedy": ("greedy.jsonl", "exposure_check.json", "rejects.jsonl"),
    "finetune": None,
    "experiment": ("mixtures", "finetune", "replicates", "analysis.json", "rejects.jsonl"),
    "surrogate": ("surrogates",),
}


def read_jsonl(path, missing_ok: bool = True) -> list[dict]:
    """Every line of a JSONL file as a dict (an absent file: no rows, or ``FileNotFoundError`` when
    not ``missing_ok``)."""
    p = Path(path)
    if missing_ok and not p.exists():
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: Iterable[dict], ensure_ascii: bool = False) -> None:
    """Write rows as JSONL, atomically (temporary name, then rename)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows))


def _read_json_or_none(path: Path):
    return read_json(path) if path.exists() else None


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
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


class Shards:
    """A folder of numbered shards, each written whole and atomically: the one writer of shards. A shard
    is finished when its file exists (the one resume rule). JSONL rows (``NNNNN.jsonl``: :meth:`write`,
    :meth:`read`) or, with ``suffix=".npz"``, named arrays (:meth:`write_arrays`, :meth:`read_arrays`,
    read without pickle)."""

    def __init__(self, folder, ensure_ascii: bool = False, suffix: str = ".jsonl"):
        self.dir = Path(folder)
        self.ensure_ascii = ensure_ascii
        self.suffix = suffix

    def path(self, i: int) -> Path:
        return self.dir / f"{i:05d}{self.suffix}"

    def done(self, i: int) -> bool:
        return self.path(i).exists()

    def write(self, i: int, rows: list[dict]) -> None:
        write_jsonl(self.path(i), rows, self.ensure_ascii)

    def read(self, i: int) -> list[dict]:
        return read_jsonl(self.path(i))

    def write_arrays(self, i: int, **arrays) -> None:
        """Shard ``i`` as an ``.npz`` of ``arrays`` (numeric or text, never objects), atomically."""
        import io

        import numpy as np

        from knowcat.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.path(i), buf.getvalue())

    def read_arrays(self, i: int, names=None) -> dict:
        """Shard ``i``'s arrays (``names``: only those), read without pickle."""
        import numpy as np

        with np.load(self.path(i), allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if names is None else names)}

    def lock(self, i: int, wait: bool = True):
        return file_lock(self.dir / f"{i:05d}.lock", wait)

    def reset_unless_key(self, key: str) -> None:
        """Record ``key`` (what the shards depend on) in the folder's ``config.json``; shards written
        under another key are removed first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "config.json"
        if cfg.exists() and cfg.read_text() != key:
            for p in self.dir.glob(f"*{self.suffix}"):
                p.unlink()
        atomic_write_text(cfg, key)


class WorldDir:
    """A knowledge world's folder (``knowcat world build OUT``, or a demo's ``RUN/world``)."""

    def __init__(self, folder):
        self.root = Path(folder)

    @property
    def summary(self) -> Path:
        return self.root / "world.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.jsonl"

    @property
    def exposures(self) -> Path:
        return self.root / "exposures.jsonl"

    @property
    def model(self) -> Path:
        """The pretrained model's default folder (``knowcat world pretrain WORLD``)."""
        return self.root / "model"

    @property
    def pretrain_checkpoint(self) -> Path:
        return self.root / "pretrain_checkpoint"

    def read_summary(self) -> dict | None:
        return _read_json_or_none(self.summary)

    def read_corpus(self) -> list[str]:
        return [d["text"] for d in read_jsonl(self.corpus, missing_ok=False)]

    def read_exposures(self, missing_ok: bool = True) -> list[dict]:
        return read_jsonl(self.exposures, missing_ok)


class MixturesDir:
    """The fine-tuning study's training sets (``RUN/mixtures``, or ``knowcat mixtures --out``):
    one prompt/completion JSONL per set and ``manifest.json``."""

    def __init__(self, folder):
        self.root = Path(folder)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def set_path(self, name: str) -> Path:
        return self.root / f"{name}.jsonl"

    def read_manifest(self) -> dict | None:
        return _read_json_or_none(self.manifest)

    def write(self, sets: dict) -> Path:
        """Every set (``{name: rows}``, ``_manifest``: the manifest) and the manifest."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name, rows in sets.items():
            if not name.startswith("_"):
                write_jsonl(self.set_path(name), rows)
        atomic_write_json(self.manifest, sets["_manifest"])
        return self.root


class FinetuneDir:
    """One fine-tuning run (``RUN/finetune/VARIANT``, or ``knowcat finetune --out``)::

        config.json                     what the run was started with
        epochs/epoch_NNN.json           the measurements after each epoch
        epochs/epoch_NNN.answers.jsonl  the answers they were made from
        checkpoints/                    the trainer's checkpoints while it runs
        model/                          the final model (or adapter)
        metrics.json                    every epoch, EARLY_STOP and CONVERGENCE, once complete
    """

    def __init__(self, folder):
        self.root = Path(folder)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def epochs_dir(self) -> Path:
        return self.root / "epochs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def epoch(self, e: int) -> Path:
        return self.epochs_dir / f"epoch_{e:03d}.json"

    def answers(self, e: int) -> Path:
        return self.epochs_dir / f"epoch_{e:03d}.answers.jsonl"

    def read_config(self) -> dict | None:
        return _read_json_or_none(self.config)

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    def read_metrics(self) -> dict | None:
        return _read_json_or_none(self.metrics)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics, metrics)

    def complete(self) -> bool:
        m = self.read_metrics()
        return bool(m and m.get("complete"))

    def read_epochs(self) -> list[dict]:
        """Every measured epoch, in order."""
        d = self.epochs_dir
        return [json.loads(p.read_text()) for p in sorted(d.glob("epoch_[0-9][0-9][0-9].json"))] if d.exists() else []

    def count_epochs(self) -> int:
        return sum(1 for _ in self.epochs_dir.glob("epoch_[0-9][0-9][0-9].json"))

    def epochs_with_answers(self) -> list[int]:
        """The epochs whose answers were recorded, in order."""
        return sorted(int(p.name[6:9]) for p in self.epochs_dir.glob("epoch_[0-9][0-9][0-9].answers.jsonl"))

    def write_epoch(self, e: int, metrics: dict, answers: list[dict]) -> None:
        """The answers first, then the measurements (an epoch is measured once its .json exists)."""
        write_jsonl(self.answers(e), answers)
        atomic_write_json(self.epoch(e), metrics)

    def read_answers(self, e: int, missing_ok: bool = False) -> list[dict]:
        return read_jsonl(self.answers(e), missing_ok)

    def copy_to(self, dst: "FinetuneDir", **config_changes) -> None:
        """Copy this finished run (measurements, answers and any saved model; not checkpoints) to
        ``dst``, its config.json updated with ``config_changes``. Atomic: ``dst`` appears whole or
        not at all."""
        tmp = FinetuneDir(dst.root.with_name(f".{dst.root.name}.reuse"))
        shutil.rmtree(tmp.root, ignore_errors=True)
        shutil.copytree(self.root, tmp.root, ignore=shutil.ignore_patterns(self.checkpoints.name))
        tmp.write_config({**tmp.read_config(), **config_changes})
        shutil.rmtree(dst.root, ignore_errors=True)
        os.replace(tmp.root, dst.root)


class FilterDir:
    """An SFT filtering run (``RUN/filter`` in the demo): the split written as SFT files (``sft/``), the
    estimator's run (``estimate/``), the filter's output (``kept.jsonl``, ``kept.rejects.jsonl``,
    ``kept.stats.json``) and ``filter_summary.json``, which the report reads."""

    def __init__(self, folder):
        self.root = Path(folder)

    def sft_file(self, split: str, kind: str) -> Path:
        """``kind``: "chat" or "alpaca"."""
        return self.root / "sft" / f"{split}.{kind}.jsonl"

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def estimate(self) -> "RunDir":
        return RunDir(self.root / "estimate")

    @property
    def kept(self) -> Path:
        return self.root / "kept.jsonl"

    @property
    def kept_stats(self) -> Path:
        return self.root / "kept.stats.json"

    @property
    def kept_rejects(self) -> Path:
        return self.root / "kept.rejects.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "filter_summary.json"

    def read_stats(self) -> dict:
        return read_json(self.kept_stats)

    def read_rejects(self) -> list[dict]:
        return read_jsonl(self.kept_rejects)

    def read_summary(self) -> dict | None:
        return _read_json_or_none(self.summary)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary, summary)


class SurrogatesDir:
    """The Ax=b surrogates' outputs (``RUN/surrogates``): ``config.json``, ``baseline.jsonl``, one
    ``NAME.jsonl`` / ``NAME.parquet`` of rows per surrogate (``NAME.shards/`` while it runs),
    ``tests.json`` and ``timings.json``."""

    def __init__(self, folder):
        self.root = Path(folder)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.jsonl"

    @property
    def tests(self) -> Path:
        return self.root / "tests.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def rows_path(self, name: str) -> Path:
        return self.root / f"{name}.jsonl"

    def shards(self, name: str) -> Shards:
        return Shards(self.root / f"{name}.shards", ensure_ascii=True)

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    def read_baseline(self) -> dict[str, dict]:
        """``{example id: baseline scores}`` (empty when absent)."""
        out = {}
        for r in read_jsonl(self.baseline):
            out[r.pop("id")] = r
        return out

    def write_baseline(self, baseline: dict[str, dict]) -> None:
        write_jsonl(self.baseline, ({"id": i, **v} for i, v in baseline.items()), ensure_ascii=True)

    def read_rows(self, name: str) -> list[dict]:
        return read_jsonl(self.rows_path(name))

    def write_rows(self, name: str, rows: list[dict]) -> None:
        """The rows as JSONL and as Parquet (dict cells as JSON strings)."""
        import pandas as pd

        write_jsonl(self.rows_path(name), rows, ensure_ascii=True)
        flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
        stem = self.root / name
        tmp = stem.with_suffix(".parquet.tmp")
        pd.DataFrame(flat).to_parquet(tmp, index=False)
        tmp.replace(stem.with_suffix(".parquet"))

    def read_tests(self) -> dict | None:
        return _read_json_or_none(self.tests)

    def write_tests(self, tests: dict) -> None:
        atomic_write_json(self.tests, tests)

    def write_timings(self, timings: dict) -> None:
        atomic_write_json(self.timings, timings)


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
    def shards(self) -> Shards:
        return Shards(self.categorize_dir / "shards")

    @property
    def shards_dir(self) -> Path:
        return self.shards.dir

    def shard(self, i: int) -> Path:
        return self.shards.path(i)

    def shard_done(self, i: int) -> bool:
        """The one resume rule: shard ``i`` is finished when its file exists (it is written atomically,
        and the run's identity, checked first, guarantees it holds this run's examples)."""
        return self.shards.done(i)

    def write_shard(self, i: int, rows: list[dict]) -> None:
        self.shards.write(i, rows)

    def read_shards(self, n_shards: int) -> dict[str, dict]:
        """``{example id: SliCK fields}`` over shards ``0 .. n_shards - 1``."""
        out = {}
        for i in range(n_shards):
            for r in self.shards.read(i):
                out[r.pop("id")] = r
        return out

    def lock(self, path: Path, wait: bool = True):
        return file_lock(path, wait)

    def run_lock(self, wait: bool = True):
        return file_lock(self.categorize_dir / "run.lock", wait)

    def shard_lock(self, i: int, wait: bool = True):
        return self.shards.lock(i, wait)

    def read_categorize_config(self) -> dict | None:
        return _read_json_or_none(self.categorize_config)

    def write_categorize_config(self, config: dict) -> None:
        self.categorize_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.categorize_config, config)

    @property
    def categorize_command(self) -> Path:
        return self.categorize_dir / "command.json"

    def read_categorize_command(self) -> dict | None:
        """The options ``knowcat categorize`` was given beyond those the run's identity records."""
        return _read_json_or_none(self.categorize_command)

    def write_categorize_command(self, options: dict) -> None:
        atomic_write_json(self.categorize_command, options)

    @property
    def categorized_jsonl(self) -> Path:
        return self.root / "categorized.jsonl"

    @property
    def categorized_parquet(self) -> Path:
        return self.root / "categorized.parquet"

    @property
    def categorize_summary(self) -> Path:
        return self.root / "categorize_summary.json"

    def has_categorized(self) -> bool:
        return self.categorized_jsonl.exists()

    def read_categorized(self, missing_ok: bool = True) -> list[dict]:
        return read_jsonl(self.categorized_jsonl, missing_ok)

    def write_categorized(self, records: list[dict]) -> None:
        from knowcat.filtering import write_records

        write_jsonl(self.categorized_jsonl, records)
        write_records(self.categorized_parquet, records)

    def read_categorize_summary(self) -> dict | None:
        return _read_json_or_none(self.categorize_summary)

    def write_categorize_summary(self, summary: dict) -> None:
        atomic_write_json(self.categorize_summary, summary)

    @property
    def rejects(self) -> Path:
        """Where a command that writes into this run puts the records it skipped (by default)."""
        return self.root / "rejects.jsonl"

    # -- SFT data and the estimator (``knowcat categorize`` / ``knowcat estimate`` on chat records) ----
    _SFT_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "hf": ""}

    def categorized_sft(self, container: str) -> Path:
        """The SFT records with their categories, in their own container (``hf``: a saved dataset folder)."""
        return self.root / ("categorized_sft" + self._SFT_SUFFIX[container])

    def estimated_sft(self, container: str) -> Path:
        return self.root / ("estimated_sft" + self._SFT_SUFFIX[container])

    @property
    def load_rejects(self) -> Path:
        """The malformed SFT records set aside while loading (by default)."""
        return self.root / "load_rejects.jsonl"

    @property
    def estimated_jsonl(self) -> Path:
        return self.root / "estimated.jsonl"

    @property
    def estimate_summary(self) -> Path:
        return self.root / "estimate_summary.json"

    def read_estimate_summary(self) -> dict:
        return read_json(self.estimate_summary)

    @property
    def estimate_features(self) -> Path:
        """The estimator's feature shards' folder."""
        return self.root / "estimate" / "features"

    @property
    def estimate_feature_shards(self) -> Shards:
        """The estimator's feature shards (``NNNNN.npz``, and ``config.json``: what they depend on)."""
        return Shards(self.estimate_features, suffix=".npz")

    @property
    def estimate_prediction_shards(self) -> Shards:
        """The estimator's predictions (``NNNNN.npz`` of ``probs``, one per feature shard), written as made."""
        return Shards(self.root / "estimate" / "predictions", suffix=".npz")

    @property
    def estimate_slick_tokens(self) -> Path:
        """The forward tokens SliCK fed on the calibration sample, measured when it ran."""
        return self.root / "estimate" / "slick_forward_tokens.json"

    @property
    def calibration(self) -> "RunDir":
        """The SliCK categorization of the estimator's calibration sample: a run directory of its own."""
        return RunDir(self.root / "calibration")

    # -- few-shot greedy evaluation and the demo's ground-truth check --------------------------
    @property
    def greedy_jsonl(self) -> Path:
        return self.root / "greedy.jsonl"

    def write_greedy(self, rows: Iterable[dict]) -> None:
        write_jsonl(self.greedy_jsonl, rows)

    @property
    def exposure_check(self) -> Path:
        return self.root / "exposure_check.json"

    def read_exposure_check(self) -> dict | None:
        return _read_json_or_none(self.exposure_check)

    def write_exposure_check(self, check: dict) -> None:
        atomic_write_json(self.exposure_check, check)

    # -- a demo's world, model, configuration and summary ----------------------------------------
    @property
    def world(self) -> WorldDir:
        return WorldDir(self.root / "world")

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def pretrain_record(self) -> Path:
        """What pretraining the demo's model recorded (its presence: the model is finished)."""
        return self.model / "knowcat_pretrain.json"

    def read_pretrain_record(self) -> dict | None:
        return _read_json_or_none(self.pretrain_record)

    @property
    def demo_config(self) -> Path:
        return self.root / "config.json"

    @property
    def demo_summary(self) -> Path:
        return self.root / "demo_summary.json"

    @property
    def demo_log(self) -> Path:
        return self.root / "demo.log"

    def write_demo_config(self, config: dict) -> None:
        atomic_write_json(self.demo_config, config)

    def read_demo_config(self) -> dict | None:
        """The demo's configuration (None when the run is not a demo's)."""
        return read_json(self.demo_config) if self.demo_summary.exists() and self.demo_config.exists() else None

    def read_demo_summary(self) -> dict | None:
        return _read_json_or_none(self.demo_summary)

    def write_demo_summary(self, summary: dict) -> None:
        atomic_write_json(self.demo_summary, summary)

    # -- the fine-tuning study ------------------------------------------------------------------
    @property
    def mixtures(self) -> MixturesDir:
        return MixturesDir(self.root / "mixtures")

    @staticmethod
    def finetune_folder(replicate: int = 0) -> str:
        """The fine-tuning runs' folder of replicate ``replicate``, relative to the run."""
        return "finetune" if replicate == 0 else f"replicates/rep_{replicate:02d}/finetune"

    def finetune(self, variant: str, folder: str = "finetune") -> FinetuneDir:
        """The fine-tuning run of ``variant`` (under ``folder``, see :meth:`finetune_folder`)."""
        return FinetuneDir(self.root / folder / variant)

    def finetune_root(self, folder: str = "finetune") -> Path:
        return self.root / folder

    def finetune_runs(self, folder: str = "finetune") -> list[FinetuneDir]:
        """The fine-tuning runs present under ``folder``, by name."""
        d = self.root / folder
        return [FinetuneDir(p) for p in sorted(d.glob("*")) if p.is_dir()] if d.is_dir() else []

    @property
    def replicates(self) -> Path:
        return self.root / "replicates"

    def replicate_folders(self) -> dict[str, str]:
        """{replicate name: its fine-tuning folder, relative to the run}: ``finetune`` (replicate 0)
        and every ``replicates/rep_NN/finetune`` present."""
        out = {"rep_00": "finetune"}
        for d in sorted(self.replicates.glob("rep_*")):
            if (d / "finetune").is_dir():
                out[d.name] = str(Path("replicates") / d.name / "finetune")
        return out

    @property
    def analysis(self) -> Path:
        return self.root / "analysis.json"

    def read_analysis(self) -> dict | None:
        return _read_json_or_none(self.analysis)

    def write_analysis(self, analysis: dict) -> None:
        atomic_write_json(self.analysis, analysis)

    # -- surrogates and the report ----------------------------------------------------------------
    @property
    def filter(self) -> FilterDir:
        return FilterDir(self.root / "filter")

    @property
    def surrogates(self) -> SurrogatesDir:
        return SurrogatesDir(self.root / "surrogates")

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # the run's config files, each read by the report for every key named ``seed`` or ``*_seed``
    CONFIG_FILES = ("config.json", "categorize/config.json", "world/world.json", "model/knowcat_pretrain.json",
                    "mixtures/manifest.json", "finetune/*/config.json", "surrogates/config.json")

    def config_files(self) -> list[tuple[str, list[Path]]]:
        """``[(pattern, the files that match it)]`` over :data:`CONFIG_FILES`."""
        return [(pattern, sorted(self.root.glob(pattern))) for pattern in self.CONFIG_FILES]
