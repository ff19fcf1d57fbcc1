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
   when labels exist for examples outside the sample, the same on those; and the forward
   tokens per example against lazy SliCK's.

Every row records which method labelled it (``category_method``: ``slick`` for the calibration
sample, ``estimate`` for the rest).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from knowcat.examples import QAExample
from knowcat.io import atomic_write_json, atomic_write_text
from knowcat.prompts import FewShotConfig, exemplar_sets, prompt_for
from knowcat.rundir import RunDir
from knowcat.slick import CATEGORIES, SliCKConfig


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

    def __post_init__(self):
        if self.n_prompts < 1 or self.k < 1 or self.folds < 2 or self.calibrate <= 0:
            raise ValueError("n_prompts and k must be >= 1, folds >= 2 and calibrate > 0")

    def n_calibration(self, n: int) -> int:
        return min(n, int(round(self.calibrate * n)) if self.calibrate < 1 else int(self.calibrate))


@dataclass
class Features:
    ids: list[str]
    names: list[str]
    scalars: np.ndarray  # (n, len(names))
    hidden: np.ndarray | None  # (n, hidden size), mean over prompts
    tokens: np.ndarray  # forward tokens per example (every prompt's whole text)
    layer: int | None


def middle_layer(model) -> int:
    from probes.jacobians import decoder_layers

    return len(decoder_layers(model)) // 2


def prompts_of(examples: list[QAExample], pool: list[QAExample], n_prompts: int, k: int, seed: int,
               exemplar_split: str = "dev") -> dict[str, list[tuple[str, str]]]:
    """SliCK's prompts (the same exemplar sets, in the same order) of each example, first ``n_prompts``."""
    sets = exemplar_sets(pool, FewShotConfig(n_prompts, k, seed, exemplar_split))
    missing = sorted({e.relation for e in examples} - set(sets))
    if missing:
        raise ValueError(f"no exemplars for relations {missing}")
    return {ex.id: [prompt_for(ex, s) for s in sets[ex.relation]] for ex in examples}


def features(model, tokenizer, examples: list[QAExample], pool: list[QAExample], cfg: EstimateConfig,
             progress=None, log=None) -> Features:
    """The estimator's features: one teacher-forced pass per (example, prompt), nothing sampled."""
    from probes.scoring import ScoreRequest, score

    layer = None if cfg.layer == -1 else (middle_layer(model) if cfg.layer is None else cfg.layer)
    prompts = prompts_of(examples, pool, cfg.n_prompts, cfg.k, cfg.seed, cfg.exemplar_split)
    reqs = [ScoreRequest((ex.id, j), pre + suf, " " + ex.answers[0])
            for ex in examples for j, (pre, suf) in enumerate(prompts[ex.id])]
    scores = score(model, tokenizer, reqs, layers=() if layer is None else (layer,), progress=progress, log=log)
    P = cfg.n_prompts
    names = [f"{f}_{j}" for j in range(P) for f in ("logprob", "logprob_per_token", "margin", "greedy_match")]
    names += ["logprob_mean", "margin_mean", "greedy_match_mean", "answer_tokens"]
    S = np.zeros((len(examples), len(names)))
    H = None
    tokens = np.zeros(len(examples), dtype=np.int64)
    lens = {r.key: len(tokenizer(r.prefix + r.continuation, add_special_tokens=True)["input_ids"]) for r in reqs}
    for i, ex in enumerate(examples):
        row = []
        hs = []
        for j in range(P):
            s = scores[(ex.id, j)]
            row += [s.logprob, s.logprob / s.n_tokens, s.first_token_margin, float(s.greedy_match)]
            if layer is not None:
                hs.append(s.hidden[layer])
            tokens[i] += lens[(ex.id, j)]
        lp = np.array(row[0::4])
        row += [lp.mean(), np.mean(row[2::4]), np.mean(row[3::4]), float(scores[(ex.id, 0)].n_tokens)]
        S[i] = row
        if hs:
            if H is None:
                H = np.zeros((len(examples), hs[0].shape[-1]), dtype=np.float32)
            H[i] = np.mean(hs, axis=0)
    return Features([e.id for e in examples], names, S, H, tokens, layer)


