"""The demo: the whole pipeline on the embedded default, into one run directory.

``run_demo(run_dir, preset)`` builds the knowledge world, pretrains its small
model, categorizes the world's train and test questions with SliCK (whose greedy
pass is the few-shot greedy evaluation), checks both against the ground
truth (greedy accuracy against exposure, mean exposure per category), then runs
the fine-tuning study (:mod:`knowcat.experiment`) on the categorized splits
and the linearized surrogates (:mod:`knowcat.surrogate`) on the train split. Each
stage skips itself when its output is already complete (categorization resumes
shard by shard), so a killed demo resumes where it stopped.

Presets: ``default`` (ends within 15 minutes on a 2-core CPU) and ``quick``
(a small world for the tests, within 2 minutes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from knowcat.experiment import ExperimentConfig
from knowcat.finetune import FinetuneConfig
from knowcat.io import atomic_write_json, json_safe
from knowcat.mixtures import MixtureConfig
from knowcat.surrogate import SurrogateConfig
from knowcat.slick import CATEGORIES, SliCKConfig
from knowcat.world.build import PRESETS as WORLD_PRESETS, WorldConfig, build_world, read_exposures
from knowcat.world.pretrain import PretrainConfig, pretrain


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    slick: SliCKConfig = field(default_factory=lambda: SliCKConfig(keep_answers=True))
    categorize_splits: tuple[str, ...] = ("train", "test")
    check_split: str = "train"  # the ground-truth checks are on this split
    batch_size: int | None = None
    # the fine-tuning study: the paper's sets; the learning rate and batch are the small model's
    # (the paper's 1e-5 with batch 128 would take one step per epoch on |D| of a few dozen)
    experiment: ExperimentConfig | None = field(default_factory=lambda: ExperimentConfig(
        finetune=FinetuneConfig(epochs=16, lr=1.5e-4, batch_size=16, save_model=False)))
    surrogate: SurrogateConfig | None = field(default_factory=SurrogateConfig)


DEMO_PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "quick": DemoConfig(
        world=WORLD_PRESETS["quick"],
        pretrain=PretrainConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384,
                                vocab_size=2048, block_size=256, batch_size=8, lr=3e-3),
        slick=SliCKConfig(n_prompts=4, n_samples=8, keep_answers=True),
        experiment=ExperimentConfig(
            mixtures=MixtureConfig(unknown_percents=(0, 50, 100), size=24, single=False),
            finetune=FinetuneConfig(epochs=3, lr=3e-3, batch_size=8, save_model=False)),
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

    return load_entityquestions(Path(world_dir) / "data")


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


def run_demo(run_dir, preset: str = "default", seed: int | None = None, device: str = "auto",
             log=print, progress: bool = True, study: bool = True) -> dict:
    from knowcat.runs import run_categorize
    from knowcat.world.validate import exposure_check, format_check

    cfg = demo_config(preset, seed)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", {"stage": "demo", "preset": preset, **asdict(cfg)})
    timings = {}
    world_dir = run / "world"

    t = time.time()
    if (world_dir / "world.json").exists():
        log(f"world: already built in {world_dir}")
    else:
        build_world(world_dir, cfg.world, log=log)
    timings["world"] = time.time() - t

    t = time.time()
    model_dir = run / "model"
    if (model_dir / "knowcat_pretrain.json").exists():
        log(f"pretrain: model already in {model_dir}")
    else:
        pretrain(world_dir, model_dir, cfg.pretrain, log=log, progress=progress)
    timings["pretrain"] = time.time() - t

    t = time.time()
    examples = world_examples(world_dir)
    todo = [e for e in examples if e.split in cfg.categorize_splits]
    pool = [e for e in examples if e.split == cfg.slick.exemplar_split]
    run_categorize(str(model_dir), todo, pool, run, cfg.slick, device=device, batch_size=cfg.batch_size,
                   data_source=str(world_dir / "data"), log=log, progress=progress)
    timings["categorize"] = time.time() - t

    categorized = [json.loads(line) for line in open(run / "categorized.jsonl", encoding="utf-8")]
    exposures = read_exposures(world_dir)
    check_set = {r["id"]: r["p_correct_greedy"] for r in categorized if r.get("split") == cfg.check_split}
    check = exposure_check(check_set, exposures)
    ce = category_exposure(categorized, exposures, cfg.check_split)
    atomic_write_json(run / "exposure_check.json", {"greedy_vs_exposure": check, "category_exposure": ce})
    log(f"ground truth ({cfg.check_split} split):")
    log(format_check(check))
    log(format_category_exposure(ce))
    summary = {"run_dir": str(run), "preset": preset, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "greedy_vs_exposure": {k: v for k, v in check.items() if k != "by_exposure"},
               "category_exposure": ce}
    if cfg.experiment is not None and study:
        from knowcat.experiment import run_experiment

        t = time.time()
        analysis = run_experiment(run, str(model_dir), cfg.experiment, device=device, log=log, progress=progress)
        timings["experiment"] = time.time() - t
        summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        summary["findings"] = analysis["findings"]
    if cfg.surrogate is not None and study:
        from knowcat.surrogate import run_surrogates

        t = time.time()
        tests = run_surrogates(run, str(model_dir), cfg.surrogate, device=device, log=log, progress=progress)
        timings["surrogates"] = time.time() - t
        summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        summary["surrogate_verdicts"] = {k: v["at_default"]["verdict"] for k, v in tests.items()}
    atomic_write_json(run / "demo_summary.json", summary)
    from reports import build_report

    report = build_report(run)  # reads demo_summary.json: the summary is written first, then again with the path
    summary["report"] = str(report)
    atomic_write_json(run / "demo_summary.json", summary)
    log(f"report: {report}")
    log(f"demo: done in {sum(timings.values()):.0f} s -> {run}")
    return json_safe(summary)  # what demo_summary.json holds: undefined statistics as None
