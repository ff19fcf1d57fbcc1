"""A categorization run's identity by content, and concurrent runs on one directory (a tiny random model:
no quick demo needed)."""

import json
import threading
from dataclasses import replace

import pytest

from knowcat.runs import RunMismatch, run_categorize
from knowcat.slick import SliCKConfig

CFG = SliCKConfig(n_prompts=2, k=2, n_samples=2, max_new_tokens=4)
QUIET = dict(shard_size=4, device="cpu", log=lambda *a: None, progress=False)


def _run(model, exs, pool, out, **kw):
    return run_categorize(str(model), exs, pool, out, CFG, **{**QUIET, **kw})


def test_changed_question_or_answer_with_the_same_ids_is_refused(tiny_model_dir, tiny_qa, tmp_path):
    exs, pool = tiny_qa
    _run(tiny_model_dir, exs, pool, tmp_path / "run")
    new_answer = [replace(e, answers=["Somewhere Else"]) if i == 3 else e for i, e in enumerate(exs)]
    with pytest.raises(RunMismatch, match="records"):
        _run(tiny_model_dir, new_answer, pool, tmp_path / "run")
    new_question = [replace(e, question=e.question + " (again)") if i == 0 else e for i, e in enumerate(exs)]
    with pytest.raises(RunMismatch, match="records"):
        _run(tiny_model_dir, new_question, pool, tmp_path / "run")


def test_changed_dev_exemplars_are_refused(tiny_model_dir, tiny_qa, tmp_path):
    exs, pool = tiny_qa
    _run(tiny_model_dir, exs, pool, tmp_path / "run")
    other = [replace(e, answers=["Changed"]) if i == 1 else e for i, e in enumerate(pool)]
    with pytest.raises(RunMismatch, match="exemplar pool"):
        _run(tiny_model_dir, exs, other, tmp_path / "run")


def test_new_weights_at_the_same_path_are_refused(tiny_model_dir, tiny_qa, tiny_tokenizer, tmp_path):
    from conftest import save_tiny_model

    exs, pool = tiny_qa
    _run(tiny_model_dir, exs, pool, tmp_path / "run")
    save_tiny_model(tiny_model_dir, tiny_tokenizer, seed=1)  # retrained: same folder, other weights
    with pytest.raises(RunMismatch, match="model") as err:
        _run(tiny_model_dir, exs, pool, tmp_path / "run")
    assert "delete" in str(err.value)  # says how to start over


def test_a_relative_path_to_the_same_model_is_the_same_model(tiny_model_dir, tiny_qa, tmp_path, monkeypatch):
    exs, pool = tiny_qa
    first = _run(tiny_model_dir, exs, pool, tmp_path / "run")
    monkeypatch.chdir(tiny_model_dir.parent)
    lines = []
    again = _run(tiny_model_dir.name, exs, pool, tmp_path / "run", log=lines.append)
    assert any("already finished" in line for line in lines)
    assert again["categories"] == first["categories"]


def test_a_failed_first_attempt_does_not_block_the_corrected_rerun(tiny_model_dir, tiny_qa, tmp_path):
    exs, pool = tiny_qa
    with pytest.raises(Exception):
        _run(tmp_path / "no_such_model", exs, pool, tmp_path / "run")
    summary = _run(tiny_model_dir, exs, pool, tmp_path / "run")
    assert summary["n"] == len(exs)


def test_two_concurrent_runs_compute_each_shard_once(tiny_model_dir, tiny_qa, tmp_path, monkeypatch):
    import knowcat.runs as runs

    exs, pool = tiny_qa
    computed, lock = [], threading.Lock()
    real = runs.categorize

    def counting(*args, **kw):
        res = real(*args, **kw)
        with lock:
            computed.extend(r.id for r in res)
        return res

    monkeypatch.setattr(runs, "categorize", counting)
    errors = []

    def one():
        try:
            _run(tiny_model_dir, exs, pool, tmp_path / "run", shard_size=2)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(computed) == sorted(e.id for e in exs)  # every example once: no shard computed twice
    rows = [json.loads(line) for line in open(tmp_path / "run" / "categorized.jsonl")]
    assert [r["id"] for r in rows] == [e.id for e in exs]
