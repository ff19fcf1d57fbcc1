"""SFT formats: detection, turns, round trips through every container, filtering, malformed records."""

import json

import pytest

from knowcat.errors import DataError
from knowcat.filtering import FilterConfig, filter_file
from knowcat.loaders.sft import META_KEY, iter_raw, load_sft, parse_record, strip_meta, write_sft
from knowcat.matching import MATCH_MODES, answer_too_long, f1_score, is_correct
from knowcat.sft import annotate_records, prepare

MESSAGES = [
    {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Where was Kel Mar born?"},
                              {"role": "assistant", "content": "Vorma"},
                              {"role": "user", "content": "And Oren Vale?"},
                              {"role": "assistant", "content": "Dorn"}], "source": "a"},
    {"id": "m2", "messages": [{"role": "user", "content": "Who founded Tessa Lind?"},
                              {"role": "assistant", "content": "Oren Vale"}], "source": "b"},
    {"id": "m3", "messages": [{"role": "user", "content": "Capital of Dorn?"},
                              {"role": "assistant", "content": "Dorn City"}], "source": "a"},
]
PROMPT_COMPLETION = [
    {"prompt": "Where was Kel Mar born?", "completion": "Vorma"},
    {"prompt": [{"role": "user", "content": "Who founded Tessa Lind?"}],
     "completion": [{"role": "assistant", "content": "Oren Vale"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Where was Kel Mar born?"}, {"from": "gpt", "value": "Vorma"}],
     "system": "Be brief.", "idx": 7},
    {"conversations": [{"from": "system", "value": "Hi"}, {"from": "human", "value": "Capital of Dorn?"},
                       {"from": "gpt", "value": "Dorn City"}], "idx": 8},
]
ALPACA = [
    {"instruction": "Name the capital.", "input": "Dorn", "output": "Dorn City", "system": "",
     "history": [["Where was Kel Mar born?", "Vorma"]]},
    {"instruction": "Who founded Tessa Lind?", "input": "", "output": "Oren Vale"},
]
QA = [{"question": "Where was Kel Mar born?", "answers": ["Vorma", "Vorma Town"], "x": 1},
      {"question": "Who founded Tessa Lind?", "answer": "Oren Vale", "x": 2}]
ALL = {"messages": MESSAGES, "prompt_completion": PROMPT_COMPLETION, "sharegpt": SHAREGPT, "alpaca": ALPACA,
       "qa": QA}


def _write(path, records):
    write_sft(path, records)
    return path


def _fake_results(examples):
    cats = ["HighlyKnown", "Unknown", "MaybeKnown", "WeaklyKnown"]
    return {e.id: {"category": cats[i % 4]} for i, e in enumerate(examples)}


@pytest.mark.parametrize("fmt", list(ALL))
@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "hf"])
def test_round_trip(fmt, container, tmp_path):
    recs = ALL[fmt]
    if container in ("parquet", "hf") and fmt != "messages":
        recs = [recs[0], dict(recs[0])]  # Parquet and datasets hold one schema: records of one shape
    src = _write(tmp_path / ("data" + ("" if container == "hf" else "." + container)), recs)
    ds = load_sft(src)
    assert ds.format == fmt and ds.container == container and not ds.rejects
    examples, na = prepare(ds)
    assert not na and len(examples) == len(recs)
    annotated = annotate_records(ds, examples, _fake_results(examples), "slick")
    for a, r in zip(annotated, recs):
        assert list(a)[:-1] == list(r) and list(a)[-1] == META_KEY  # own field order, one key added
        assert strip_meta(a) == r
    out = _write(tmp_path / ("cat" + ("" if container == "hf" else "." + container)), annotated)
    back = [rr.value for rr in iter_raw(out)]
    assert back == annotated
    kept_path = tmp_path / ("kept" + ("" if container == "hf" else "." + container))
    res = filter_file(out, kept_path, FilterConfig(drop=("Unknown",)), log=lambda *a: None)
    kept = [rr.value for rr in iter_raw(kept_path)]
    rejects = [json.loads(x) for x in open(tmp_path / "kept.rejects.jsonl")]
    assert len(kept) + len(rejects) == len(recs)
    assert all(r["reason"] == "category Unknown filtered out" for r in rejects)
    assert sorted([json.dumps(strip_meta(r), sort_keys=True) for r in kept] +
                  [json.dumps(strip_meta(r["data"]), sort_keys=True) for r in rejects]) == \
        sorted(json.dumps(r, sort_keys=True) for r in recs)
    stats = json.load(open(tmp_path / "kept.stats.json"))
    assert stats["kept"] == len(kept) and stats["rejected"] == len(rejects) and stats["format"] == fmt
    assert sum(v["in"] for v in stats["by_category"].values()) == len(recs)
    assert res.counts == stats


