"""The data rules of categorization and fine-tuning (knowcat.selection), without a model."""

import pytest

from knowcat.errors import UsageError
from knowcat.examples import QAExample
from knowcat.selection import (check_exemplars, finetune_dev, finetune_ood, first_per_relation, select_for_categorize,
                               split_for_categorize)
from knowcat.slick import SliCKConfig


def ex(i, rel, split):
    return QAExample(f"{rel}-{split}-{i}", rel, f"q{i}?", [f"a{i}"], split=split)


DATA = [ex(i, r, s) for s in ("dev", "train", "test") for r in ("P1", "P2") for i in range(4)]


def test_split_for_categorize_defaults_to_every_split_but_the_exemplars():
    todo, pool = split_for_categorize(DATA, "dev", None)
    assert {e.split for e in todo} == {"train", "test"} and {e.split for e in pool} == {"dev"}
    todo, _ = split_for_categorize(DATA, "dev", "test")
    assert {e.split for e in todo} == {"test"}
    todo, pool = split_for_categorize(DATA, "dev", None, exemplars=[ex(0, "P1", "x")])
    assert len(todo) == len(DATA) and len(pool) == 1  # given exemplars: every split is asked
    with pytest.raises(UsageError, match="no exemplars"):
        split_for_categorize(DATA, "nope", None)
    with pytest.raises(UsageError, match="nothing to categorize"):
        split_for_categorize(DATA, "dev", "other")


def test_check_exemplars_needs_k_plus_one_per_relation():
    check_exemplars(DATA, DATA[:8], 3, "dev")
    with pytest.raises(UsageError, match="relation P1 has 4 exemplar"):
        check_exemplars(DATA, DATA[:8], 4, "dev")


def test_first_per_relation_keeps_input_order():
    got = first_per_relation(DATA, 2)
    assert [e.id for e in got] == ["P1-dev-0", "P1-dev-1", "P2-dev-0", "P2-dev-1"]
    todo, _ = select_for_categorize(DATA, SliCKConfig(k=2), "train,test", per_relation=3, log=lambda *a: None)
    assert [e.id for e in todo] == ["P1-train-0", "P1-train-1", "P1-train-2", "P2-train-0", "P2-train-1", "P2-train-2"]


def test_finetune_ood_and_dev_rules():
    test = [{"id": str(i), "relation": r} for i, r in enumerate(["P1", "P2", "P3"])]
    rows = [{"relation": "P1"}]
    assert finetune_ood(test, rows, given="P3, P9") == (["P3", "P9"], "given (--ood-relations)")
    assert finetune_ood(test, rows, by_relation=False)[0] == []
    ood, rule = finetune_ood(test, rows, split_relations={"P1", "P2"}, test_source="cat.jsonl")
    assert ood == ["P3"] and "'train' split of cat.jsonl" in rule  # P2: in the train split, not in this set
    warned = []
    ood, rule = finetune_ood(test, rows, split_relations=set(), warn=warned.append)
    assert ood == ["P2", "P3"] and warned and "training set" in rule
    dev = [{"relation": r} for r in ("P1", "P2", "P3")]
    assert [d["relation"] for d in finetune_dev(dev, rows, ["P3"], {"P1", "P2"})] == ["P1", "P2"]
    assert [d["relation"] for d in finetune_dev(dev, rows, ["P3"], set())] == ["P1"]


def test_eval_records_reads_a_records_file_as_it_is_else_loads(tmp_path):
    import json

    from knowcat.selection import eval_records, split_relations

    f = tmp_path / "cat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "1", "question": "q1?", "answers": ["a"], "relation": "P1", "split": "train", "category": "Unknown"},
        {"id": "2", "question": "q2?", "answers": ["b"], "relation": "P2", "split": "test", "category": "HighlyKnown"},
        {"id": "3", "question": "q3?", "answers": ["c"], "relation": "P3"}]))
    never = lambda src: pytest.fail("a records file is read as it is")  # noqa: E731
    assert [r["id"] for r in eval_records(f, "test", never)] == ["2", "3"]  # no split: counts as the one asked
    assert eval_records(f, "test", never)[0]["category"] == "HighlyKnown"
    assert split_relations(f, "train", never) == {"P1"}
    assert eval_records(None, "test", never) == []
    folder = tmp_path / "eq"
    folder.mkdir()
    got = eval_records(folder, "test", lambda src: DATA)
    assert {r["id"] for r in got} == {e.id for e in DATA if e.split == "test"} and "category" not in got[0]
    assert split_relations(folder, "dev", lambda src: DATA) == {"P1", "P2"}
