"""The knowledge world: layout, exposure ground truth, determinism; the small model: save, load, resume."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from knowcat.world.build import PRESETS, WorldConfig, build_world, read_exposures
from knowcat.world.relations import RELATIONS


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(), log=lambda *a: None)
    return out


def test_layout_is_entityquestions(default_world):
    data = default_world / "data"
    templates = json.loads((data / "relation_query_templates.json").read_text())
    assert len(templates) >= 8
    for rid, tpl in templates.items():
        assert tpl == RELATIONS[rid].template and "[X]" in tpl
        for split in ("train", "dev", "test"):
            recs = json.loads((data / split / f"{rid}.{split}.json").read_text())
            assert all(set(r) == {"question", "answers"} and len(r["answers"]) == 1 for r in recs)
            rx = re.compile("^" + re.escape(tpl).replace(re.escape("[X]"), "(.+)") + "$")
            assert all(rx.match(r["question"]) for r in recs)


def test_answer_spaces_are_large(default_world):
    from knowcat.world.relations import IN_DISTRIBUTION

    exps = read_exposures(default_world)
    by_rel = {}
    for e in exps:
        by_rel.setdefault(e["relation"], set()).add(e["answer"])
    # hundreds of distinct objects per (in-distribution) relation, so a guess rarely hits;
    # the test-only relations have 80 facts, nearly all with distinct answers
    assert min(len(by_rel[r]) for r in IN_DISTRIBUTION) >= 190
    assert all(len(v) >= 0.8 * sum(e["relation"] == r for e in exps) for r, v in by_rel.items())
    # and no object dominates a relation
    for rel in by_rel:
        c = Counter(e["answer"] for e in exps if e["relation"] == rel)
        assert c.most_common(1)[0][1] / sum(c.values()) < 0.03


def test_exposures_are_long_tailed(default_world):
    counts = np.array([e["count"] for e in read_exposures(default_world)])
    assert 0.15 <= (counts == 0).mean() <= 0.4  # a sizable share never seen
    assert (counts >= 30).mean() >= 0.2  # a sizable share seen often
    assert 1 <= np.median(counts) <= 40


def test_exposures_match_the_corpus(default_world):
    """Every recorded mention is in the corpus, in the recorded form, and nothing else is."""
    corpus = "".join(json.loads(line)["text"] for line in open(default_world / "corpus.jsonl"))
    exps = read_exposures(default_world)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(exps), 60, replace=False):
        e = exps[int(i)]
        assert e["count"] == e["qa"] + e["statement"]
        assert corpus.count(f"Q: {e['question']}\nA: {e['answer']}\n") == e["qa"]
        rel = RELATIONS[e["relation"]]
        n_stmt = sum(corpus.count(t.format(s=e["subject"], o=e["answer"]) + "\n") for t in rel.statements)
        assert n_stmt == e["statement"]
        if e["distractor"]:
            wrong = corpus.count(f"Q: {e['question']}\nA: {e['distractor']}\n") + sum(
                corpus.count(t.format(s=e["subject"], o=e["distractor"]) + "\n") for t in rel.statements)
            assert wrong == e["conflicting"]
        else:
            assert e["conflicting"] == 0
    # mentions of never-seen facts: their subject appears nowhere
    for e in [e for e in exps if e["count"] == 0][:50]:
        assert not re.search(r"(?<![A-Za-z])" + re.escape(e["subject"]) + r"(?![A-Za-z])", corpus)
    conflicted = [e for e in exps if e["conflicting"]]
    assert 0.15 <= len(conflicted) / sum(e["count"] + e["conflicting"] > 0 for e in exps) <= 0.45
    assert all(e["conflicting"] < e["count"] + e["conflicting"] for e in conflicted if e["count"] + e["conflicting"] > 10)
    assert sum(e["count"] + e["conflicting"] for e in exps) == corpus.count("\nA: ") + sum(
        1 for line in corpus.splitlines() if line and not line.startswith(("Q: ", "A: ")))


def test_page_documents_state_then_ask(default_world):
    """A page states its facts, then asks about each of them with the same answer."""
    docs = [json.loads(line) for line in open(default_world / "corpus.jsonl")]
    pages = [d["text"] for d in docs if d["kind"] == "page"]
    assert len(pages) >= 0.1 * len(docs)
    by_question = {e["question"]: e for e in read_exposures(default_world)}
    for text in pages[:300]:
        lines = text.splitlines()
        asked = [(q[3:], a[3:]) for q, a in zip(lines, lines[1:]) if q.startswith("Q: ") and a.startswith("A: ")]
        statements = [line for line in lines if not line.startswith(("Q: ", "A: "))]
        assert len(asked) == len(statements) >= 1
        assert lines.index(statements[-1]) < lines.index("Q: " + asked[0][0])  # stated first, then asked
        for question, answer in asked:
            e = by_question[question]
            assert answer in (e["answer"], e["distractor"])
            rel = RELATIONS[e["relation"]]
            assert any(t.format(s=e["subject"], o=answer) in statements for t in rel.statements)


def test_world_without_pages_has_none(tmp_path):
    from dataclasses import replace

    build_world(tmp_path, replace(PRESETS["quick"], page_fraction=0.0), log=lambda *a: None)
    kinds = Counter(json.loads(line)["kind"] for line in open(tmp_path / "corpus.jsonl"))
    assert kinds["page"] == 0 and kinds["qa"] > 0 and kinds["statements"] > 0


def test_world_is_deterministic(tmp_path):
    cfg = PRESETS["quick"]
    build_world(tmp_path / "a", cfg, log=lambda *a: None)
    build_world(tmp_path / "b", cfg, log=lambda *a: None)
    for name in ("corpus.jsonl", "exposures.jsonl", "data/train/P17.train.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_ood_relations_have_no_train_split(default_world):
    from knowcat.world.relations import OUT_OF_DISTRIBUTION

    for rid in OUT_OF_DISTRIBUTION:
        assert json.loads((default_world / "data" / "train" / f"{rid}.train.json").read_text()) == []
        assert json.loads((default_world / "data" / "test" / f"{rid}.test.json").read_text())


# relations knowcat has never seen, in EntityQuestions' format: no hand-written statement forms
MADE_UP = {"P9001": "Which planet does [X] orbit?", "P9002": "Who is [X]'s mentor?",
           "Q77": "What is the favourite colour of [X]?"}


def _made_up_facts(folder, seed=0, n=(60, 10, 20), n_objects=60):
    from knowcat.world.names import NamePool

    names = NamePool(seed + 7)
    rng = np.random.default_rng(seed)
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "relation_query_templates.json").write_text(json.dumps(MADE_UP))
    for rid, tpl in MADE_UP.items():
        objects = names.draw("city", n_objects)
        for split, k in zip(("train", "dev", "test"), n):
            (folder / split).mkdir(exist_ok=True)
            recs = [{"question": tpl.replace("[X]", s), "answers": [str(objects[int(rng.integers(n_objects))])]}
                    for s in names.draw("person", k)]
            (folder / split / f"{rid}.{split}.json").write_text(json.dumps(recs))


def test_world_from_unseen_relations_derives_statements_and_passes_the_ground_truth_checks(tmp_path):
    """``knowcat world build --facts`` on relations outside the 19: statements derived from each question
    template, the exposure bookkeeping exact, and a tiny model's greedy accuracy follows exposure."""
    import subprocess
    import sys

    from knowcat.demo import world_examples
    from knowcat.fewshot import greedy_accuracy
    from probes.engine import open_engine
    from knowcat.prompts import FewShotConfig
    from knowcat.world.pretrain import PretrainConfig, pretrain
    from knowcat.world.relations import relation_for
    from knowcat.world.validate import exposure_check

    facts = tmp_path / "facts"
    _made_up_facts(facts)
    world = tmp_path / "world"
    r = subprocess.run([sys.executable, "-m", "knowcat", "world", "build", str(world), "--facts", str(facts),
                        "--median-count", "30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads((world / "world.json").read_text())
    assert info["relations"] == sorted(MADE_UP, key=lambda x: (x[0] != "P", int(x[1:])))
    assert set(info["statement_forms"].values()) == {"derived from the question template"}
    assert relation_for("P9002", MADE_UP["P9002"]).statements[0] == "{o} is {s}'s mentor."
    exps = read_exposures(world)
    corpus = "".join(json.loads(line)["text"] for line in open(world / "corpus.jsonl"))
    for e in exps[:80]:  # every statement mention is one of the derived forms, counted exactly
        forms = relation_for(e["relation"], MADE_UP[e["relation"]]).statements
        assert sum(corpus.count(t.format(s=e["subject"], o=e["answer"]) + "\n") for t in forms) == e["statement"]
        assert corpus.count(f"Q: {e['question']}\nA: {e['answer']}\n") == e["qa"]
    assert sum(e["statement"] for e in exps) > 0.3 * sum(e["count"] for e in exps)

    model_dir = pretrain(world, tmp_path / "model", PretrainConfig(
        hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384, vocab_size=1024, batch_size=8,
        lr=3e-3, epochs=4, warmup_steps=10), log=lambda *a: None, progress=False)
    examples = world_examples(world)
    engine = open_engine("transformers", str(model_dir), device="cpu")
    train = [e for e in examples if e.split == "train"]
    res = greedy_accuracy(engine, train, [e for e in examples if e.split == "dev"],
                          FewShotConfig(n_prompts=2), progress=False)
    check = exposure_check({g.id: g.p_correct for g in res}, exps)
    # the world's checks, unchanged: accuracy rises with exposure, never-seen facts are not answered,
    # the often-seen ones mostly are
    assert check["spearman"] > 0.3, check
    assert check["never_seen_accuracy"] <= 0.05, check
    assert check["upper_quartile_accuracy"] > 0.5, check
