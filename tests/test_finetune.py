"""Fine-tuning: scoring and stops on hand-built answers; on the quick world's model, fitted
tracking, resume after a real kill, and data-parallel runs under torchrun and accelerate."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from knowcat.finetune import (NO_DEV_NOTE, FinetuneConfig, answer_prompts, checkpoint_complete, choose_stops,
                              encode_training_set, finetune, latest_complete_checkpoint, mark_checkpoint_complete,
                              score_answers)
from knowcat.matching import normalize
from knowcat.mixtures import DEFAULT_TEMPLATE, MixtureConfig, build_mixtures

ROOT = Path(__file__).resolve().parents[1]


def _categorized(run):
    return [json.loads(line) for line in open(run / "categorized.jsonl", encoding="utf-8")]


@pytest.fixture(scope="module")
def small_sets(quick_demo):
    run, _ = quick_demo
    cat = _categorized(run)
    sets = build_mixtures(cat, MixtureConfig(size=24, unknown_percents=(0, 50, 100), single=False, natural=False))
    test = [{"id": r["id"], "question": r["question"], "answers": r["answers"], "relation": r["relation"],
             "category": r["category"]} for r in cat if r["split"] == "test"][:40]
    return run, sets, test


CFG = FinetuneConfig(epochs=4, lr=3e-3, batch_size=8, save_model=True)


def test_labels_cover_only_the_completion(quick_model):
    _, tok = quick_model
    rows = [{"prompt": "Answer the following question. Who?\nAnswer:", "completion": " Bob Smith"}]
    enc = encode_training_set(rows, tok)[0]
    n_prompt = len(tok(rows[0]["prompt"])["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    learned = [t for t in enc["labels"] if t != -100]
    assert tok.decode(learned[:-1]).strip() == "Bob Smith"
    assert learned[-1] in (tok.eos_token_id, *tok("\n", add_special_tokens=False)["input_ids"])


def test_fitted_tracking_matches_the_saved_model(small_sets, tmp_path):
    run, sets, test = small_sets
    rows = sets["unknown_50"]
    msgs = []
    m = finetune(str(run / "model"), rows, {"test": test}, tmp_path / "ft", CFG, log=msgs.append,
                 progress=False, device="cpu")
    assert m["complete"] and [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4]
    assert m["convergence"] == 4
    # no dev set: EARLY_STOP is undefined, said in the log and in metrics.json, not silently epoch 1
    assert m["early_stop"] is None and m["early_stop_note"] == NO_DEV_NOTE
    assert any("warning" in x and "EARLY_STOP" in x for x in msgs)
    # fitting progresses: the last epoch fits more than the first, on a learning rate that learns
    assert m["epochs"][-1]["train"]["fitted"] > m["epochs"][0]["train"]["fitted"]
    # independent check: the saved final model's greedy answers give the same fitted set
    from probes.loading import load_model

    model, tok = load_model(str(tmp_path / "ft" / "model"), device="cpu")
    ans = answer_prompts(model, tok, {r["id"]: r["prompt"] for r in rows}, DEFAULT_TEMPLATE)
    fitted = {r["id"] for r in rows if normalize(ans[r["id"]]) == normalize(r["completion"])}
    last = [json.loads(line) for line in open(tmp_path / "ft" / "epochs" / "epoch_004.answers.jsonl")]
    assert {r["id"] for r in last if r["set"] == "train" and r["fitted"]} == fitted
    by_cat = m["epochs"][-1]["train"]["fitted_by_category"]
    n_by = m["epochs"][-1]["train"]["n_by_category"]
    assert sum(n_by.values()) == len(rows) and round(sum(by_cat[c] * n_by[c] for c in n_by)) == len(fitted)
    # test accuracy and its per-category split agree with the per-example file
    t = [r for r in last if r["set"] == "test"]
    assert m["epochs"][-1]["test"]["all"]["accuracy"] == pytest.approx(sum(r["correct"] for r in t) / len(t))
    # never writes into the base model's folder
    with pytest.raises(ValueError, match="base model"):
        finetune(str(run / "model"), rows, {}, run / "model" / "ft", CFG, log=lambda *a: None, progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    # the child imports this checkout's knowcat, offline
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def cli_data(quick_demo, tmp_path_factory):
    """A small categorized file (the whole train split, 5 test questions per relation) and a dev
    file (4 dev questions per relation), for `knowcat finetune` runs in subprocesses."""
    from knowcat.loaders import load_examples

    run, _ = quick_demo
    d = tmp_path_factory.mktemp("cli_data")
    cat = _categorized(run)
    per = defaultdict(int)
    keep = []
    for r in cat:
        if r["split"] == "test":
            per[r["relation"]] += 1
            if per[r["relation"]] > 5:
                continue
        keep.append(r)
    (d / "categorized.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    per = defaultdict(int)
    dev = []
    for e in load_examples(str(run / "world" / "data")):
        if e.split == "dev" and per[e.relation] < 4:
            per[e.relation] += 1
            dev.append({"id": e.id, "question": e.question, "answers": list(e.answers), "relation": e.relation,
                        "split": "dev"})
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    train_rels = {r["relation"] for r in keep if r["split"] == "train"}
    ood = sorted({r["relation"] for r in keep if r["split"] == "test"} - train_rels)
    return run, d / "categorized.jsonl", d / "dev.jsonl", ood


def _finetune_cmd(run, cat, dev, out, epochs=3):
    return [sys.executable, "-m", "knowcat", "finetune", "--model", str(run / "model"),
            "--train", str(run / "mixtures" / "unknown_50.jsonl"), "--test", str(cat), "--dev", str(dev),
            "--out", str(out), "--epochs", str(epochs), "--lr", "3e-3", "--batch-size", "8", "--no-save-model",
            "--no-progress", "--device", "cpu"]


def _epoch_files(out: Path) -> dict:
    """Every epoch's measurements (without the time they took) and its per-example answers file."""
    res = {}
    for p in sorted((out / "epochs").glob("epoch_[0-9][0-9][0-9].json")):
        m = json.loads(p.read_text())
        m.pop("seconds_measuring")
        res[p.name] = (m, (out / "epochs" / p.name.replace(".json", ".answers.jsonl")).read_text())
    return res