def sharded_features(model, tokenizer, examples: list[QAExample], pool: list[QAExample], cfg: EstimateConfig,
                     folder, shard_size: int = 4096, progress=None, log=None, stop_after_shards=None) -> Features:
    """:func:`features` shard by shard, each saved as ``NNNNN.npz`` (written to a temporary name, then
    renamed; read back without pickle); finished shards whose example ids and settings match are reused,
    so a killed run resumes. ``stop_after_shards`` stops early, as a kill would (for tests)."""
    import hashlib
    import os
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    setting = json.dumps([cfg.n_prompts, cfg.k, cfg.seed, cfg.layer, getattr(model, "name_or_path", "")])
    parts, new = [], 0
    for start in range(0, len(examples), shard_size):
        chunk = examples[start:start + shard_size]
        ids = [e.id for e in chunk]
        key = hashlib.sha1(("\0".join(ids) + "\0" + setting).encode("utf-8")).hexdigest()
        path = folder / f"{start // shard_size:05d}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    parts.append(Features(ids, [str(x) for x in z["names"]], z["scalars"],
                                          z["hidden"] if z["hidden"].size else None, z["tokens"],
                                          int(z["layer"]) if int(z["layer"]) >= 0 else None))
                    if progress:
                        progress(len(chunk) * cfg.n_prompts)
                    continue
        if stop_after_shards is not None and new >= stop_after_shards:
            raise KeyboardInterrupt(f"stopped after {new} new feature shards")
        f = features(model, tokenizer, chunk, pool, cfg, progress=progress, log=log)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=folder)
        os.close(fd)
        np.savez(tmp, key=np.array(key), names=np.array(f.names), scalars=f.scalars,
                 hidden=f.hidden if f.hidden is not None else np.zeros(0, np.float32), tokens=f.tokens,
                 layer=np.array(-1 if f.layer is None else f.layer))
        os.replace(tmp, path)
        parts.append(f)
        new += 1
    if not parts:
        raise ValueError("no examples")
    hidden = None if parts[0].hidden is None else np.concatenate([p.hidden for p in parts])
    return Features([i for p in parts for i in p.ids], parts[0].names, np.concatenate([p.scalars for p in parts]),
                    hidden, np.concatenate([p.tokens for p in parts]), parts[0].layer)


