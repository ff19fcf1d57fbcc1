"""EARLY_STOP's dev questions: one rule for ``knowcat experiment`` and ``knowcat finetune``."""

import json

from knowcat.experiment import early_stop_dev


def _rows(split, rels, n=3):
    return [{"id": f"{split}-{r}-{i}", "relation": r, "question": f"{r} q{i}?", "answers": [f"a{i}"],
             "category": "Unknown", "split": split} for r in rels for i in range(n)]


def test_early_stop_dev_rule():
    dev = _rows("dev", ["P1", "P2", "P9"])
    assert {d["relation"] for d in early_stop_dev(dev, {"P1", "P2"}, ["P9"])} == {"P1", "P2"}
    assert {d["relation"] for d in early_stop_dev(dev, {"P1", "P2", "P9"}, ["P9"])} == {"P1", "P2"}
    assert {d["relation"] for d in early_stop_dev(dev, set(), ["P9"])} == {"P1", "P2"}
    no_rel = [{k: v for k, v in d.items() if k != "relation"} for d in dev]
    assert early_stop_dev(no_rel, {"P1"}, ["P9"]) == no_rel


def test_standalone_finetune_uses_the_experiments_dev_rule(tmp_path, monkeypatch):
    """``knowcat finetune`` used to keep out-of-distribution relations in dev (EARLY_STOP chosen on them)."""
    import knowcat.finetune as ft
    from knowcat.cli import main

    cat = tmp_path / "categorized.jsonl"
    cat.write_text("".join(json.dumps(r) + "\n" for r in
                           _rows("train", ["P1", "P2"]) + _rows("dev", ["P1", "P2", "P9"]) + _rows("test", ["P1", "P9"])))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"x{i}", "relation": "P1", "category": "Unknown", "question": "q?",
                                         "prompt": "Answer the following question. q?\nAnswer:",
                                         "completion": " a"}) + "\n" for i in range(3)))
    seen = {}

    def fake_finetune(model, rows, evals, out, cfg, **kw):
        seen.update(evals=evals, ood=kw.get("ood_relations"))
        return None

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    rc = main(["finetune", "--model", "unused", "--train", str(train), "--out", str(tmp_path / "ft"),
               "--dev", str(cat), "--test", str(cat)])
    assert rc in (0, None)
    assert seen["ood"] == ["P9"]
    assert {d["relation"] for d in seen["evals"]["dev"]} == {"P1", "P2"}
    assert {d["relation"] for d in seen["evals"]["test"]} == {"P1", "P9"}
