"""Categorization as a Ray Data pipeline on a local Ray instance (CPU, transformers engine, quick world):
identical to a single-machine run, with a worker killed mid-run, and a restarted job redoing only what
no finished shard holds."""

import json

import pytest

from knowcat.slick import SliCKConfig

CFG = SliCKConfig(n_prompts=3, n_samples=4, keep_answers=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def data(quick_demo):
    from knowcat.demo import world_examples

    run, _ = quick_demo
    ex = world_examples(run / "world")
    train = [e for e in ex if e.split == "train"]
    by_rel = {}
    todo = [e for e in train if by_rel.setdefault(e.relation, []).append(e) or len(by_rel[e.relation]) <= 5]
    return run, todo, [e for e in ex if e.split == "dev"]


def _rows(run_dir):
    return {r["id"]: r for r in map(json.loads, open(run_dir / "categorized.jsonl", encoding="utf-8"))}


def test_ray_pipeline_equals_single_machine_with_a_worker_killed(data, tmp_path):
    from knowcat.ray_runner import run_categorize_ray
    from knowcat.runs import run_categorize

    run, todo, pool = data
    model = str(run / "model")
    run_categorize(model, todo, pool, tmp_path / "single", CFG, shard_size=6, device="cpu", log=lambda *a: None,
                   progress=False)
    marker = tmp_path / "killed_once"
    logs = []
    run_categorize_ray(model, todo, pool, tmp_path / "ray", CFG, shard_size=6, num_workers=2, device="cpu",
                       log=logs.append, _fail_once_marker=str(marker))
    assert marker.exists()  # a worker process did die mid-run
    single, ray_rows = _rows(tmp_path / "single"), _rows(tmp_path / "ray")
    assert list(single) == list(ray_rows)  # same examples, same order
    for i, r in single.items():
        for k in ("category", "greedy_answers", "sampled_answers", "n_sampled", "p_correct_greedy"):
            assert ray_rows[i][k] == r[k], (i, k)

    # a restarted job: two shards lost, only they are redone
    shards = sorted((tmp_path / "ray" / "categorize" / "shards").glob("*.jsonl"))
    for p in shards[:2]:
        p.unlink()
    logs = []
    run_categorize_ray(model, todo, pool, tmp_path / "ray", CFG, shard_size=6, num_workers=2, device="cpu",
                       log=logs.append)
    assert any(f"{len(shards) - 2}/{len(shards)} shards already finished" in m for m in logs)
    assert sum("done (" in m for m in logs) == 2
    assert _rows(tmp_path / "ray") == ray_rows


def test_cli_backend_ray(quick_demo, tmp_path):
    from knowcat.cli import main

    run, _ = quick_demo
    common = ["categorize", "--model", str(run / "model"), str(run / "world" / "data"), "--splits", "train",
              "--per-relation", "2", "--n-prompts", "2", "--n-samples", "2", "--device", "cpu", "--no-progress",
              "--keep-answers"]
    assert main(common + ["--out", str(tmp_path / "r"), "--backend", "ray", "--ray-workers", "1"]) == 0
    assert main(common + ["--out", str(tmp_path / "t")]) == 0
    r, t = _rows(tmp_path / "r"), _rows(tmp_path / "t")
    assert r == t  # the Ray pipeline writes exactly what the single-machine run writes
