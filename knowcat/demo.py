"""The demo: the whole pipeline on the embedded default, into one run directory.

``run_demo(run_dir, preset)`` builds the knowledge world, pretrains its small
model, categorizes the world's train and test questions with SliCK (whose greedy
pass is the few-shot greedy evaluation), checks both against the ground
truth (greedy accuracy against exposure, mean exposure per category), writes the
train split as SFT files (chat and Alpaca) and estimates and filters the chat one
(:mod:`knowcat.sft_run`: SliCK's categories on a calibration sample, the estimator's
on the rest, drop Unknown), then runs the fine-tuning study (:mod:`knowcat.experiment`) on the categorized splits
and the linearized surrogates (:mod:`knowcat.surrogate`) on the train split. Each
stage skips itself when its output is already complete (categorization resumes
shard by shard), so a killed demo resumes where it stopped.

Presets: ``default`` (sized to end within 20 minutes on a 2-core CPU) and ``quick``
(a small world for the tests, a few minutes).

Every stage ends by rewriting ``report.html`` with what exists so far and printing
one line; the detail goes to ``RUN/demo.log`` (and to the terminal with ``verbose``),
and so do library warnings, so the terminal shows one progress bar per stage.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait for work are many times slower when other processes share
# the cores (measured on 2 busy cores: a training step 4.4x slower with 2 spinning threads than with 1);
# passive waiting costs little on an idle machine. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from knowcat.estimate import EstimateConfig
from knowcat.experiment import ExperimentConfig
from knowcat.finetune import FinetuneConfig
from knowcat.io import json_safe
from knowcat.mixtures import MixtureConfig
from knowcat.rundir import RunDir
from knowcat.surrogate import SurrogateConfig
from knowcat.slick import CATEGORIES, SliCKConfig
from knowcat.world.build import PRESETS as WORLD_PRESETS, WorldConfig, build_world
from knowcat.world.pretrain import PretrainConfig, pretrain


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    # the demo's model: float32 on every CPU (bf16=False), so the same seed gives the same model whatever
    # the CPU's instruction set; sized for 2 CPU cores (see the README for the sizes against the paper's)
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        vocab_size=2048, hidden_size=192, num_layers=3, num_heads=4, intermediate_size=512, lr=3e-3, bf16=False))
    slick: SliCKConfig = field(default_factory=lambda: SliCKConfig(keep_answers=True))
    categorize_splits: tuple[str, ...] = ("train", "test")
    check_split: str = "train"  # the ground-truth checks are on this split
    batch_size: int | None = None
    # the fine-tuning study: the paper's sets; the learning rate and batch are the small model's
    # (the paper's 1e-5 with batch 128 would take one step per epoch on |D| of a few dozen). The test set
    # is measured after every epoch for the sets the linear model is fitted on (the X% Unknown and D_Known
    # sets), and for the others where the analysis reads it (each new best dev epoch, and the last)
    experiment: ExperimentConfig | None = field(default_factory=lambda: ExperimentConfig(
        finetune=FinetuneConfig(epochs=16, lr=1.5e-4, batch_size=16, save_model=False,
                                test_each_epoch="unknown_*,known_*")))
    surrogate: SurrogateConfig | None = field(default_factory=lambda: SurrogateConfig(answer_jacobian_per_category=50))
    # the train split as SFT files (chat, Alpaca), its categories estimated (SliCK's on a 20% calibration sample)
    # and filtered (drop Unknown); None: no filtering stage
    sft_filter: EstimateConfig | None = field(default_factory=lambda: EstimateConfig(calibrate=0.2))
    # torch threads; None: the cores not busy when the demo starts (free_cores), at least one. On cores shared with
    # other work, threads that wait on one another at every operation lose more than they gain
    threads: int | None = None


DEMO_PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "quick": DemoConfig(
        world=WORLD_PRESETS["quick"],
        pretrain=PretrainConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384,
                                vocab_size=2048, block_size=256, batch_size=8, lr=3e-3, bf16=False),
        slick=SliCKConfig(n_prompts=4, n_samples=8, keep_answers=True),
        experiment=ExperimentConfig(
            mixtures=MixtureConfig(unknown_percents=(0, 50, 100), size=24, single=False),
            finetune=FinetuneConfig(epochs=3, lr=3e-3, batch_size=8, save_model=False,
                                    test_each_epoch="unknown_*,known_*")),
        surrogate=SurrogateConfig(max_examples=120, answer_jacobian_per_category=6, jacobian_examples=2),
    ),
}


def demo_config(preset: str = "default", seed: int | None = None) -> DemoConfig:
    if preset not in DEMO_PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(DEMO_PRESETS)}")
    cfg = DEMO_PRESETS[preset]
    if seed is not None:
        cfg = replace(cfg, world=replace(cfg.world, seed=seed), pretrain=replace(cfg.pretrain, seed=seed),
                      slick=replace(cfg.slick, seed=seed))
    return cfg


def world_examples(world_dir):
    """The world's dataset, read back through the EntityQuestions loader like any user data."""
    from knowcat.loaders import load_entityquestions

    from knowcat.rundir import WorldDir

    return load_entityquestions(WorldDir(world_dir).data)


