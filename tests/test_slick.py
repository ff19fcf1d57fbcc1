"""SliCK categorization: protocol, lazy == exact, sampling invariance, resumable runs."""

import json

import pytest

from knowcat.matching import is_correct, normalize
from knowcat.slick import CATEGORIES, SliCKConfig, categorize, category_of
from probes.engine import TransformersEngine


@pytest.fixture(scope="module")
def quick_data(quick_split):
    _, train, pool = quick_split
    return train, pool


SMALL = SliCKConfig(n_prompts=3, n_samples=6, seed=7)


def test_category_rule():
    assert category_of(10, 10, 0) == "HighlyKnown"
    assert category_of(3, 10, 0) == "MaybeKnown"
    assert category_of(0, 10, 1) == "WeaklyKnown"
    assert category_of(0, 10, 0) == "Unknown"


@pytest.mark.parametrize("pred,golds,mode,ok", [
    ("The Beatles", ["Beatles"], "exact", True),
    ("  paris. ", ["Paris"], "exact", True),
    ("Paris, France", ["Paris"], "exact", False),
    ("Paris, France", ["Paris"], "contains", True),
    ("Parisian", ["Paris"], "contains", False),  # whole words only
    ("an apple", ["Apple"], "exact", True),
    ("", ["x"], "exact", False),
    ("", [""], "contains", False),
    ("Sao Paulo", ["São Paulo"], "exact", False),  # accents are not folded (SQuAD does not)
    ("U.S.A.", ["USA"], "exact", True),
])
def test_matching(pred, golds, mode, ok):
    assert is_correct(pred, golds, mode) is ok


def test_normalize():
    assert normalize("  The  Quick, brown (fox)! ") == "quick brown fox"
    with pytest.raises(ValueError):
        is_correct("a", ["a"], "fuzzy")


def test_config_validation():
    with pytest.raises(ValueError):
        SliCKConfig(match="fuzzy")
    with pytest.raises(ValueError):
        SliCKConfig(temperature=0)
    d = SliCKConfig()
    assert (d.n_prompts, d.k, d.n_samples, d.temperature, d.top_k, d.match) == (10, 4, 16, 0.5, 40, "exact")


class CountingEngine:
    """An engine that counts what it is asked (rounds, answer rows: a greedy answer or one sample) and
    what its model computes (forward calls, tokens: ``input_ids.numel()``, padding included)."""

    def __init__(self, engine, monkeypatch):
        import functools

        self.engine, self.name, self.batch_rows = engine, engine.name, engine.batch_rows
        self.rounds = self.rows = self.calls = self.tokens = 0
        real = engine.model.forward

        @functools.wraps(real)
        def forward(*a, **k):
            ids = k.get("input_ids", a[0] if a else None)
            self.calls += 1
            self.tokens += 0 if ids is None else ids.numel()
            return real(*a, **k)

        monkeypatch.setattr(engine.model, "forward", forward)

    @property
    def device(self):
        return self.engine.device

    def generate(self, rounds, **kw):
        def counted():
            for rnd in rounds:
                self.rounds += 1
                self.rows += sum(int(r.greedy) + len(r.streams) for r in rnd)
                yield rnd

        return self.engine.generate(counted(), **kw)

    def work(self) -> dict:
        return {"rounds": self.rounds, "rows": self.rows, "forward_calls": self.calls, "forward_tokens": self.tokens}


