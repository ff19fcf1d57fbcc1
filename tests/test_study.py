import numpy as np
import pytest

from linear_models.study import fit_linear_model, fitting_speed, paired_split_ttest


def test_ols_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    D = 500
    nk = rng.integers(0, 400, 120)
    nu = rng.integers(0, 250, 120)
    y = 36.9 + 7.3 * nk / D - 8.3 * nu / D + rng.normal(0, 0.1, 120)
    res = fit_linear_model(y, nk, nu, D)
    p = res["params"]
    assert p["b0"] == pytest.approx(36.9, abs=0.1)
    assert p["b_kn"] == pytest.approx(7.3, abs=0.2)
    assert p["b_unk"] == pytest.approx(-8.3, abs=0.2)
    for k, v in (("b0", 36.9), ("b_kn", 7.3), ("b_unk", -8.3)):
        lo, hi = res["conf_int_95"][k]
        assert lo < res["params"][k] < hi and abs(res["params"][k] - v) < 4 * res["bse"][k]
    assert res["r2"] > 0.99 and res["nobs"] == 120 and res["pvalues"]["b_unk"] < 1e-6


def test_ols_without_effect_is_not_significant():
    rng = np.random.default_rng(1)
    nk, nu = rng.integers(0, 100, 60), rng.integers(0, 100, 60)
    res = fit_linear_model(40 + rng.normal(0, 1, 60), nk, nu, 100)
    assert res["pvalues"]["b_kn"] > 0.01 and res["pvalues"]["b_unk"] > 0.01 and res["r2"] < 0.2
    with pytest.raises(ValueError, match="at least 4"):
        fit_linear_model([1, 2], [1, 2], [0, 1], 10)


def test_paired_split_ttest():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.6
    same = paired_split_ttest(a, a)
    assert same["p"] == 1.0 and same["mean_diff"] == 0 and same["n_parts"] == 100
    b = a.copy()
    flip = np.flatnonzero(a)[:150]  # B loses 150 correct answers
    b[flip] = False
    res = paired_split_ttest(a, b)
    assert res["mean_diff"] == pytest.approx(15.0, abs=0.5) and res["p"] < 1e-6 and res["t"] > 0
    # the parts are a partition: part means average to the overall accuracy
    assert res["mean_a"] == pytest.approx(100 * a.mean(), abs=0.01)
    with pytest.raises(ValueError):
        paired_split_ttest(a, b[:10])


def test_fitting_speed():
    s = fitting_speed({1: 0.1, 2: 0.55, 3: 0.9, 4: 1.0})
    assert s == {"epoch_to_50": 2, "epoch_to_90": 3, "epoch_to_100": 4, "mean_fitted": pytest.approx(0.6375)}
    assert fitting_speed({1: 0.2, 2: 0.3})["epoch_to_50"] is None


# ---------------------------------------------------------------------------------------------
# the analysis of a run, on small synthetic per-epoch files (no training)

import json  # noqa: E402

from knowcat.experiment import ExperimentConfig, analyze, linear_model_variants  # noqa: E402
from knowcat.finetune import FinetuneConfig, choose_stops, score_answers  # noqa: E402
from linear_models.study import PAPER_TABLE2  # noqa: E402

CATS = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
D = 4  # |D|
# test: 10 in-distribution questions per category (relation P1, trained on) and 4 OOD ones (P9)
TEST = [{"id": f"t-{c}-{i}", "relation": "P1", "category": c, "question": "q?", "answers": [f"{c}{i}"]}
        for c in CATS for i in range(10)] + \
       [{"id": f"o-{i}", "relation": "P9", "category": "Unknown", "question": "q?", "answers": [f"o{i}"]}
        for i in range(4)]

