"""Few-shot prompts: an example is never its own exemplar, whatever the ids."""

from collections import defaultdict

import pytest

from knowcat.examples import QAExample
from knowcat.matching import normalize
from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for

from conftest import ENTITYQUESTIONS as EQ  # noqa: E402


def _prefix_questions(prefix: str) -> list[str]:
    return [line[3:] for line in prefix.split("\n") if line.startswith("Q: ")]


def _carries_own(ex: QAExample, prefix: str, pool_by_q: dict) -> bool:
    qs = [normalize(q) for q in _prefix_questions(prefix)]
    if normalize(ex.question) in qs:
        return True
    subj = {(e.relation, normalize(e.subject)) for q in qs for e in pool_by_q.get(q, []) if e.subject}
    return ex.subject is not None and (ex.relation, normalize(ex.subject)) in subj


def test_same_question_under_other_ids_and_subjects_is_never_an_exemplar():
    dev = [QAExample(f"dev-{i}", "P1", f"Where was person {i} born?", [f"city{i}"], subject=f"person {i}",
                     split="dev") for i in range(6)]
    # the same question in train and test under other ids, with other casing/punctuation, and one
    # asked in other words about the same subject
    dup = QAExample("train-7", "P1", "where was Person 2 born", ["city2"], subject="person 2", split="train")
    same_subject = QAExample("test-3", "P1", "In which city was person 4 born?", ["city4"], subject="Person 4",
                             split="test")
    dev += [QAExample("dev-2b", "P1", "Where was person 2 born?!", ["city2"], split="dev")]  # a second copy
    sets = exemplar_sets(dev, FewShotConfig(n_prompts=10, k=4, seed=0))
    by_q = defaultdict(list)
    for e in dev:
        by_q[normalize(e.question)].append(e)
    for ex in [dup, same_subject, *dev]:
        for s in sets["P1"]:
            prefix, suffix = prompt_for(ex, s)
            assert len(_prefix_questions(prefix)) == 4 and suffix == f"Q: {ex.question}\nA:"
            assert not _carries_own(ex, prefix, by_q), (ex.id, prefix)


def test_prompts_without_a_clash_keep_the_first_k_exemplars():
    dev = [QAExample(f"d{i}", "P1", f"q{i}?", [f"a{i}"], split="dev") for i in range(9)]
    sets = exemplar_sets(dev, FewShotConfig(n_prompts=5, k=4, seed=3))
    other = QAExample("t0", "P1", "another question?", ["x"], split="test")
    for s in sets["P1"]:
        assert prompt_for(other, s)[0] == "".join(f"Q: {e.question}\nA: {e.answers[0]}\n" for e in s[:4])
        # the first spare takes the slot of the example itself, in place (as before)
        prefix, _ = prompt_for(s[1], s)
        assert _prefix_questions(prefix) == [s[0].question, s[4].question, s[2].question, s[3].question]


def test_real_entityquestions_no_question_is_its_own_exemplar():
    """On the real files, questions of train and test that also appear (under other ids) in dev:
    before, 24 (example, prompt) pairs of the default protocol (10 prompts, k = 4, dev exemplars)
    carried the question itself in their few-shot prefix; now none does."""
    from knowcat.loaders import load_entityquestions

    if not (EQ / "relation_query_templates.json").is_file():
        pytest.fail(f"EntityQuestions copy not found at {EQ}")
    examples = load_entityquestions(EQ)
    pool = [e for e in examples if e.split == "dev"]
    by_q = defaultdict(list)
    keys = set()
    for e in pool:
        by_q[normalize(e.question)].append(e)
        keys.add(normalize(e.question))
        if e.subject:
            keys.add((e.relation, normalize(e.subject)))
    # only a question whose text or (relation, subject) is in dev can meet itself there
    cand = [e for e in examples if e.split != "dev" and (
        normalize(e.question) in keys or (e.subject and (e.relation, normalize(e.subject)) in keys))]
    # 495 train and 57 test questions appear word for word in dev (568 and 62 once normalized)
    assert sum(e.question in {d.question for d in by_q.get(normalize(e.question), [])} for e in cand) == 495 + 57
    sets = exemplar_sets(pool, FewShotConfig())
    carried = [(ex.id, j) for ex in cand for j, s in enumerate(sets[ex.relation])
               if _carries_own(ex, prompt_for(ex, s)[0], by_q)]
    assert carried == []
