"""The ``knowcat`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field (ints, floats, strs, bools)."""
    for f in fields(cls):
        if f.name in skip or f.type not in ("int", "float", "str", "bool", "int | None", "str | None",
                                            "float | None", "bool | None"):
            continue
        if any(f"--{f.name.replace('_', '-')}" in a.option_strings for a in p._actions):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str,
                   "float | None": float}[f.type]
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {f.default})")


def _override(cfg, args):
    changes = {f.name: getattr(args, f.name) for f in fields(cfg)
               if getattr(args, f.name, None) is not None}
    return replace(cfg, **changes)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an EntityQuestions folder, a JSONL/JSON/CSV/Parquet file, "
                                "a saved Hugging Face dataset, or a local dataset load_dataset can read")
    g = p.add_argument_group("data")
    g.add_argument("--format", default=None, help="force the format: entityquestions, jsonl, json, csv, parquet, hf")
    g.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                   help="map a record field to your column, e.g. --field question=prompt --field answers=targets")
    g.add_argument("--relation", default=None, help="relation for records that have none")
    g.add_argument("--split", default=None, help="split for records that have none (or the dataset split to read)")
    g.add_argument("--answers-sep", default=None, help="separator of several answers in one CSV cell")
    g.add_argument("--drop-multi-answer", action="store_true", help="drop questions with more than one gold answer")
    g.add_argument("--drop-overlap", action="store_true",
                   help="drop train examples whose subject or answer appears in test")
    g.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad records: stop with an error naming file, record and field, or skip them")
    g.add_argument("--rejects", default=None, help="with --on-error skip: where to write the skipped records")