def test_lazy_and_exact_give_identical_categories(quick_model, quick_split, monkeypatch):
    from knowcat.world.build import read_exposures

    model, tok = quick_model
    run, train, pool = quick_split
    # the first questions, and the most exposed ones (the few the quick model knows are among them)
    count = {e["id"]: e["count"] for e in read_exposures(run / "world")}
    exs = train[:40] + sorted(train[40:], key=lambda e: -count.get(e.id, 0))[:24]
    cfg = SliCKConfig(**{**SMALL.__dict__, "keep_answers": True})
    engine = CountingEngine(TransformersEngine(model, tok, batch_size=64), monkeypatch)
    lazy = categorize(engine, exs, pool, cfg)
    lazy_work = engine.work()
    engine = CountingEngine(TransformersEngine(model, tok, batch_size=64), monkeypatch)
    exact = categorize(engine, exs, pool, SliCKConfig(**{**cfg.__dict__, "exact": True}))
    exact_work = engine.work()
    assert [r.category for r in lazy] == [r.category for r in exact]
    # the test is not vacuous: both sample outcomes, and examples decided by their greedy answers
    assert {r.category for r in lazy} >= {"Unknown", "WeaklyKnown"}
    assert {r.category for r in lazy} & {"HighlyKnown", "MaybeKnown"}
    gold = {e.id: e.answers for e in exs}
    abandoned = completed = 0
    for lz, ex in zip(lazy, exact):
        assert ex.n_sampled == SMALL.n_prompts * SMALL.n_samples and ex.p_correct_sampled is not None
        assert lz.greedy_answers == ex.greedy_answers and lz.p_correct_greedy == ex.p_correct_greedy
        flat = [a for s in ex.sampled_answers for a in s]
        hits = [i for i, a in enumerate(flat) if is_correct(a, gold[ex.id])]
        if lz.category in ("HighlyKnown", "MaybeKnown"):  # decided by the greedy answers: no sample asked
            assert lz.n_sampled == 0 and lz.p_correct_sampled is None
        else:
            if lz.category == "WeaklyKnown":  # counted up to its first correct sample, in canonical order
                assert (lz.n_sampled, lz.n_sampled_correct) == (hits[0] + 1, 1)
                flat = flat[:hits[0] + 1]
            else:
                assert lz.n_sampled == ex.n_sampled and lz.p_correct_sampled == 0.0 and not hits
            # a lazy sample is the exact one, or abandoned (None) where the exact one is wrong
            lz_flat = [a for s in lz.sampled_answers for a in s]
            assert len(lz_flat) == len(flat)
            for a, b in zip(lz_flat, flat):
                assert a == b or (a is None and not is_correct(b, gold[ex.id])), (a, b)
            abandoned += sum(a is None for a in lz_flat)
            completed += sum(a is not None for a in lz_flat)
    # not vacuous: samples were abandoned, and others (correct, or wrong only at their end) completed
    assert abandoned and completed, (abandoned, completed)
    # lazy asked fewer answers, in rounds whose batches stay full, and abandoned hopeless samples:
    # fewer rows, forward calls and tokens
    assert lazy_work["rows"] < exact_work["rows"], (lazy_work, exact_work)
    assert lazy_work["forward_calls"] < exact_work["forward_calls"], (lazy_work, exact_work)
    assert lazy_work["forward_tokens"] < exact_work["forward_tokens"], (lazy_work, exact_work)
    assert lazy_work["rounds"] > 2 and exact_work["rounds"] == 1


def test_lazy_counts_do_not_depend_on_the_batch_size(quick_model, quick_data):
    """The sample rounds are sized to the engine's batch; the results are not."""
    model, tok = quick_model
    train, pool = quick_data
    exs = train[:40]
    cfg = SliCKConfig(**{**SMALL.__dict__, "keep_answers": True})
    a = categorize(TransformersEngine(model, tok, batch_size=8), exs, pool, cfg)
    b = categorize(TransformersEngine(model, tok, batch_size=400), list(reversed(exs)), pool, cfg)
    b = {r.id: r for r in b}
    assert [r.fields() for r in a] == [b[r.id].fields() for r in a]


def test_answers_do_not_depend_on_batch_size_or_order(quick_model, quick_data):
    model, tok = quick_model
    train, pool = quick_data
    exs = train[:24]
    cfg = SliCKConfig(**{**SMALL.__dict__, "exact": True, "keep_answers": True})
    a = categorize(TransformersEngine(model, tok, batch_size=256), exs, pool, cfg)
    b = categorize(TransformersEngine(model, tok, batch_size=7), list(reversed(exs)), pool, cfg)
    b = {r.id: r for r in b}
    for r in a:
        assert r.greedy_answers == b[r.id].greedy_answers
        assert r.sampled_answers == b[r.id].sampled_answers
    # samples differ between sample indices (they are samples, not copies)
    assert any(len(set(s)) > 1 for r in a for s in r.sampled_answers)
    # another seed gives other samples
    c = categorize(TransformersEngine(model, tok, batch_size=256), exs[:8], pool, SliCKConfig(**{**cfg.__dict__, "seed": 8}))
    assert [r.sampled_answers for r in c] != [r.sampled_answers for r in a[:8]]