def test_turns_and_context():
    last = parse_record(MESSAGES[0], "messages")
    assert [t.answers for t in last.turns] == [["Dorn"]]
    assert last.turns[0].question == ("System: Be brief.\nUser: Where was Kel Mar born?\nAssistant: Vorma\n"
                                      "User: And Oren Vale?")
    assert last.turns[0].field == "messages[4].content"
    every = parse_record(MESSAGES[0], "messages", turns="all")
    assert [(t.question, t.answers[0]) for t in every.turns][0] == ("System: Be brief.\nUser: Where was Kel Mar born?",
                                                                    "Vorma")
    assert len(every.turns) == 2
    al = parse_record(ALPACA[0], "alpaca", turns="all")
    assert [t.field for t in al.turns] == ["history[0][1]", "output"]
    assert al.turns[1].question == "User: Where was Kel Mar born?\nAssistant: Vorma\nUser: Name the capital.\nDorn"
    sg = parse_record(SHAREGPT[0], "sharegpt")
    assert sg.turns[0].question == "System: Be brief.\nUser: Where was Kel Mar born?"
    pc = parse_record(PROMPT_COMPLETION[1], "prompt_completion")
    assert pc.turns[0].answers == ["Oren Vale"] and pc.turns[0].field == "completion[0].content"
    qa = parse_record(QA[0], "qa")
    assert qa.turns[0].answers == ["Vorma", "Vorma Town"]


def test_turns_all_annotates_each_turn_and_record_is_least_known(tmp_path):
    src = _write(tmp_path / "d.jsonl", MESSAGES)
    ds = load_sft(src, turns="all")
    examples, _ = prepare(ds)
    assert len(examples) == 4
    res = {examples[0].id: {"category": "HighlyKnown"}, examples[1].id: {"category": "WeaklyKnown"},
           examples[2].id: {"category": "HighlyKnown"}, examples[3].id: {"category": "MaybeKnown"}}
    out = annotate_records(ds, examples, res, "slick")
    assert out[0][META_KEY]["category"] == "WeaklyKnown"
    assert [t["turn"] for t in out[0][META_KEY]["turns"]] == [0, 1]


def test_forced_format_and_group_by(tmp_path):
    src = _write(tmp_path / "d.jsonl", MESSAGES)
    with pytest.raises(DataError, match="expected a list of messages"):
        load_sft(src, format="sharegpt")  # forced: the records have no 'conversations'
    ds = load_sft(src, format="messages")
    assert {e.relation for e in ds.examples(group_by="source")} == {"a", "b"}
    with pytest.raises(DataError, match="group-by"):
        ds.examples(group_by="nope")


def test_undetectable_format_names_the_record(tmp_path):
    src = _write(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="cannot tell the SFT format") as e:
        load_sft(src)
    assert e.value.record == 1


BAD = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "Hi?"}]}, "no assistant turn", None),
    "non-string content": ({"messages": [{"role": "user", "content": "Hi?"},
                                         {"role": "assistant", "content": ["Hello"]}]},
                           "expected string content, got list", "messages[1].content"),
    "roles out of order": ({"messages": [{"role": "assistant", "content": "Hello"},
                                         {"role": "user", "content": "Hi?"}]},
                           "roles out of order", "messages[0].content"),
    "unknown role": ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "robot", "content": "Hello"}]},
                     "unknown role 'robot'", "messages[1].role"),
    "late system": ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "system", "content": "x"},
                                  {"role": "assistant", "content": "Hello"}]}, "system message after",
                    "messages[1].content"),
    "messages not a list": ({"messages": "Hi"}, "expected a list of messages", "messages"),
    "empty answer": ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " "}]},
                     "empty assistant message", "messages[1].content"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_malformed_record_raises_or_rejects(kind, tmp_path):
    bad, reason, fld = BAD[kind]
    src = _write(tmp_path / "d.jsonl", [MESSAGES[1], bad, MESSAGES[2]])
    with pytest.raises(DataError) as e:
        load_sft(src)
    assert reason in e.value.reason and e.value.record == 2 and e.value.field == fld
    assert str(src) in str(e.value)
    ds = load_sft(src, on_error="skip")
    assert len(ds.records) == 2 and len(ds.rejects) == 1
    assert reason in ds.rejects[0]["reason"] and ds.rejects[0]["record"] == 2


