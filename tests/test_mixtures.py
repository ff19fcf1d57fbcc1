import json
from collections import Counter

import numpy as np
import pytest

from knowcat.errors import DataError
from knowcat.mixtures import MixtureConfig, apportion, build_mixtures, read_training_set, write_mixtures

# per relation: (HighlyKnown, MaybeKnown, WeaklyKnown, Unknown) counts
COUNTS = {"P1": (10, 4, 7, 30), "P2": (20, 9, 5, 12), "P3": (3, 8, 6, 40)}
CATS = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def records(counts=COUNTS, extra_test=True):
    out = []
    for rel, cs in counts.items():
        for cat, n in zip(CATS, cs):
            for i in range(n):
                out.append({"id": f"{rel}-{cat}-{i}", "relation": rel, "question": f"Q {rel} {cat} {i}?",
                            "answers": [f"A{i}", f"alias{i}"], "category": cat, "split": "train"})
        if extra_test:
            out.append({"id": f"{rel}-test", "relation": rel, "question": "T?", "answers": ["x"],
                        "category": "Unknown", "split": "test"})
    return out


def by_rel_cat(rows):
    return Counter((r["relation"], r["category"]) for r in rows)


def test_paper_size_rule_and_exact_composition():
    sets = build_mixtures(records())
    m = sets["_manifest"]
    per_rel = {r: min(c) for r, c in COUNTS.items()}  # 4, 5, 3
    D = sum(per_rel.values())
    assert m["size"] == D == 12
    assert m["per_relation"] == per_rel
    for x in (0, 25, 50, 75, 100):
        rows = sets[f"unknown_{x:02d}"]
        assert len(rows) == D
        n_unk = sum(r["category"] == "Unknown" for r in rows)
        assert n_unk == round(D * x / 100)
        # every relation keeps its share of |D|
        assert Counter(r["relation"] for r in rows) == Counter(per_rel)
        # Unknown spread over relations in proportion to their share (largest remainders)
        unk_rel = Counter(r["relation"] for r in rows if r["category"] == "Unknown")
        want = apportion(round(D * x / 100), per_rel)
        assert {k: unk_rel.get(k, 0) for k in per_rel} == want
        assert len({r["id"] for r in rows}) == D  # no duplicates
    # single-category sets: exactly that category, per relation its share
    for c in CATS:
        rows = sets[c]
        assert by_rel_cat(rows) == Counter({(r, c): n for r, n in per_rel.items()})
    nat = sets["natural"]
    assert Counter(r["relation"] for r in nat) == Counter(per_rel)
    # the manifest agrees with the files
    for name, rows in sets.items():
        if name.startswith("_"):
            continue
        assert m["sets"][name]["n"] == len(rows)
        assert m["sets"][name]["by_category"] == dict(Counter(r["category"] for r in rows))
    # test-split records were ignored
    assert all(not r["id"].endswith("-test") for n, rows in sets.items() if not n.startswith("_") for r in rows)


def test_known_sets_nesting_and_idk():
    sets = build_mixtures(records())
    for x in (25, 50, 75):
        mix = sets[f"unknown_{x:02d}"]
        known = sets[f"known_{x:02d}"]
        assert [r["id"] for r in known] == [r["id"] for r in mix if r["category"] != "Unknown"]
    assert "known_00" not in sets and "known_100" not in sets
    # nested: more Unknown keeps the Unknown of the sets with fewer, fewer Known keeps a subset of Known
    for a, b in ((25, 50), (50, 75), (75, 100)):
        ua = {r["id"] for r in sets[f"unknown_{a:02d}"] if r["category"] == "Unknown"}
        ub = {r["id"] for r in sets[f"unknown_{b:02d}"] if r["category"] == "Unknown"}
        ka = {r["id"] for r in sets[f"unknown_{a:02d}"] if r["category"] != "Unknown"}
        kb = {r["id"] for r in sets[f"unknown_{b:02d}"] if r["category"] != "Unknown"}
        assert ua <= ub and kb <= ka
    idk, base = sets["idk"], sets["unknown_50"]
    assert [r["id"] for r in idk] == [r["id"] for r in base]
    for r, b in zip(idk, base):
        if b["category"] == "Unknown":
            assert r["completion"] == " I don't know" and r["target"] == "I don't know" and r["answers"] == b["answers"]
        else:
            assert r == b
    # prompt/completion follow the paper's template; the target is the first alias
    r = base[0]
    assert r["prompt"] == f"Answer the following question. {r['question']}\nAnswer:"
    assert r["completion"] == " " + r["answers"][0]


def test_given_size_is_apportioned_and_checked():
    sets = build_mixtures(records(), MixtureConfig(size=30, single=False))
    assert all(len(sets[f"unknown_{x:02d}"]) == 30 for x in (0, 25, 50, 75, 100))
    per_rel = sets["_manifest"]["per_relation"]
    assert sum(per_rel.values()) == 30 and per_rel == apportion(30, {"P1": 51, "P2": 46, "P3": 57})
    with pytest.raises(DataError, match="needs .* examples but has"):
        build_mixtures(records(), MixtureConfig(size=100))