def test_greedy_answers_match_plain_generate(quick_model, quick_data):
    from knowcat.prompts import exemplar_sets, prompt_for
    from probes.generation import decode_answer

    model, tok = quick_model
    train, pool = quick_data
    cfg = SliCKConfig(**{**SMALL.__dict__, "keep_answers": True})
    exs = train[:10]
    res = categorize(TransformersEngine(model, tok, batch_size=64), exs, pool, cfg)
    sets = exemplar_sets(pool, cfg.fewshot)
    for ex, r in zip(exs, res):
        for j, s in enumerate(sets[ex.relation]):
            pre, suf = prompt_for(ex, s)
            ids = tok(pre + suf, return_tensors="pt")
            out = model.generate(**ids, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
            assert r.greedy_answers[j] == decode_answer(tok, out[0, ids["input_ids"].shape[1]:].tolist())


def test_resumed_run_equals_uninterrupted(quick_demo, quick_data, tmp_path):
    from knowcat.runs import RunMismatch, run_categorize

    run, _ = quick_demo
    train, pool = quick_data
    exs = train[:50]
    quiet = dict(log=lambda *a: None, progress=False, shard_size=16, batch_size=64)
    model = str(run / "model")
    run_categorize(model, exs, pool, tmp_path / "whole", SMALL, **quiet)
    # killed after 2 of 4 shards (a partial shard file left behind must not count)
    assert run_categorize(model, exs, pool, tmp_path / "resumed", SMALL, stop_after_shards=2, **quiet) == {}
    shards = tmp_path / "resumed" / "categorize" / "shards"
    assert len(list(shards.glob("*.jsonl"))) == 2
    (shards / ".00002.jsonl.partial.tmp").write_text('{"id": "truncated')
    assert not (tmp_path / "resumed" / "categorized.jsonl").exists()
    lines = []
    run_categorize(model, exs, pool, tmp_path / "resumed", SMALL, **{**quiet, "log": lines.append})
    assert any("resuming" in l for l in lines)
    for name in ("categorized.jsonl",):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    recs = [json.loads(l) for l in open(tmp_path / "whole" / "categorized.jsonl")]
    assert [r["id"] for r in recs] == [e.id for e in exs]
    assert all(r["category"] in CATEGORIES and r["match_mode"] == "exact" for r in recs)
    assert all(len(r["ci_greedy"]) == 2 and r["ci_greedy"][0] <= r["p_correct_greedy"] <= r["ci_greedy"][1]
               for r in recs)
    import pandas as pd
    assert len(pd.read_parquet(tmp_path / "whole" / "categorized.parquet")) == 50
    # another protocol in the same directory is refused, not mixed in
    with pytest.raises(RunMismatch):
        run_categorize(model, exs, pool, tmp_path / "whole", SliCKConfig(n_prompts=2), **quiet)


def test_categorize_real_entityquestions_files(quick_demo, tmp_path):
    """The pipeline runs on the real EntityQuestions files (the demo model knows none of it)."""
    import subprocess
    import sys

    from conftest import ENTITYQUESTIONS

    assert ENTITYQUESTIONS.exists(), f"the EntityQuestions copy is missing: {ENTITYQUESTIONS}"
    run, _ = quick_demo
    sub = tmp_path / "eq"
    for split in ("train", "dev", "test"):
        (sub / split).mkdir(parents=True)
        for rel in ("P17", "P19"):
            recs = json.loads((ENTITYQUESTIONS / split / f"{rel}.{split}.json").read_text())[:12]
            (sub / split / f"{rel}.{split}.json").write_text(json.dumps(recs))
    (sub / "relation_query_templates.json").write_text((ENTITYQUESTIONS / "relation_query_templates.json").read_text())
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "knowcat", "categorize", "--model", str(run / "model"), str(sub),
                        "--out", str(out), "--splits", "train", "--n-prompts", "2", "--n-samples", "2",
                        "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in open(out / "categorized.jsonl")]
    assert len(recs) == 24 and all(r["category"] in CATEGORIES for r in recs)
    assert "Unknown" in r.stdout and "share" in r.stdout  # the summary table


@pytest.mark.parametrize("kept_per_prompt,second_wave_prompts", [(16, 1), (1, 9), (4, 3)])
def test_lazy_waves_are_sized_by_the_samples_that_were_not_abandoned(kept_per_prompt, second_wave_prompts):
    """A sample round asks ``batch_rows`` samples divided by the share of earlier samples not abandoned
    (the rows decoding goes on with): where most were abandoned at once, the next round asks more
    prompts per example; an example with a correct sample leaves."""
    from types import SimpleNamespace

    from knowcat.slick import _lazy_waves

    cfg = SliCKConfig(n_prompts=10, n_samples=16)
    exs = [SimpleNamespace(id=f"e{i}") for i in range(8)]
    state = {e.id: SimpleNamespace(n_greedy_correct=0, sample_hit=False, samples={}) for e in exs}
    waves = _lazy_waves(exs, cfg, state, lambda ex, j: (ex.id, j), batch_rows=64)
    first = next(waves)
    assert sorted(first) == sorted((e.id, 0) for e in exs)  # 64 rows: one prompt of each of 8 examples
    for ex_id, j in first:
        state[ex_id].samples[j] = ["wrong"] * kept_per_prompt + [None] * (16 - kept_per_prompt)
    state["e0"].sample_hit = True
    second = next(waves)  # 7 examples left: 64 / (7 * 16 * kept share) prompts each, at most the 9 left
    assert {i for i, _ in second} == {e.id for e in exs[1:]}
    assert sorted(j for i, j in second if i == "e1") == list(range(1, 1 + second_wave_prompts))