def load_from_args(args, log=print, source=None, with_fields=False):
    """Examples from the data arguments (``source`` overrides ``args.data``); with
    ``with_fields`` also the FieldMap used, to write records back in the user's format."""
    from knowcat.loaders import FieldMap, apply_paper_filters, load_examples

    opts = {}
    fieldmap = None
    if args.field:
        mapping = {}
        for item in args.field:
            if "=" not in item:
                raise SystemExit(f"--field expects NAME=COLUMN, got {item!r}")
            k, v = item.split("=", 1)
            mapping[k.strip()] = v.strip()
        try:
            fieldmap = opts["fields"] = FieldMap(**mapping)
        except TypeError as e:
            raise SystemExit(f"--field: {e}")
    for name in ("relation", "split", "answers_sep"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    opts["on_error"] = args.on_error
    if args.rejects:
        opts["rejects"] = args.rejects
    source = source or args.data
    examples = load_examples(source, format=args.format, **opts)
    log(f"loaded {len(examples)} examples from {source}")
    if args.drop_multi_answer or args.drop_overlap:
        examples, _ = apply_paper_filters(examples, multi_answer=args.drop_multi_answer,
                                          overlap=args.drop_overlap, log=log)
    return (examples, fieldmap) if with_fields else examples


def split_for_categorize(examples, exemplar_split: str, splits: str | None, exemplars=None):
    """(examples to categorize, exemplar pool). Default: every split but the exemplars'."""
    pool = exemplars if exemplars is not None else [e for e in examples if e.split == exemplar_split]
    if not pool:
        raise SystemExit(f"no exemplars: the data has no '{exemplar_split}' split; give --exemplars FILE "
                         f"(few-shot exemplars of the same relations) or --exemplar-split NAME")
    if splits:
        wanted = {s.strip() for s in splits.split(",") if s.strip()}
        todo = [e for e in examples if e.split in wanted]
    else:
        todo = [e for e in examples if exemplars is not None or e.split != exemplar_split]
    if not todo:
        raise SystemExit(f"nothing to categorize (splits: {splits or 'all but ' + exemplar_split})")
    return todo, pool


def cmd_categorize(args):
    from knowcat.runs import run_categorize
    from knowcat.slick import SliCKConfig

    cfg = _override(SliCKConfig(), args)
    examples, fieldmap = load_from_args(args, with_fields=True)
    exemplars = load_from_args(args, source=args.exemplars) if args.exemplars else None
    todo, pool = split_for_categorize(examples, cfg.exemplar_split, args.splits, exemplars)
    if args.per_relation:
        seen: dict = {}
        todo = [e for e in todo if seen.setdefault(e.relation, []).append(e) or len(seen[e.relation]) <= args.per_relation]
        print(f"categorizing the first {args.per_relation} questions of each relation: {len(todo)}")
    opts = {}
    if args.backend == "vllm" or (args.backend == "ray" and args.ray_engine == "vllm"):
        opts = {"tensor_parallel_size": args.tensor_parallel_size, "dtype": args.dtype}
    if args.data_parallel_size > 1 and (args.backend != "vllm" or args.ray_address):
        raise SystemExit("--data-parallel-size runs several vLLM engines on this machine (--backend vllm); "
                         "with --backend ray the replicas are --ray-workers (--ray-engine vllm)")
    if args.backend == "vllm" and args.data_parallel_size > 1:
        from knowcat.ray_runner import run_categorize_data_parallel

        run_categorize_data_parallel(args.model, todo, pool, args.out, cfg, data_parallel_size=args.data_parallel_size,
                                     shard_size=args.shard_size, engine_options=opts, fields=fieldmap,
                                     data_source=str(args.data))
        return
    if args.backend == "ray" or args.ray_address:
        from knowcat.ray_runner import run_categorize_ray

        run_categorize_ray(args.model, todo, pool, args.out, cfg, shard_size=args.shard_size,
                           ray_address=args.ray_address, num_workers=args.ray_workers,
                           gpus_per_worker=args.ray_gpus_per_worker, device=args.device, dtype=args.dtype,
                           engine=args.ray_engine, engine_options=opts, fields=fieldmap, data_source=str(args.data))
        return
    run_categorize(args.model, todo, pool, args.out, cfg, shard_size=args.shard_size, device=args.device,
                   dtype=args.dtype, batch_size=args.batch_size, fields=fieldmap, data_source=str(args.data),
                   progress=not args.no_progress, backend=args.backend, backend_options=opts)


def cmd_filter(args):
    from knowcat.filtering import FilterConfig, filter_file

    def cats(s):
        return tuple(c.strip() for c in s.split(",") if c.strip()) if s else ()

    try:
        cfg = FilterConfig(keep=cats(args.keep) or None, drop=cats(args.drop), relabel=cats(args.relabel),
                           abstention=args.abstention, cap_per_relation=args.cap_per_relation,
                           category_field=args.category_field, answers_field=args.answers_field,
                           relation_field=args.relation_field, seed=args.seed)
    except ValueError as e:
        raise SystemExit(str(e))
    filter_file(args.input, args.out, cfg, rejects_path=args.rejects)


def cmd_demo(args):
    from knowcat.demo import run_demo

    run_demo(args.out, preset=args.preset, seed=args.seed, device=args.device, progress=not args.no_progress,
             study=not args.no_study, verbose=args.verbose)


def cmd_world_build(args):
    from knowcat.world.build import PRESETS, build_world

    cfg = _override(PRESETS[args.preset], args)
    if args.facts:
        cfg = replace(cfg, facts_from=args.facts)
    build_world(args.out, cfg)


def cmd_world_pretrain(args):
    from knowcat.world.pretrain import PretrainConfig, pretrain

    pretrain(args.world, args.out, _override(PretrainConfig(), args), progress=not args.no_progress)


def cmd_data(args):
    from knowcat.examples import write_jsonl

    examples = load_from_args(args)
    n = write_jsonl(args.out, examples)
    print(f"wrote {n} examples to {args.out}")


def cmd_greedy(args):
    from knowcat.fewshot import greedy_accuracy
    from knowcat.io import atomic_write_json, atomic_write_text
    from knowcat.prompts import FewShotConfig
    from probes.loading import load_model

    examples = load_from_args(args)
    fs = _override(FewShotConfig(), args)
    pool = [e for e in examples if e.split == fs.exemplar_split]
    evalset = [e for e in examples if e.split == args.eval_split] if args.eval_split else examples
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    res = greedy_accuracy(model, tok, evalset, pool, fs, match=args.match, batch_size=args.batch_size)
    out = Path(args.out)
    atomic_write_text(out / "greedy.jsonl", "".join(
        json.dumps({"id": r.id, "relation": r.relation, "p_correct_greedy": r.p_correct,
                    "greedy_answers": r.answers}, ensure_ascii=False) + "\n" for r in res))
    acc = sum(r.p_correct for r in res) / max(1, len(res))
    print(f"greedy accuracy {acc:.1%} over {len(res)} examples -> {out / 'greedy.jsonl'}")
    if args.world:
        from knowcat.world.build import read_exposures
        from knowcat.world.validate import exposure_check, format_check

        check = exposure_check({r.id: r.p_correct for r in res}, read_exposures(args.world))
        atomic_write_json(out / "exposure_check.json", check)
        print(format_check(check))


def _mixture_config(args):
    from knowcat.mixtures import MixtureConfig

    cfg = _override(MixtureConfig(), args)
    if getattr(args, "unknown_percents_csv", None):
        cfg = replace(cfg, unknown_percents=tuple(int(x) for x in args.unknown_percents_csv.split(",") if x.strip()))
    return cfg


def _categorized_path(path: str) -> Path:
    p = Path(path)
    return p / "categorized.jsonl" if p.is_dir() else p


def cmd_mixtures(args):
    from knowcat.filtering import read_records
    from knowcat.mixtures import build_mixtures, format_manifest, write_mixtures

    src = _categorized_path(args.input)
    cfg = _mixture_config(args)
    sets = build_mixtures(read_records(src), cfg, source=str(src))
    out = write_mixtures(sets, args.out or src.parent / "mixtures")
    print(format_manifest(sets["_manifest"]))
    print(f"wrote {len(sets) - 1} training sets to {out}")


def _eval_records(args, path, split):
    from knowcat.filtering import read_records

    if path is None:
        return []
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".csv", ".parquet") and p.is_file():
        recs = read_records(p)
        if recs and "question" in recs[0]:
            return [r for r in recs if split is None or r.get("split", split) == split]
    return [{"id": e.id, "question": e.question, "answers": list(e.answers), "relation": e.relation}
            for e in load_from_args(args, source=str(path)) if split is None or e.split == split]


