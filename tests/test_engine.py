"""The engine interface: the rounds loop, the registry, the transformers engine on a tiny random model."""

import warnings

import pytest

from probes.engine import Engine, TransformersEngine, open_engine, run_rounds
from probes.generation import Generation, PromptRequest, generate


def test_rounds_prepare_sees_every_earlier_result():
    seen_at_prepare, done = [], []

    def one_round(todo, progress):
        if progress:
            progress(len(todo))
        return {r.key: Generation(f"answer {r.key}", []) for r in todo}

    def prepare(req):
        seen_at_prepare.append((req.key, tuple(done)))
        return None if req.key == "skip" else PromptRequest(req.key, req.prefix, req.suffix, True, ())

    ticks = []
    out = run_rounds(one_round, [[PromptRequest("a", "", "q", True, (1, 2))],
                                 [PromptRequest("b", "", "q"), PromptRequest("skip", "", "q")]],
                     prepare=prepare, on_result=lambda r, g: done.append(r.key), progress=ticks.append)
    assert set(out) == {"a", "b"} and out["b"].greedy == "answer b"
    assert seen_at_prepare == [("a", ()), ("b", ("a",)), ("skip", ("a",))]  # a round's results before the next
    assert sum(ticks) == 3  # finished and skipped requests are counted


def test_registry_is_the_one_place_that_picks_an_engine(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine"):
        open_engine("llamacpp", str(tiny_model_dir))
    eng = open_engine("transformers", str(tiny_model_dir), device="cpu", batch_size=8, seed=3)
    assert isinstance(eng, TransformersEngine) and isinstance(eng, Engine) and eng.device == "cpu"


def test_transformers_engine_generates_and_scores_without_deprecated_cache_argument(tiny_model_dir):
    from probes.loading import load_model
    from probes.scoring import ScoreRequest, score

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    eng = open_engine("transformers", (model, tok))
    reqs = [PromptRequest(("x", j), "Q: Where was Kel Mar born?\nA: Vorma Rusk\n", f"Q: Who founded {n}?\nA:",
                          True, (11, 12)) for j, n in enumerate(["Tessa Lind", "Oren Vale"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' `past_key_values` deprecation
        got = eng.generate([reqs[:1], reqs[1:]], max_new_tokens=6)
    want = generate(model, tok, reqs, max_new_tokens=6)
    assert {k: (g.greedy, g.samples) for k, g in got.items()} == {k: (g.greedy, g.samples) for k, g in want.items()}
    sreq = [ScoreRequest("s", reqs[0].prefix + reqs[0].suffix, " Oren Vale")]
    assert eng.score(sreq, layers=(0,))["s"].token_logprobs == score(model, tok, sreq, layers=(0,))["s"].token_logprobs


def test_transformers_engine_counts_the_tokens_it_feeds(tiny_model_dir):
    import torch

    from probes.generation import group_requests, stop_token_ids
    from probes.loading import load_model
    from probes.scoring import ScoreRequest

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    eng = open_engine("transformers", (model, tok))
    pre, suf = "Q: Where was Kel Mar born?\nA: Vorma Rusk\n", "Q: Who founded Tessa Lind?\nA:"
    eng.generate([[PromptRequest("g", pre, suf, True, ())]], max_new_tokens=6)
    (shared, [(_, suffix)]), = group_requests(tok, [PromptRequest("g", pre, suf)]).items()
    ids, stops, n_gen = list(shared) + suffix, stop_token_ids(tok), 0
    with torch.no_grad():  # greedy decoding by hand, whole text each step
        for _ in range(6):
            t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            n_gen += 1
            if t in stops:
                break
    # the prefix once, the suffix, then every generated token but the last is fed back
    assert eng.forward_tokens == len(shared) + len(suffix) + n_gen - 1
    before = eng.forward_tokens
    eng.score([ScoreRequest("s", suf, " Oren Vale", shared=pre), ScoreRequest("t", suf, " Dorn", shared=pre)])
    whole = [len(tok(pre + suf + c)["input_ids"]) for c in (" Oren Vale", " Dorn")]
    assert eng.forward_tokens - before == sum(w - 1 for w in whole) - len(tok(pre)["input_ids"])  # no last tokens


def test_forward_tokens_count_a_round_that_mixes_kept_states_and_new_prompts(tiny_model_dir):
    """A round whose requests partly continue from a kept prompt state and partly need their prefill (lazy
    SliCK's sample rounds) counts every token it feeds: the same as computing those requests in rounds of
    their own."""
    from probes.loading import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    pre = "Q: Where was Kel Mar born?\nA: Vorma Rusk\n"
    x = PromptRequest("x", pre, "Q: Who founded Tessa Lind?\nA:", True, (), keep_state=True)
    xs = PromptRequest("xs", pre, "Q: Who founded Tessa Lind?\nA:", False, (3, 4, 5))
    y = PromptRequest("y", pre, "Q: What is the capital of Dorn?\nA:", True, ())
    mixed, apart = open_engine("transformers", (model, tok)), open_engine("transformers", (model, tok))
    got = mixed.generate([[x], [xs, y]], max_new_tokens=6)
    want = apart.generate([[x], [xs], [y]], max_new_tokens=6)
    assert {k: (g.greedy, g.samples) for k, g in got.items()} == {k: (g.greedy, g.samples) for k, g in want.items()}
    assert mixed.forward_tokens == apart.forward_tokens > 0