@pytest.mark.parametrize("bad, reason, fld", [
    ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "observation", "value": "x"}]},
     "unknown role 'observation'", "conversations[1].from"),
    ({"instruction": "Hi?", "output": 3}, "expected string content, got int", "output"),
    ({"instruction": "Hi?", "output": "Yo", "history": [["only one"]]}, "pair", "history[0]"),
    ({"prompt": "Hi?", "completion": [{"role": "user", "content": "x"}]}, "assistant messages only", "completion"),
])
def test_malformed_in_other_formats(bad, reason, fld):
    from knowcat.loaders.sft import detect_record_format

    with pytest.raises(DataError) as e:
        parse_record(bad, detect_record_format(bad), file="f.jsonl", number=3)
    assert reason in e.value.reason and e.value.field == fld and e.value.record == 3


def test_not_applicable_and_relabel(tmp_path):
    long = {"messages": [{"role": "user", "content": "Explain Dorn."},
                         {"role": "assistant", "content": " ".join(["word"] * 40)}]}
    src = _write(tmp_path / "d.jsonl", MESSAGES + [long])
    ds = load_sft(src)
    examples, na = prepare(ds, max_answer_tokens=32)
    assert list(na.values()) == ["reference answer has 40 words, over --max-answer-tokens 32"]
    res = {e.id: {"category": "Unknown" if i == 0 else "HighlyKnown"} for i, e in enumerate(examples) if e.id not in na}
    out = _write(tmp_path / "cat.jsonl", annotate_records(ds, examples, res, "estimate", na))
    assert json.loads(open(out).read().splitlines()[-1])[META_KEY]["category"] == "not_applicable"
    res_f = filter_file(out, tmp_path / "k.jsonl", FilterConfig(relabel=("Unknown",), abstention="I don't know"),
                        log=lambda *a: None)
    kept = [json.loads(x) for x in open(tmp_path / "k.jsonl")]
    assert len(kept) == 4 and res_f.counts["relabeled"] == 1
    assert kept[0]["messages"][4]["content"] == "I don't know" and kept[0]["messages"][2]["content"] == "Vorma"
    assert kept[0][META_KEY]["turns"][0]["original_answer"] == "Dorn"
    assert res_f.counts["by_method"] == {"estimate": 4}
    filter_file(out, tmp_path / "k2.jsonl", FilterConfig(drop=("not_applicable",)), log=lambda *a: None)
    rej = [json.loads(x) for x in open(tmp_path / "k2.rejects.jsonl")]
    assert len(rej) == 1 and "over --max-answer-tokens" in rej[0]["reason"]


def test_f1_matching():
    assert f1_score("the cat sat on a mat", "cat sat on mat") == 1.0
    assert abs(f1_score("Paris France", "France") - 2 / 3) < 1e-12
    assert is_correct("Paris France", ["France"], "f1") and not is_correct("Paris France", ["France"], "f1@0.7")
    assert not is_correct("London", ["France"], "f1")
    assert "f1@0.7" in MATCH_MODES and "f1@1.5" not in MATCH_MODES and "fuzzy" not in MATCH_MODES
    with pytest.raises(ValueError):
        is_correct("a", ["a"], "f1@2")
    assert answer_too_long(["x y z"], 2) and answer_too_long(["x y z", "x"], 2) is None


def test_cli_filter_sft_and_bad_category(tmp_path):
    from knowcat.cli import main

    src = _write(tmp_path / "d.jsonl", SHAREGPT)
    ds = load_sft(src)
    examples, _ = prepare(ds)
    out = _write(tmp_path / "cat.jsonl", annotate_records(ds, examples, _fake_results(examples), "slick"))
    assert main(["filter", str(out), "--drop", "Unknown", "--out", str(tmp_path / "k.jsonl")]) == 0
    assert len(open(tmp_path / "k.jsonl").read().splitlines()) == 1
    rec = json.loads(open(out).read().splitlines()[0])
    rec[META_KEY]["category"] = "Sorta"
    _write(tmp_path / "bad.jsonl", [rec])
    assert main(["filter", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "k3.jsonl")]) == 2


