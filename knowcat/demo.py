"""The demo: the whole pipeline on the embedded default, into one run directory.

``run_demo(run_dir, preset)`` builds the knowledge world, pretrains its small
model, and runs the first few-shot greedy evaluation on the world's train split
with the ground-truth exposure check. Each stage skips itself when its output
is already complete, so a killed demo resumes where it stopped.

Presets: ``default`` (ends within 15 minutes on a 2-core CPU) and ``quick``
(a small world for the tests, within 2 minutes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from knowcat.io import atomic_write_json
from knowcat.prompts import FewShotConfig
from knowcat.world.build import PRESETS as WORLD_PRESETS, WorldConfig, build_world, read_exposures
from knowcat.world.pretrain import PretrainConfig, pretrain


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    eval_split: str = "train"
    batch_size: int = 64


DEMO_PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "quick": DemoConfig(
        world=WORLD_PRESETS["quick"],
        pretrain=PretrainConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384,
                                vocab_size=2048, block_size=256, batch_size=8, lr=3e-3),
        fewshot=FewShotConfig(n_prompts=4),
    ),
}


def demo_config(preset: str = "default", seed: int | None = None) -> DemoConfig:
    if preset not in DEMO_PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(DEMO_PRESETS)}")
    cfg = DEMO_PRESETS[preset]
    if seed is not None:
        cfg = replace(cfg, world=replace(cfg.world, seed=seed), pretrain=replace(cfg.pretrain, seed=seed),
                      fewshot=replace(cfg.fewshot, seed=seed))
    return cfg


def world_examples(world_dir):
    """The world's dataset, read back through the EntityQuestions loader like any user data."""
    from knowcat.loaders import load_entityquestions

    return load_entityquestions(Path(world_dir) / "data")


def run_demo(run_dir, preset: str = "default", seed: int | None = None, device: str = "auto",
             log=print, progress: bool = True) -> dict:
    from knowcat.fewshot import greedy_accuracy
    from knowcat.world.validate import exposure_check, format_check
    from probes.loading import load_model

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
    evalset = [e for e in examples if e.split == cfg.eval_split]
    pool = [e for e in examples if e.split == cfg.fewshot.exemplar_split]
    model, tok = load_model(str(model_dir), device=device)
    log(f"greedy: {len(evalset)} {cfg.eval_split} examples x {cfg.fewshot.n_prompts} prompts "
        f"({cfg.fewshot.k} exemplars each) on {model.device}")
    results = greedy_accuracy(model, tok, evalset, pool, cfg.fewshot, batch_size=cfg.batch_size, progress=progress)
    from knowcat.io import atomic_write_text
    atomic_write_text(run / "greedy.jsonl", "".join(
        json.dumps({"id": r.id, "relation": r.relation, "p_correct_greedy": r.p_correct,
                    "greedy_answers": r.answers}, ensure_ascii=False) + "\n" for r in results))
    check = exposure_check({r.id: r.p_correct for r in results}, read_exposures(world_dir))
    atomic_write_json(run / "exposure_check.json", check)
    timings["greedy"] = time.time() - t
    log(format_check(check))
    summary = {"run_dir": str(run), "preset": preset, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "exposure_check": {k: v for k, v in check.items() if k != "by_exposure"}}
    atomic_write_json(run / "demo_summary.json", summary)
    log(f"demo: done in {sum(timings.values()):.0f} s -> {run}")
    return summary
