"""``knowcat estimate``: SliCK categories for a whole dataset at the cost of one forward pass per prompt.

1. Features of every example, teacher-forced (:mod:`probes.scoring`), no sampling: under each
   of the first ``n_prompts`` SliCK prompts the log-probability of the reference answer (sum and
   per token), the first-token margin and whether greedy decoding would reproduce it; and the
   hidden state of a middle block at the last prompt token, averaged over the prompts (a linear
   probe, as in KEEN and Inside-Out).
2. A calibration sample (stratified by relation and by quintile of the answer's log-probability)
   gets its categories from full SliCK (:func:`knowcat.runs.run_categorize`), or from labels
   already computed (``labels``: a categorized file's categories by example id).
3. A multinomial logistic regression of the category on the features, its penalty chosen by
   cross-validated log-loss (:mod:`linear_models.classifiers`), predicts the category and its
   probabilities for every other example.
4. Validation, always: out-of-fold predictions on the calibration sample against SliCK
   (confusion matrix, macro-F1, AUROC of Unknown against the Known categories, and for the
   drop-Unknown rule the share of Unknown dropped and of HighlyKnown kept, with intervals);
   when labels exist for examples outside the sample, the same on those (at most
   :data:`VALIDATION_CAP` of them, beyond it a seeded sample); and the forward tokens per
   example against lazy SliCK's.

Every row records which method labelled it (``category_method``: ``slick`` for the calibration
sample, ``estimate`` for the rest).

Memory, with a run folder: the features and the predictions are written in shards and read back one
at a time; what is held is the calibration sample's features, one shard, the few-shot pool, the
validation sample and a few numbers per example (see :func:`estimate`). On SFT files (:func:`knowcat.sft.estimate_sft`) the examples
are read again from the file on each pass, the pool keeps at most :data:`POOL_CAP` exemplars per group
(:func:`bounded_pool`) and labels given as a file are indexed (:class:`LabelIndex`), not held.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from knowcat.examples import QAExample
from knowcat.io import atomic_write_json
from knowcat.prompts import FewShotConfig, answer_sep, exemplar_sets, prompt_for
from knowcat.rundir import RunDir
from knowcat.slick import CATEGORIES, SliCKConfig

POOL_CAP = 1000  # few-shot exemplars kept per relation (group) where the examples are streamed: see bounded_pool
VALIDATION_CAP = 20000  # labelled examples outside the calibration sample that validate (a seeded sample of them)


@dataclass(frozen=True)
class EstimateConfig:
    n_prompts: int = 1  # prompts scored once each (the first of the exemplar sets SliCK draws with this k)
    k: int = 2
    seed: int = 0
    exemplar_split: str = "dev"
    layer: int | None = None  # hidden-state block (None: the middle one; -1: none)
    calibrate: float = 2000  # calibration sample: a count (>= 1) or a share of the examples (< 1)
    pca_dim: int = 32
    folds: int = 5
    alpha: float = 0.05
    chat_template: bool = False  # few-shot blocks in the model's own chat template (a chat model)

    def __post_init__(self):
        if self.n_prompts < 1 or self.k < 1 or self.folds < 2 or self.calibrate <= 0:
            raise ValueError("n_prompts and k must be >= 1, folds >= 2 and calibrate > 0")

    def n_calibration(self, n: int) -> int:
        return min(n, int(round(self.calibrate * n)) if self.calibrate < 1 else int(self.calibrate))


@dataclass
class Features:
    """The features of every example: arrays, or (:func:`sharded_features`) :class:`ShardColumn` of the
    shards on disk, read a shard at a time."""

    ids: "list[str] | ExampleIds"
    names: list[str]
    scalars: "np.ndarray | ShardColumn"  # (n, len(names))
    hidden: "np.ndarray | HiddenShards | None"  # (n, hidden size), mean over prompts
    tokens: "np.ndarray | ShardColumn"  # forward tokens fed per example, measured: its own + its share of each
    # shared prefix
    layer: int | None
    whole_tokens: "np.ndarray | ShardColumn | None" = None  # what a scorer encoding every prompt's whole text
    # would feed


class ExampleIds:
    """The ids of examples read again each time they are asked for (a file's records, streamed): iterable,
    and equal to a list of the same ids."""

    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return (e.id for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def ids_of(examples):
    return [e.id for e in examples] if isinstance(examples, list) else ExampleIds(examples)


def in_chunks(examples, size: int):
    """Lists of ``size`` examples (the last shorter), read in one pass."""
    it = iter(examples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class ShardColumn:
    """One array of the feature shards (a :class:`knowcat.rundir.Shards` of ``.npz``; its rows are the
    examples, in order), read one shard at a time: memory does not grow with the dataset. ``np.asarray``
    reads them all (small data, tests)."""

    def __init__(self, shards, sizes: list[int], key: str, tail: tuple = ()):
        self.shards, self.sizes, self.key, self.tail = shards, sizes, key, tuple(tail)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    @property
    def shape(self) -> tuple:
        return (int(self.starts[-1]),) + self.tail

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, s: int) -> np.ndarray:
        return self.shards.read_arrays(s, [self.key])[self.key]

    def chunks(self):
        """``(first row, that shard's rows)`` in order."""
        for s, start in enumerate(self.starts[:-1]):
            yield int(start), self._read(s)

    def take(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=int)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = None
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            a = self._read(int(s))
            if out is None:
                out = np.zeros((len(rows),) + a.shape[1:], dtype=a.dtype)
            out[sel] = a[rows[sel] - self.starts[s]]
        return out if out is not None else np.zeros((0,) + self.tail)

    def column(self, j: int) -> np.ndarray:
        """Column ``j`` of every row (one number per example)."""
        return np.concatenate([a[:, j] for _, a in self.chunks()])

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate([a for _, a in self.chunks()]) if len(self.sizes) else np.zeros((0,) + self.tail)
        return a if dtype is None else a.astype(dtype)


class HiddenShards(ShardColumn):
    """The hidden states of the feature shards (:class:`ShardColumn` of ``hidden``)."""

    def __init__(self, shards, sizes: list[int], dim: int):
        super().__init__(shards, sizes, "hidden", (dim,))
        self.dim = dim


def chunks_of(a):
    """``(first row, rows)`` of an array (one chunk) or a :class:`ShardColumn` (a shard at a time)."""
    if a is None:
        return
    if isinstance(a, ShardColumn):
        yield from a.chunks()
    else:
        yield 0, a


def bounded_pool(examples, cap: int = POOL_CAP, seed: int = 0) -> list[QAExample]:
    """The few-shot exemplar pool drawn from ``examples`` (any iterable, read once): every example of a
    relation (group) that has at most ``cap``, else the ``cap`` whose seeded hash of the id is smallest, a
    sample that depends on the ids and the seed only, not on the order they come in. Memory holds at most
    ``cap`` examples per relation. The examples kept are returned in the order they came; when no relation
    has more than ``cap``, that is every example, in order (the pool, and so every prompt, is the same as
    with all of them)."""
    heaps: dict[str, list] = {}
    for seq, ex in enumerate(examples):
        _keep_smallest(heaps.setdefault(ex.relation, []), cap, seed, ex.id, seq, ex)
    kept = sorted((it for heap in heaps.values() for it in heap), key=lambda it: it[2])
    return [it[3] for it in kept]


def _keep_smallest(heap: list, cap: int, seed: int, i: str, seq: int, value) -> None:
    """Push ``(id, seq, value)`` onto ``heap``, which keeps the ``cap`` items whose seeded hash of the id (then
    the id) is smallest: a max-heap, the largest is the one let go."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}\0{i}".encode("utf-8"), digest_size=8).digest(), "little")
    item = (-h, _Desc(i), seq, value)
    if len(heap) < cap:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


class _Desc:
    """A string ordered backwards (the ties of :func:`bounded_pool`'s max-heap: the larger id goes)."""

    __slots__ = ("s",)

    def __init__(self, s: str):
        self.s = s

    def __lt__(self, other):
        return self.s > other.s

    def __gt__(self, other):
        return self.s < other.s

    def __eq__(self, other):
        return self.s == other.s


def hidden_rows(H, rows) -> np.ndarray | None:
    if H is None:
        return None
    return H.take(rows) if isinstance(H, ShardColumn) else H[rows]


def column_of(a, j: int) -> np.ndarray:
    return a.column(j) if isinstance(a, ShardColumn) else a[:, j]


def as_array(a) -> np.ndarray | None:
    """An array, or a :class:`ShardColumn` read whole."""
    return None if a is None else np.asarray(a)


def prompts_of(examples: list[QAExample], pool: list[QAExample], n_prompts: int, k: int, seed: int,
               exemplar_split: str = "dev", render=None) -> dict[str, list[tuple[str, str]]]:
    """SliCK's prompts (the same exemplar sets, in the same order) of each example, first ``n_prompts``
    (``render``: a :func:`knowcat.prompts.chat_renderer`, or None for plain ``Q: ... A: ...`` blocks)."""
    sets = exemplar_sets(pool, FewShotConfig(n_prompts, k, seed, exemplar_split))
    missing = sorted({e.relation for e in examples} - set(sets))
    if missing:
        raise ValueError(f"no exemplars for relations {missing}")
    return {ex.id: [prompt_for(ex, s, render=render) for s in sets[ex.relation]] for ex in examples}


def _renderer(tokenizer, cfg):
    if not getattr(cfg, "chat_template", False):
        return None
    from knowcat.prompts import chat_renderer

    return chat_renderer(tokenizer)


def features(model, tokenizer, examples: list[QAExample], pool: list[QAExample], cfg: EstimateConfig,
             progress=None, log=None) -> Features:
    """The estimator's features: one teacher-forced pass per (example, prompt), nothing sampled; each
    few-shot prefix is encoded once and its KV cache shared by every question asked under it."""
    from probes.engine import open_engine
    from probes.scoring import ScoreRequest, ScoreStats, middle_block

    layer = None if cfg.layer == -1 else (middle_block(model) if cfg.layer is None else cfg.layer)
    render = _renderer(tokenizer, cfg)
    prompts = prompts_of(examples, pool, cfg.n_prompts, cfg.k, cfg.seed, cfg.exemplar_split, render=render)
    sep = answer_sep(render)
    reqs = [ScoreRequest((ex.id, j), suf, sep + ex.answers[0], shared=pre)
            for ex in examples for j, (pre, suf) in enumerate(prompts[ex.id])]
    stats = ScoreStats()
    engine = open_engine("transformers", (model, tokenizer), log=log)
    scores = engine.score(reqs, layers=() if layer is None else (layer,), progress=progress, stats=stats)
    del reqs
    P = cfg.n_prompts
    names = [f"{f}_{j}" for j in range(P) for f in ("logprob", "logprob_per_token", "margin", "greedy_match")]
    names += ["logprob_mean", "margin_mean", "greedy_match_mean", "answer_tokens"]
    S = np.zeros((len(examples), len(names)))
    H = None
    tokens = np.zeros(len(examples))
    for i, ex in enumerate(examples):
        row = []
        hs = []
        for j in range(P):
            s = scores[(ex.id, j)]
            row += [s.logprob, s.logprob / s.n_tokens, s.first_token_margin, float(s.greedy_match)]
            if layer is not None:
                hs.append(s.hidden[layer])
            tokens[i] += stats.per_key[(ex.id, j)]
        lp = np.array(row[0::4])
        row += [lp.mean(), np.mean(row[2::4]), np.mean(row[3::4]), float(scores[(ex.id, 0)].n_tokens)]
        S[i] = row
        if hs:
            if H is None:
                H = np.zeros((len(examples), hs[0].shape[-1]), dtype=np.float32)
            H[i] = np.mean(hs, axis=0)
    whole = np.array([sum(stats.per_key_whole[(ex.id, j)] for j in range(P)) for ex in examples], dtype=float)
    return Features([e.id for e in examples], names, S, H, tokens, layer, whole)


def sharded_features(model, tokenizer, examples, pool: list[QAExample], cfg: EstimateConfig,
                     shards, shard_size: int = 4096, progress=None, log=None, stop_after_shards=None) -> Features:
    """:func:`features` shard by shard, each written by ``shards`` (a :class:`knowcat.rundir.Shards` of
    ``.npz``, :attr:`knowcat.rundir.RunDir.estimate_feature_shards`) and read back without pickle. The
    shards' identity (the settings, the model, the shard size and every example id in order) is recorded
    first (:meth:`~knowcat.rundir.Shards.reset_unless_key`: shards of another identity are removed); then
    a shard is finished when its file exists, so a killed run resumes. ``examples``: a list, or any
    sized re-iterable (a file's examples read again each time, :class:`knowcat.loaders.sft.StreamedExamples`),
    read a shard at a time. Memory holds one shard's examples and features; every feature stays on disk
    (:class:`ShardColumn`). ``stop_after_shards`` stops early, as a kill would (for tests)."""
    ids_hash = hashlib.sha1()
    n = 0
    for e in examples:
        ids_hash.update(e.id.encode("utf-8") + b"\0")
        n += 1
    shards.reset_unless_key(json.dumps({
        "n_prompts": cfg.n_prompts, "k": cfg.k, "seed": cfg.seed, "layer": cfg.layer,
        "model": str(getattr(model, "name_or_path", "")), "exemplar_split": cfg.exemplar_split,
        "chat_template": bool(getattr(cfg, "chat_template", False)), "shard_size": shard_size,
        "n_examples": n, "ids_sha1": ids_hash.hexdigest()}, sort_keys=True))
    names, sizes = None, []
    layer, dim, new = None, 0, 0
    for i, chunk in enumerate(in_chunks(examples, shard_size)):
        if shards.done(i):
            z = shards.read_arrays(i, ["names", "layer", "dim"])
            if progress:
                progress(len(chunk) * cfg.n_prompts)
        else:
            if stop_after_shards is not None and new >= stop_after_shards:
                raise KeyboardInterrupt(f"stopped after {new} new feature shards")
            f = features(model, tokenizer, chunk, pool, cfg, progress=progress, log=log)
            z = {"names": np.array(f.names), "scalars": f.scalars, "tokens": f.tokens, "whole_tokens": f.whole_tokens,
                 "layer": np.array(-1 if f.layer is None else f.layer),
                 "dim": np.array(0 if f.hidden is None else f.hidden.shape[1])}
            shards.write_arrays(i, hidden=f.hidden if f.hidden is not None else np.zeros(0, np.float32), **z)
            del f
            new += 1
        names = names or [str(x) for x in z["names"]]
        layer = int(z["layer"]) if int(z["layer"]) >= 0 else None
        dim = int(z["dim"])
        sizes.append(len(chunk))
    if not sizes:
        raise ValueError("no examples")
    hidden = HiddenShards(shards, sizes, dim) if dim else None
    return Features(ids_of(examples), names, ShardColumn(shards, sizes, "scalars", (len(names),)), hidden,
                    ShardColumn(shards, sizes, "tokens"), layer, ShardColumn(shards, sizes, "whole_tokens"))


def calibration_sample(examples, feats: Features, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` examples, stratified by relation and quintile of the mean log-probability
    (proportional allocation, largest remainders), each stratum drawn at random. Memory: a few numbers
    per example (the log-probability, the stratum), the examples read once."""
    if n >= len(examples):
        return list(range(len(examples)))
    lp = column_of(feats.scalars, feats.names.index("logprob_mean"))
    key = np.searchsorted(np.quantile(lp, [0.2, 0.4, 0.6, 0.8]), lp, side="right").astype(np.int32)
    n_all = len(lp)
    del lp
    code: dict[str, int] = {}
    rel = np.empty(n_all, dtype=np.int32)
    for i, ex in enumerate(examples):
        rel[i] = code.setdefault(ex.relation, len(code))
    rank = np.empty(len(code), dtype=np.int32)
    for r, name in enumerate(sorted(code)):
        rank[code[name]] = r
    key += rank[rel] * 5  # strata in the order of (relation, quintile)
    del rel
    order = np.argsort(key, kind="stable")  # each stratum's indices, in increasing order
    key = key[order]
    first = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
    del key
    sizes = np.diff(np.append(first, n_all))
    quota = sizes * n / n_all
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    out = []
    for f, m, t in zip(first, sizes, take):
        out += [int(x) for x in rng.choice(order[f:f + m], size=t, replace=False)]
    return sorted(out)


# --- cost --------------------------------------------------------------------------------------

def slick_forward_tokens(tokenizer, examples: list[QAExample], pool: list[QAExample], slick_rows: dict[str, dict],
                         scfg: SliCKConfig, per_relation: dict[str, int] | None = None) -> dict[str, dict]:
    """Forward tokens of lazy SliCK per example, from its recorded answers (``keep_answers``).

    Each prompt is encoded once for its greedy answer and its samples (lazy mode keeps the prompt's
    state from the greedy round for the samples); a generated answer of t tokens then feeds t tokens
    back (its last token produces the stop; an empty answer feeds none). Three counts:
    ``naive``: every prompt's whole text, every answer decoded on its own; ``nodes``: answers that
    start alike share their common tokens (knowcat's generator decodes the distinct token prefixes of
    one request once: in exact mode the greedy answer and the samples of a prompt are one request; in
    lazy mode the greedy answer is decoded in a round of its own, and only the samples share);
    ``shared``: ``nodes`` with each few-shot prefix encoded once per relation and prompt, spread over
    the relation's examples (``per_relation``: their counts; default those in ``examples``), which is
    how knowcat runs SliCK. Generated tokens are those of re-tokenizing ``" " + answer`` (at most
    ``max_new_tokens - 1`` fed back). Lazy mode records the samples up to the first correct one, and
    may have computed more (a round can ask several prompts' samples of an example), and a sample it
    abandoned (recorded as None) fed its first tokens, counted as none: the count is a lower bound of
    what the engine fed."""
    render = _renderer(tokenizer, scfg)
    prompts = prompts_of(examples, pool, scfg.n_prompts, scfg.k, scfg.seed, scfg.exemplar_split, render=render)
    cap = scfg.max_new_tokens - 1
    sep = answer_sep(render)

    def ids(a: str | None) -> tuple:  # an abandoned sample (None) fed at most its first tokens: counted as none
        return tuple(tokenizer(sep + a, add_special_tokens=False)["input_ids"][:cap]) if a else ()

    def distinct(answers) -> int:  # the distinct token prefixes of answers decoded together: one fed token each
        return len({t[:i] for t in answers for i in range(1, len(t) + 1)})

    prefix_len: dict[str, int] = {}
    if per_relation is None:
        per_relation = {}
        for ex in examples:
            per_relation[ex.relation] = per_relation.get(ex.relation, 0) + 1
    out = {}
    for ex in examples:
        row = slick_rows[ex.id]
        ga, sa = row.get("greedy_answers"), row.get("sampled_answers")
        if ga is None or sa is None:
            raise ValueError("lazy SliCK's cost needs its answers: categorize with keep_answers")
        naive = nodes = shared = 0.0
        for j, (pre, suf) in enumerate(prompts[ex.id]):
            whole = len(tokenizer(pre + suf, add_special_tokens=True)["input_ids"])
            if pre not in prefix_len:
                prefix_len[pre] = len(tokenizer(pre, add_special_tokens=True)["input_ids"])
            g, samples = ids(ga[j]), [ids(a) for a in sa[j]]
            fed = len(g) + sum(len(t) for t in samples)
            decoded = distinct([g] + samples) if scfg.exact else len(g) + distinct(samples)
            naive += whole + fed
            nodes += whole + decoded
            shared += whole - prefix_len[pre] + prefix_len[pre] / per_relation[ex.relation] + decoded
        out[ex.id] = {"naive": naive, "nodes": nodes, "shared": shared}
    return out


# --- the whole estimate ------------------------------------------------------------------------

class EstimateResult:
    """What :func:`estimate` found: each example's category, the method that labelled it (``slick`` for the
    calibration sample, ``estimate`` for the rest) and its probabilities, read in order by :meth:`rows` (from
    the prediction shards on disk when the run has a folder: memory does not grow with the dataset);
    ``ids``, ``categories``, ``method`` and ``probs`` give them whole (read once, then kept)."""

    def __init__(self, examples, probs, calibration: list[int], slick_categories: dict[int, str], summary: dict):
        self.examples, self._probs = examples, probs  # probs: an array or a ShardColumn (rows: the examples)
        self.calibration, self.slick_categories, self.summary = calibration, slick_categories, summary

    def rows(self):
        """``(example, category, method, probabilities)`` of every example, in order."""
        it = iter(self.examples)
        for start, P in chunks_of(self._probs):
            for j, p in enumerate(P):
                ex = next(it)
                cat = self.slick_categories.get(start + j)
                yield (ex, cat, "slick", p) if cat is not None else (ex, CATEGORIES[int(p.argmax())], "estimate", p)

    @cached_property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    @cached_property
    def categories(self) -> list[str]:
        return [r[1] for r in self.rows()]

    @cached_property
    def method(self) -> list[str]:
        return [r[2] for r in self.rows()]

    @cached_property
    def probs(self) -> np.ndarray:
        return as_array(self._probs)


def _code(i: str, category) -> int:
    """The index of example ``i``'s category."""
    if category not in CATEGORIES:
        raise ValueError(f"example {i}: unknown category {category!r}; expected one of {list(CATEGORIES)}")
    return CATEGORIES.index(category)


def _codes(ids, category_of) -> np.ndarray:
    """The category index of each id (``category_of(id)``: its category's name)."""
    return np.array([_code(i, category_of(i)) for i in ids])


def label_category(labels, i: str):
    """The category of example ``i`` in ``labels`` (a dict of rows, or a :class:`LabelIndex`)."""
    return labels.category(i) if isinstance(labels, LabelIndex) else labels[i]["category"]


def _slick_on_sample(model, tokenizer, model_name, cal_ex, pool, slick_cfg, run_dir, log, progress):
    """Full SliCK on the calibration sample, resumable in ``run_dir/calibration``; returns its rows and
    the forward tokens its engine fed (None when part of the run was computed earlier: a resumed run's
    count would be partial)."""
    from knowcat.rundir import RunDir
    from knowcat.runs import run_categorize
    from probes.engine import open_engine

    cal = RunDir(run_dir).calibration
    cdir = cal.root
    record = RunDir(run_dir).estimate_slick_tokens
    fresh = not any(cal.shards_dir.glob("*.jsonl")) if cal.shards_dir.exists() else True
    log(f"estimate: SliCK on the calibration sample ({len(cal_ex)} examples) in {cdir}")
    engine = open_engine("transformers", (model, tokenizer))
    run_categorize(model_name, cal_ex, pool, cdir, slick_cfg, engine=engine, log=log, progress=progress)
    rows = {r["id"]: r for r in cal.read_categorized(missing_ok=False)}
    measured = None
    if fresh and getattr(engine, "forward_tokens", 0):
        measured = {"forward_tokens": int(engine.forward_tokens), "prefix_tokens": int(engine.prefix_tokens),
                    "examples": len(cal_ex)}
        atomic_write_json(record, measured)
    elif record.exists():
        measured = json.loads(record.read_text(encoding="utf-8"))
        if measured.get("examples") != len(cal_ex):
            measured = None
    return rows, measured


def estimate(model, tokenizer, examples, pool, cfg: EstimateConfig = EstimateConfig(),
             slick_cfg: SliCKConfig = SliCKConfig(keep_answers=True), labels=None,
             run_dir=None, model_name: str = "model", log=print, progress: bool = True,
             shard_size: int = 4096, run_slick: bool = False, pool_cap: int | None = None,
             validation_cap: int = VALIDATION_CAP) -> EstimateResult:
    """Categories and probabilities of every example (see the module's docstring).

    ``examples``: a list, or any sized re-iterable (:class:`knowcat.loaders.sft.StreamedExamples`: a
    file's examples, read again on each pass). ``pool``: the few-shot exemplars; with ``pool_cap``, at
    most that many per relation are kept (:func:`bounded_pool`: all of them when no relation has more).
    ``labels``: SliCK rows already computed (``{id: {"category", "greedy_answers", ...}}``, as a
    categorized file holds them, or a :class:`LabelIndex` of that file); the calibration sample then
    takes its categories from there instead of running SliCK (unless ``run_slick``: SliCK then runs
    on the sample anyway, so its forward tokens are measured, and the labels validate), and the
    other labelled examples also validate (at most ``validation_cap``: beyond it the sample of those
    whose seeded hash of the id is smallest, the summary's ``n_labelled_rest`` says of how many).
    Without labels, SliCK runs on the calibration sample in ``run_dir/calibration`` (resumable). With
    ``run_dir`` the features are computed in shards of ``shard_size`` examples, each written atomically
    to ``run_dir/estimate/features`` (a rerun reuses the finished shards), and the predictions are
    written a shard at a time to ``run_dir/estimate/predictions``: memory holds the calibration
    sample's features, one shard, the pool, the validation sample and a few numbers per example (the
    log-probability and relation of each, for the stratified sample), not the examples (when they are
    streamed) or their features.
    """
    from tqdm.auto import tqdm

    from linear_models.classifiers import fit_calibrated, format_validation, format_verdicts, validate, verdicts

    if slick_cfg.chat_template != cfg.chat_template:
        slick_cfg = replace(slick_cfg, chat_template=cfg.chat_template)
    _renderer(tokenizer, cfg)  # a tokenizer without a chat template is refused before anything is written
    if pool_cap is not None:
        pool = bounded_pool(pool, pool_cap, cfg.seed)
    n = len(examples)
    bar = tqdm(total=n * cfg.n_prompts, desc="features", unit="prompt", disable=not progress)
    if run_dir is not None:
        feats = sharded_features(model, tokenizer, examples, pool, cfg, RunDir(run_dir).estimate_feature_shards,
                                 shard_size=shard_size, progress=bar.update, log=log)
    else:
        feats = features(model, tokenizer, examples, pool, cfg, progress=bar.update, log=log)
    bar.close()
    n_cal = cfg.n_calibration(n)
    cal = calibration_sample(examples, feats, n_cal, cfg.seed)
    cal_set = set(cal)
    cal_ex = [ex for i, ex in enumerate(examples) if i in cal_set]
    measured = None
    if labels is not None and not run_slick:
        missing = [e.id for e in cal_ex if e.id not in labels]
        if missing:
            raise ValueError(f"{len(missing)} calibration examples have no precomputed label (e.g. {missing[0]})")
        slick_rows = {e.id: labels[e.id] for e in cal_ex}
        source = "precomputed"
    else:
        if run_dir is None:
            raise ValueError("running SliCK on the calibration sample needs a run_dir")
        slick_rows, measured = _slick_on_sample(model, tokenizer, model_name, cal_ex, pool, slick_cfg, run_dir, log,
                                                progress)
        source = "slick"
    y = _codes([e.id for e in cal_ex], lambda i: slick_rows[i]["category"])
    S, H = feats.scalars, feats.hidden
    fit = fit_calibrated(hidden_rows(S, cal), hidden_rows(H, cal), y, len(CATEGORIES), cfg.pca_dim,
                         n_folds=cfg.folds, seed=cfg.seed)
    # the predictions, a shard at a time (written to disk beside the features' shards), and the labelled
    # examples outside the calibration sample gathered for validation as they pass
    out = RunDir(run_dir).estimate_prediction_shards if isinstance(S, ShardColumn) else None
    if out is not None:
        out.dir.mkdir(parents=True, exist_ok=True)
        for old in out.dir.glob("*.npz"):
            old.unlink()
    parts, sizes, rest, n_rest = [], [], [], 0
    it = iter(examples)
    h_chunks = chunks_of(H)
    for k, (start, s) in enumerate(chunks_of(S)):
        h = next(h_chunks)[1] if H is not None else None
        P = fit.model.predict_proba(s, h)
        if out is not None:
            out.write_arrays(k, probs=P)
            sizes.append(len(P))
        else:
            parts.append(P)
        if labels is not None:  # at most validation_cap of them, a seeded sample (all when fewer)
            for j, ex in enumerate(itertools.islice(it, len(P))):
                if start + j not in cal_set and ex.id in labels:
                    code = _code(ex.id, label_category(labels, ex.id))
                    _keep_smallest(rest, validation_cap, cfg.seed, ex.id, start + j, (code, P[j].copy()))
                    n_rest += 1
    probs = ShardColumn(out, sizes, "probs", (len(CATEGORIES),)) if out is not None else np.concatenate(parts)
    del parts
    v_cal = validate(y, fit.oof_proba, CATEGORIES, alpha=cfg.alpha, seed=cfg.seed)
    log(format_validation(v_cal, f"estimate: held-out calibration examples (out-of-fold, {cfg.folds} folds)"))
    log(format_verdicts(v_cal))
    summary = {"config": asdict(cfg), "n": n, "n_calibration": len(cal), "labels": source,
               "layer": feats.layer, "features": feats.names, "l2": fit.l2,
               "cv_log_loss": {str(k): v for k, v in fit.cv_log_loss.items()},
               "validation_calibration_oof": asdict(v_cal), "verdicts_calibration_oof": verdicts(v_cal)}
    if labels is not None and source == "slick":
        both = [e.id for e in cal_ex if e.id in labels]
        agree = sum(label_category(labels, i) == slick_rows[i]["category"] for i in both)
        summary["calibration_slick_vs_labels"] = {"n": len(both), "agree": agree}
        log(f"estimate: SliCK run on the calibration sample agrees with the given labels on {agree}/{len(both)}")
    if rest:
        rest.sort(key=lambda r: r[2])  # in the examples' order
        v_rest = validate(np.array([r[3][0] for r in rest]), np.array([r[3][1] for r in rest]), CATEGORIES,
                          alpha=cfg.alpha, seed=cfg.seed)
        what = "labelled examples outside the calibration sample"
        if n_rest > len(rest):
            what = f"a sample of {len(rest)} of the {n_rest} {what}"
            summary["n_labelled_rest"] = n_rest
        log(format_validation(v_rest, f"estimate: {what}"))
        log(format_verdicts(v_rest))
        summary["validation_rest"] = asdict(v_rest)
        summary["verdicts_rest"] = verdicts(v_rest)
    del rest
    summary["cost"] = _cost(tokenizer, examples, pool, cal_ex, slick_rows, slick_cfg, cfg, feats, measured, log)
    cats = {i: slick_rows[ex.id]["category"] for i, ex in zip(cal, cal_ex)}
    return EstimateResult(examples, probs, cal, cats, summary)


def _cost(tokenizer, examples, pool, cal_ex, slick_rows, slick_cfg, cfg, feats, measured, log) -> dict:
    """Forward tokens per example: the estimator's as fed (measured), lazy SliCK's as its engine fed them
    on the calibration sample (measured, when SliCK ran here in one go) and as counted from its answers."""
    tokens, whole_tokens = as_array(feats.tokens), as_array(feats.whole_tokens)  # one number per example
    est = float(tokens.mean())
    whole_mean = float(whole_tokens.mean()) if whole_tokens is not None else None
    cost = {"estimate_tokens_per_example": est, "estimate_prompts": cfg.n_prompts,
            "estimate_tokens_per_example_whole_texts": whole_mean,
            "estimate_tokens_total": float(tokens.sum()), "n_examples": len(examples)}
    del tokens, whole_tokens
    parts = [f"estimator {est:.1f} measured ({cfg.n_prompts} prompt(s) of {cfg.k} exemplars, each few-shot prefix "
             f"encoded once per shard" + (f"; {whole_mean:.0f} with whole texts)" if whole_mean else ")")]
    if measured:
        m = measured["forward_tokens"] / measured["examples"]
        cost.update(slick_lazy_tokens_per_example_measured=m, slick_lazy_tokens_total_measured=measured["forward_tokens"],
                    slick_measured_examples=measured["examples"], ratio_measured=m / est)
        parts.append(f"lazy SliCK {m:.0f} measured on the {measured['examples']} calibration examples "
                     f"({m / est:.1f}x)")
        if "prefix_tokens" in measured:
            # like for like: SliCK's few-shot prefixes spread over every example, as the estimator's are
            own = (measured["forward_tokens"] - measured["prefix_tokens"]) / measured["examples"]
            m2 = own + measured["prefix_tokens"] / len(examples)
            cost.update(slick_lazy_tokens_per_example_measured_shared=m2, ratio_measured_shared=m2 / est)
            parts.append(f"{m2:.0f} with its few-shot prefixes (encoded once each) spread over all {len(examples)} "
                         f"examples ({m2 / est:.1f}x)")
    if all(len(slick_rows[e.id].get("greedy_answers") or ()) == slick_cfg.n_prompts
           and len(slick_rows[e.id].get("sampled_answers") or ()) == slick_cfg.n_prompts for e in cal_ex):
        per_rel: dict[str, int] = {}
        for ex in examples:
            per_rel[ex.relation] = per_rel.get(ex.relation, 0) + 1
        counted = slick_forward_tokens(tokenizer, cal_ex, pool, slick_rows, slick_cfg, per_rel)
        mm = {k: float(np.mean([c[k] for c in counted.values()])) for k in ("naive", "nodes", "shared")}
        cost.update({f"slick_lazy_tokens_per_example_{k}": v for k, v in mm.items()})
        cost.update({f"ratio_{k}": v / est for k, v in mm.items()})
        parts.append(f"lazy SliCK counted from its answers: {mm['naive']:.0f} with whole texts and every answer "
                     f"decoded alone ({mm['naive'] / est:.1f}x), {mm['shared']:.0f} sharing answers' common tokens "
                     f"and each few-shot prefix once per relation over all {len(examples)} examples "
                     f"({mm['shared'] / est:.1f}x)")
    log("estimate: forward tokens per example: " + "; ".join(parts))
    return cost


def write_estimate(run_dir, examples, res: EstimateResult, fields=None) -> Path:
    """``estimated.jsonl`` (the records with ``category``, ``category_probs``, ``category_method``) and
    ``estimate_summary.json`` in ``run_dir``; the records (``examples``: those :func:`estimate` was given, a
    list or a re-iterable) are streamed to a temporary file with their predictions, then renamed."""
    import os
    import tempfile

    from knowcat.runs import user_record

    run = Path(run_dir)
    rd = RunDir(run)
    run.mkdir(parents=True, exist_ok=True)
    dest = rd.estimated_jsonl
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=run)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex, (_, cat, method, probs) in zip(examples, res.rows()):
                rec = user_record(ex, fields)
                rec["category"] = cat
                rec["category_method"] = method
                rec["category_probs"] = {c: round(float(p), 6) for c, p in zip(CATEGORIES, probs)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_json(rd.estimate_summary, res.summary)
    return dest


def read_labels(path) -> dict[str, dict]:
    """A categorized file's rows by example id (``knowcat categorize``'s ``categorized.jsonl``)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[str(r["id"])] = r
    return out


def _id_key(i: str) -> tuple[int, int]:

    d = hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little", signed=True), int.from_bytes(d[8:], "little", signed=True)


class LabelIndex:
    """A categorized file's rows by example id, as :func:`read_labels` gives them, without holding them:
    the file is read once for each row's id (a 128-bit hash), category and place in the file, and a row is
    read again when asked for (``labels[id]``: the last row of that id). Memory: 25 bytes per row.
    ``id in labels``, ``labels.category(id)`` (without reading the row), ``len(labels)``."""

    def __init__(self, path):
        from array import array

        from knowcat.errors import DataError

        self.path = Path(path)
        h1, h2, offsets, codes = array("q"), array("q"), array("q"), array("b")
        off = 0
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"not JSON ({e})", file=self.path, record=n) from None
                    if not isinstance(r, dict) or "id" not in r:
                        raise DataError("a categorized row needs an 'id'", file=self.path, record=n, field="id")
                    a, b = _id_key(str(r["id"]))
                    h1.append(a)
                    h2.append(b)
                    offsets.append(off)
                    c = r.get("category")
                    codes.append(CATEGORIES.index(c) if c in CATEGORIES else -1)
                off += len(line)
        order = np.lexsort((np.arange(len(h1)), np.frombuffer(h2, np.int64), np.frombuffer(h1, np.int64)))
        self.h1 = np.frombuffer(h1, np.int64)[order]
        self.h2 = np.frombuffer(h2, np.int64)[order]
        self.offsets = np.frombuffer(offsets, np.int64)[order]
        self.codes = np.frombuffer(codes, np.int8)[order]

    def _find(self, i: str) -> int | None:
        """The position of id ``i``'s last row in the sorted keys, or None."""
        a, b = _id_key(str(i))
        lo, hi = np.searchsorted(self.h1, a, "left"), np.searchsorted(self.h1, a, "right")
        last = None
        for k in range(lo, hi):  # rows of the same id follow in file order: the last one wins
            if self.h2[k] == b:
                last = k
        return last

    def __contains__(self, i) -> bool:
        return self._find(i) is not None

    def __len__(self) -> int:
        return len(np.unique(np.stack([self.h1, self.h2], axis=1), axis=0)) if len(self.h1) else 0

    def __getitem__(self, i) -> dict:
        k = self._find(i)
        if k is None:
            raise KeyError(i)
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[k]))
            row = json.loads(f.readline())
        if str(row.get("id")) != str(i):
            raise KeyError(f"{i} ({self.path} changed while it was read)")
        return row

    def get(self, i, default=None):
        return self[i] if i in self else default

    def category(self, i):
        """Example ``i``'s category (the row's ``category``, as written: an unknown one is read again)."""
        k = self._find(i)
        if k is None:
            raise KeyError(i)
        c = int(self.codes[k])
        return CATEGORIES[c] if c >= 0 else self[i].get("category")