def _kill_when(cmd, path: Path, log: Path) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists; its output."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        while not path.exists():  # no time limit: a run that never writes it ends, and fails here
            assert proc.poll() is None, f"ended before {path.name} appeared: " + log.read_text()[-3000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    return log.read_text()


def test_resume_after_sigkill_matches_uninterrupted(cli_data, tmp_path, capsys):
    """Real kills: `knowcat finetune` in a subprocess is SIGKILLed (1) as soon as epoch 1's files
    appear, which lands during epoch 1's checkpoint save or just after it, then, started again,
    (2) as soon as epoch 2's checkpoint is marked complete; a torn epoch-3 checkpoint is then left
    beside it, and the third start must skip that one, resume from epoch 2's and end with per-epoch
    measurements and answers identical to an uninterrupted run's."""
    run, cat, dev, ood = cli_data
    full = subprocess.run(_finetune_cmd(run, cat, dev, tmp_path / "a"), capture_output=True, text=True,
                          timeout=900, env=_env())
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "b"
    ckpts = out / "checkpoints"  # 24 examples, batch 8: 3 steps an epoch, checkpoint-3, -6, -9
    _kill_when(_finetune_cmd(run, cat, dev, out), out / "epochs" / "epoch_001.json", tmp_path / "kill1.log")
    assert [e.name for e in sorted((out / "epochs").glob("epoch_*.json"))] == ["epoch_001.json"]
    assert not (out / "metrics.json").exists()
    left = {p.name: checkpoint_complete(p)[0] for p in ckpts.glob("checkpoint-*")} if ckpts.exists() else {}
    second = _kill_when(_finetune_cmd(run, cat, dev, out), ckpts / "checkpoint-6" / "knowcat_complete.json",
                        tmp_path / "kill2.log")
    # after kill 1: resumed from epoch 1's checkpoint if its save had finished, else trained from the start
    if left.get("checkpoint-3"):
        assert "resuming from checkpoint-3" in second
    else:
        assert "no complete checkpoint; training again from the start" in second
        assert not left or "skipping checkpoint-3" in second  # a save cut short is not resumed from
    with capsys.disabled():  # which of the two kill 1 hit, in the output of pytest -s
        print("\nkill 1 left", left or "no checkpoint folder", flush=True)
    assert not (out / "epochs" / "epoch_003.json").exists() and checkpoint_complete(ckpts / "checkpoint-6")[0]
    # a save cut short: the next checkpoint's folder with a truncated state and garbage weights, no marker
    torn = ckpts / "checkpoint-9"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    (torn / "trainer_state.json").write_text('{"global_st')
    assert not checkpoint_complete(torn)[0]

    resumed = subprocess.run(_finetune_cmd(run, cat, dev, out), capture_output=True, text=True, timeout=900,
                             env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint-9: no completion marker" in resumed.stdout
    assert "resuming from checkpoint-6" in resumed.stdout
    a, b = _epoch_files(tmp_path / "a"), _epoch_files(out)
    assert list(a) == list(b) == ["epoch_001.json", "epoch_002.json", "epoch_003.json"]
    for name in a:
        assert a[name] == b[name], name  # measurements (loss included) and every answer, exactly
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "a", out))
    assert (ma["early_stop"], ma["convergence"]) == (mb["early_stop"], mb["convergence"])
    assert ma["early_stop"] is not None and ma["early_stop_rule"].startswith("best dev accuracy")
    # OOD: the test relations absent from the categorized train split
    assert mb["ood_relations"] == ood and ood and "absent from the 'train' split" in mb["ood_rule"]
    assert not ckpts.exists()  # a finished run keeps no checkpoints
    # finished: the same command again does nothing
    from knowcat.cli import main

    assert main(_finetune_cmd(run, cat, dev, out)[3:]) == 0
    assert "already complete" in capsys.readouterr().out
    # the same folder with another configuration is refused rather than mixed
    assert main(_finetune_cmd(run, cat, dev, out, epochs=4)[3:]) == 2
    assert "another model, configuration or data" in capsys.readouterr().err