def _split_relations(args, path, split) -> set:
    """The relations of the records of ``split`` (records that name it) in the data at ``path``."""
    from knowcat.filtering import read_records

    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".csv", ".parquet") and p.is_file():
        recs = read_records(p)
        if recs and "question" in recs[0]:
            return {r.get("relation") for r in recs if r.get("split") == split and r.get("relation")}
    return {e.relation for e in load_from_args(args, source=str(path)) if e.split == split and e.relation}


def finetune_ood(args, rows, test) -> tuple[list[str], str]:
    """The OOD relations of ``knowcat finetune`` and the rule that chose them: ``--ood-relations``;
    else the test relations absent from the train split of the --test data (as ``knowcat
    experiment`` does, so a relation of the train split with no example in this training set
    stays in-distribution); else, when that data has no train split, those absent from the
    training set, with a warning."""
    test_rels = {t["relation"] for t in test if t.get("relation")}
    if args.ood_relations is not None:
        return sorted({x.strip() for x in args.ood_relations.split(",") if x.strip()}), "given (--ood-relations)"
    if not args.ood_by_relation or not test:
        return [], "none" if test else "no test set"
    train_rels = _split_relations(args, args.test, args.train_split)
    if train_rels:
        return sorted(test_rels - train_rels), (f"test relations absent from the '{args.train_split}' split "
                                                f"of {args.test}")
    print(f"knowcat finetune: warning: {args.test} has no '{args.train_split}' split, so OOD relations are those "
          f"absent from the training set; give --ood-relations, or a categorized file with both splits",
          file=sys.stderr)
    return sorted(test_rels - {r.get("relation") for r in rows}), \
        "test relations absent from the training set (the test data has no train split)"


def cmd_finetune(args):
    from knowcat.finetune import FinetuneConfig, eval_items, finetune, format_epochs
    from knowcat.mixtures import DEFAULT_TEMPLATE, read_training_set

    cfg = _override(FinetuneConfig(), args)
    rows = read_training_set(args.train)
    test = eval_items(_eval_records(args, args.test, args.test_split))
    dev = eval_items(_eval_records(args, args.dev, args.dev_split))
    ood, ood_rule = finetune_ood(args, rows, test)
    m = finetune(args.model, rows, {k: v for k, v in (("dev", dev), ("test", test)) if v}, args.out, cfg,
                 template=args.template or DEFAULT_TEMPLATE, ood_relations=ood, device=args.device,
                 progress=not args.no_progress, ood_rule=ood_rule)
    if m:
        print(format_epochs(m))