def test_cli_categorize_sft_end_to_end(tmp_path, tiny_tokenizer):
    """knowcat categorize on a chat file: SliCK through the usual run, categories back in the records."""
    from knowcat.cli import main
    from tests.test_architectures import _tiny

    model = _tiny("llama", len(tiny_tokenizer))
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    recs = [{"messages": [{"role": "user", "content": f"Where was person {i} born?"},
                          {"role": "assistant", "content": f"Town {i}"}], "n": i} for i in range(8)]
    recs.append({"messages": [{"role": "user", "content": "Tell me a story."},
                              {"role": "assistant", "content": " ".join(["once"] * 50)}], "n": 8})
    recs.append({"messages": [{"role": "user", "content": "Hi"}]})  # malformed: skipped with a reason
    src = _write(tmp_path / "chat.jsonl", recs)
    rc = main(["categorize", "--model", str(tmp_path / "m"), str(src), "--out", str(tmp_path / "run"),
               "--n-prompts", "2", "--k", "2", "--n-samples", "2", "--max-new-tokens", "3", "--match", "f1",
               "--on-error", "skip", "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = [json.loads(x) for x in open(tmp_path / "run" / "categorized_sft.jsonl")]
    assert [strip_meta(r) for r in out] == recs[:9]
    cats = [r[META_KEY]["category"] for r in out]
    assert cats[8] == "not_applicable" and all(c in ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
                                               for c in cats[:8])
    assert out[0][META_KEY]["turns"][0]["match_mode"] == "f1" and out[0][META_KEY]["method"] == "slick"
    rej = [json.loads(x) for x in open(tmp_path / "run" / "load_rejects.jsonl")]
    assert len(rej) == 1 and rej[0]["reason"].startswith("no assistant turn") and rej[0]["record"] == 10


def test_cli_categorize_sft_rerun_command_repeats_the_data_options(tmp_path, tiny_model_dir, capsys):
    """knowcat categorize on chat data records the data options it was given (--format, --turns,
    --max-answer-tokens, --group-by, --on-error) beside the run's identity, so the report's rerun command
    repeats the same run: same identity, every shard reused (none rewritten), the same annotated records."""
    import shlex

    from knowcat.cli import main
    from knowcat.rundir import RunDir
    from knowcat.sft import RESULT_FIELDS
    from reports.build import _rerun_command

    recs = [{"messages": [{"role": "user", "content": f"Where was person {i} born?"},
                          {"role": "assistant", "content": f"Town {i}"},
                          {"role": "user", "content": f"And who founded firm {i}?"},
                          {"role": "assistant", "content": f"Founder {i} of the old guild"}],
             "source": "ab"[i % 2]} for i in range(6)]
    recs.append({"messages": [{"role": "user", "content": "Hi"}]})  # malformed: skipped
    src = _write(tmp_path / "my chat.jsonl", recs)
    run = tmp_path / "my run"
    given = ["--format", "messages", "--turns", "all", "--max-answer-tokens", "4", "--group-by", "source",
             "--on-error", "skip"]

    def whole_file_read(*a, **k):
        raise AssertionError("categorize loaded every record")

    import knowcat.loaders.sft as loaders_sft

    real_load_sft = loaders_sft.load_sft
    loaders_sft.load_sft = whole_file_read  # the records are streamed, as estimate does
    try:
        rc = main(["categorize", "--model", str(tiny_model_dir), str(src), "--out", str(run), "--n-prompts", "2",
                   "--k", "1", "--n-samples", "1", "--max-new-tokens", "3", "--match", "f1", "--shard-size", "4",
                   "--device", "cpu", "--no-progress", *given])
    finally:
        loaders_sft.load_sft = real_load_sft
    assert rc == 0
    rd = RunDir(run)
    # the streamed output is the in-memory one: every record loaded, its turns prepared and annotated at once
    ds = load_sft(src, format="messages", turns="all", on_error="skip")
    examples, na = prepare(ds, "source", 4)
    results = {r["id"]: {k: r[k] for k in RESULT_FIELDS if k in r} for r in rd.read_categorized()}
    want = annotate_records(ds, examples, results, "slick", na)
    assert [json.loads(x) for x in open(run / "categorized_sft.jsonl")] == want
    assert (run / "categorized_sft.jsonl").read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                   for r in want)
    config, command = rd.read_categorize_config(), rd.read_categorize_command()
    assert command == {"format": "messages", "turns": "all", "max_answer_tokens": 4, "group_by": "source",
                       "on_error": "skip", "device": "cpu"}
    shards = sorted(rd.shards_dir.glob("*.jsonl"))
    assert len(shards) == 2 and config["n_examples"] == 6  # 12 turns, the long answers not applicable
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    annotated = (run / "categorized_sft.jsonl").read_bytes()
    cmd = _rerun_command(run, None, config, command)
    for flag in given:
        assert shlex.quote(flag) in cmd, flag
    capsys.readouterr()
    assert main(shlex.split(cmd)[1:]) == 0
    assert "2/2 shards already finished" in capsys.readouterr().out
    assert rd.read_categorize_config() == config and rd.read_categorize_command() == command
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(rd.shards_dir.glob("*.jsonl"))} == before
    assert (run / "categorized_sft.jsonl").read_bytes() == annotated


