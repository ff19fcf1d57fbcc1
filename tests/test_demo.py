"""The quick demo, end to end, and the command line around it."""

import json
import subprocess
import sys


def test_quick_demo_writes_every_stage(quick_demo):
    run, summary = quick_demo
    for name in ("config.json", "world/world.json", "world/exposures.jsonl", "world/data/relation_query_templates.json",
                 "model/model.safetensors", "model/tokenizer.json", "categorized.jsonl", "categorized.parquet",
                 "categorize_summary.json", "exposure_check.json", "demo_summary.json"):
        assert (run / name).exists(), name
    check = json.loads((run / "exposure_check.json").read_text())
    greedy = [json.loads(line) for line in open(run / "categorized.jsonl")]
    assert {g["split"] for g in greedy} == {"train", "test"}
    assert check["greedy_vs_exposure"]["n"] == sum(g["split"] == "train" for g in greedy) > 0
    assert sum(check["category_exposure"][c]["n"] for c in
               ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")) == check["greedy_vs_exposure"]["n"]
    assert all(len(g["greedy_answers"]) == 4 for g in greedy)
    # the quick model has learned the format: it answers, one line each
    answers = [a for g in greedy for a in g["greedy_answers"]]
    assert sum(bool(a) for a in answers) / len(answers) > 0.9
    assert all("\n" not in a for a in answers)
    assert sum(summary["seconds"].values()) < 120


def test_demo_resumes_without_recomputing(quick_demo):
    from knowcat.demo import run_demo

    run, _ = quick_demo
    before = (run / "model" / "model.safetensors").stat().st_mtime_ns
    lines = []
    run_demo(run, preset="quick", device="cpu", progress=False, log=lines.append)
    assert any("already built" in line for line in lines)
    assert any("model already" in line for line in lines)
    assert any("already finished" in line for line in lines)
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_cli_greedy_on_the_demo_world(quick_demo, tmp_path):
    run, _ = quick_demo
    out = tmp_path / "g"
    r = subprocess.run([sys.executable, "-m", "knowcat", "greedy", "--model", str(run / "model"),
                        str(run / "world" / "data"), "--out", str(out), "--n-prompts", "2",
                        "--world", str(run / "world"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Spearman" in r.stdout
    assert (out / "greedy.jsonl").exists() and (out / "exposure_check.json").exists()


def test_cli_help_lists_the_stages():
    r = subprocess.run([sys.executable, "-m", "knowcat", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("demo", "world", "data", "greedy"):
        assert cmd in r.stdout