# the X% Unknown and D_Known sets: train composition; at epoch e, min(e, #Known) Known and
# min(e - 1, #Unknown) Unknown examples are fitted and the in-distribution accuracy is exactly
# 30 + 20 * N_kn / |D| - 10 * N_unk / |D| (percent)
PAPER_SETS = {"unknown_00": {"HighlyKnown": 2, "MaybeKnown": 1, "WeaklyKnown": 1},
              "unknown_25": {"HighlyKnown": 1, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1},
              "unknown_50": {"HighlyKnown": 1, "MaybeKnown": 1, "Unknown": 2},
              "unknown_75": {"HighlyKnown": 1, "Unknown": 3}, "unknown_100": {"Unknown": 4},
              "known_25": {"HighlyKnown": 1, "MaybeKnown": 1, "WeaklyKnown": 1},
              "known_50": {"HighlyKnown": 1, "MaybeKnown": 1}, "known_75": {"HighlyKnown": 1}}
# the single-category sets and D_Natural: in-distribution test questions answered correctly per
# category (of 10) at epochs 1, 2, 3, and the dev accuracy per epoch (None: no dev set)
TABLE_SETS = {
    "HighlyKnown": ([(10, 7, 2, 0), (10, 6, 2, 0), (9, 5, 3, 3)], [0.2, 0.6, 0.4]),  # EARLY_STOP 2
    "MaybeKnown": ([(10, 8, 3, 1), (10, 7, 2, 1), (10, 7, 1, 1)], [0.5, 0.5, 0.1]),  # 1 (earliest of a tie)
    "WeaklyKnown": ([(9, 5, 1, 0), (9, 6, 2, 0), (8, 6, 4, 2)], [0.1, 0.2, 0.3]),   # 3
    "Unknown": ([(9, 5, 1, 0), (7, 4, 2, 1), (5, 3, 1, 1)], [0.4, 0.3, 0.2]),       # 1
    "natural": ([(10, 7, 2, 0), (10, 8, 3, 1), (10, 7, 3, 2)], None),               # undefined
}


def _fill(n_by: dict, n: int) -> dict:
    out = {}
    for c in CATS:
        k = min(n, n_by.get(c, 0))
        if c in n_by:
            out[c] = k
        n -= k
    return out


def _write_variant(run, name, n_by, epochs):
    """epochs: (fitted count per category, correct in-distribution per category, correct OOD, dev accuracy)."""
    d = run / "finetune" / name / "epochs"
    d.mkdir(parents=True)
    ms = []
    for e, (fitted, correct, ood_correct, dev) in enumerate(epochs, 1):
        answers = {}
        for t in TEST:
            c, i = t["category"], int(t["id"].rsplit("-", 1)[1])
            ok = i < (ood_correct if t["relation"] == "P9" else correct.get(c, 0))
            answers[t["id"]] = t["answers"][0] if ok else "wrong"
        res, rows = score_answers(TEST, answers, FinetuneConfig(), {"P9"})
        m = {"epoch": e, "train": {"n": sum(n_by.values()), "fitted": sum(fitted.values()) / sum(n_by.values()),
                                   "fitted_by_category": {c: fitted[c] / n_by[c] for c in n_by},
                                   "n_by_category": dict(n_by)}, "test": res}
        if dev is not None:
            m["dev"] = {"all": {"n": 10, "accuracy": dev}}
        (d / f"epoch_{e:03d}.json").write_text(json.dumps(m))
        train = [{"set": "train", "id": f"{name}-{c}-{i}", "category": c, "fitted": i < fitted.get(c, 0)}
                 for c in CATS for i in range(n_by.get(c, 0))]
        (d / f"epoch_{e:03d}.answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train) +
                                                         "".join(json.dumps({"set": "test", **r}) + "\n" for r in rows))
        ms.append(m)
    (run / "finetune" / name / "metrics.json").write_text(json.dumps({"complete": True, "epochs": ms,
                                                                      **choose_stops(ms)}))