def calibration_sample(examples: list[QAExample], feats: Features, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` examples, stratified by relation and quintile of the mean log-probability
    (proportional allocation, largest remainders), each stratum drawn at random."""
    if n >= len(examples):
        return list(range(len(examples)))
    lp = feats.scalars[:, feats.names.index("logprob_mean")]
    q = np.searchsorted(np.quantile(lp, [0.2, 0.4, 0.6, 0.8]), lp, side="right")
    strata: dict = {}
    for i, ex in enumerate(examples):
        strata.setdefault((ex.relation, int(q[i])), []).append(i)
    keys = sorted(strata)
    quota = np.array([len(strata[k]) * n / len(examples) for k in keys])
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    out = []
    for k, t in zip(keys, take):
        out += [int(x) for x in rng.choice(strata[k], size=t, replace=False)]
    return sorted(out)


# --- cost --------------------------------------------------------------------------------------

def slick_forward_tokens(tokenizer, examples: list[QAExample], pool: list[QAExample], slick_rows: dict[str, dict],
                         scfg: SliCKConfig, per_relation: dict[str, int] | None = None) -> dict[str, dict]:
    """Forward tokens of lazy SliCK per example, from its recorded answers (``keep_answers``).

    Each prompt is encoded once for its greedy answer and its samples; a generated answer of t
    tokens then feeds t tokens back (its last token produces the stop). Three counts:
    ``naive``: every prompt's whole text, every answer decoded on its own; ``nodes``: answers that
    start alike share their common tokens (knowcat's generator decodes distinct token prefixes
    once); ``shared``: ``nodes`` with each few-shot prefix encoded once per relation and prompt,
    spread over the relation's examples (``per_relation``: their counts; default those in
    ``examples``), which is how knowcat runs SliCK. Generated tokens are those of re-tokenizing
    ``" " + answer`` (at most ``max_new_tokens - 1`` fed back)."""
    prompts = prompts_of(examples, pool, scfg.n_prompts, scfg.k, scfg.seed, scfg.exemplar_split)
    cap = scfg.max_new_tokens - 1

    def ids(a: str) -> tuple:
        return tuple(tokenizer(" " + a, add_special_tokens=False)["input_ids"][:cap])

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
            answers = [ids(a) for a in [ga[j]] + list(sa[j])]
            fed = sum(len(t) for t in answers)
            distinct = len({t[:i] for t in answers for i in range(1, len(t) + 1)})
            naive += whole + fed
            nodes += whole + distinct
            shared += whole - prefix_len[pre] + prefix_len[pre] / per_relation[ex.relation] + distinct
        out[ex.id] = {"naive": naive, "nodes": nodes, "shared": shared}
    return out


def estimator_tokens_shared(tokenizer, examples, pool, cfg: EstimateConfig, feats: Features,
                            per_relation: dict[str, int]) -> float:
    """Mean forward tokens per example the estimator would need if each few-shot prefix were encoded
    once per relation and prompt (the scorer encodes whole texts: this is the bound prefix caching would give)."""
    prompts = prompts_of(examples, pool, cfg.n_prompts, cfg.k, cfg.seed, cfg.exemplar_split)
    plen: dict[str, int] = {}
    total = 0.0
    for i, ex in enumerate(examples):
        t = float(feats.tokens[i])
        for pre, _ in prompts[ex.id]:
            if pre not in plen:
                plen[pre] = len(tokenizer(pre, add_special_tokens=True)["input_ids"])
            t -= plen[pre] * (1 - 1 / per_relation[ex.relation])
        total += t
    return total / len(examples)


# --- the whole estimate ------------------------------------------------------------------------

@dataclass
class EstimateResult:
    ids: list[str]
    categories: list[str]
    probs: np.ndarray
    method: list[str]
    calibration: list[int]
    summary: dict


def _label_array(ids, labels):
    return np.array([CATEGORIES.index(labels[i]) for i in ids])


def estimate(model, tokenizer, examples: list[QAExample], pool: list[QAExample], cfg: EstimateConfig = EstimateConfig(),
             slick_cfg: SliCKConfig = SliCKConfig(keep_answers=True), labels: dict[str, dict] | None = None,
             run_dir=None, model_name: str = "model", log=print, progress: bool = True,
             shard_size: int = 4096) -> EstimateResult:
    """Categories and probabilities of every example (see the module's docstring).

    ``labels``: SliCK rows already computed (``{id: {"category", "greedy_answers", ...}}``, as a
    categorized file holds them); the calibration sample then takes its categories from there
    instead of running SliCK, and every other labelled example is also used for validation.
    Without it, SliCK runs on the calibration sample in ``run_dir/calibration`` (resumable).
    With ``run_dir`` the features are computed in shards of ``shard_size`` examples, each written
    atomically to ``run_dir/estimate/features``; a rerun reuses the finished shards.
    """
    from tqdm.auto import tqdm

    from linear_models.classifiers import fit_calibrated, format_validation, format_verdicts, validate, verdicts

    n_req = len(examples) * cfg.n_prompts
    bar = tqdm(total=n_req, desc="features", unit="prompt", disable=not progress)
    if run_dir is not None:
        feats = sharded_features(model, tokenizer, examples, pool, cfg, RunDir(run_dir).estimate_features,
                                 shard_size=shard_size, progress=bar.update, log=log)
    else:
        feats = features(model, tokenizer, examples, pool, cfg, progress=bar.update, log=log)
    bar.close()
    n_cal = cfg.n_calibration(len(examples))
    cal = calibration_sample(examples, feats, n_cal, cfg.seed)
    cal_ex = [examples[i] for i in cal]
    if labels is not None:
        missing = [e.id for e in cal_ex if e.id not in labels]
        if missing:
            raise ValueError(f"{len(missing)} calibration examples have no precomputed label (e.g. {missing[0]})")
        slick_rows = {e.id: labels[e.id] for e in cal_ex}
        source = "precomputed"
    else:
        from knowcat.runs import run_categorize

        if run_dir is None:
            raise ValueError("running SliCK on the calibration sample needs a run_dir")
        cdir = RunDir(run_dir).calibration.root
        log(f"estimate: SliCK on the calibration sample ({len(cal_ex)} examples) in {cdir}")
        from probes.engine import open_engine

        run_categorize(model_name, cal_ex, pool, cdir, slick_cfg, engine=open_engine("transformers", (model, tokenizer)),
                       log=log, progress=progress)
        slick_rows = {r["id"]: r for r in RunDir(cdir).read_categorized(missing_ok=False)}
        source = "slick"
    y = _label_array([e.id for e in cal_ex], {i: r["category"] for i, r in slick_rows.items()})
    S, H = feats.scalars, feats.hidden
    fit = fit_calibrated(S[cal], None if H is None else H[cal], y, len(CATEGORIES), cfg.pca_dim, n_folds=cfg.folds,
                         seed=cfg.seed)
    probs = fit.model.predict_proba(S, H)
    cal_set = set(cal)
    cats, method = [], []
    for i, ex in enumerate(examples):
        if i in cal_set:
            cats.append(slick_rows[ex.id]["category"])
            method.append("slick")
        else:
            cats.append(CATEGORIES[int(probs[i].argmax())])
            method.append("estimate")
    v_cal = validate(y, fit.oof_proba, CATEGORIES, alpha=cfg.alpha, seed=cfg.seed)
    log(format_validation(v_cal, f"estimate: held-out calibration examples (out-of-fold, {cfg.folds} folds)"))
    log(format_verdicts(v_cal))
    summary = {"config": asdict(cfg), "n": len(examples), "n_calibration": len(cal), "labels": source,
               "layer": feats.layer, "features": feats.names, "l2": fit.l2,
               "cv_log_loss": {str(k): v for k, v in fit.cv_log_loss.items()},
               "validation_calibration_oof": asdict(v_cal), "verdicts_calibration_oof": verdicts(v_cal)}
    rest = [i for i in range(len(examples)) if i not in cal_set and labels is not None and examples[i].id in labels]
    if rest:
        y_rest = _label_array([examples[i].id for i in rest], {i: r["category"] for i, r in labels.items()})
        v_rest = validate(y_rest, probs[rest], CATEGORIES, alpha=cfg.alpha, seed=cfg.seed)
        log(format_validation(v_rest, "estimate: labelled examples outside the calibration sample"))
        log(format_verdicts(v_rest))
        summary["validation_rest"] = asdict(v_rest)
        summary["verdicts_rest"] = verdicts(v_rest)
    # cost: forward tokens per example, estimator vs lazy SliCK on the calibration sample
    per_rel: dict[str, int] = {}
    for ex in examples:
        per_rel[ex.relation] = per_rel.get(ex.relation, 0) + 1
    slick_cost = slick_forward_tokens(tokenizer, cal_ex, pool, slick_rows, slick_cfg, per_rel) \
        if all("greedy_answers" in slick_rows[e.id] for e in cal_ex) else None
    est_tokens = float(feats.tokens.mean())
    cost = {"estimate_tokens_per_example": est_tokens, "estimate_prompts": cfg.n_prompts,
            "estimate_tokens_per_example_if_prefix_shared": estimator_tokens_shared(tokenizer, examples, pool, cfg,
                                                                                    feats, per_rel)}
    if slick_cost:
        m = {k: float(np.mean([c[k] for c in slick_cost.values()])) for k in ("naive", "nodes", "shared")}
        cost.update({f"slick_lazy_tokens_per_example_{k}": v for k, v in m.items()})
        cost.update({f"ratio_{k}": v / est_tokens for k, v in m.items()})
        log(f"estimate: forward tokens per example (lazy SliCK counted from its answers on the calibration sample): "
            f"estimator {est_tokens:.0f} ({cfg.n_prompts} prompt(s), one teacher-forced pass each, whole texts); "
            f"lazy SliCK {m['naive']:.0f} with whole texts and every answer decoded alone ({m['naive'] / est_tokens:.1f}x), "
            f"{m['nodes']:.0f} sharing answers' common tokens ({m['nodes'] / est_tokens:.1f}x), {m['shared']:.0f} also "
            f"sharing few-shot prefixes as knowcat runs it ({m['shared'] / est_tokens:.1f}x; "
            f"{m['shared'] / cost['estimate_tokens_per_example_if_prefix_shared']:.1f}x against a scorer that "
            f"shared them too, which probes.scoring does not)")
    summary["cost"] = cost
    return EstimateResult([e.id for e in examples], cats, probs, method, cal, summary)


def write_estimate(run_dir, examples: list[QAExample], res: EstimateResult, fields=None) -> Path:
    """``estimated.jsonl`` (the records with ``category``, ``category_probs``, ``category_method``) and
    ``estimate_summary.json`` in ``run_dir``."""
    from knowcat.runs import user_record

    run = Path(run_dir)
    lines = []
    for i, ex in enumerate(examples):
        rec = user_record(ex, fields)
        rec["category"] = res.categories[i]
        rec["category_method"] = res.method[i]
        rec["category_probs"] = {c: round(float(p), 6) for c, p in zip(CATEGORIES, res.probs[i])}
        lines.append(json.dumps(rec, ensure_ascii=False))
    rd = RunDir(run)
    atomic_write_text(rd.estimated_jsonl, "".join(line + "\n" for line in lines))
    atomic_write_json(rd.estimate_summary, res.summary)
    return rd.estimated_jsonl


def read_labels(path) -> dict[str, dict]:
    """A categorized file's rows by example id (``knowcat categorize``'s ``categorized.jsonl``)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[str(r["id"])] = r
    return out