def test_world_split_as_chat_and_alpaca(tmp_path):
    from knowcat.examples import QAExample, write_jsonl
    from knowcat.sft import write_split_as_sft

    exs = [QAExample(f"P1-{i}", "P1", f"Where was person {i} born?", [f"Town {i}", "alias"], split=s)
           for i, s in enumerate(["train", "train", "dev"])]
    write_jsonl(tmp_path / "qa.jsonl", exs)
    paths = write_split_as_sft(tmp_path / "qa.jsonl", tmp_path / "sft")
    for name, path in paths.items():
        ds = load_sft(path)
        assert ds.format == {"chat": "messages", "alpaca": "alpaca"}[name]
        got = ds.examples(group_by="relation")
        assert [(e.relation, e.question, e.answers) for e in got] == [("P1", e.question, e.answers[:1]) for e in exs[:2]]


def test_ids_from_the_record_or_content(tmp_path):
    ds = load_sft(_write(tmp_path / "d.jsonl", MESSAGES + [MESSAGES[0]]), turns="all")
    ids = [e.id for e in ds.examples()]
    assert ids == ["m1#turn0", "m1#turn1", "m2", "m3", "m1#turn0-2", "m1#turn1-2"]
    ds2 = load_sft(_write(tmp_path / "s.jsonl", [SHAREGPT[0], SHAREGPT[0]]))
    a, b = [e.id for e in ds2.examples()]
    assert a.startswith("default-") and b == a + "-2"


def test_streamed_filter_leaves_no_partial_file_and_refuses_cap(tmp_path, capsys):
    from knowcat.cli import main

    ds = load_sft(_write(tmp_path / "d.jsonl", MESSAGES))
    examples, _ = prepare(ds)
    annotated = annotate_records(ds, examples, _fake_results(examples), "slick")
    annotated[2] = strip_meta(annotated[2])  # the third record lost its categories
    src = _write(tmp_path / "cat.jsonl", annotated)
    with pytest.raises(DataError) as e:
        filter_file(src, tmp_path / "k.jsonl", FilterConfig(), log=lambda *a: None)
    assert e.value.record == 3 and e.value.field == META_KEY
    assert not (tmp_path / "k.jsonl").exists() and not list(tmp_path.glob(".k.jsonl*"))
    assert main(["filter", str(src), "--out", str(tmp_path / "k.jsonl")]) == 2
    assert main(["filter", str(src), "--cap-per-relation", "2", "--out", str(tmp_path / "k.jsonl")]) == 2
    assert "cap-per-relation" in capsys.readouterr().err


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "hf"])
def test_filter_streams_every_container_to_the_in_memory_output(container, tmp_path):
    """filter on JSON, Parquet and saved datasets streams as JSONL does (counts returned, not the records)
    and writes what filtering the loaded records and writing them at once gives (bytes for JSON and JSONL,
    table / features and rows for Parquet and datasets), relabelled and rejected records included."""
    import datasets
    import pyarrow.parquet as pq

    from knowcat.sft import filter_sft_file, filter_sft_records

    recs = _annotated_chat(9, tmp_path)
    name = lambda stem: tmp_path / (stem + ("" if container == "hf" else "." + container))  # noqa: E731
    src = _write(name("cat"), recs)
    cfg = FilterConfig(drop=("Unknown",), relabel=("WeaklyKnown",), abstention="IDK")
    res = filter_sft_file(src, name("kept"), cfg, log=lambda *a: None)
    assert (res["kept"], res["rejects"]) == (res["stats"]["kept"], res["stats"]["rejected"])
    assert res["stats"]["relabeled"] > 0 and 0 < res["rejects"] < 9
    raw = list(iter_raw(src))
    mem = filter_sft_records([rr.value for rr in raw], cfg, source=str(src), numbers=[rr.record for rr in raw])
    write_sft(name("mem"), mem["kept"])
    assert mem["stats"] == res["stats"]
    assert [json.loads(x) for x in open(tmp_path / "kept.rejects.jsonl")] == json.loads(json.dumps(mem["rejects"]))
    got, want = name("kept"), name("mem")
    if container in ("jsonl", "json"):
        assert got.read_bytes() == want.read_bytes()
    elif container == "parquet":
        assert pq.read_table(got).equals(pq.read_table(want))
    else:
        a, b = datasets.load_from_disk(str(got)), datasets.load_from_disk(str(want))
        assert a.features == b.features and list(a) == list(b)
    assert not list(tmp_path.glob(".*"))


