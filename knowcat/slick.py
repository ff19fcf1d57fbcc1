"""SliCK: the knowledge categories of Gekhman et al. (2024).

P_Correct(q, a; M, T) is the share of correct answers of model M to question q
at temperature T over ``n_prompts`` few-shot prompts (each ``k`` exemplars from
the dev split of the same relation). Per prompt: one greedy answer (T = 0) and
``n_samples`` answers at ``temperature`` from the ``top_k`` tokens.

- HighlyKnown:  P_Correct(T=0) = 1
- MaybeKnown:   0 < P_Correct(T=0) < 1
- WeaklyKnown:  P_Correct(T=0) = 0 and P_Correct(T>0) > 0
- Unknown:      P_Correct(T=0) = 0 and P_Correct(T>0) = 0

Lazy mode (the default) generates only what decides the category, in waves that
keep the engine's batches full: first every greedy answer of every prompt (one
round, always needed), then samples only for the examples whose greedy answers
are all wrong, a few prompts' samples per example per round (as many as fill the
engine's batch), an example leaving at the end of the round that gave it a
correct sample. Because every sample is a pure function of (seed, example id,
prompt index, sample index), lazy and exact mode see the same answers and give
the same categories; exact mode also yields the full P_Correct(T>0) for every
example. In lazy mode the samples of an example are counted in their canonical
order (prompt 0's samples 0, 1 ..., then prompt 1's ...) up to its first correct
one, whatever the rounds computed past it, so the counts do not depend on the
batch size either: an example with a correct greedy answer has none, a
WeaklyKnown one counts up to its first correct sample, an Unknown one all of
them. P_Correct(T>0) is reported only where it was fully measured (Unknown: 0)
and is ``None`` elsewhere; the counts are always given. With ``exact`` matching, a
lazy sample is also abandoned as soon as its first words can no longer match any
answer (:func:`knowcat.matching.may_still_match`): it is counted, wrong, and its
answer is kept as ``None`` (null). Most samples of an Unknown example leave after
their first token or two instead of decoding a whole wrong answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from typing import Callable

from knowcat.examples import QAExample
from knowcat.matching import MATCH_MODES, is_correct, may_still_match
from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for

from linear_models.names import CATEGORIES, KNOWN  # noqa: F401  (defined once, there)


@dataclass(frozen=True)
class SliCKConfig:
    """The protocol; defaults are the paper's."""

    n_prompts: int = 10
    k: int = 4
    n_samples: int = 16
    temperature: float = 0.5
    top_k: int = 40
    seed: int = 0
    match: str = "exact"
    exact: bool = False  # compute every sample (full P_Correct(T>0)) instead of lazily
    exemplar_split: str = "dev"
    max_new_tokens: int = 32
    keep_answers: bool = False
    alpha: float = 0.05  # confidence intervals at 1 - alpha (Wilson)
    chat_template: bool = False  # few-shot blocks in the model's own chat template (a chat model)

    def __post_init__(self):
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {self.match!r}")
        for name in ("n_prompts", "k", "n_samples", "top_k", "max_new_tokens"):
            if getattr(self, name) < (0 if name == "n_samples" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (the greedy answer is T = 0)")

    @property
    def fewshot(self) -> FewShotConfig:
        return FewShotConfig(self.n_prompts, self.k, self.seed, self.exemplar_split)


@dataclass
class SliCKResult:
    id: str
    category: str
    n_greedy: int
    n_greedy_correct: int
    p_correct_greedy: float
    ci_greedy: tuple[float, float]
    n_sampled: int
    n_sampled_correct: int
    p_correct_sampled: float | None
    ci_sampled: tuple[float, float] | None
    match_mode: str
    mode: str  # "lazy" or "exact"
    greedy_answers: list[str] | None = None
    sampled_answers: list[list[str | None]] | None = None  # per prompt (None: abandoned, lazy mode)

    def fields(self) -> dict:
        d = asdict(self)
        d.pop("id")
        if d["greedy_answers"] is None:
            d.pop("greedy_answers")
            d.pop("sampled_answers")
        return d


def category_of(n_greedy_correct: int, n_greedy: int, n_sampled_correct: int) -> str:
    if n_greedy_correct == n_greedy:
        return "HighlyKnown"
    if n_greedy_correct > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if n_sampled_correct > 0 else "Unknown"


def wilson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return (round(float(lo), 6), round(float(hi), 6))


@dataclass
class _State:
    greedy: list[str | None]  # one per prompt
    samples: dict[int, list[str]] = field(default_factory=dict)  # prompt -> answers in sample order
    n_greedy_correct: int = 0
    n_sampled: int = 0
    n_sampled_correct: int = 0
    sample_hit: bool = False  # one of the samples computed so far is correct


def _count_samples(st: _State, answers, cfg: SliCKConfig) -> None:
    """The sample counts, in canonical order (prompt by prompt, sample by sample); lazy mode stops at
    the first correct sample and forgets the samples computed past it."""
    verdict: dict[str, bool] = {}  # samples repeat: each distinct answer is matched once
    for j in sorted(st.samples):
        for i, a in enumerate(st.samples[j]):
            # None: a sample abandoned once it could no longer match (lazy mode), wrong whatever followed
            if a is None:
                ok = False
            elif a not in verdict:
                ok = verdict[a] = is_correct(a, answers, cfg.match)
            else:
                ok = verdict[a]
            st.n_sampled += 1
            st.n_sampled_correct += ok
            if ok and not cfg.exact:
                st.samples = {k: (v if k < j else v[:i + 1]) for k, v in st.samples.items() if k <= j}
                return


def categorize(engine, examples: list[QAExample], exemplar_pool: list[QAExample],
               cfg: SliCKConfig = SliCKConfig(), progress: Callable[[int], object] | None = None
               ) -> list[SliCKResult]:
    """SliCK categories of ``examples`` (a pure function of model, data and config).

    ``engine``: a :class:`probes.engine.Engine` (:func:`probes.engine.open_engine`).
    ``exemplar_pool``: the examples few-shot exemplars are drawn from (the dev
    split). ``progress`` is called with numbers of finished requests (the greedy answer
    or the samples of an example under one prompt; with ``n_samples=0``: prompts).
    """
    from probes.generation import PromptRequest
    from probes.sampling import stream_seeds

    sets = exemplar_sets(exemplar_pool, cfg.fewshot)
    missing = sorted({e.relation for e in examples} - set(sets))
    if missing:
        raise ValueError(f"no {cfg.exemplar_split} exemplars for relations {missing}")
    render = None
    if cfg.chat_template:
        from knowcat.prompts import chat_renderer

        tok = getattr(engine, "tokenizer", None)
        if tok is None:
            raise ValueError(f"the {getattr(engine, 'name', 'engine')} engine exposes no tokenizer for --chat-template")
        render = chat_renderer(tok)
    prompts = {ex.id: [prompt_for(ex, s, render=render) for s in sets[ex.relation]] for ex in examples}
    state = {ex.id: _State([None] * cfg.n_prompts) for ex in examples}
    by_id = {ex.id: ex for ex in examples}

    def record(req, g):
        ex_id, j = req.key[1], req.key[2]
        st, answers = state[ex_id], by_id[ex_id].answers
        if req.greedy:
            st.greedy[j] = g.greedy
            st.n_greedy_correct += is_correct(g.greedy, answers, cfg.match)
        if req.streams:
            st.samples[j] = list(g.samples)
            st.sample_hit = st.sample_hit or any(is_correct(a, answers, cfg.match) for a in set(g.samples) - {None})

    def sample_request(ex, j):
        # lazy mode only needs to know whether a sample is correct: one that can no longer match
        # (its first words already differ from every answer) is abandoned
        hopeless = None
        if not cfg.exact and cfg.match == "exact":
            hopeless = partial(_hopeless, answers=tuple(ex.answers), mode=cfg.match)
        return PromptRequest(("s", ex.id, j), *prompts[ex.id][j], False,
                             stream_seeds(cfg.seed, ex.id, j, cfg.n_samples),
                             abandon=hopeless)

    if cfg.exact or cfg.n_samples == 0:
        # one round: every greedy answer and every sample (greedy and samples of a prompt share a prefill)
        rounds = [[PromptRequest(("p", ex.id, j), *prompts[ex.id][j], True, sample_request(ex, j).streams)
                   for ex in examples for j in range(cfg.n_prompts)]]
    else:
        rounds = _lazy_waves(examples, cfg, state, sample_request,
                             getattr(engine, "batch_rows", None) or LAZY_WAVE_ROWS)
        # the greedy round keeps each prompt's state for the samples a later round may ask
        rounds = _chain([[PromptRequest(("g", ex.id, j), *prompts[ex.id][j], True, (), keep_state=True)
                          for ex in examples for j in range(cfg.n_prompts)]], rounds)
    engine.generate(rounds, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    on_result=record, progress=progress)

    for ex in examples:
        _count_samples(state[ex.id], ex.answers, cfg)

    results = []
    for ex in examples:
        st = state[ex.id]
        ng, ngc = len(st.greedy), st.n_greedy_correct
        cat = category_of(ngc, ng, st.n_sampled_correct)
        full = st.n_sampled == cfg.n_prompts * cfg.n_samples
        results.append(SliCKResult(
            id=ex.id, category=cat, n_greedy=ng, n_greedy_correct=ngc, p_correct_greedy=ngc / ng,
            ci_greedy=wilson(ngc, ng, cfg.alpha), n_sampled=st.n_sampled, n_sampled_correct=st.n_sampled_correct,
            p_correct_sampled=(st.n_sampled_correct / st.n_sampled) if full and st.n_sampled else None,
            ci_sampled=wilson(st.n_sampled_correct, st.n_sampled, cfg.alpha) if full and st.n_sampled else None,
            match_mode=cfg.match, mode="exact" if cfg.exact else "lazy",
            greedy_answers=st.greedy if cfg.keep_answers else None,
            sampled_answers=[st.samples.get(j, []) for j in range(cfg.n_prompts)] if cfg.keep_answers else None,
        ))
    return results


@lru_cache(maxsize=1 << 16)
def _hopeless(text: str, answers: tuple[str, ...], mode: str) -> bool:
    # (the same first words come back under every prompt of an example: each is matched once)
    return not may_still_match(text, answers, mode)


# rows a sample round aims at when the engine does not say how many rows it decodes together
LAZY_WAVE_ROWS = 512


def _chain(*parts):
    for p in parts:
        yield from p


def _lazy_waves(examples, cfg: SliCKConfig, state, sample_request, batch_rows: int):
    """The sample rounds of lazy mode, formed one at a time after the previous round's results were
    recorded: for each example whose answers so far are all wrong, its next prompts' samples in prompt
    order, as many prompts each as make the round decode about ``batch_rows`` rows. A sample abandoned
    (``None``) takes a row for a token or two at most (most leave at their first token, drawn before any
    batch is formed), so a round asks for ``batch_rows`` samples divided by the share of the samples of
    earlier rounds that were not abandoned (1 before any round: the first asks ``batch_rows`` samples).
    Which prompts a round asks changes what is computed, never the counts or the category."""
    asked = {ex.id: 0 for ex in examples}  # prompts whose samples were asked
    n_asked = n_kept = 0  # samples asked in earlier rounds, and of them those not abandoned
    last: list = []
    while True:
        for ex_id, j in last:
            got = state[ex_id].samples.get(j, [])
            n_asked += len(got)
            n_kept += sum(a is not None for a in got)
        todo = [ex for ex in examples if asked[ex.id] < cfg.n_prompts and not state[ex.id].n_greedy_correct
                and not state[ex.id].sample_hit]
        if not todo:
            return
        kept = max(n_kept / n_asked, 1 / cfg.n_samples) if n_asked else 1.0
        per = max(1, -(-batch_rows // max(1, int(len(todo) * cfg.n_samples * kept))))
        wave, last = [], []
        for ex in todo:
            j0 = asked[ex.id]
            asked[ex.id] = min(cfg.n_prompts, j0 + per)
            wave.extend(sample_request(ex, j) for j in range(j0, asked[ex.id]))
            last.extend((ex.id, j) for j in range(j0, asked[ex.id]))
        yield wave