def _experiment_config(args):
    from knowcat.experiment import ExperimentConfig
    from knowcat.finetune import FinetuneConfig

    cfg = ExperimentConfig(mixtures=_mixture_config(args), finetune=_override(FinetuneConfig(), args))
    if args.variants:
        cfg = replace(cfg, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    if getattr(args, "linear_model_variants", None):
        cfg = replace(cfg, linear_model_variants=args.linear_model_variants)
    return cfg


def cmd_experiment(args):
    from knowcat.experiment import run_experiment

    cfg = _experiment_config(args)
    dev = _eval_records(args, args.dev, cfg.dev_split) if args.dev else None
    run_experiment(args.run, args.model, cfg, dev=dev, device=args.device, progress=not args.no_progress)


def cmd_analyze(args):
    from knowcat.experiment import analyze, format_findings
    from knowcat.io import atomic_write_json

    cfg = _experiment_config(args)
    a = analyze(args.run, cfg, cfg.variants)
    atomic_write_json(Path(args.run) / "analysis.json", a)
    print(format_findings(a))
    print(f"-> {Path(args.run) / 'analysis.json'}")


def cmd_surrogate(args):
    from knowcat.surrogate import SurrogateConfig, run_surrogates

    cfg = _override(SurrogateConfig(), args)
    if args.surrogates:
        cfg = replace(cfg, surrogates=tuple(x.strip() for x in args.surrogates.split(",") if x.strip()))
    if args.rtol_sweep_csv:
        cfg = replace(cfg, rtol_sweep=tuple(float(x) for x in args.rtol_sweep_csv.split(",")))
    if args.residual_sweep_csv:
        cfg = replace(cfg, residual_sweep=tuple(float(x) for x in args.residual_sweep_csv.split(",")))
    run_surrogates(args.run, args.model, cfg, data=args.data, device=args.device, progress=not args.no_progress)


def cmd_report(args):
    from reports import build_report

    path = build_report(args.run, out=args.out, max_table_rows=args.max_table_rows)
    print(f"report: {path} ({path.stat().st_size / 2 ** 20:.2f} MB)")


def _add_mixture_args(p):
    from knowcat.mixtures import MixtureConfig

    p.add_argument("--unknown-percents", dest="unknown_percents_csv", default=None, help="comma-separated %%Unknown of the mixtures "
                                                            "(default 0,25,50,75,100)")
    _add_config_args(p, MixtureConfig)


def _add_data_opts(p):
    g = p.add_argument_group("evaluation data (any loader's format)")
    have = {o for a in p._actions for o in a.option_strings}
    for flag, kw in (("--format", {}), ("--field", {"action": "append", "default": [], "metavar": "NAME=COLUMN"}),
                     ("--relation", {}), ("--split", {}), ("--answers-sep", {}),
                     ("--drop-multi-answer", {"action": "store_true"}), ("--drop-overlap", {"action": "store_true"}),
                     ("--on-error", {"choices": ["raise", "skip"], "default": "raise"}), ("--rejects", {})):
        if flag not in have:
            g.add_argument(flag, **({"default": None} | kw))


def build_parser() -> argparse.ArgumentParser:
    from knowcat.prompts import FewShotConfig
    from knowcat.slick import SliCKConfig
    from knowcat.world.build import PRESETS, WorldConfig
    from knowcat.world.pretrain import PretrainConfig

    p = argparse.ArgumentParser(prog="knowcat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded default world and its small model")
    d.add_argument("--preset", default="default", choices=["default", "quick"])
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--device", default="auto", help="auto | cpu | cuda")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--verbose", action="store_true",
                   help="every stage's detail and library warnings on the terminal (otherwise in RUN/demo.log)")
    d.add_argument("--no-study", action="store_true", help="stop after categorization (skip the fine-tuning study and the surrogates)")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("world", help="the knowledge world: build it, pretrain its model")
    wsub = w.add_subparsers(dest="world_command", required=True)
    wb = wsub.add_parser("build", help="write facts, an EntityQuestions-format dataset, a corpus and exposures")
    wb.add_argument("out")
    wb.add_argument("--preset", default="default", choices=sorted(PRESETS))
    wb.add_argument("--facts", default=None, metavar="ENTITYQUESTIONS_DIR",
                    help="take real (subject, relation, answer) facts from an EntityQuestions folder")
    _add_config_args(wb, WorldConfig, skip=("facts_from",))
    wb.set_defaults(func=cmd_world_build)
    wp = wsub.add_parser("pretrain", help="train the tokenizer and the small Llama model on a world's corpus")
    wp.add_argument("world")
    wp.add_argument("--out", default=None, help="model folder (default WORLD/model)")
    wp.add_argument("--no-progress", action="store_true")
    _add_config_args(wp, PretrainConfig)
    wp.set_defaults(func=cmd_world_pretrain)

    dt = sub.add_parser("data", help="load a dataset (any supported format), apply filters, write knowcat JSONL")
    add_data_args(dt)
    dt.add_argument("--out", required=True)
    dt.set_defaults(func=cmd_data)

    c = sub.add_parser("categorize", help="SliCK categories (HighlyKnown / MaybeKnown / WeaklyKnown / Unknown)")
    c.add_argument("--model", required=True, help="hub id or local folder")
    add_data_args(c)
    c.add_argument("--out", required=True, help="run directory (resumes what is finished there)")
    c.add_argument("--splits", default=None, help="comma-separated splits to categorize (default: all but the "
                                                  "exemplar split)")
    c.add_argument("--exemplars", default=None, help="a file/folder of few-shot exemplars, when the data has no dev split")
    c.add_argument("--per-relation", type=int, default=None, metavar="N",
                   help="categorize only the first N questions of each relation (a quick look at a big dataset)")
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=None, help="decoded rows per batch (default: by device, "
                                                                "halved on out-of-memory)")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="auto")
    c.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "ray"],
                   help="generation engine (vllm: pip install 'knowcat[vllm]'; ray: a Ray Data pipeline over "
                        "workers, pip install 'knowcat[ray]')")
    c.add_argument("--ray-address", default=None, help="a Ray cluster to run on (implies --backend ray)")
    c.add_argument("--ray-workers", type=int, default=2, help="ray: worker actors (model replicas)")
    c.add_argument("--ray-gpus-per-worker", type=float, default=0.0)
    c.add_argument("--ray-engine", default="transformers", choices=["transformers", "vllm"],
                   help="ray: the engine each worker runs")
    c.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    c.add_argument("--data-parallel-size", type=int, default=1,
                   help="vllm: model replicas on this machine, one engine process each on its own "
                        "--tensor-parallel-size GPUs (of CUDA_VISIBLE_DEVICES), sharing the shards; over a cluster "
                        "use --backend ray --ray-engine vllm --ray-workers N")
    c.add_argument("--no-progress", action="store_true")
    _add_config_args(c, SliCKConfig)
    c.set_defaults(func=cmd_categorize)

    f = sub.add_parser("filter", help="keep / drop / relabel categories of a categorized file; cap relations")
    f.add_argument("input", help="a categorized file (.jsonl, .json, .csv, .parquet)")
    f.add_argument("--out", required=True, help="where the kept records go (format by suffix)")
    f.add_argument("--keep", default=None, help="categories to keep, e.g. HighlyKnown,MaybeKnown")
    f.add_argument("--drop", default=None, help="categories to drop, e.g. Unknown")
    f.add_argument("--relabel", default=None, help="categories whose answers become the abstention string")
    f.add_argument("--abstention", default="I don't know")
    f.add_argument("--cap-per-relation", type=int, default=None)
    f.add_argument("--rejects", default=None, help="rejects file (default OUT's name + .rejects.jsonl)")
    f.add_argument("--category-field", default="category")
    f.add_argument("--answers-field", default="answers")
    f.add_argument("--relation-field", default="relation")
    f.add_argument("--seed", type=int, default=0, help="seed of the per-relation cap's sample")
    f.set_defaults(func=cmd_filter)

    g = sub.add_parser("greedy", help="few-shot greedy accuracy (SliCK prompts) of a model on a dataset")
    g.add_argument("--model", required=True, help="hub id or local folder")
    add_data_args(g)
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--eval-split", default="train", help="split to evaluate ('' for all)")
    g.add_argument("--world", default=None, help="a knowledge world folder: also check accuracy against exposure")
    g.add_argument("--match", default="exact", choices=["exact", "contains"])
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    _add_config_args(g, FewShotConfig)
    g.set_defaults(func=cmd_greedy)

    from knowcat.finetune import FinetuneConfig

    mx = sub.add_parser("mixtures", help="the paper's fine-tuning sets from a categorized train split")
    mx.add_argument("input", help="a categorized run directory or file")
    mx.add_argument("--out", default=None, help="folder for the sets (default: beside the input, mixtures/)")
    _add_mixture_args(mx)
    mx.set_defaults(func=cmd_mixtures)

    ft = sub.add_parser("finetune", help="fine-tune on one training set, measuring after every epoch")
    ft.add_argument("--model", required=True, help="hub id or local folder (never written to)")
    ft.add_argument("--train", required=True, help="a prompt/completion JSONL (as knowcat mixtures writes)")
    ft.add_argument("--out", required=True, help="output folder (resumes what is finished there)")
    ft.add_argument("--dev", default=None, help="dev questions: a categorized file or any dataset")
    ft.add_argument("--dev-split", default="dev")
    ft.add_argument("--test", default=None, help="test questions, best a categorized file (per-category accuracy)")
    ft.add_argument("--test-split", default="test")
    ft.add_argument("--ood-by-relation", action=argparse.BooleanOptionalAction, default=True,
                    help="test relations absent from the train split of the --test data (a categorized file "
                         "with train and test splits) count as out-of-distribution")
    ft.add_argument("--ood-relations", default=None,
                    help="comma-separated relations that are out-of-distribution (overrides --ood-by-relation)")
    ft.add_argument("--train-split", default="train", help="the split of the --test data that was trained from")
    ft.add_argument("--template", default=None, help="prompt template with {question}")
    ft.add_argument("--device", default="auto")
    ft.add_argument("--no-progress", action="store_true")
    _add_config_args(ft, FinetuneConfig)
    _add_data_opts(ft)
    ft.set_defaults(func=cmd_finetune)

    ex = sub.add_parser("experiment", help="mixtures -> fine-tuning on every set -> analysis, in a categorized run")
    ex.add_argument("run", help="a run directory holding categorized.jsonl (train and test splits)")
    ex.add_argument("--model", required=True, help="hub id or local folder (never written to)")
    ex.add_argument("--dev", default=None, help="dev questions (default: the dev split of the run's data)")
    ex.add_argument("--variants", default=None, help="comma-separated training sets (default: all)")
    ex.add_argument("--linear-model-variants", default=None,
                    help="points of the linear model: paper (the X%% Unknown and D_Known sets, the "
                         "default), all (every set) or comma-separated sets")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--no-progress", action="store_true")
    _add_mixture_args(ex)
    _add_config_args(ex, FinetuneConfig)
    _add_data_opts(ex)
    ex.set_defaults(func=cmd_experiment)

    from knowcat.surrogate import SURROGATES, SurrogateConfig

    sg = sub.add_parser("surrogate", help="linearized surrogates (Ax=b) per example and the hypothesis test")
    sg.add_argument("run", help="a categorized run directory")
    sg.add_argument("--model", required=True, help="hub id or local folder")
    sg.add_argument("--data", default=None, help="the data the run was categorized from (default: as recorded)")
    sg.add_argument("--surrogates", default=None, help=f"comma-separated, from {','.join(SURROGATES)} (default all)")
    sg.add_argument("--rtol-sweep", dest="rtol_sweep_csv", default=None, help="comma-separated rank rtols to sweep")
    sg.add_argument("--residual-sweep", dest="residual_sweep_csv", default=None,
                    help="comma-separated residual tolerances to sweep (relation_map)")
    sg.add_argument("--device", default="auto")
    sg.add_argument("--no-progress", action="store_true")
    _add_config_args(sg, SurrogateConfig)
    sg.set_defaults(func=cmd_surrogate)

    rp = sub.add_parser("report", help="one self-contained HTML report of a run directory")
    rp.add_argument("run")
    rp.add_argument("--out", default=None, help="default RUN/report.html")
    rp.add_argument("--max-table-rows", type=int, default=2000, help="examples in the page's table (a stratified "
                                                                     "sample beyond this)")
    rp.set_defaults(func=cmd_report)

    an = sub.add_parser("analyze", help="the fine-tuning study's statistics from a run's files")
    an.add_argument("run")
    an.add_argument("--variants", default=None,
                    help="comma-separated training sets to analyze (default: every set with a finished run)")
    an.add_argument("--linear-model-variants", default=None,
                    help="points of the linear model: paper (the X%% Unknown and D_Known sets, the "
                         "default), all (every set) or comma-separated sets")
    _add_mixture_args(an)
    an.set_defaults(func=cmd_analyze)
    return p


def main(argv=None) -> int:
    from knowcat.errors import DataError
    from knowcat.runs import RunMismatch

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        print(f"knowcat: bad input: {e}", file=sys.stderr)
        return 2
    except RunMismatch as e:
        print(f"knowcat: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
