"""The quick demo, end to end, and the command line around it."""

import json
import subprocess
import sys

import pytest


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
    # stage timings are recorded, never bounded here: wall time belongs in bench/
    assert set(summary["seconds"]) and all(v >= 0 for v in summary["seconds"].values())


def test_quick_demo_runs_the_study_and_the_surrogates(quick_demo):
    run, summary = quick_demo
    analysis = json.loads((run / "analysis.json").read_text())
    manifest = json.loads((run / "mixtures" / "manifest.json").read_text())
    assert set(analysis["variants"]) == {k for k, v in manifest["sets"].items() if v["n"] > 0}
    for v in analysis["variants"]:
        m = json.loads((run / "finetune" / v / "metrics.json").read_text())
        assert m["complete"] and len(m["epochs"]) == 3
        assert {"in_distribution", "ood"} <= set(m["epochs"][-1]["test"])
    for key in ("linear_model", "accuracy_vs_unknown", "t_tests", "fitting", "idk", "findings"):
        assert key in analysis, key
    assert "b_unk" in analysis["linear_model"]["in_distribution"]["params"]
    assert summary["findings"] == analysis["findings"]
    tests = json.loads((run / "surrogates" / "tests.json").read_text())
    assert set(tests) == {"answer_jacobian", "relation_map", "relation_jacobian", "weight_update"}
    assert set(summary["surrogate_verdicts"]) == set(tests)
    assert json.loads((run / "demo_summary.json").read_text())["report"] == str(run / "report.html")
    assert (run / "report.html").stat().st_size > 0


def test_demo_resumes_without_recomputing(quick_demo):
    from knowcat.demo import run_demo

    run, _ = quick_demo
    before = (run / "model" / "model.safetensors").stat().st_mtime_ns
    lines = []
    run_demo(run, preset="quick", device="cpu", progress=False, log=lines.append)
    assert any("already built" in line for line in lines)
    assert any("model already" in line for line in lines)
    assert any("already finished" in line for line in lines)
    assert any("already complete" in line for line in lines)  # the fine-tuning runs
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
    for cmd in ("demo", "world", "data", "greedy", "categorize", "filter", "mixtures", "finetune", "experiment",
                "analyze", "surrogate"):
        assert cmd in r.stdout


def test_quick_demo_terminal_is_clean(quick_demo_cli):
    """What ``knowcat demo`` prints: a line per stage and at the end what was found and where the report is;
    no library warning, no bare source line of one, no raw log dict (they go to RUN/demo.log)."""
    import re

    run, summary, output = quick_demo_cli
    if output is None:
        pytest.skip("KNOWCAT_QUICK_DEMO names a run without terminal.txt (its captured output)")
    lines = [seg for line in output.splitlines() for seg in line.split("\r") if seg.strip()]
    assert not [x for x in lines if re.search(r"warn", x, re.I)], [x for x in lines if re.search(r"warn", x, re.I)]
    assert not [x for x in lines if "forward_call" in x or x.lstrip().startswith(("return ", "File \"", "Traceback"))]
    assert not [x for x in lines if re.match(r"\s*\{['\"]", x)]  # the Trainer's {'loss': ...} dicts
    for i, stage in enumerate(summary["stages"], 1):
        assert any(x.startswith(f"[{i}/{len(summary['stages'])}] {stage}: ") for x in lines), stage
    done = [x for x in lines if x.startswith("demo done in")]  # the last line printed (stdout; bars are stderr)
    assert len(done) == 1 and done[0].endswith(str(run / "report.html"))
    assert any(x.startswith("found: HighlyKnown") for x in lines)
    assert (run / "demo.log").stat().st_size > 0  # the detail is kept there


def test_quick_demo_reports_as_it_goes(quick_demo):
    """Each stage from categorization on rewrote the report; the summary records when the first one was
    written, the precision is in the config and on the page."""
    run, summary = quick_demo
    assert summary["status"] == "complete" and summary["stages_done"] == summary["stages"]
    assert 0 < summary["first_report_seconds"] <= summary["seconds_since_start"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["precision"]["pretrain"] == "float32" and cfg["pretrain"]["bf16"] is False
    html = (run / "report.html").read_text()
    assert 'id="precision"' in html and "float32" in html
    assert 'id="progress"' not in html  # finished: no "in progress" banner
    # the filter stage: the train split as chat and Alpaca files, estimated, filtered, in the report
    assert "filter" in summary["stages_done"]
    fs = json.loads((run / "filter" / "filter_summary.json").read_text())
    assert fs["kept"] + fs["rejected"] == fs["total"] == sum(1 for _ in open(run / "filter" / "sft" / "train.alpaca.jsonl"))
    assert fs["by_category"]["Unknown"]["kept"] == 0 and 'id="filtering"' in html


def test_partial_report_shows_progress(quick_demo, tmp_path):
    """A run with only the early stages' files (as while the demo runs) gets a report with its knowledge
    section and an "in progress" banner naming the stages still to come."""
    import shutil

    from reports import build_report

    run, _ = quick_demo
    part = tmp_path / "part"
    (part / "world").mkdir(parents=True)
    for name in ("config.json", "categorized.jsonl", "exposure_check.json", "categorize_summary.json"):
        shutil.copy(run / name, part / name)
    shutil.copy(run / "world" / "exposures.jsonl", part / "world" / "exposures.jsonl")
    (part / "demo_summary.json").write_text(json.dumps({
        "status": "running", "stages": ["world", "pretrain", "categorize", "experiment", "surrogates"],
        "stages_done": ["world", "pretrain", "categorize"], "seconds": {"world": 1.0}}))
    html = build_report(part).read_text()
    assert 'id="progress"' in html and "experiment, surrogates" in html
    assert 'id="knowledge"' in html and "Spearman" in html


def test_test_set_measured_where_early_stop_may_fall():
    """Outside the sets given in ``test_each_epoch``, the test set is measured only at epochs whose dev
    accuracy beats every earlier one's: EARLY_STOP (the earliest best dev epoch) is always among them."""
    from knowcat.finetune import FinetuneConfig, choose_stops, may_be_early_stop, tests_every_epoch

    cfg = FinetuneConfig(test_each_epoch="unknown_*,known_*")
    assert tests_every_epoch(cfg, "unknown_50") and tests_every_epoch(cfg, "known_25")
    assert not tests_every_epoch(cfg, "HighlyKnown") and not tests_every_epoch(cfg, "idk")
    assert tests_every_epoch(FinetuneConfig(), "natural")  # the default: every epoch, every set
    dev = [0.2, 0.3, 0.3, 0.25, 0.35, 0.1]
    epochs, measured = [], []
    for i, a in enumerate(dev, 1):
        if may_be_early_stop(a, epochs):
            measured.append(i)
        epochs.append({"epoch": i, "dev": {"all": {"accuracy": a}}})
    assert measured == [1, 2, 5]  # a tie (epoch 3) is never EARLY_STOP: the earliest best wins
    assert choose_stops(epochs)["early_stop"] in measured


def test_study_line_says_each_findings_decision():
    """The terminal line of the study stage gives each finding's three-way decision: an interval that contains
    0 is "unclear", not "does not hold"."""
    from knowcat.demo import study_line

    line = study_line({"a": {"holds": True, "decision": "holds"}, "b": {"holds": False, "decision": "unclear"},
                       "c": {"holds": False, "decision": "does not hold"}, "d": {"holds": False}, "e": {}})
    assert line == "a holds; b unclear; c does not hold; d does not hold"
