"""Fine-tuning on the quick world's model: fitted tracking, resume after a kill, the study end to end."""

import json

import pytest

from knowcat.finetune import FinetuneConfig, answer_prompts, encode_training_set, finetune, read_epochs
from knowcat.matching import normalize
from knowcat.mixtures import DEFAULT_TEMPLATE, MixtureConfig, build_mixtures


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
    m = finetune(str(run / "model"), rows, {"test": test}, tmp_path / "ft", CFG, log=lambda *a: None,
                 progress=False, device="cpu")
    assert m["complete"] and [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4]
    assert m["convergence"] == 4
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


def test_resume_after_kill_matches_uninterrupted(small_sets, tmp_path):
    run, sets, test = small_sets
    rows = sets["unknown_50"]
    cfg = FinetuneConfig(epochs=3, lr=3e-3, batch_size=8, save_model=False)
    full = finetune(str(run / "model"), rows, {"test": test}, tmp_path / "a", cfg, log=lambda *a: None,
                    progress=False, device="cpu")

    class Killed(Exception):
        pass

    def kill_after_two(msg):
        if msg.startswith("epoch 2:"):
            raise Killed

    with pytest.raises(Killed):
        finetune(str(run / "model"), rows, {"test": test}, tmp_path / "b", cfg, log=kill_after_two,
                 progress=False, device="cpu")
    assert [e["epoch"] for e in read_epochs(tmp_path / "b")] == [1, 2]
    assert not (tmp_path / "b" / "metrics.json").exists()
    msgs = []
    resumed = finetune(str(run / "model"), rows, {"test": test}, tmp_path / "b", cfg, log=msgs.append,
                       progress=False, device="cpu")
    assert any("resuming" in m for m in msgs)
    for a, b in zip(full["epochs"], resumed["epochs"]):
        for k in ("train", "test"):
            assert a[k] == b[k]
    # finished: a third call does nothing
    msgs = []
    finetune(str(run / "model"), rows, {"test": test}, tmp_path / "b", cfg, log=msgs.append, progress=False,
             device="cpu")
    assert any("already complete" in m for m in msgs)


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