def _fake_checkpoint(d: Path, step: int) -> Path:
    p = d / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name, n in (("model.safetensors", 64), ("optimizer.pt", 128), ("scheduler.pt", 8), ("rng_state.pth", 16)):
        (p / name).write_bytes(b"x" * n)
    return p


def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    d = tmp_path / "checkpoints"
    assert latest_complete_checkpoint(d) is None
    c3, c6 = _fake_checkpoint(d, 3), _fake_checkpoint(d, 6)
    assert checkpoint_complete(c3) == (False, "no completion marker (the save did not finish)")
    marker = mark_checkpoint_complete(c3, 3, 1.0)
    assert marker["files"] == {"model.safetensors": 64, "optimizer.pt": 128, "rng_state.pth": 16,
                               "scheduler.pt": 8, "trainer_state.json": len(json.dumps({"global_step": 3}))}
    assert checkpoint_complete(c3) == (True, "complete")
    msgs = []
    assert latest_complete_checkpoint(d, log=msgs.append) == c3  # checkpoint-6 has no marker
    assert msgs == ["finetune: skipping checkpoint-6: no completion marker (the save did not finish)"]
    mark_checkpoint_complete(c6, 6, 2.0)
    assert latest_complete_checkpoint(d) == c6
    # a file cut short or missing after the marker was written
    (c6 / "optimizer.pt").write_bytes(b"x" * 10)
    assert checkpoint_complete(c6) == (False, "optimizer.pt has 10 bytes, 128 when saved")
    assert latest_complete_checkpoint(d) == c3
    (c3 / "rng_state.pth").unlink()
    assert checkpoint_complete(c3) == (False, "rng_state.pth is missing")
    assert latest_complete_checkpoint(d) is None
    # a marker written for a save that lacked the optimizer (a model-only save) is not resumable
    c9 = _fake_checkpoint(d, 9)
    (c9 / "optimizer.pt").unlink()
    mark_checkpoint_complete(c9, 9)
    assert checkpoint_complete(c9) == (False, "optimizer.pt missing from the marker")
    c10 = _fake_checkpoint(d, 10)  # the training arguments but no weights
    (c10 / "model.safetensors").rename(c10 / "training_args.bin")
    mark_checkpoint_complete(c10, 10)
    assert checkpoint_complete(c10) == (False, "the weights missing from the marker")
    # a marker copied from another step, an unreadable trainer state
    c12 = _fake_checkpoint(d, 12)
    mark_checkpoint_complete(c12, 9)
    assert checkpoint_complete(c12) == (False, "the marker names step 9")
    c15 = _fake_checkpoint(d, 15)
    mark_checkpoint_complete(c15, 15)
    (c15 / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    assert checkpoint_complete(c15) == (False, "trainer_state.json is at step 12")


def test_lora_trains_only_the_adapter(small_sets, tmp_path):
    run, sets, test = small_sets
    cfg = FinetuneConfig(epochs=2, lr=1e-2, batch_size=8, lora=True, lora_r=4, save_model=True)
    m = finetune(str(run / "model"), sets["unknown_00"], {"test": test[:10]}, tmp_path / "lora", cfg,
                 log=lambda *a: None, progress=False, device="cpu")
    assert m["complete"] and len(m["epochs"]) == 2
    saved = {p.name for p in (tmp_path / "lora" / "model").iterdir()}
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert "model.safetensors" not in saved  # the base weights are not copied


def test_two_processes_under_torchrun(quick_demo, tmp_path):
    """`knowcat finetune` under torchrun: 2 CPU processes (gloo), one data-parallel run, measured once."""
    import shutil
    import subprocess
    import sys

    run, _ = quick_demo
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = (torchrun.split() + ["--nproc_per_node", "2", "-m", "knowcat", "finetune", "--model", str(run / "model"),
           "--train", str(run / "mixtures" / "unknown_50.jsonl"), "--test", str(run / "categorized.jsonl"),
           "--out", str(tmp_path / "ddp"), "--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--no-progress",
           "--device", "cpu"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["complete"] and m["world_size"] == 2 and [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert r.stdout.count("epoch 1:") == 1  # measured by rank 0 only
    assert len(list((tmp_path / "ddp" / "epochs").glob("epoch_*.answers.jsonl"))) == 2


def test_two_processes_under_accelerate_launch(cli_data, tmp_path):
    """`knowcat finetune` under `accelerate launch --multi_gpu --num_processes 2` on the CPU: accelerate
    starts the two processes through torch.distributed.run, the Trainer joins them with gloo (use_cpu),
    rank 0 measures. (`accelerate launch --cpu --num_processes 2` would start one process only:
    accelerate sends multi-CPU runs through mpirun, which needs --mpirun_hostfile and an MPI install.)"""
    run, cat, dev, _ = cli_data
    accelerate = shutil.which("accelerate")
    launcher = [accelerate] if accelerate else [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate:
        launcher.append("launch")
    out = tmp_path / "acc"
    cmd = launcher + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                      "-m"] + _finetune_cmd(run, cat, dev, out, epochs=2)[2:]
    # HF_HOME: no accelerate config file of this machine's user is read
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env={**_env(), "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] and m["world_size"] == 2 and [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert r.stdout.count("epoch 1:") == 1  # measured by rank 0 only
    assert len(list((out / "epochs").glob("epoch_*.answers.jsonl"))) == 2
    assert m["epochs"][-1]["train"]["n"] == 24 and m["early_stop"] in (1, 2)


# ---------------------------------------------------------------------------------------------
# scoring and stops on hand-built answers (no model)

# (id, relation, category, gold answers, the model's answer); P1 and P2 in-distribution, P9 OOD
ANSWERED = [
    ("a", "P1", "HighlyKnown", ["Paris"], "paris"),               # correct (normalized)
    ("b", "P1", "HighlyKnown", ["Rome"], "Rome"),                 # correct
    ("c", "P1", "Unknown", ["Oslo"], "I don't know"),             # abstains
    ("d", "P1", "Unknown", ["Bern"], "I Don't Know."),            # abstains (same after normalization)
    ("e", "P2", "MaybeKnown", ["The Beatles", "Beatles"], "Beatles"),  # correct (an alias)
    ("f", "P2", "WeaklyKnown", ["Kyiv"], "Kiev"),                 # wrong: a hallucination
    ("g", "P9", "HighlyKnown", ["Tokyo"], "Tokyo"),               # correct
    ("h", "P9", "Unknown", ["Accra"], "I don't know"),            # abstains
    ("i", "P9", "MaybeKnown", ["Quito"], "Lima"),                 # wrong
]


def _items_answers():
    items = [{"id": i, "relation": rel, "category": c, "question": f"{i}?", "answers": g}
             for i, rel, c, g, _ in ANSWERED]
    return items, {i: a for i, *_, a in ANSWERED}


def test_hallucination_and_abstention_rates():
    items, answers = _items_answers()
    res, rows = score_answers(items, answers, FinetuneConfig(), {"P9"})
    assert [r["correct"] for r in rows] == [True, True, False, False, True, False, True, False, False]
    assert [r["abstained"] for r in rows] == [False, False, True, True, False, False, False, True, False]
    a = res["all"]  # 9 questions: 4 correct, 3 abstentions, 6 answered of which 2 wrong
    assert (a["n"], a["answered"]) == (9, 6)
    assert a["accuracy"] == pytest.approx(4 / 9) and a["abstention_rate"] == pytest.approx(3 / 9)
    assert a["accuracy_answered"] == pytest.approx(4 / 6) and a["hallucination_rate"] == pytest.approx(2 / 6)
    assert a["by_category"] == {"HighlyKnown": {"n": 3, "accuracy": 1.0}, "MaybeKnown": {"n": 2, "accuracy": 0.5},
                                "WeaklyKnown": {"n": 1, "accuracy": 0.0}, "Unknown": {"n": 3, "accuracy": 0.0}}
    i = res["in_distribution"]  # P1, P2: 6 questions, 3 correct, 2 abstentions, 4 answered, 1 wrong
    assert (i["n"], i["answered"]) == (6, 4)
    assert i["accuracy"] == pytest.approx(0.5) and i["abstention_rate"] == pytest.approx(2 / 6)
    assert i["accuracy_answered"] == pytest.approx(0.75) and i["hallucination_rate"] == pytest.approx(0.25)
    assert i["by_category"] == {"HighlyKnown": {"n": 2, "accuracy": 1.0}, "MaybeKnown": {"n": 1, "accuracy": 1.0},
                                "WeaklyKnown": {"n": 1, "accuracy": 0.0}, "Unknown": {"n": 2, "accuracy": 0.0}}
    o = res["ood"]  # P9: 3 questions, 1 correct, 1 abstention, 2 answered, 1 wrong
    assert (o["n"], o["answered"]) == (3, 2)
    assert o["accuracy"] == pytest.approx(1 / 3) and o["abstention_rate"] == pytest.approx(1 / 3)
    assert o["accuracy_answered"] == pytest.approx(0.5) and o["hallucination_rate"] == pytest.approx(0.5)
    assert o["by_category"] == {"HighlyKnown": {"n": 1, "accuracy": 1.0}, "MaybeKnown": {"n": 1, "accuracy": 0.0},
                                "Unknown": {"n": 1, "accuracy": 0.0}}
    # no OOD relations: one block only
    res, _ = score_answers(items, answers, FinetuneConfig(), set())
    assert set(res) == {"all"}
    # another abstention string: "I don't know" is then an answer, and a wrong one
    res, rows = score_answers(items, answers, FinetuneConfig(abstention="No idea"), {"P9"})
    assert not any(r["abstained"] for r in rows)
    assert res["all"]["abstention_rate"] == 0 and res["all"]["hallucination_rate"] == pytest.approx(5 / 9)
    # every question abstained: no answered question, so no hallucination rate (None, not 0)
    res, _ = score_answers(items, {i: "i don't know" for i in answers}, FinetuneConfig(), {"P9"})
    assert res["all"]["abstention_rate"] == 1.0 and res["all"]["answered"] == 0
    assert res["all"]["hallucination_rate"] is None and res["all"]["accuracy_answered"] is None


def _epoch(e, dev=None):
    m = {"epoch": e, "train": {"fitted": 0.5}}
    if dev is not None:
        m["dev"] = {"all": {"accuracy": dev}}
    return m


def test_choose_stops():
    assert choose_stops([]) == {}
    s = choose_stops([_epoch(1, 0.2), _epoch(2, 0.5), _epoch(3, 0.5), _epoch(4, 0.4)])
    assert (s["early_stop"], s["convergence"]) == (2, 4)  # best dev, the earliest on ties
    # without dev measurements EARLY_STOP is undefined, with the reason; never epoch 1 by default
    s = choose_stops([_epoch(1), _epoch(2), _epoch(3)])
    assert s == {"convergence": 3, "early_stop": None, "early_stop_note": NO_DEV_NOTE}
    # an empty dev set measures nothing either
    s = choose_stops([{"epoch": e, "dev": {"all": {"accuracy": None}}} for e in (1, 2)])
    assert s["early_stop"] is None and s["convergence"] == 2


def test_cli_finetune_ood_is_relative_to_the_categorized_train_split(tmp_path, monkeypatch):
    """A relation of the categorized train split with no example in this training set stays
    in-distribution; --ood-relations overrides; data without a train split falls back, with a warning."""
    import knowcat.finetune as ft
    from knowcat.cli import main

    cat = []
    for rel in ("P1", "P2", "P3"):
        cat += [{"id": f"{rel}-tr{i}", "relation": rel, "question": "q?", "answers": ["a"], "category": "Unknown",
                 "split": "train"} for i in range(2)]
    for rel in ("P1", "P2", "P3", "P4"):
        cat.append({"id": f"{rel}-te", "relation": rel, "question": "q?", "answers": ["a"], "category": "Unknown",
                    "split": "test"})
    (tmp_path / "cat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cat))
    (tmp_path / "test_only.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cat if r["split"] == "test"))
    train = [{"id": r["id"], "relation": r["relation"], "category": "Unknown", "prompt": "p", "completion": " a"}
             for r in cat if r["split"] == "train" and r["relation"] != "P3"]  # P3: none in this set
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    calls = []

    def fake_finetune(model, rows, eval_sets, out, cfg, **kw):
        calls.append({"eval_sets": eval_sets, **kw})
        return {}

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    base = ["finetune", "--model", "m", "--train", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "o")]
    assert main(base + ["--test", str(tmp_path / "cat.jsonl")]) == 0
    assert calls[-1]["ood_relations"] == ["P4"]
    assert calls[-1]["ood_rule"] == f"test relations absent from the 'train' split of {tmp_path / 'cat.jsonl'}"
    assert [t["relation"] for t in calls[-1]["eval_sets"]["test"]] == ["P1", "P2", "P3", "P4"]
    assert main(base + ["--test", str(tmp_path / "cat.jsonl"), "--ood-relations", "P3,P4"]) == 0
    assert calls[-1]["ood_relations"] == ["P3", "P4"] and calls[-1]["ood_rule"] == "given (--ood-relations)"
    assert main(base + ["--test", str(tmp_path / "cat.jsonl"), "--no-ood-by-relation"]) == 0
    assert calls[-1]["ood_relations"] == []
    assert main(base + ["--test", str(tmp_path / "test_only.jsonl")]) == 0
    assert calls[-1]["ood_relations"] == ["P3", "P4"] and "no train split" in calls[-1]["ood_rule"]


def test_identical_training_sets_are_trained_once(quick_demo, tmp_path, monkeypatch):
    """D_Unknown and the 100% Unknown set are the same file under the paper's |D| rule: the study trains on it
    once and copies the run (config.json says so); a resumed study keeps the copy."""
    import knowcat.experiment as ex
    from knowcat.experiment import ExperimentConfig, run_experiment

    run, _ = quick_demo
    mine = tmp_path / "run"
    mine.mkdir()
    # the quick world lacks some categories in every relation: relabel its train questions round-robin so that
    # every relation holds every category (this test is about the orchestration, not the labels)
    cats = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
    rows = [r for r in _categorized(run) if r["split"] in ("train", "test")]
    rels = sorted({r["relation"] for r in rows if r["split"] == "train"})[:2]
    rows = [r for r in rows if r["relation"] in rels]
    for i, r in enumerate(r for r in rows if r["split"] == "train"):
        r["category"] = cats[i % 4]
    (mine / "categorized.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = ex.finetune
    monkeypatch.setattr(ex, "finetune", lambda *a, **k: calls.append(Path(a[3]).name) or real(*a, **k))
    cfg = ExperimentConfig(mixtures=MixtureConfig(unknown_percents=(0, 100), known=False, idk=False,
                                                  natural=False),
                           finetune=FinetuneConfig(epochs=1, lr=3e-3, batch_size=8),
                           variants=("unknown_100", "Unknown", "unknown_00"))
    run_experiment(mine, str(run / "model"), cfg, dev=[], device="cpu", log=lambda s: None, progress=False)
    mix = mine / "mixtures"
    assert (mix / "Unknown.jsonl").read_bytes() == (mix / "unknown_100.jsonl").read_bytes()
    assert (mix / "unknown_00.jsonl").read_bytes() != (mix / "unknown_100.jsonl").read_bytes()
    assert calls == ["unknown_100", "unknown_00"]
    ft = mine / "finetune"
    assert json.loads((ft / "Unknown" / "config.json").read_text())["same_training_set_as"] == "unknown_100"
    assert (ft / "Unknown" / "metrics.json").read_text() == (ft / "unknown_100" / "metrics.json").read_text()
    assert not (ft / "Unknown" / "checkpoints").exists()
    a = json.loads((mine / "analysis.json").read_text())
    assert {"Unknown", "unknown_100", "unknown_00"} <= set(a["variants"])
    calls.clear()
    run_experiment(mine, str(run / "model"), cfg, dev=[], device="cpu", log=lambda s: None, progress=False)
    assert calls == ["unknown_100", "unknown_00"]  # finetune returns at once: "already complete"
