"""Loaders on small hand-written files: validation, skip mode, round trips, filters."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest

from knowcat.loaders.filters import ENTITY_FIELDS

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.loaders import (
    FieldMap,
    FilterReport,
    RejectWriter,
    apply_paper_filters,
    drop_multi_answer,
    drop_train_test_overlap,
    load_examples,
    load_hf_dataset,
    load_records,
    read_rejects,
)

GOOD = {"question": "Where was Ada born?", "answers": ["London"]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_names(err: DataError, file, record, field=None):
    msg = str(err)
    assert str(file) in msg, msg
    assert f"record {record}" in msg, msg
    assert err.record == record
    if field is not None:
        assert f"field '{field}'" in msg, msg
        assert err.field == field


# --- one bad record of each kind, JSONL (the bad one is line 2) ------------------------------------

BAD_RECORDS = {
    "missing question": ({"answers": ["x"]}, "question", "missing"),
    "missing answers": ({"question": "q?"}, "answers", "missing"),
    "answers a number": ({"question": "q?", "answers": 1984}, "answers", "int"),
    "question a list": ({"question": ["q?"], "answers": ["x"]}, "question", "list"),
    "alias a number": ({"question": "q?", "answers": ["x", 3]}, "answers", "int"),
    "empty answers": ({"question": "q?", "answers": []}, "answers", "empty"),
    "empty alias": ({"question": "q?", "answers": ["x", "  "]}, "answers", "empty"),
    "empty answer string": ({"question": "q?", "answers": ""}, "answers", "empty"),
    "empty question": ({"question": "   ", "answers": ["x"]}, "question", "empty"),
    "null question": ({"question": None, "answers": ["x"]}, "question", "missing"),
    "id a list": ({"id": [1], "question": "q?", "answers": ["x"]}, "id", "list"),
    "relation a number": ({"relation": 5, "question": "q?", "answers": ["x"]}, "relation", "int"),
    "not an object": (["q?", ["x"]], None, "list"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_jsonl_raises_naming_file_record_field(tmp_path, kind):
    bad, field, word = BAD_RECORDS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 2, field)
    assert word in str(ei.value)


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_json_list_names_index(tmp_path, kind):
    bad, field, word = BAD_RECORDS[kind]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, bad, GOOD]), encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, field)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"question": "q?", "answers": ["x"' + "\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 3)
    assert "malformed JSON at line 3" in str(ei.value)


def test_malformed_json_list_names_record_and_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"question": "a?", "answers": ["x"]},\n {"question": "b?", "answers": ["y"],,}\n]', encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1)
    assert "line 3" in str(ei.value)


def test_json_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('"hello"', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(path)


def test_duplicate_ids(tmp_path):
    recs = [dict(GOOD, id="a"), dict(GOOD, id="b", question="other?"), dict(GOOD, id="a", question="third?")]
    path = write_jsonl(tmp_path / "data.jsonl", recs)
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 3, "id")
    assert "duplicate id 'a'" in str(ei.value) and "record 1" in str(ei.value)


def test_exact_duplicates_without_ids_get_suffixes(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, GOOD])
    ids = [ex.id for ex in load_records(path, relation="P19")]
    assert len(set(ids)) == 3
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"


def test_invalid_utf8_jsonl_names_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "Where is caf\xe9?", "answers": ["x"]}\n')
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 2, "question")
    assert "UTF-8" in str(ei.value)


def test_invalid_utf8_json_list_names_record_and_field(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"question": "a?", "answers": ["x"]}, {"question": "b?", "answers": ["\xff\xfe"], "note": 1}]')
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, "answers")
    assert "UTF-8" in str(ei.value)


def test_invalid_utf8_in_extra_field_names_it(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"question": "a?", "answers": ["x"], "source": "caf\xe9"}\n')
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, "source")


def test_invalid_utf8_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"question,answers\na?,x\nb\xff?,y\n")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, "question")


def test_over_long_jsonl_line(tmp_path):
    path = tmp_path / "data.jsonl"
    long = dict(GOOD, question="x" * 5000 + "?")
    write_jsonl(path, [GOOD, long, GOOD])
    with pytest.raises(DataError) as ei:
        load_records(path, max_line_bytes=1000)
    assert_names(ei.value, path, 2)
    assert "max_line_bytes=1000" in str(ei.value)
    # skip mode keeps reading after the long line
    out = load_records(path, max_line_bytes=1000, on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert len(out) == 2
    rej = read_rejects(tmp_path / "rej.jsonl")
    assert [r["record"] for r in rej] == [2] and len(rej[0]["raw"]) < 5000


def test_line_exactly_at_limit_is_fine(tmp_path):
    line = json.dumps(GOOD)
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n" + line, encoding="utf-8")
    assert len(load_records(path, max_line_bytes=len(line))) == 2
    with pytest.raises(DataError):
        load_records(path, max_line_bytes=len(line) - 1)


def test_bad_csv_cells(tmp_path):
    path = tmp_path / "data.csv"
    pd.DataFrame({"question": ["a?", "b?", ""], "answers": ['["x", "y"]', "[not, json]", "z"]}).to_csv(path, index=False)
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, "answers")
    out = load_records(path, on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert [ex.answers for ex in out] == [["x", "y"]]
    rej = read_rejects(tmp_path / "rej.jsonl")
    assert [(r["record"], r["field"]) for r in rej] == [(1, "answers"), (2, "question")]


def test_malformed_csv_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,answers\na?,x\nb?,y,extra,more\nc?,z\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert str(path) in str(ei.value) and "line 3" in str(ei.value)
    out = load_records(path, on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert [ex.question for ex in out] == ["a?", "c?"]
    assert "malformed CSV row" in read_rejects(tmp_path / "rej.jsonl")[0]["reason"]


def test_bad_parquet_record(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"question": ["a?", "b?"], "answers": [["x"], []]}).to_parquet(path)
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert_names(ei.value, path, 1, "answers")


def test_not_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("nope", encoding="utf-8")
    with pytest.raises(DataError, match="Parquet"):
        load_records(path)


# --- skip mode -------------------------------------------------------------------------------------

def test_skip_mode_writes_rejects_and_keeps_good(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(GOOD), '{"question": "broken', json.dumps({"question": "q?", "answers": []}),
             json.dumps({"question": "q2?", "answers": ["y"], "id": "k"}),
             json.dumps({"question": "q3?", "answers": ["z"], "id": "k", "blob": "b" * 10000})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"question": "\xff?", "answers": ["x"]}\n')
    rej_path = tmp_path / "out" / "rejects.jsonl"
    with caplog.at_level(logging.WARNING, logger="knowcat.loaders"):
        out = load_records(path, on_error="skip", rejects=rej_path)
    assert [ex.question for ex in out] == ["Where was Ada born?", "q2?"]
    rej = read_rejects(rej_path)
    assert [(r["record"], r["field"]) for r in rej] == [(2, None), (3, "answers"), (5, "id"), (6, "question")]
    assert all(r["file"] == str(path) for r in rej)
    assert "malformed JSON" in rej[0]["reason"] and "empty" in rej[1]["reason"]
    assert "duplicate id" in rej[2]["reason"] and "UTF-8" in rej[3]["reason"]
    assert rej[0]["raw"].startswith('{"question": "broken')
    assert len(rej[2]["raw"]) < 5000 and "truncated" in rej[2]["raw"]
    assert "\\xff" in rej[3]["raw"]
    assert "skipped 4 bad record(s)" in caplog.text


def test_skip_mode_with_clean_file_writes_empty_rejects(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    rej = tmp_path / "rej.jsonl"
    assert len(load_records(path, on_error="skip", rejects=rej)) == 1
    assert rej.read_text() == ""


def test_shared_reject_writer(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"question": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"answers": ["x"]}, GOOD])
    with RejectWriter(tmp_path / "rej.jsonl") as w:
        n = len(load_records(a, on_error="skip", rejects=w)) + len(load_records(b, on_error="skip", rejects=w))
    assert n == 2
    assert [(r["file"], r["field"]) for r in read_rejects(tmp_path / "rej.jsonl")] == [
        (str(a), "answers"), (str(b), "question")]


def test_skip_mode_malformed_json_list_keeps_records_before(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"question": "a?", "answers": ["x"]}, {"question": "b?" "answers": ["y"]}, '
                    '{"question": "c?", "answers": ["z"]}]', encoding="utf-8")
    out = load_records(path, on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert [ex.question for ex in out] == ["a?"]
    assert read_rejects(tmp_path / "rej.jsonl")[0]["record"] == 1


def test_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(ValueError):
        load_records(path, on_error="ignore")
    with pytest.raises(ValueError):
        load_records(path, fields={"questoin": "q"})
    with pytest.raises(DataError, match="unknown format"):
        load_records(tmp_path / "data.txt")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


# --- round trips -----------------------------------------------------------------------------------

FIELDS = FieldMap(id="uid", relation="rel", question="q", answers="golds", subject="subj", split="part")
ROWS = [
    {"uid": "e1", "rel": "P17", "q": "Which country is Paris located in?", "golds": ["France", "French Republic"],
     "subj": "Paris", "part": "test", "source": "wiki", "difficulty": 3},
    {"uid": "e2", "rel": "P19", "q": "Where was Ada born?", "golds": ["London"], "subj": "Ada", "part": "train",
     "source": "book", "difficulty": 1},
]


def check_round_trip(out, *, typed=True):
    assert [ex.id for ex in out] == ["e1", "e2"]
    assert [ex.relation for ex in out] == ["P17", "P19"]
    assert out[0].question == ROWS[0]["q"] and out[0].answers == ["France", "French Republic"]
    assert [ex.subject for ex in out] == ["Paris", "Ada"] and [ex.split for ex in out] == ["test", "train"]
    want = [{"source": "wiki", "difficulty": 3}, {"source": "book", "difficulty": 1}]
    if not typed:  # CSV cells are text
        want = [{k: str(v) for k, v in m.items()} for m in want]
    assert [ex.metadata for ex in out] == want


def test_round_trip_jsonl(tmp_path):
    check_round_trip(load_records(write_jsonl(tmp_path / "d.jsonl", ROWS), fields=FIELDS))


def test_round_trip_json_list_and_json_lines_named_json(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    check_round_trip(load_records(tmp_path / "d.json", fields=FIELDS))
    check_round_trip(load_records(write_jsonl(tmp_path / "lines.json", ROWS), fields=FIELDS))


def test_round_trip_csv_json_cells(tmp_path):
    df = pd.DataFrame([dict(r, golds=json.dumps(r["golds"])) for r in ROWS])
    df.to_csv(tmp_path / "d.csv", index=False)
    check_round_trip(load_records(tmp_path / "d.csv", fields=FIELDS), typed=False)


def test_csv_answers_sep_and_defaults(tmp_path):
    pd.DataFrame({"q": ["a?", "b?"], "golds": ["x | y", "z"], "id": ["", "given"]}).to_csv(tmp_path / "d.csv", index=False)
    out = load_records(tmp_path / "d.csv", fields={"question": "q", "answers": "golds"}, answers_sep="|",
                       relation="P26", split="dev")
    assert [ex.answers for ex in out] == [["x", "y"], ["z"]]
    assert [ex.relation for ex in out] == ["P26", "P26"] and [ex.split for ex in out] == ["dev", "dev"]
    assert out[0].id.startswith("P26-") and out[1].id == "given"
    assert out[0].subject is None and out[0].metadata == {}


def test_single_string_answer_and_relation_default(tmp_path):
    out = load_records(write_jsonl(tmp_path / "d.jsonl", [{"question": "a?", "answers": "x", "id": 7}]))
    assert out[0].answers == ["x"] and out[0].relation == "default" and out[0].id == "7"


def test_round_trip_parquet(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    check_round_trip(load_records(tmp_path / "d.parquet", fields=FIELDS))


def test_round_trip_saved_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    check_round_trip(load_hf_dataset(tmp_path / "ds", fields=FIELDS))
    check_round_trip(load_examples(tmp_path / "ds", fields=FIELDS))


def test_round_trip_saved_hf_dataset_dict(tmp_path):
    import datasets

    rows = [{k: v for k, v in r.items() if k != "part"} for r in ROWS]
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1]),
                               "train": datasets.Dataset.from_list(rows[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    check_round_trip(load_hf_dataset(tmp_path / "dd", fields=FIELDS))
    only = load_examples(tmp_path / "dd", fields=FIELDS, split="train")
    assert [ex.id for ex in only] == ["e2"] and only[0].split == "train"
    with pytest.raises(DataError, match="no split"):
        load_hf_dataset(tmp_path / "dd", split="validation")


def test_hf_split_name_does_not_override_record_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert [ex.split for ex in load_hf_dataset(tmp_path / "dd", fields=FIELDS)] == ["test", "train"]


def test_hf_bad_row_names_split_and_row(tmp_path):
    import datasets

    rows = [{"question": "a?", "answers": ["x"]}, {"question": "b?", "answers": []}]
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as ei:
        load_hf_dataset(tmp_path / "dd")
    assert_names(ei.value, tmp_path / "dd", "dev[1]", "answers")
    out = load_hf_dataset(tmp_path / "dd", on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert len(out) == 1 and read_rejects(tmp_path / "rej.jsonl")[0]["record"] == "dev[1]"


def test_hf_load_dataset_folder_of_files(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": "a?", "answers": ["x"], "tag": "t"}])
    write_jsonl(folder / "test.jsonl", [{"question": "b?", "answers": ["y"], "tag": "u"}])
    out = load_examples(folder, cache_dir=str(tmp_path / "cache"))
    assert sorted((ex.split, ex.question, ex.metadata["tag"]) for ex in out) == [("test", "b?", "u"), ("train", "a?", "t")]


def test_hf_folder_falls_back_to_own_readers_with_precise_errors(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_hf_dataset(folder, cache_dir=str(tmp_path / "cache"))
    assert_names(ei.value, folder / "train.jsonl", 2)
    out = load_hf_dataset(folder, cache_dir=str(tmp_path / "cache"), on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert len(out) == 1 and out[0].split == "train"


def test_hf_never_downloads(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        load_hf_dataset("some-org/some-dataset")


def test_load_examples_dispatch(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [GOOD])
    pd.DataFrame([GOOD]).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "weird.txt").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    assert load_examples(tmp_path / "d.jsonl")[0].answers == ["London"]
    assert load_examples(tmp_path / "d.parquet")[0].answers == ["London"]
    assert load_examples(tmp_path / "weird.txt", format="jsonl")[0].answers == ["London"]
    with pytest.raises(ValueError):
        load_examples(tmp_path / "d.jsonl", format="xml")
    with pytest.raises(DataError):
        load_examples(tmp_path / "missing")


# --- filters ---------------------------------------------------------------------------------------

def ex(i, rel, answers, subject, split):
    return QAExample(id=str(i), relation=rel, question=f"q{i}?", answers=answers, subject=subject, split=split)


def tiny():
    return [
        ex(1, "P17", ["France"], "Paris", "train"),          # answer France is a test answer -> overlap
        ex(2, "P17", ["Italy", "Italia"], "Rome", "train"),   # multi-answer
        ex(3, "P19", ["Berlin"], " lyon ", "train"),          # subject Lyon is a test subject (casefold/strip)
        ex(4, "P19", ["Oslo"], "Ada", "train"),               # kept
        ex(5, "P19", ["Bergen"], "Bob", "dev"),               # dev: untouched by overlap
        ex(6, "P17", ["france"], "Lyon", "test"),
        ex(7, "P17", ["Spain", "España"], "Madrid", "test"),  # multi-answer: dropped before the overlap check
        ex(8, "P19", ["Madrid"], "Eve", "train"),             # Madrid only in a dropped test example: kept
        ex(9, "P19", ["Tokyo"], None, "train"),               # no subject: answers only; kept
    ]


def test_drop_multi_answer():
    kept, rep = drop_multi_answer(tiny())
    assert [e.id for e in kept] == ["1", "3", "4", "5", "6", "8", "9"]
    assert (rep.name, rep.kept, rep.removed, rep.removed_by_relation) == ("drop_multi_answer", 7, 2, {"P17": 2})


def test_drop_train_test_overlap():
    kept, rep = drop_train_test_overlap(tiny(), train_fields=ENTITY_FIELDS, test_fields=ENTITY_FIELDS)
    # test entities: lyon, france, madrid, spain, españa -> train 1, 3, 8 removed
    assert [e.id for e in kept] == ["2", "4", "5", "6", "7", "9"]
    assert (rep.kept, rep.removed, rep.removed_by_relation) == (6, 3, {"P17": 1, "P19": 2})
    kept, rep = drop_train_test_overlap(tiny())  # default: subjects against subjects
    assert [e.id for e in kept if e.split == "train"] == ["1", "2", "4", "8", "9"] and rep.removed == 1


def test_apply_paper_filters_order_and_log():
    lines = []
    kept, reports = apply_paper_filters(tiny(), log=lines.append)
    assert [e.id for e in kept] == ["1", "4", "5", "6", "8", "9"]
    assert [(r.name, r.removed) for r in reports] == [("drop_multi_answer", 2), ("drop_train_test_overlap", 1)]
    assert lines == [str(r) for r in reports]
    assert lines[1] == "drop_train_test_overlap: removed 1 of 7 (14.3%), kept 6; by relation: P19 1"
    kept, reports = apply_paper_filters(tiny(), overlap=False, log=None)
    assert len(kept) == 7 and len(reports) == 1


def test_filter_report_str_empty():
    assert str(FilterReport("x", 0, 0)) == "x: removed 0 of 0 (0.0%), kept 0"