@pytest.fixture()
def synthetic_run(tmp_path):
    run = tmp_path / "run"
    (run / "mixtures").mkdir(parents=True)
    cat = [{"id": f"tr-{c}", "relation": "P1", "category": c, "question": "q?", "answers": ["a"], "split": "train"}
           for c in CATS] + [{**t, "split": "test"} for t in TEST]
    (run / "categorized.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cat))
    sets = {}
    for name, n_by in PAPER_SETS.items():
        n_kn = sum(v for c, v in n_by.items() if c != "Unknown")
        n_unk = n_by.get("Unknown", 0)
        eps = []
        for e in (1, 2, 3):
            nk, nu = min(e, n_kn), min(e - 1, n_unk)
            fitted = {**_fill({c: v for c, v in n_by.items() if c != "Unknown"}, nk),
                      **({"Unknown": nu} if n_unk else {})}
            eps.append((fitted, _fill(dict.fromkeys(CATS, 10), 12 + 2 * nk - nu), (nk + e) % 5, 0.3))
        _write_variant(run, name, n_by, eps)
        sets[name] = {"n": sum(n_by.values())}
    for name, (correct, dev) in TABLE_SETS.items():
        n_by = {name: D} if name in CATS else {"HighlyKnown": 1, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1}
        eps = [(_fill(n_by, e + 1), dict(zip(CATS, correct[e - 1])), 4, None if dev is None else dev[e - 1])
               for e in (1, 2, 3)]
        _write_variant(run, name, n_by, eps)
        sets[name] = {"n": D}
    (run / "mixtures" / "manifest.json").write_text(json.dumps({"size": D, "sets": sets}))
    return run


def test_table2_at_early_stop_and_convergence(synthetic_run):
    a = analyze(synthetic_run)
    t2 = a["table2"]
    row = lambda r: (r["full"], *(r[c] for c in CATS))  # noqa: E731
    # in-distribution test accuracy (the OOD questions, all answered correctly, are left out)
    approx = lambda d: {k: pytest.approx(v, abs=1e-9) for k, v in d.items()}  # noqa: E731
    assert {v: row(r) for v, r in t2["early_stop"].items()} == approx({
        "HighlyKnown": (45.0, 100.0, 60.0, 20.0, 0.0),  # epoch 2, the best dev epoch
        "MaybeKnown": (55.0, 100.0, 80.0, 30.0, 10.0),  # epoch 1: dev ties at epochs 1 and 2
        "WeaklyKnown": (50.0, 80.0, 60.0, 40.0, 20.0),  # epoch 3
        "Unknown": (37.5, 90.0, 50.0, 10.0, 0.0),       # epoch 1
    })  # D_Natural has no dev set: no EARLY_STOP row, and a note says why
    assert {v: row(r) for v, r in t2["convergence"].items()} == approx({
        "HighlyKnown": (50.0, 90.0, 50.0, 30.0, 30.0), "MaybeKnown": (47.5, 100.0, 70.0, 10.0, 10.0),
        "WeaklyKnown": (50.0, 80.0, 60.0, 40.0, 20.0), "Unknown": (25.0, 50.0, 30.0, 10.0, 10.0),
        "natural": (55.0, 100.0, 70.0, 30.0, 20.0)})
    for stop in ("early_stop", "convergence"):
        for v, r in t2[stop].items():
            assert r["paper"] == PAPER_TABLE2[stop][v]
    assert a["stops"]["HighlyKnown"] == {"early_stop": 2, "convergence": 3}
    assert a["stops"]["MaybeKnown"]["early_stop"] == 1 and a["stops"]["natural"]["early_stop"] is None
    assert set(a["early_stop_undefined"]) == {"natural"} and "natural" in a["table2_notes"]
    assert a["accuracy"]["natural"]["early_stop"]["epoch"] is None
    assert a["accuracy"]["HighlyKnown"]["early_stop"]["in_distribution"] == pytest.approx(45.0)
    assert a["accuracy"]["HighlyKnown"]["early_stop"]["ood"] == pytest.approx(100.0)
    # EARLY_STOP against CONVERGENCE: one question per part here (40 in-distribution questions)
    tt = a["t_tests"]["HighlyKnown"]["in_distribution"]
    assert tt["n_parts"] == 40 and (tt["mean_a"], tt["mean_b"]) == pytest.approx((45.0, 50.0))
    assert a["t_tests"]["natural"] == {} and "natural" in a["t_tests_skipped"]


def test_linear_model_points_are_the_papers_by_default_and_recorded(synthetic_run):
    a = analyze(synthetic_run)
    lm = a["linear_model"]["in_distribution"]
    paper = ["unknown_00", "unknown_25", "unknown_50", "unknown_75", "unknown_100", "known_25", "known_50",
             "known_75"]
    assert lm["rule"] == "paper" and lm["variants"] == paper and a["linear_model_variants"]["variants"] == paper
    assert lm["points"] == [[v, e] for v in paper for e in (1, 2, 3)] and lm["nobs"] == 24
    # the points lie exactly on 30 + 20 N_kn/|D| - 10 N_unk/|D|
    for k, v in (("b0", 30.0), ("b_kn", 20.0), ("b_unk", -10.0)):
        assert lm["params"][k] == pytest.approx(v, abs=1e-9)
    assert lm["r2"] == pytest.approx(1.0)
    assert a["findings"]["b_unk_negative"]["holds"]
    # every set: the single-category and natural points, off that plane, join the fit
    a = analyze(synthetic_run, ExperimentConfig(linear_model_variants="all"))
    lm = a["linear_model"]["in_distribution"]
    assert lm["rule"] == "all" and lm["variants"] == paper + ["HighlyKnown", "MaybeKnown", "Unknown",
                                                              "WeaklyKnown", "natural"]
    assert lm["nobs"] == 39 == len(lm["points"]) and lm["r2"] < 0.99 and lm["params"]["b_kn"] != pytest.approx(20)
    # a given list
    a = analyze(synthetic_run, ExperimentConfig(linear_model_variants="unknown_00, unknown_50,unknown_100"))
    lm = a["linear_model"]["in_distribution"]
    assert lm["variants"] == ["unknown_00", "unknown_50", "unknown_100"] and lm["nobs"] == 9
    assert lm["params"]["b_unk"] == pytest.approx(-10.0, abs=1e-9)
    with pytest.raises(ValueError, match="idk not among them"):
        analyze(synthetic_run, ExperimentConfig(linear_model_variants="unknown_00,idk"))
    assert linear_model_variants(["natural", "known_50", "unknown_100", "unknown_00"])[0] == \
        ["unknown_00", "unknown_100", "known_50"]


def test_cli_analyze_variants(synthetic_run, capsys):
    from knowcat.cli import main

    assert main(["analyze", str(synthetic_run), "--variants", "unknown_00,unknown_50,unknown_100,natural"]) == 0
    a = json.loads((synthetic_run / "analysis.json").read_text())
    assert a["variants"] == ["natural", "unknown_00", "unknown_100", "unknown_50"]
    assert set(a["accuracy"]) == set(a["t_tests"]) == set(a["fitting"]) == set(a["variants"])
    assert a["linear_model"]["in_distribution"]["variants"] == ["unknown_00", "unknown_50", "unknown_100"]
    assert a["linear_model"]["in_distribution"]["nobs"] == 9
    assert a["table2"]["early_stop"] == {} and list(a["table2"]["convergence"]) == ["natural"]
    assert a["config"]["variants"] == ["unknown_00", "unknown_50", "unknown_100", "natural"]
    assert main(["analyze", str(synthetic_run), "--linear-model-variants", "all"]) == 0
    a = json.loads((synthetic_run / "analysis.json").read_text())
    assert len(a["variants"]) == 13 and a["linear_model"]["in_distribution"]["nobs"] == 39
    capsys.readouterr()
    assert main(["analyze", str(synthetic_run), "--variants", "unknown_00,unknown_60"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_undefined_correlation_is_written_as_null(synthetic_run):
    """Every X% Unknown set answering nothing: accuracy is constant, its rank correlation with the Unknown share
    undefined. analysis.json says null (strict JSON, no NaN), the verdict is 'does not hold', the report builds."""
    import shutil

    from knowcat.cli import main
    from reports import build_report

    for name, n_by in PAPER_SETS.items():
        if name.startswith("unknown_"):
            shutil.rmtree(synthetic_run / "finetune" / name)
            _write_variant(synthetic_run, name, n_by, [(_fill(n_by, e), {}, 0, 0.3) for e in (1, 2, 3)])
    assert main(["analyze", str(synthetic_run)]) == 0

    def no_nan(token):
        raise AssertionError(f"analysis.json holds {token}")

    a = json.loads((synthetic_run / "analysis.json").read_text(), parse_constant=no_nan)
    for stop in ("early_stop", "convergence"):
        e = a["findings"][f"accuracy_vs_unknown_{stop}"]
        assert e["spearman"] is None and e["slope_per_10pct_unknown"] == pytest.approx(0.0, abs=1e-9)
    assert a["findings"]["convergence_accuracy_falls_with_unknown"]["holds"] is False
    assert build_report(synthetic_run).stat().st_size > 0  # builds without raising


def test_json_writes_undefined_numbers_as_null(tmp_path):
    from knowcat.io import atomic_write_json
    from reports.build import format_or_na

    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}
    assert format_or_na("%.2f", None) == format_or_na("%.1f%%", float("nan")) == "n/a"
    assert format_or_na("%.2f", 0.125) == "0.12"


def test_every_decided_finding_has_an_interval_and_a_decision(synthetic_run):
    from knowcat.experiment import format_findings

    a = analyze(synthetic_run, ExperimentConfig(n_boot=300, n_boot_clusters=299))
    lm = a["linear_model"]["in_distribution"]
    # the fit is exact here, so run-level intervals collapse; the clustered fields are there, 8 runs
    assert lm["n_clusters"] == 8 and lm["cluster"]["df"] == 7 and "clustered by fine-tuning run" in lm["inference"]
    assert "wild" in a["inference"]["linear_model"] and "resamples" in a["inference"]["findings"]
    decided = {n: f for n, f in a["findings"].items() if isinstance(f, dict) and "decision" in f}
    assert {"unknown_fitted_more_slowly", "b_unk_negative", "convergence_accuracy_falls_with_unknown",
            "known_does_not_fall", "known_falls_less_than_mixture"} <= set(decided)
    for n, f in decided.items():
        assert f["decision"] in ("holds", "does not hold", "unclear") and f["holds"] == (f["decision"] == "holds")
        assert f["claim"] and "interval" in f
        if f["decision"] != "unclear":
            lo, hi = f["interval"]
            assert lo <= hi
    # Known examples are fitted from epoch 1, Unknown one epoch later: the gap's interval is above 0
    u = decided["unknown_fitted_more_slowly"]
    assert u["interval"][0] > 0 and u["decision"] == "holds" and "training examples" in u["resampled"]
    assert decided["b_unk_negative"]["decision"] == "holds"
    # slopes over 5 sets come with intervals; the Spearman correlation is reported, not decided
    e = a["findings"]["accuracy_vs_unknown_convergence"]
    assert e["n_points"] == 5 and len(e["slope_interval"]) == 2 and "decision" not in e
    assert "holds" in format_findings(a) or "unclear" in format_findings(a)


def test_replicates_are_summarized_and_a_finding_holds_only_if_it_holds_in_each(synthetic_run):
    import shutil

    from reports import build_report

    rep = synthetic_run / "replicates" / "rep_01" / "finetune"
    shutil.copytree(synthetic_run / "finetune", rep)
    cfg = ExperimentConfig(n_boot=300, n_boot_clusters=299)
    a = analyze(synthetic_run, cfg)
    r = a["replicates"]
    assert r["replicates"] == ["rep_00", "rep_01"] and r["folders"]["rep_01"] == "replicates/rep_01/finetune"
    b = r["linear_model"]["in_distribution"]["b_unk"]
    assert b["n"] == 2 and b["mean"] == pytest.approx(-10.0) and b["n_negative"] == 2 and b["sd"] == pytest.approx(0)
    assert a["findings"]["b_unk_negative"]["decisions_by_replicate"] == ["holds", "holds"]
    assert a["findings"]["b_unk_negative"]["decision"] == "holds"
    # replicate 1: the X% Unknown sets with every answer wrong; its trend and b_unk findings no longer hold
    for name, n_by in PAPER_SETS.items():
        shutil.rmtree(rep / name)
        eps = []
        for e in (1, 2, 3):
            n_kn = sum(v for c, v in n_by.items() if c != "Unknown")
            fitted = {**_fill({c: v for c, v in n_by.items() if c != "Unknown"}, min(e, n_kn)),
                      **({"Unknown": min(e - 1, n_by["Unknown"])} if "Unknown" in n_by else {})}
            eps.append((fitted, {}, 0, 0.3))
        _write_variant_at(rep / name, name, n_by, eps)
    a = analyze(synthetic_run, cfg)
    f = a["findings"]["convergence_accuracy_falls_with_unknown"]
    assert f["decisions_by_replicate"][1] == "does not hold" and f["decision"] != "holds"
    assert f["decision_first_replicate"] == a["findings"]["convergence_accuracy_falls_with_unknown"]["decisions_by_replicate"][0]
    (synthetic_run / "analysis.json").write_text(json.dumps(a))
    assert build_report(synthetic_run).stat().st_size > 0


def _write_variant_at(folder, name, n_by, epochs):
    """``_write_variant`` into a given fine-tuning folder (a replicate's)."""
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    _write_variant(tmp, name, n_by, epochs)
    import shutil

    shutil.copytree(tmp / "finetune" / name, folder)


def test_demo_seeds_aggregate():
    from knowcat.replicates import aggregate, format_summary

    def one(b_unk, decision):
        return {"linear_model": {"in_distribution": {"params": {"b0": 10, "b_kn": 1.0, "b_unk": b_unk}, "r2": 0.5}},
                "findings": {"b_unk_negative": {"claim": "b_unk < 0", "value": b_unk, "interval": [b_unk - 1, b_unk + 1],
                                                "decision": decision}}}

    s = aggregate({"seed_0": one(-11.7, "holds"), "seed_1": one(-14.7, "holds"), "seed_2": one(0.5, "unclear")})
    assert s["per_seed"]["seed_1"]["linear_model"]["in_distribution"]["b_unk"] == -14.7
    assert s["linear_model"]["in_distribution"]["b_unk"]["n_negative"] == 2
    assert s["findings"]["b_unk_negative"]["decision"] == "unclear"
    assert "seed_2" in format_summary(s)


def test_format_findings_prints_undefined_numbers_as_na(synthetic_run):
    """A constant test accuracy (the quick demo's OOD questions, all wrong) leaves R^2 and p-values undefined."""
    from knowcat.experiment import format_findings

    a = analyze(synthetic_run, ExperimentConfig(n_boot=200, n_boot_clusters=99))
    lm = a["linear_model"]["in_distribution"]
    lm["r2"] = None
    lm["pvalues"] = dict.fromkeys(lm["pvalues"])
    lm["wild_bootstrap"] = {"pvalues": dict.fromkeys(lm["pvalues"]), "conf_int_95": dict.fromkeys(lm["pvalues"])}
    assert "R^2 n/a" in format_findings(a) and "p n/a" in format_findings(a)
