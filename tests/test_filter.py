"""knowcat filter: keeps, drops, relabels and caps, in the user's own record format."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from knowcat.errors import DataError
from knowcat.filtering import FilterConfig, filter_file, filter_records, read_records

CATS = ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"]


def records():
    out = []
    for i in range(20):
        out.append({"uid": f"u{i}", "prompt": f"q{i}?", "targets": [f"a{i}"], "rel": "R1" if i < 12 else "R2",
                    "source": {"doc": i, "tags": ["x", "y"]}, "category": CATS[i % 4]})
    return out


def test_keep_drop_relabel_cap():
    cfg = FilterConfig(drop=("Unknown",), relabel=("WeaklyKnown",), answers_field="targets", relation_field="rel")
    res = filter_records(records(), cfg)
    assert len(res.kept) == 15 and len(res.rejects) == 5
    assert all(r["record"]["category"] == "Unknown" for r in res.rejects)
    wk = [r for r in res.kept if r["category"] == "WeaklyKnown"]
    assert all(r["targets"] == ["I don't know"] and r["original_targets"][0].startswith("a") for r in wk)
    # user fields survive untouched
    assert all(r["source"]["tags"] == ["x", "y"] and r["uid"].startswith("u") for r in res.kept)
    res = filter_records(records(), FilterConfig(keep=("HighlyKnown", "MaybeKnown"), cap_per_relation=3,
                                                 relation_field="rel"))
    by_rel = pd.Series([r["rel"] for r in res.kept]).value_counts().to_dict()
    assert by_rel == {"R1": 3, "R2": 3}
    assert res.counts["reasons"]["over the cap of 3 for relation R1"] == 3
    # deterministic under the seed, input order kept
    again = filter_records(records(), FilterConfig(keep=("HighlyKnown", "MaybeKnown"), cap_per_relation=3,
                                                   relation_field="rel"))
    assert [r["uid"] for r in res.kept] == [r["uid"] for r in again.kept]
    assert [int(r["uid"][1:]) for r in res.kept] == sorted(int(r["uid"][1:]) for r in res.kept)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_round_trip_preserves_user_fields(tmp_path, suffix):
    recs = records()
    if suffix == ".csv":
        recs = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in recs]
        recs = [{k: v for k, v in r.items() if k != "source"} for r in recs]
    src = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif suffix == ".json":
        src.write_text(json.dumps(recs))
    elif suffix == ".parquet":
        pd.DataFrame(recs).to_parquet(src)
    else:
        pd.DataFrame(recs).to_csv(src, index=False)
    out = tmp_path / f"out{suffix}"
    filter_file(src, out, FilterConfig(drop=("Unknown",)), log=lambda *a: None)
    kept = read_records(out)
    orig = {r["uid"]: r for r in read_records(src)}
    assert len(kept) == 15
    for r in kept:
        assert r == orig[r["uid"]]
    rejects = [json.loads(l) for l in open(tmp_path / f"out.rejects.jsonl")]
    assert len(rejects) == 5 and all(r["reason"] == "category Unknown filtered out" for r in rejects)


def test_bad_input_names_file_record_field(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"question": "q", "category": "HighlyKnown"}) + "\n" + json.dumps({"question": "r"}) + "\n")
    with pytest.raises(DataError) as e:
        filter_file(src, tmp_path / "o.jsonl", FilterConfig(), log=lambda *a: None)
    assert "x.jsonl" in str(e.value) and "record 1" in str(e.value) and "category" in str(e.value)
    src.write_text(json.dumps({"question": "q", "category": "Known"}) + "\n")
    with pytest.raises(DataError, match="unknown category"):
        filter_file(src, tmp_path / "o.jsonl", FilterConfig(), log=lambda *a: None)
    src.write_text('{"question": "q", "category": \n')
    with pytest.raises(DataError, match="record 1"):
        filter_file(src, tmp_path / "o.jsonl", FilterConfig(), log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown categories"):
        FilterConfig(keep=("Known",))


def test_cli_filter(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records()))
    r = subprocess.run([sys.executable, "-m", "knowcat", "filter", str(src), "--out", str(tmp_path / "k.jsonl"),
                        "--drop", "Unknown,WeaklyKnown", "--relation-field", "rel"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "kept 10 of 20" in r.stdout
    assert len((tmp_path / "k.jsonl").read_text().splitlines()) == 10