def test_deterministic_and_seeded():
    a = build_mixtures(records())
    b = build_mixtures(records())
    c = build_mixtures(records(), MixtureConfig(seed=1))
    assert a["unknown_50"] == b["unknown_50"]
    assert [r["id"] for r in a["unknown_50"]] != [r["id"] for r in c["unknown_50"]]


def test_bad_records_name_record_and_field():
    recs = records()
    del recs[5]["category"]
    with pytest.raises(DataError) as e:
        build_mixtures(recs, source="cat.jsonl")
    assert "cat.jsonl" in str(e.value) and "record 5" in str(e.value) and "category" in str(e.value)
    recs = records()
    recs[2]["answers"] = []
    with pytest.raises(DataError, match="answers"):
        build_mixtures(recs)
    # a relation lacking a category makes the paper's |D| rule empty for it
    recs = [r for r in records() if not (r["relation"] == "P1" and r["category"] == "MaybeKnown")]
    assert build_mixtures(recs)["_manifest"]["per_relation"]["P1"] == 0


def test_cli_writes_prompt_completion_files(tmp_path):
    from knowcat.cli import main

    src = tmp_path / "run" / "categorized.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in records()))
    assert main(["mixtures", str(tmp_path / "run"), "--unknown-percents", "0,50,100", "--no-natural"]) == 0
    out = tmp_path / "run" / "mixtures"
    names = sorted(p.stem for p in out.glob("*.jsonl"))
    assert names == sorted(["unknown_00", "unknown_50", "unknown_100", "known_50", "HighlyKnown", "MaybeKnown",
                            "WeaklyKnown", "Unknown", "idk"])
    rows = read_training_set(out / "unknown_50.jsonl")
    assert len(rows) == 12 and all(set(r) >= {"prompt", "completion", "id", "category"} for r in rows)
    man = json.loads((out / "manifest.json").read_text())
    assert man["sets"]["unknown_50"]["n_unknown"] == 6


def test_write_and_read_back(tmp_path):
    sets = build_mixtures(records())
    write_mixtures(sets, tmp_path)
    assert read_training_set(tmp_path / "natural.jsonl") == sets["natural"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="completion"):
        read_training_set(tmp_path / "bad.jsonl")


def _nested_ok(sets, percents):
    unk = {x: {r["id"] for r in sets[f"unknown_{x:02d}"] if r["category"] == "Unknown"} for x in percents}
    kn = {x: {r["id"] for r in sets[f"unknown_{x:02d}"] if r["category"] != "Unknown"} for x in percents}
    xs = sorted(percents)
    return all(unk[a] <= unk[b] and kn[b] <= kn[a] for a, b in zip(xs, xs[1:]))


def test_unknown_sets_nested_for_a_table_that_broke_independent_apportioning():
    # smallest category per relation {29, 25, 28, 29, 1, 5, 23, 17}: apportioning each X on its
    # own gave the relation with 1 its Unknown example in unknown_50 but not in unknown_75
    smallest = (29, 25, 28, 29, 1, 5, 23, 17)
    counts = {f"P{i}": (m, m + 3, m + 1, m + 7) for i, m in enumerate(smallest)}
    sets = build_mixtures(records(counts))
    assert _nested_ok(sets, (0, 25, 50, 75, 100))


def test_nested_counts_property_over_random_tables():
    from knowcat.mixtures import nested_counts

    rng = np.random.default_rng(0)
    for trial in range(400):
        n_rel = int(rng.integers(1, 13))
        per_rel = {f"P{i}": int(v) for i, v in enumerate(rng.integers(0, 40, n_rel))}
        if trial % 3 == 0:
            per_rel[f"P{n_rel}"] = 1  # tiny relations are where independent rounding broke
        D = sum(per_rel.values())
        percents = sorted(set(rng.integers(0, 101, int(rng.integers(2, 8))).tolist()) | {0, 100})
        got = nested_counts(percents, per_rel)
        for x in percents:
            assert sum(got[x].values()) == round(D * x / 100)
            for r, n in got[x].items():
                assert 0 <= n <= per_rel[r]
                assert abs(n - round(D * x / 100) * per_rel[r] / D) < 1 + 1e-9 if D else n == 0
        for a, b in zip(percents, percents[1:]):
            assert all(got[a][r] <= got[b][r] for r in per_rel), (per_rel, a, b)
        # from zero, the first step is the largest-remainder rule
        first = percents[1]
        assert got[first] == apportion(round(D * first / 100), per_rel)
    # end to end on random category tables: the built sets are nested
    for trial in range(30):
        counts = {f"P{i}": tuple(int(v) for v in rng.integers(1, 30, 4)) for i in range(int(rng.integers(2, 9)))}
        assert _nested_ok(build_mixtures(records(counts)), (0, 25, 50, 75, 100))
