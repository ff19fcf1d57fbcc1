"""EntityQuestions: the real copy in ../shared/data/entityquestions, and small broken copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowcat.errors import DataError
from knowcat.loaders import (
    IN_DISTRIBUTION_RELATIONS,
    OOD_RELATIONS,
    drop_multi_answer,
    load_entityquestions,
    load_examples,
    read_rejects,
    subject_share,
)
from knowcat.loaders.entityquestions import template_regex

from conftest import ENTITYQUESTIONS as EQ  # noqa: E402


@pytest.fixture(scope="module")
def eq_folder() -> Path:
    if not (EQ / "relation_query_templates.json").is_file():
        pytest.fail(f"EntityQuestions copy not found at {EQ} (expected ../shared/data/entityquestions "
                    "from the project root, with relation_query_templates.json and train/dev/test folders)")
    return EQ


@pytest.fixture(scope="module")
def eq_all(eq_folder):
    return load_entityquestions(eq_folder)


def test_relation_constants(eq_folder):
    assert len(IN_DISTRIBUTION_RELATIONS) == 12 and len(OOD_RELATIONS) == 7
    assert not set(IN_DISTRIBUTION_RELATIONS) & set(OOD_RELATIONS)
    for rel in IN_DISTRIBUTION_RELATIONS + OOD_RELATIONS:
        for split in ("train", "dev", "test"):
            assert (eq_folder / split / f"{rel}.{split}.json").is_file()


def test_test_counts_after_multi_answer_filter(eq_all):
    test = [ex for ex in eq_all if ex.split == "test"]
    kept, report = drop_multi_answer(test)
    n_in = sum(ex.relation in IN_DISTRIBUTION_RELATIONS for ex in kept)
    n_ood = sum(ex.relation in OOD_RELATIONS for ex in kept)
    print(f"\nafter multi-answer filter: {n_in:,} in-distribution, {n_ood:,} OOD test questions; {report}")
    assert n_in == 10_481
    assert n_ood == 5_848


def test_subjects_recovered(eq_all):
    share = subject_share(eq_all)
    print(f"\nsubjects recovered for {share:.4%} of {len(eq_all):,} questions")
    assert share >= 0.99
    ex = next(e for e in eq_all if e.question == "Which country is Painblanc located in?")
    assert ex.subject == "Painblanc" and ex.relation == "P17" and ex.answers == ["France"]


def test_ids_unique_and_stable(eq_folder, eq_all):
    ids = [ex.id for ex in eq_all]
    assert len(set(ids)) == len(ids)
    again = load_entityquestions(eq_folder)
    assert [ex.id for ex in again] == ids


def test_p495_duplicates_get_suffixes(eq_all):
    p495 = [ex for ex in eq_all if ex.relation == "P495" and ex.split == "train"]
    assert sum(ex.id.count("-") == 2 for ex in p495) == 64  # "P495-<hash>-<n>"


def test_subset_of_relations_and_splits(eq_folder):
    out = load_entityquestions(eq_folder, splits=("dev",), relations=["P36", "P40"])
    assert {(ex.split, ex.relation) for ex in out} == {("dev", "P36"), ("dev", "P40")}
    assert out[0].id == load_examples(eq_folder, splits=("dev",), relations=["P36"])[0].id
    with pytest.raises(DataError, match="no template"):
        load_entityquestions(eq_folder, splits=("dev",), relations=["P999"])


@pytest.mark.parametrize("question,subject", [
    ("Which country is Painblanc located in?", "Painblanc"),
    ("Which country is Painblanc located in ?  ", "Painblanc"),
    ("which country is  Painblanc located in", "Painblanc"),
    ("Which country is Saint-Denis (Réunion) located in?", "Saint-Denis (Réunion)"),
    ("Where is Paris located?", None),
])
def test_template_tolerance(question, subject):
    m = template_regex("Which country is [X] located in?").match(question)
    assert (m.group("subject").strip() if m else None) == subject


def test_template_possessive():
    assert template_regex("Who is [X]'s child?").match("Who is Jean's child?").group("subject") == "Jean"


# --- small broken copies ---------------------------------------------------------------------------

def make_eq(root: Path, records: dict[str, str | list]) -> Path:
    (root / "relation_query_templates.json").write_text(
        json.dumps({"P19": "Where was [X] born?", "P36": "What is the capital of [X]?"}), encoding="utf-8")
    for name, content in records.items():
        split = name.split(".")[1]
        (root / split).mkdir(exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        (root / split / name).write_text(text, encoding="utf-8")
    return root


def test_bad_record_names_file_record_field(tmp_path):
    folder = make_eq(tmp_path, {
        "P19.test.json": [{"question": "Where was Ada born?", "answers": ["London"]},
                          {"question": "Where was Bob born?", "answers": [""]}],
        "P36.test.json": [{"question": "What is the capital of Peru?", "answers": ["Lima"]}],
    })
    with pytest.raises(DataError) as ei:
        load_entityquestions(folder, splits=("test",))
    msg = str(ei.value)
    assert str(folder / "test" / "P19.test.json") in msg and "record 1" in msg and "field 'answers'" in msg
    out = load_entityquestions(folder, splits=("test",), on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert [(ex.relation, ex.subject) for ex in out] == [("P19", "Ada"), ("P36", "Peru")]
    rej = read_rejects(tmp_path / "rej.jsonl")
    assert len(rej) == 1 and rej[0]["field"] == "answers" and "Bob" in rej[0]["raw"]


def test_malformed_file_names_record_and_line(tmp_path):
    folder = make_eq(tmp_path, {"P19.dev.json": '[{"question": "Where was Ada born?", "answers": ["London"]},\n'
                                                '{"question": "Where was Bob born?" "answers": ["Paris"]}]'})
    with pytest.raises(DataError) as ei:
        load_entityquestions(folder, splits=("dev",))
    assert str(folder / "dev" / "P19.dev.json") in str(ei.value)
    assert "record 1" in str(ei.value) and "line 2" in str(ei.value)


def test_missing_pieces(tmp_path):
    with pytest.raises(DataError, match="relation_query_templates.json is missing"):
        load_entityquestions(tmp_path)
    folder = make_eq(tmp_path, {"P19.test.json": [{"question": "Where was Ada born?", "answers": ["London"]}]})
    with pytest.raises(DataError, match="missing split folder"):
        load_entityquestions(folder)
    with pytest.raises(DataError, match="missing file"):
        load_entityquestions(folder, splits=("test",), relations=["P36"])
    assert [ex.subject for ex in load_examples(folder, splits=("test",))] == ["Ada"]