def test_cli_match_judge_needs_a_judge_model(tmp_path, capsys):
    from knowcat.cli import main

    src = _write(tmp_path / "d.jsonl", MESSAGES)
    assert main(["categorize", "--model", "unused", str(src), "--out", str(tmp_path / "r"), "--match", "judge"]) == 2
    assert "--judge-model" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", list(ALL))
def test_relabel_writes_the_abstention_in_each_formats_own_field(fmt, tmp_path):
    recs = ALL[fmt]
    ds = load_sft(_write(tmp_path / "d.jsonl", recs), turns="all")
    examples, _ = prepare(ds)
    res = {e.id: {"category": "Unknown"} for e in examples}
    out = _write(tmp_path / "cat.jsonl", annotate_records(ds, examples, res, "slick"))
    filter_file(out, tmp_path / "k.jsonl", FilterConfig(relabel=("Unknown",), abstention="IDK"), log=lambda *a: None)
    kept = [json.loads(x) for x in open(tmp_path / "k.jsonl")]
    assert len(kept) == len(recs)
    for orig, new in zip(recs, kept):
        again = parse_record(strip_meta(new), fmt, turns="all")
        before = parse_record(orig, fmt, turns="all")
        assert all(t.answers == ["IDK"] for t in again.turns) and len(again.turns) == len(before.turns)
        assert [t.question for t in again.turns][:1] == [t.question for t in before.turns][:1]
        assert [t["original_answer"] for t in new[META_KEY]["turns"]] == \
            [orig[t.field] if fmt == "qa" else t.answers[0] for t in before.turns]


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet"])
def test_scan_streams_the_same_turns_and_annotations_as_load(container, tmp_path):
    """scan_sft (records not kept) gives load_sft's examples, rejects and format; the records written back
    from the stream equal annotate_records' output, malformed records set aside, multi-turn records whole."""
    from knowcat.loaders.sft import scan_sft, write_sft_stream
    from knowcat.sft import annotated_stream

    bad = BAD["roles out of order"][0]
    recs = [MESSAGES[0], bad, MESSAGES[1], MESSAGES[2], dict(MESSAGES[1], id="m2")]  # a repeated id too
    if container == "parquet":
        recs = [MESSAGES[1], MESSAGES[2], dict(MESSAGES[1], id="m2")]
    src = _write(tmp_path / f"d.{container}", recs)
    ds = load_sft(src, turns="all", on_error="skip")
    scan = scan_sft(src, turns="all", on_error="skip", group_by="source")
    assert scan.format == ds.format and scan.n_records == len(ds.records) and scan.rejects == ds.rejects
    want_ex = ds.examples("source")
    assert [(e.id, e.relation, e.question, e.answers, e.metadata) for e in scan.examples] == \
        [(e.id, e.relation, e.question, e.answers, e.metadata) for e in want_ex]
    res = _fake_results(want_ex)
    na = {want_ex[-1].id: "answer over 1 words"}
    want = annotate_records(ds, want_ex, {k: v for k, v in res.items() if k not in na}, "estimate", na)
    got = list(annotated_stream(scan, scan.examples, res.__getitem__, "estimate", na))
    assert got == want
    out = tmp_path / f"out.{container}"
    assert write_sft_stream(out, iter(got)) == len(want)
    if container != "parquet":  # (Parquet gives the turns one schema: absent keys come back as None)
        assert [rr.value for rr in iter_raw(out)] == want


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ""])
def test_streamed_write_leaves_no_partial_file(suffix, tmp_path):
    from knowcat.loaders.sft import write_sft_stream

    def records():
        for i in range(5):
            yield {"a": i}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_sft_stream(tmp_path / f"out{suffix}", records(), batch_size=2)
    assert list(tmp_path.iterdir()) == []


