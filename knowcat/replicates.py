"""The demo over several world/pretraining seeds: one run directory per seed, then every
linear-model coefficient and finding across them.

``run_demo_seeds(out, seeds)`` runs ``knowcat.demo.run_demo(OUT/seed_S, seed=S)`` for each
seed (each run resumes what it finished, as the demo does) and writes ``OUT/replicates.json``:
per seed b_kn, b_unk, R^2 and each finding's decision, and across seeds their mean, spread,
sign agreement and the combined decision (a finding holds only when it holds for every seed).
"""

from __future__ import annotations

from pathlib import Path

from knowcat.io import atomic_write_json


def aggregate(analyses: dict) -> dict:
    """{seed name: analysis.json} -> per seed and across seeds (``linear_models.study.replicate_summary``)."""
    from linear_models.study import replicate_summary

    per_seed = {}
    for name, a in analyses.items():
        lm = a.get("linear_model", {})
        per_seed[name] = {
            "linear_model": {s: {k: r.get("params", {}).get(k) for k in ("b0", "b_kn", "b_unk")} | {"r2": r.get("r2")}
                             for s, r in lm.items()},
            "findings": {n: f.get("decision") for n, f in a.get("findings", {}).items()
                         if isinstance(f, dict) and "decision" in f}}
    return {"per_seed": per_seed, **replicate_summary(analyses)}


def read_analyses(out_dir, seeds) -> dict:
    from knowcat.rundir import RunDir

    out = {}
    for s in seeds:
        a = RunDir(Path(out_dir) / f"seed_{s}").read_analysis()
        if a is not None:
            out[f"seed_{s}"] = a
    return out


def run_demo_seeds(out_dir, seeds, preset: str = "default", device: str = "auto", log=print,
                   progress: bool = True) -> dict:
    from knowcat.demo import run_demo

    out = Path(out_dir)
    for s in seeds:
        log(f"demo seed {s} -> {out / f'seed_{s}'}")
        run_demo(out / f"seed_{s}", preset=preset, seed=s, device=device, log=log, progress=progress)
    summary = aggregate(read_analyses(out, seeds))
    summary["preset"], summary["seeds"] = preset, list(seeds)
    atomic_write_json(out / "replicates.json", summary)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"across {len(summary['per_seed'])} seeds:"]
    for name, d in summary["per_seed"].items():
        lm = d["linear_model"].get("in_distribution") or next(iter(d["linear_model"].values()), {})
        fmt = lambda x: "n/a" if x is None else f"{x:+.2f}"  # noqa: E731
        lines.append(f"  {name}: b_kn {fmt(lm.get('b_kn'))}, b_unk {fmt(lm.get('b_unk'))}, R^2 {fmt(lm.get('r2'))}")
    for n, f in summary["findings"].items():
        lines.append(f"  [{f['decision']}] {n}: {', '.join(f['decisions'])}")
    return "\n".join(lines)