def category_exposure(categorized: list[dict], exposures: list[dict], split: str | None = None) -> dict:
    """Mean and median exposure count per SliCK category (the ground-truth check of categorization)."""
    import numpy as np

    count = {e["id"]: e["count"] for e in exposures}
    out = {}
    for c in CATEGORIES:
        v = [count[r["id"]] for r in categorized if r["category"] == c and (split is None or r.get("split") == split)
             and r["id"] in count]
        out[c] = {"n": len(v), "mean_exposure": float(np.mean(v)) if v else None,
                  "median_exposure": float(np.median(v)) if v else None}
    n = sum(o["n"] for o in out.values())
    for c in CATEGORIES:
        out[c]["share"] = out[c]["n"] / n if n else 0.0
    means = [out[c]["mean_exposure"] for c in CATEGORIES]
    out["strictly_ordered"] = all(m is not None for m in means) and all(a > b for a, b in zip(means, means[1:]))
    return out


def format_category_exposure(ce: dict) -> str:
    lines = [f"{'category':<12}{'n':>6}{'share':>8}{'mean exposure':>15}{'median':>8}"]
    for c in CATEGORIES:
        o = ce[c]
        mean = f"{o['mean_exposure']:.1f}" if o["mean_exposure"] is not None else "-"
        med = f"{o['median_exposure']:.0f}" if o["median_exposure"] is not None else "-"
        lines.append(f"{c:<12}{o['n']:>6}{o['share']:>8.1%}{mean:>15}{med:>8}")
    lines.append("mean exposure strictly ordered HighlyKnown > MaybeKnown > WeaklyKnown > Unknown: "
                 f"{'yes' if ce['strictly_ordered'] else 'no'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the terminal: one line per stage, detail and library warnings in RUN/demo.log


@contextlib.contextmanager
def quiet_libraries(log_path: Path, verbose: bool):
    """Unless ``verbose``: Python warnings and transformers' log records go to ``log_path`` (kept, with
    where they came from) instead of the terminal, and transformers' own progress bars are off."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    pyw = logging.getLogger("py.warnings")
    hf = hf_logging.get_logger("transformers")
    saved = (pyw.propagate, hf_logging.is_progress_bar_enabled())
    logging.captureWarnings(True)
    pyw.addHandler(handler)
    pyw.propagate = False
    hf_logging.disable_default_handler()
    hf.addHandler(handler)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.captureWarnings(False)
        pyw.removeHandler(handler)
        pyw.propagate = saved[0]
        hf.removeHandler(handler)
        hf_logging.enable_default_handler()
        if saved[1]:
            hf_logging.enable_progress_bar()
        handler.close()


class FileProgress:
    """One progress bar for a stage whose work is counted by files appearing under the run (the
    fine-tuning study's epoch files, the surrogates' outputs): a thread counts them every second."""

    def __init__(self, desc: str, count, total, enabled: bool, unit: str = "it"):
        from tqdm.auto import tqdm

        self.count, self.total = count, total
        self.bar = tqdm(total=None, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tick(self):
        total = self.total()
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        done = self.count()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _run(self):
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):  # a file being replaced mid-count: count again next second
                self._tick()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._tick()
        self.bar.close()


def _study_progress(run: Path, epochs: int):
    rd = RunDir(run)

    def total():
        m = rd.mixtures.read_manifest()
        return epochs * sum(v["n"] > 0 for v in m["sets"].values()) if m is not None else None

    def count():
        return sum(ft.count_epochs() for ft in rd.finetune_runs())

    return count, total


def _surrogate_progress(run: Path, names):
    sd = RunDir(run).surrogates

    def count():
        return len(set(sd.read_tests() or {}) & set(names))

    return count, (lambda: len(names))


# ---------------------------------------------------------------------------------------------
# stage summaries (one line each)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def categories_line(ce: dict, check: dict) -> str:
    shares = " / ".join(f"{c} {ce[c]['share']:.1%}" for c in CATEGORIES)
    sp = check.get("spearman")
    return (f"{shares}; mean exposure strictly ordered: {'yes' if ce['strictly_ordered'] else 'NO'}; "
            f"greedy accuracy vs exposure Spearman {'n/a' if sp is None or sp != sp else f'{sp:.3f}'}, "
            f"never seen {_pct(check.get('never_seen_accuracy'))}")


def study_line(findings: dict) -> str:
    parts = []
    for k, f in findings.items():
        if isinstance(f, dict) and "holds" in f:
            parts.append(f"{k} {f.get('decision') or ('holds' if f['holds'] else 'does not hold')}")
    return "; ".join(parts) if parts else "analysis written"


def run_demo(run_dir, preset: str = "default", seed: int | None = None, device: str = "auto",
             log=None, progress: bool = True, study: bool = True, verbose: bool = False, say=print) -> dict:
    """The demo into ``run_dir``. ``log`` receives every detail line (default: ``RUN/demo.log``, and the
    terminal too when ``verbose``); ``say`` the terminal's stage lines."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    log_path = RunDir(run).demo_log
    logfile = open(log_path, "a", encoding="utf-8")

    def to_file(msg=""):
        logfile.write(f"{msg}\n")
        logfile.flush()

    detail = log
    if detail is None:
        detail = (lambda msg="": (to_file(msg), say(msg))) if verbose else to_file
    try:
        with quiet_libraries(log_path, verbose or log is not None):
            return _run_demo(run, preset, seed, device, detail, progress and log is None, study, say)
    finally:
        logfile.close()


def free_cores(window: float = 0.5) -> int:
    """The CPU cores this process may use that are not busy now: all of them less the cores' busy share
    over ``window`` seconds (from ``/proc/stat``), at least one; ``OMP_NUM_THREADS`` wins when set. Not the
    1-minute load average: it still counts, for a minute, the install that ran just before the demo."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return n
    busy = (os.cpu_count() or n) * (1 - (i1 - i0) / max(1, t1 - t0))
    return max(1, min(n, int(n - busy + 0.5)))


def _run_demo(run: Path, preset, seed, device, log, progress, study, say) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(demo_config(preset, seed).threads or free_cores())
    try:
        return _run_demo_stages(run, preset, seed, device, log, progress, study, say)
    finally:
        torch.set_num_threads(before)


def _run_demo_stages(run: Path, preset, seed, device, log, progress, study, say) -> dict:
    import torch

    from knowcat.runs import run_categorize
    from knowcat.world.validate import exposure_check, format_check

    cfg = demo_config(preset, seed)
    precision = "bfloat16 autocast" if cfg.pretrain.bf16 else "float32"
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    rd = RunDir(run)
    rd.write_demo_config({"stage": "demo", "preset": preset, "precision": {
        "pretrain": precision, "finetune": "bfloat16" if cfg.experiment and cfg.experiment.finetune.bf16 else "float32",
        "categorize": "float32"}, "machine": machine, **asdict(cfg)})
    stages = ["world", "pretrain", "categorize"] + (["filter"] if cfg.sft_filter is not None and
                                                     cfg.check_split in cfg.categorize_splits else []) + (["experiment"] if cfg.experiment is not None and study else []) \
        + (["surrogates"] if cfg.surrogate is not None and study else [])
    timings: dict[str, float] = {}
    summary: dict = {"run_dir": str(run), "preset": preset, "precision": precision, "threads": machine["threads"],
                     "status": "running", "stages": stages, "stages_done": [], "seconds": {}}
    t_start = time.time()
    say(f"knowcat demo ({preset}): {len(stages)} stages into {run} on {machine['threads']} of {os.cpu_count()} cores "
        f"(the ones idle at the start; OMP_NUM_THREADS to choose); detail in {rd.demo_log}; "
        f"the report {rd.report} is rewritten as each stage ends")

    def end_stage(name: str, line: str, report: bool = True):
        summary["stages_done"].append(name)
        summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        summary["seconds_since_start"] = round(time.time() - t_start, 1)
        rd.write_demo_summary(json_safe(summary))
        where = ""
        if report and rd.has_categorized():
            from reports import build_report

            where = f" -> report updated ({time.time() - t_start:.0f} s since start)"
            summary["report"] = str(build_report(run))
            summary.setdefault("first_report_seconds", round(time.time() - t_start, 1))
            rd.write_demo_summary(json_safe(summary))
        i = stages.index(name) + 1
        say(f"[{i}/{len(stages)}] {name}: {line} ({timings[name]:.0f} s){where}")

    world = rd.world
    world_dir = world.root
    t = time.time()
    if world.summary.exists():
        log(f"world: already built in {world_dir}")
    else:
        build_world(world_dir, cfg.world, log=log)
    timings["world"] = time.time() - t
    w = world.read_summary()
    end_stage("world", f"{w['facts']} facts over {len(w['relations'])} relations, {w['documents']} documents, "
                       f"{w['mentions']} mentions, never seen {w['never_seen_share']:.0%}", report=False)

    t = time.time()
    model_dir = rd.model
    if rd.pretrain_record.exists():
        log(f"pretrain: model already in {model_dir}")
    else:
        pretrain(world_dir, model_dir, cfg.pretrain, log=log, progress=progress)
    timings["pretrain"] = time.time() - t
    pm = rd.read_pretrain_record()
    params = pm.get("parameters")
    end_stage("pretrain", f"{'?' if params is None else f'{params / 1e6:.1f}M'} parameters, {pm['tokens']} tokens "
                          f"in {pm['steps']} steps, {precision}, final loss {pm['final_loss']}", report=False)

    t = time.time()
    examples = world_examples(world_dir)
    todo = [e for e in examples if e.split in cfg.categorize_splits]
    pool = [e for e in examples if e.split == cfg.slick.exemplar_split]
    run_categorize(str(model_dir), todo, pool, run, cfg.slick, device=device, batch_size=cfg.batch_size,
                   data_source=str(world.data), log=log, progress=progress)
    categorized = rd.read_categorized(missing_ok=False)
    exposures = world.read_exposures(missing_ok=False)
    check_set = {r["id"]: r["p_correct_greedy"] for r in categorized if r.get("split") == cfg.check_split}
    check = exposure_check(check_set, exposures)
    ce = category_exposure(categorized, exposures, cfg.check_split)
    rd.write_exposure_check({"greedy_vs_exposure": check, "category_exposure": ce})
    log(f"ground truth ({cfg.check_split} split):")
    log(format_check(check))
    log(format_category_exposure(ce))
    timings["categorize"] = time.time() - t
    summary["greedy_vs_exposure"] = {k: v for k, v in check.items() if k != "by_exposure"}
    summary["category_exposure"] = ce
    end_stage("categorize", f"{len(categorized)} questions; {cfg.check_split} split: {categories_line(ce, check)}")

    if "filter" in stages:
        from knowcat.sft_run import run_sft_filter

        t = time.time()
        labels = {r["id"]: r for r in categorized if r.get("split") == cfg.check_split}
        fs = run_sft_filter(rd.filter.root, str(model_dir), world_dir / "data", labels, cfg.sft_filter,
                            slick_cfg=cfg.slick, split=cfg.check_split, device=device, log=log)
        timings["filter"] = time.time() - t
        v = fs["estimate"].get("validation_rest") or {}
        summary["filter"] = {"kept": fs["kept"], "total": fs["total"], "auroc_unknown": v.get("auroc_unknown"),
                             "unknown_dropped": v.get("unknown_dropped"), "highly_known_kept": v.get("highly_known_kept")}
        end_stage("filter", f"kept {fs['kept']} of {fs['total']} chat records (drop Unknown); estimator against SliCK "
                            f"outside its calibration sample: AUROC {v.get('auroc_unknown', float('nan')):.3f}, "
                            f"Unknown dropped {_pct(v.get('unknown_dropped'))}, HighlyKnown kept "
                            f"{_pct(v.get('highly_known_kept'))}")
    if "experiment" in stages:
        from knowcat.experiment import run_experiment

        t = time.time()
        count, total = _study_progress(run, cfg.experiment.finetune.epochs)
        with FileProgress("fine-tuning study", count, total, progress, unit="epoch"):
            analysis = run_experiment(run, str(model_dir), cfg.experiment, device=device, log=log, progress=False)
        timings["experiment"] = time.time() - t
        summary["findings"] = analysis["findings"]
        end_stage("experiment", study_line(analysis["findings"]))
    if "surrogates" in stages:
        from knowcat.surrogate import run_surrogates

        t = time.time()
        count, total = _surrogate_progress(run, cfg.surrogate.surrogates)
        with FileProgress("surrogates", count, total, progress, unit="surrogate"):
            tests = run_surrogates(run, str(model_dir), cfg.surrogate, device=device, log=log, progress=False)
        timings["surrogates"] = time.time() - t
        summary["surrogate_verdicts"] = {k: v["at_default"]["verdict"] for k, v in tests.items()}
        end_stage("surrogates", "; ".join(f"{k} {v}" for k, v in summary["surrogate_verdicts"].items()))
    summary["status"] = "complete"
    summary["seconds_since_start"] = round(time.time() - t_start, 1)
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    rd.write_demo_summary(json_safe(summary))
    from reports import build_report

    report = build_report(run)  # reads demo_summary.json: the summary is written first, then again with the path
    summary["report"] = str(report)
    rd.write_demo_summary(json_safe(summary))
    log(f"report: {report}")
    log(f"demo: done in {sum(timings.values()):.0f} s -> {run}")
    say(f"found: {categories_line(ce, check)}")
    if "findings" in summary:
        say(f"fine-tuning study: {study_line(summary['findings'])}")
    if "surrogate_verdicts" in summary:
        say("surrogates (Ax=b): " + "; ".join(f"{k} {v}" for k, v in summary["surrogate_verdicts"].items()))
    say(f"demo done in {sum(timings.values()):.0f} s; report: {report}")
    return json_safe(summary)  # what demo_summary.json holds: undefined statistics as None