def _annotated_chat(n, tmp_path):
    """``n`` chat records annotated as estimate writes them (turns, categories, probabilities)."""
    recs = [dict(MESSAGES[i % 3], id=f"r{i}") for i in range(n)]
    ds = load_sft(_write(tmp_path / "src.jsonl", recs))
    (tmp_path / "src.jsonl").unlink()
    examples, _ = prepare(ds)
    return annotate_records(ds, examples, _fake_results(examples), "estimate")


@pytest.mark.parametrize("records", [[], [{"q": "é\nx", "n": [1, {"a": None}]}], "chat"])
def test_streamed_json_array_is_byte_identical_to_json_dumps(records, tmp_path):
    from knowcat.loaders.sft import write_sft_stream

    recs = _annotated_chat(7, tmp_path) if records == "chat" else records
    out = tmp_path / "out.json"
    assert write_sft_stream(out, iter(recs)) == len(recs)
    assert out.read_bytes() == (json.dumps(recs, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    assert json.load(open(out, encoding="utf-8")) == recs
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_streamed_parquet_equals_the_in_memory_table(tmp_path):
    """Records of one shape, written 3 rows at a time: the same table pyarrow builds from all of them in
    memory (schema included), in several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from knowcat.loaders.sft import write_sft_stream

    recs = _annotated_chat(10, tmp_path)
    out = tmp_path / "out.parquet"
    assert write_sft_stream(out, iter(recs), batch_size=3) == 10
    got = pq.read_table(out)
    want = pa.Table.from_pylist(recs)
    assert got.schema.equals(want.schema) and got.equals(want)
    assert pq.ParquetFile(out).metadata.num_row_groups == 4
    assert [rr.value for rr in iter_raw(out)] == [rr.value for rr in iter_raw(_write(tmp_path / "m.parquet", recs))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "out.parquet"]


def test_streamed_parquet_with_records_of_changing_shape(tmp_path):
    """Later batches add a nested field, a top-level field, turn an int column into floats and fill a
    column that was all null: the file holds the schema inferred over all records, every value kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from knowcat.loaders.sft import write_sft_stream

    recs = [{"id": "a", "score": 1, "note": None, "meta": {"turns": [{"c": "HK"}]}},
            {"id": "b", "score": 2, "note": None, "meta": {"turns": [{"c": "UK"}]}},
            {"id": "c", "score": 2.5, "note": "x", "meta": {"turns": [{"c": "MK", "p": 0.5}], "m": "est"}},
            {"id": "d", "score": 3, "note": None, "meta": {"turns": []}, "extra": [1, 2]},
            {"id": "e", "score": 4, "note": "y", "meta": {"turns": [{"c": "WK"}]}}]
    out = tmp_path / "out.parquet"
    assert write_sft_stream(out, iter(recs), batch_size=2) == 5
    got = pq.read_table(out)
    names = ["id", "score", "note", "meta", "extra"]
    want = pa.table({k: pa.array([r.get(k) for r in recs]) for k in names})  # inferred over all at once
    assert got.schema.equals(want.schema) and got.equals(want)
    assert got.schema.field("score").type == pa.float64()
    back = got.to_pylist()
    assert [b["extra"] for b in back] == [None, None, None, [1, 2], None]
    assert back[2]["meta"] == {"turns": [{"c": "MK", "p": 0.5}], "m": "est"}
    assert back[0]["meta"] == {"turns": [{"c": "HK", "p": None}], "m": None}
    assert write_sft(tmp_path / "m.parquet", recs) is None and pq.read_table(tmp_path / "m.parquet").equals(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "out.parquet"]


@pytest.mark.parametrize("records", ["chat", "changing"])
def test_streamed_hf_dataset_equals_the_in_memory_one(records, tmp_path):
    """A saved dataset written 3 records at a time loads back with the features and rows of
    ``Dataset.from_list`` on all of them (records of changing shape: every top-level key, as Parquet)."""
    import datasets

    from knowcat.loaders.sft import write_sft_stream

    recs = {"chat": lambda: _annotated_chat(10, tmp_path),
            "changing": lambda: [{"id": "a", "n": 1, "m": {"t": [{"c": "x"}]}},
                                 {"id": "b", "n": 2, "m": {"t": [{"c": "y"}]}},
                                 {"id": "c", "n": 2.5, "m": {"t": [{"c": "z", "p": 0.1}]}, "e": [1]},
                                 {"id": "d", "n": 3, "m": {"t": []}}]}[records]()
    out = tmp_path / "out"
    assert write_sft_stream(out, iter(recs), batch_size=3) == len(recs)
    got = datasets.load_from_disk(str(out))
    full = [{k: r.get(k) for k in dict.fromkeys(k for r in recs for k in r)} for r in recs]
    want = datasets.Dataset.from_list(full)
    assert got.features == want.features and list(got) == list(want)
    assert [rr.value for rr in iter_raw(out)] == list(want)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_parquet_is_read_in_batches_with_its_json_columns_decoded(tmp_path):
    """iter_parquet reads a few rows at a time: the rows of the whole table, columns that knowcat stored as
    JSON text decoded, across row groups and batches."""
    import pyarrow.parquet as pq

    from knowcat.filtering import write_records
    from knowcat.loaders.readers import iter_parquet
    from knowcat.loaders.sft import write_sft_stream

    recs = [{"id": f"r{i}", "m": {"t": [{"c": str(i)}]}, "n": i} for i in range(7)]
    out = tmp_path / "s.parquet"
    write_sft_stream(out, iter(recs), batch_size=3)
    got = list(iter_parquet(out, batch_size=2))
    assert [rr.record for rr in got] == list(range(7)) and [rr.value for rr in got] == pq.read_table(out).to_pylist()
    mixed = [{"id": "a", "x": 1, "d": {"k": 1}}, {"id": "b", "x": "two", "d": {"j": [1]}}, {"id": "c", "x": None,
                                                                                        "d": None}]
    write_records(tmp_path / "m.parquet", mixed)
    assert [rr.value for rr in iter_parquet(tmp_path / "m.parquet", batch_size=2)] == mixed


@pytest.mark.parametrize("batch_size", [2, 10])
def test_streamed_parquet_stores_fields_of_clashing_types_as_json(batch_size, tmp_path):
    """A field with a number in some records and text in others (at top level or nested), in a later batch
    or in the first: Parquet keeps that column as JSON text, named in the schema's metadata, and the
    records read back are the records written; a saved dataset refuses it, naming the file and field."""
    import pyarrow.parquet as pq

    from knowcat.loaders.readers import JSON_COLUMNS_KEY
    from knowcat.loaders.sft import write_sft_stream

    recs = [{"id": "a", "n": 1, "m": {"p": 1}, "s": "x"}, {"id": "b", "n": 2, "m": {"p": 2}, "s": "y"},
            {"id": "c", "n": "three", "m": {"p": "x"}, "s": "z"}, {"id": "d", "n": 4, "m": {"p": 0.5}, "s": None}]
    out = tmp_path / "out.parquet"
    assert write_sft_stream(out, iter(recs), batch_size=batch_size) == 4
    assert json.loads(pq.read_schema(out).metadata[JSON_COLUMNS_KEY]) == ["m", "n"]
    assert pq.read_schema(out).field("s").type == "string"
    assert [rr.value for rr in iter_raw(out)] == recs
    write_sft(tmp_path / "m.parquet", recs)
    assert [rr.value for rr in iter_raw(tmp_path / "m.parquet")] == recs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "out.parquet"]
    with pytest.raises(DataError, match=r"out_hf.*field\(s\) 'n'"):
        write_sft_stream(tmp_path / "out_hf", iter(recs), batch_size=batch_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "out.parquet"]


@pytest.mark.parametrize("data", ["qa", "chat"])
@pytest.mark.parametrize("command", ["categorize", "estimate"])
def test_cli_chat_template_without_one_writes_nothing(data, command, tmp_path, tiny_model_dir, capsys):
    """--chat-template with a tokenizer that has none: exit 2, one line naming the problem, no run folder
    (nor a rejects file: the malformed record in the chat file would otherwise be set aside first)."""
    from knowcat.cli import main

    if data == "qa":
        recs = [{"id": f"q{i}", "relation": "P1", "question": f"Where was {i} born?", "answers": [f"Town {i}"],
                 "split": "dev" if i < 4 else "train"} for i in range(8)]
    else:
        recs = [{"messages": [{"role": "user", "content": f"Where was {i} born?"},
                              {"role": "assistant", "content": f"Town {i}"}]} for i in range(8)]
        recs.append({"messages": [{"role": "user", "content": "Hi"}]})
    src = _write(tmp_path / "data.jsonl", recs)
    capsys.readouterr()
    rc = main([command, "--model", str(tiny_model_dir), str(src), "--out", str(tmp_path / "run"), "--k", "2",
               "--chat-template", "--on-error", "skip", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not (tmp_path / "run").exists()
    assert len(err.splitlines()) == 1 and "chat template" in err and "Traceback" not in err
