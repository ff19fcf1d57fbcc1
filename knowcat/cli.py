"""The ``knowcat`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path
from knowcat.errors import UsageError
from knowcat.selection import split_for_categorize


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (what is wrong, where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


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
    """``cfg`` with the values given on the command line; a value the config refuses is a usage error."""
    from knowcat.errors import UsageError

    changes = {f.name: getattr(args, f.name) for f in fields(cfg)
               if getattr(args, f.name, None) is not None}
    try:
        return replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{e}; see knowcat {args.command} --help") from None


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an EntityQuestions folder, a JSONL/JSON/CSV/Parquet file, "
                                "a saved Hugging Face dataset, or a local dataset load_dataset can read")
    g = p.add_argument_group("data")
    g.add_argument("--format", default=None, help="force the format: entityquestions, jsonl, json, csv, parquet, hf, "
                                                 "or an SFT format: messages, prompt_completion, sharegpt, alpaca")
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


def _rejects_writer(args):
    """The one rejects file of this command (``--rejects``, else beside the output), shared by every
    load of the command so that no load overwrites another's rejects."""
    from knowcat.loaders import RejectWriter

    w = getattr(args, "_rejects_writer", None)
    if w is None:
        if getattr(args, "rejects", None):
            path = Path(args.rejects)
        elif args.command == "data":
            out = Path(args.out)
            path = out.with_name(out.stem + ".rejects.jsonl")
        else:
            from knowcat.rundir import RunDir

            path = RunDir(getattr(args, "out", None) or getattr(args, "run", None) or ".").rejects
        w = args._rejects_writer = RejectWriter(path)
    return w


def load_from_args(args, log=print, source=None, with_fields=False):
    """Examples from the data arguments (``source`` overrides ``args.data``); with
    ``with_fields`` also the FieldMap used, to write records back in the user's format.
    With ``--on-error skip`` the bad records go to one rejects file (``--rejects``, else beside
    the output), always written, and its path is printed. Loading no example is an error."""
    from knowcat.errors import DataError
    from knowcat.loaders import apply_paper_filters, load_examples

    opts = {}
    fieldmap = _field_map(args)
    if fieldmap is not None:
        opts["fields"] = fieldmap
    for name in ("relation", "split", "answers_sep"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    opts["on_error"] = args.on_error
    writer = None
    if args.on_error == "skip":
        writer = opts["rejects"] = _rejects_writer(args)
    source = source or args.data
    before = writer.count if writer else 0
    quiet = logging.getLogger("knowcat.loaders")
    was, quiet.disabled = quiet.disabled, True  # the line below says what was skipped and where
    try:
        examples = load_examples(source, format=args.format, **opts)
    finally:
        quiet.disabled = was
        if writer is not None:
            writer.close()
    skipped = (writer.count - before) if writer else 0
    log(f"loaded {len(examples)} examples from {source}"
        + (f"; skipped {skipped} bad record(s), listed in {writer.path}" if writer else ""))
    if not examples:
        raise DataError("no examples loaded" + (f" (all {skipped} records were bad; see {writer.path})"
                                                if skipped else ""), file=source)
    if args.drop_multi_answer or args.drop_overlap:
        examples, _ = apply_paper_filters(examples, multi_answer=args.drop_multi_answer,
                                          overlap=args.drop_overlap, log=log)
    return (examples, fieldmap) if with_fields else examples


def _field_map(args):
    """The ``--field NAME=COLUMN`` mappings as a FieldMap (None when none is given)."""
    from knowcat.errors import UsageError
    from knowcat.loaders import FieldMap

    if not getattr(args, "field", None):
        return None
    mapping = {}
    for item in args.field:
        if "=" not in item:
            raise UsageError(f"--field expects NAME=COLUMN, got {item!r}")
        k, v = item.split("=", 1)
        mapping[k.strip()] = v.strip()
    try:
        return FieldMap.coerce(mapping)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--field: {e}") from None


def _sft_format(args) -> str | None:
    """The SFT chat format of ``args.data`` (forced by ``--format`` or detected), or None for QA data."""
    from knowcat.loaders.sft import SFT_FORMATS, is_chat_format, normalize_format, sniff_format

    if args.format:
        try:
            fmt = normalize_format(args.format)
        except ValueError:
            return None
        return fmt if is_chat_format(fmt) else None
    p = Path(args.data)
    if p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson", ".json", ".parquet", ".pq") or (
            p.is_dir() and not (p / "relation_query_templates.json").exists()):
        fmt = sniff_format(p)
        return fmt if fmt in SFT_FORMATS and is_chat_format(fmt) else None
    return None


def _install_judge(args, cfg) -> None:
    """With ``--match judge``: load ``--judge-model`` and make it the judge of answers."""
    if cfg.match != "judge":
        return
    if not getattr(args, "judge_model", None):
        raise UsageError("--match judge needs --judge-model M (a model asked whether an answer agrees with the reference)")
    from knowcat.matching import Judge, set_judge
    from probes.loading import load_model

    set_judge(Judge(*load_model(args.judge_model, device=args.device, dtype=args.dtype)))


def _categorize_sft(args, fmt, cfg):
    from knowcat.sft import categorize_sft

    categorize_sft(args.model, args.data, args.out, cfg, format=fmt, turns=args.turns, group_by=args.group_by,
                   max_answer_tokens=args.max_answer_tokens, exemplars=args.exemplars, on_error=args.on_error,
                   rejects=args.rejects, shard_size=args.shard_size, device=args.device, dtype=args.dtype,
                   batch_size=args.batch_size, progress=not args.no_progress,
                   command=_given_options(args, _CATEGORIZE_OPTIONS))


def cmd_categorize(args):
    from knowcat.runs import categorize_with, check_chat_template
    from knowcat.selection import select_for_categorize
    from knowcat.slick import SliCKConfig

    cfg = _override(SliCKConfig(), args)
    check_chat_template(args.model, cfg)  # before anything is read or written
    _install_judge(args, cfg)
    sft_fmt = _sft_format(args)
    if sft_fmt:
        return _categorize_sft(args, sft_fmt, cfg)
    examples, fieldmap = load_from_args(args, with_fields=True)
    exemplars = load_from_args(args, source=args.exemplars) if args.exemplars else None
    todo, pool = select_for_categorize(examples, cfg, args.splits, exemplars, args.per_relation)
    categorize_with(args.backend, args.model, todo, pool, args.out, cfg, shard_size=args.shard_size,
                    device=args.device, dtype=args.dtype, batch_size=args.batch_size, fields=fieldmap,
                    data_source=str(args.data), progress=not args.no_progress, ray_address=args.ray_address,
                    ray_workers=args.ray_workers, ray_gpus_per_worker=args.ray_gpus_per_worker,
                    ray_engine=args.ray_engine, tensor_parallel_size=args.tensor_parallel_size,
                    data_parallel_size=args.data_parallel_size, command=_given_options(args, _CATEGORIZE_OPTIONS))


# the options of knowcat categorize that its run's identity does not record (model, data, protocol, shard size
# and backend are there): recorded beside it when they differ from their defaults, for the report's rerun command
_CATEGORIZE_OPTIONS = ("format", "field", "relation", "split", "answers_sep", "drop_multi_answer", "drop_overlap",
                       "on_error", "rejects", "splits", "exemplars", "per_relation", "batch_size", "device", "dtype",
                       "ray_address", "ray_workers", "ray_gpus_per_worker", "ray_engine", "tensor_parallel_size",
                       "data_parallel_size", "judge_model", "turns", "group_by", "max_answer_tokens")


def _given_options(args, names) -> dict:
    """``{option: value}`` of ``names`` whose value differs from the command's default (paths that exist
    made absolute, so that the command can be repeated from anywhere)."""
    defaults = build_parser().parse_args([args.command, *_REQUIRED[args.command]])
    out = {}
    for n in names:
        v = getattr(args, n, None)
        if v == getattr(defaults, n, None):
            continue
        if n in ("exemplars", "rejects") and v and Path(v).exists():
            v = str(Path(v).resolve())
        out[n] = v
    return out


_REQUIRED = {"categorize": ("--model", "M", "DATA", "--out", "RUN")}


def cmd_estimate(args):
    from knowcat.estimate import EstimateConfig, LabelIndex, estimate, write_estimate
    from knowcat.rundir import RunDir
    from knowcat.runs import check_chat_template
    from knowcat.slick import SliCKConfig
    from probes.loading import load_model

    try:
        cfg = _override(EstimateConfig(), args)
        scfg = SliCKConfig(match=args.match, keep_answers=True, chat_template=cfg.chat_template)
    except ValueError as e:
        raise UsageError(f"knowcat estimate: {e}") from None
    check_chat_template(args.model, cfg)  # before anything is read or written
    _install_judge(args, scfg)
    labels = LabelIndex(args.labels) if args.labels else None  # indexed, not held
    sft_fmt = _sft_format(args)
    if sft_fmt:
        from knowcat.sft import estimate_sft

        try:
            out, _ = estimate_sft(args.model, args.data, args.out, cfg, scfg, format=sft_fmt, turns=args.turns,
                                  group_by=args.group_by, max_answer_tokens=args.max_answer_tokens,
                                  exemplars=args.exemplars, labels=labels, on_error=args.on_error,
                                  rejects=args.rejects, device=args.device, dtype=args.dtype,
                                  shard_size=args.shard_size, run_slick=args.run_slick, progress=not args.no_progress)
        except ValueError as e:
            if type(e) is not ValueError:  # DataError: the usual bad-input path
                raise
            raise UsageError(f"knowcat estimate: {e}") from None
        print(f"estimate: wrote {out} and {RunDir(args.out).estimate_summary}")
        return
    examples, fieldmap = load_from_args(args, with_fields=True)
    exemplars = load_from_args(args, source=args.exemplars) if args.exemplars else None
    todo, pool = split_for_categorize(examples, cfg.exemplar_split, args.splits, exemplars)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    try:
        res = estimate(model, tok, todo, pool, cfg, scfg, labels=labels, run_dir=args.out, model_name=args.model,
                       progress=not args.no_progress, shard_size=args.shard_size, run_slick=args.run_slick)
    except ValueError as e:
        if type(e) is not ValueError:  # DataError: the usual bad-input path
            raise
        raise UsageError(f"knowcat estimate: {e}") from None
    out = write_estimate(args.out, todo, res, fields=fieldmap)
    print(f"estimate: wrote {out} and {RunDir(args.out).estimate_summary}")


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
        from knowcat.errors import UsageError

        raise UsageError(str(e)) from None
    filter_file(args.input, args.out, cfg, rejects_path=args.rejects, stats_path=args.stats)


def cmd_demo(args):
    from knowcat.demo import run_demo

    if args.seeds:
        from knowcat.replicates import run_demo_seeds

        run_demo_seeds(args.out, [int(x) for x in args.seeds.split(",") if x.strip()], preset=args.preset,
                       device=args.device, progress=not args.no_progress)
        return
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
    from knowcat.fewshot import run_greedy
    from knowcat.prompts import FewShotConfig

    run_greedy(args.model, load_from_args(args), args.out, _override(FewShotConfig(), args), eval_split=args.eval_split,
               match=args.match, world=args.world, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def _numbers(text: str, typ, flag: str) -> tuple:
    """Comma-separated numbers of a flag; anything else is a usage error."""
    from knowcat.errors import UsageError

    try:
        vals = tuple(typ(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated {typ.__name__}s, got {text!r}") from None
    if not vals or any(v != v for v in vals):
        raise UsageError(f"{flag} expects comma-separated {typ.__name__}s, got {text!r}")
    return vals


def _replace_checked(cfg, **changes):
    from knowcat.errors import UsageError

    try:
        return replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _mixture_config(args):
    from knowcat.mixtures import MixtureConfig

    cfg = _override(MixtureConfig(), args)
    if getattr(args, "unknown_percents_csv", None):
        cfg = _replace_checked(cfg, unknown_percents=_numbers(args.unknown_percents_csv, int, "--unknown-percents"))
    return cfg


def _categorized_path(path: str) -> Path:
    from knowcat.rundir import RunDir

    p = Path(path)
    return RunDir(p).categorized_jsonl if p.is_dir() else p


def cmd_mixtures(args):
    from knowcat.filtering import read_records
    from knowcat.rundir import RunDir
    from knowcat.mixtures import build_mixtures, format_manifest, write_mixtures

    src = _categorized_path(args.input)
    cfg = _mixture_config(args)
    sets = build_mixtures(read_records(src), cfg, source=str(src))
    out = write_mixtures(sets, args.out or RunDir(src.parent).mixtures.root)
    print(format_manifest(sets["_manifest"]))
    print(f"wrote {len(sets) - 1} training sets to {out}")


def _eval_records(args, path, split):
    from knowcat.selection import eval_records

    return eval_records(path, split, lambda src: load_from_args(args, source=str(src)))


def _split_relations(args, path, split) -> set:
    from knowcat.selection import split_relations

    return split_relations(path, split, lambda src: load_from_args(args, source=str(src)))


def cmd_finetune(args):
    from knowcat.finetune import FinetuneConfig, eval_items, finetune, format_epochs
    from knowcat.mixtures import DEFAULT_TEMPLATE, read_training_set
    from knowcat.selection import finetune_dev, finetune_ood

    cfg = _override(FinetuneConfig(), args)
    rows = read_training_set(args.train)
    test = eval_items(_eval_records(args, args.test, args.test_split))
    dev = eval_items(_eval_records(args, args.dev, args.dev_split))
    split_rels = _split_relations(args, args.test, args.train_split) if args.test else set()
    ood, ood_rule = finetune_ood(test, rows, args.ood_relations, args.ood_by_relation, split_rels, args.test,
                                 args.train_split, warn=lambda msg: print(msg, file=sys.stderr))
    # EARLY_STOP on the dev questions of the trained relations, as knowcat experiment does
    dev = finetune_dev(dev, rows, ood, split_rels)
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
    if getattr(args, "replicates", None):
        cfg = replace(cfg, replicates=args.replicates)
    return cfg


def cmd_experiment(args):
    from knowcat.experiment import run_experiment

    cfg = _experiment_config(args)
    dev = _eval_records(args, args.dev, cfg.dev_split) if args.dev else None
    run_experiment(args.run, args.model, cfg, dev=dev, device=args.device, progress=not args.no_progress)


def cmd_analyze(args):
    from knowcat.experiment import analyze_run

    cfg = _experiment_config(args)
    analyze_run(args.run, cfg, cfg.variants)


def cmd_surrogate(args):
    from knowcat.surrogate import SurrogateConfig, run_surrogates

    if not args.tests_only and not args.model:
        print("knowcat surrogate: --model is required (unless --tests-only)", file=sys.stderr)
        raise SystemExit(2)

    cfg = _override(SurrogateConfig(), args)
    if args.surrogates:
        cfg = replace(cfg, surrogates=tuple(x.strip() for x in args.surrogates.split(",") if x.strip()))
    if args.rtol_sweep_csv:
        cfg = replace(cfg, rtol_sweep=_numbers(args.rtol_sweep_csv, float, "--rtol-sweep"))
    if args.residual_sweep_csv:
        cfg = replace(cfg, residual_sweep=_numbers(args.residual_sweep_csv, float, "--residual-sweep"))
    if args.tests_only:
        from knowcat.surrogate import evaluate_run
        from linear_models.hypothesis import format_verdict

        for name, t in evaluate_run(args.run, cfg).items():
            print(format_verdict(name, t["at_default"], t.get("fit_epoch_link")))
        return
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

    p = _Parser(prog="knowcat", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also KNOWCAT_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded default world and its small model")
    d.add_argument("--preset", default="default", choices=["default", "quick"])
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--seeds", default=None, help="comma-separated world/pretraining seeds: one demo per seed in "
                   "OUT/seed_S, then b_kn, b_unk and the findings across them (OUT/replicates.json)")
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
    s = c.add_argument_group("SFT data (messages, prompt/completion, ShareGPT, Alpaca; --format forces one)")
    s.add_argument("--turns", default="last", choices=["last", "all"],
                   help="multi-turn records: ask the last assistant turn (default) or each")
    s.add_argument("--group-by", default=None, metavar="FIELD",
                   help="draw few-shot exemplars from records with the same value of FIELD")
    s.add_argument("--judge-model", default=None, metavar="M",
                   help="with --match judge: the model asked whether an answer agrees with the reference")
    s.add_argument("--max-answer-tokens", type=int, default=32, metavar="N",
                   help="turns whose reference answer is over N words are not_applicable (not categorized)")
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
    f.add_argument("--stats", default=None, help="stats file (default OUT's name + .stats.json)")
    f.add_argument("--category-field", default="category")
    f.add_argument("--answers-field", default="answers")
    f.add_argument("--relation-field", default="relation")
    f.add_argument("--seed", type=int, default=0, help="seed of the per-relation cap's sample")
    f.set_defaults(func=cmd_filter)

    from knowcat.estimate import EstimateConfig

    es = sub.add_parser("estimate", help="categories of a whole dataset from one teacher-forced pass per prompt, "
                                         "calibrated on a SliCK-categorized sample")
    es.add_argument("--model", required=True, help="hub id or local folder")
    add_data_args(es)
    es.add_argument("--out", required=True, help="run directory (estimated.jsonl, estimate_summary.json)")
    es.add_argument("--splits", default=None, help="comma-separated splits to estimate (default: all but the "
                                                   "exemplar split)")
    es.add_argument("--exemplars", default=None, help="a file/folder of few-shot exemplars")
    es.add_argument("--labels", default=None, metavar="CATEGORIZED_FILE",
                    help="SliCK categories already computed (a categorize run's categorized.jsonl): the calibration "
                         "sample takes them instead of running SliCK, and the other labelled examples validate")
    es.add_argument("--run-slick", action="store_true",
                    help="with --labels: run SliCK on the calibration sample anyway (its forward tokens are then "
                         "measured; the labels validate)")
    es.add_argument("--match", default="exact", help="SliCK's answer matching on the calibration sample: exact, "
                                                     "contains, f1 or f1@THRESHOLD")
    es.add_argument("--judge-model", default=None, metavar="M", help="with --match judge: the judge model")
    es.add_argument("--turns", default="last", choices=["last", "all"])
    es.add_argument("--group-by", default=None, metavar="FIELD")
    es.add_argument("--max-answer-tokens", type=int, default=32, metavar="N")
    es.add_argument("--shard-size", type=int, default=4096,
                    help="examples per feature shard (each saved as it finishes; a rerun resumes)")
    es.add_argument("--device", default="auto")
    es.add_argument("--dtype", default="auto")
    es.add_argument("--no-progress", action="store_true")
    _add_config_args(es, EstimateConfig)
    es.set_defaults(func=cmd_estimate)

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
    ex.add_argument("--replicates", type=int, default=1, help="fine-tuning seeds per set (replicate r in "
                    "RUN/replicates/rep_RR/finetune, seed + r); the analysis gives each figure across them")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--no-progress", action="store_true")
    _add_mixture_args(ex)
    _add_config_args(ex, FinetuneConfig)
    _add_data_opts(ex)
    ex.set_defaults(func=cmd_experiment)

    from knowcat.surrogate import SURROGATES, SurrogateConfig

    sg = sub.add_parser("surrogate", help="linearized surrogates (Ax=b) per example and the hypothesis test")
    sg.add_argument("run", help="a categorized run directory")
    sg.add_argument("--model", default=None, help="hub id or local folder (required unless --tests-only)")
    sg.add_argument("--tests-only", action="store_true",
                    help="recompute tests.json from the stored rows (e.g. once the fine-tuning study has finished)")
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


# ---------------------------------------------------------------------------------------------
# validation before any work, and the one error path

# (flag dest, lowest value, lowest allowed is strict, highest or None): every numeric argument a user
# may give, checked before anything is loaded
_RANGES = {
    "n_prompts": (1, False, None), "k": (1, False, None), "n_samples": (0, False, None), "top_k": (1, False, None),
    "temperature": (0, True, None), "max_new_tokens": (1, False, None), "alpha": (0, True, 1),
    "shard_size": (1, False, None), "per_relation": (1, False, None), "batch_size": (1, False, None),
    "eval_batch_size": (1, False, None), "per_device_batch_size": (1, False, None), "epochs": (1, False, None),
    "lr": (0, True, None), "weight_decay": (0, False, None), "warmup_ratio": (0, False, 1),
    "lora_r": (1, False, None), "lora_alpha": (0, True, None), "lora_dropout": (0, False, 1),
    "log_every": (0, False, None), "ray_workers": (1, False, None), "ray_gpus_per_worker": (0, False, None),
    "tensor_parallel_size": (1, False, None), "data_parallel_size": (1, False, None),
    "cap_per_relation": (1, False, None), "max_table_rows": (0, False, None), "size": (1, False, None),
    "idk_from": (0, False, 100), "block_size": (2, False, None), "vocab_size": (1, False, None),
    "hidden_size": (1, False, None), "num_layers": (1, False, None), "num_heads": (1, False, None),
    "intermediate_size": (1, False, None), "warmup_steps": (0, False, None), "checkpoint_every": (1, False, None),
    "threads": (1, False, None), "min_lr_ratio": (0, False, 1),
}

_FORMATS = ("entityquestions", "eq", "hf", "datasets", "jsonl", "json", "csv", "parquet")



def validate_args(args) -> None:
    """Check every argument before any work: number ranges, names, the model folder, and that no
    output lands in a model folder (:func:`knowcat.paths.check_output_separate`)."""
    import math

    from knowcat.errors import UsageError
    from knowcat.paths import check_model_source, check_output_separate
    from knowcat.rundir import WRITES

    for name, (lo, strict, hi) in _RANGES.items():
        v = getattr(args, name, None)
        if v is None or isinstance(v, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number, got {v}")
        if v < lo or (strict and v == lo) or (hi is not None and (v > hi or strict and v == hi)):
            rng = (f"{'above' if strict else 'at least'} {lo}"
                   + (f" and {'below' if strict else 'at most'} {hi}" if hi is not None else ""))
            raise UsageError(f"{flag} must be {rng}, got {v}")
    if getattr(args, "match", None) == "judge" and not getattr(args, "judge_model", None):
        raise UsageError("--match judge needs --judge-model M (a model asked whether an answer agrees with the reference)")
    fmt = getattr(args, "format", None)
    if fmt is not None and fmt.lower() not in _FORMATS:
        from knowcat.loaders.sft import SFT_FORMATS, is_chat_format, normalize_format

        try:  # a chat format (messages, prompt_completion, sharegpt, alpaca) or an alias of one
            chat = is_chat_format(normalize_format(fmt))
        except ValueError:
            chat = False
        if not chat:
            raise UsageError(f"unknown --format {fmt!r}; choose one of "
                             f"{', '.join(_FORMATS + tuple(f for f in SFT_FORMATS if is_chat_format(f)))}")
    if getattr(args, "field", None):
        _field_map(args)
    if getattr(args, "rejects", None) and getattr(args, "on_error", "skip") != "skip" and args.command != "filter":
        raise UsageError("--rejects is only used with --on-error skip; add --on-error skip or drop --rejects")
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        from probes.loading import _DTYPES

        if dtype.lower() not in _DTYPES:
            raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
    device = getattr(args, "device", None)
    if device is not None and device != "auto":
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise UsageError(f"unknown --device {device!r}; choose auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    for flag, dest, typ in (("--unknown-percents", "unknown_percents_csv", int), ("--rtol-sweep", "rtol_sweep_csv", float),
                            ("--residual-sweep", "residual_sweep_csv", float)):
        if getattr(args, dest, None):
            _numbers(getattr(args, dest), typ, flag)
    model = getattr(args, "model", None)
    if model is not None:
        check_model_source(model)
        out = getattr(args, "out", None) or getattr(args, "run", None)
        if out is not None and args.command in WRITES:
            check_output_separate([model], out, WRITES[args.command],
                                  what="run directory" if args.command != "finetune" else "output folder")
            if getattr(args, "rejects", None):
                check_output_separate([model], args.rejects, what="rejects file")


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv=None) -> int:
    """Run one command. A user mistake (an argument, a path, a model folder, a bad record) ends with
    one line on stderr and exit code 2; ``--debug`` shows the traceback instead."""
    import os
    import pickle

    from knowcat.errors import DataError, UsageError
    from knowcat.runs import RunMismatch

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KNOWCAT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        validate_args(args)
        args.func(args)
    except KeyboardInterrupt:
        print("knowcat: interrupted (finished shards and epochs are kept; rerun the command to resume)",
              file=sys.stderr)
        return 130
    except DataError as e:
        if debug:
            raise
        hint = "; fix it, or pass --on-error skip to set bad records aside" if (
            e.record is not None and getattr(args, "on_error", None) == "raise") else ""
        print(f"knowcat: bad input: {_one_line(e)}{hint}", file=sys.stderr)
        return 2
    except (UsageError, RunMismatch) as e:
        if debug:
            raise
        print(f"knowcat: {_one_line(e)}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError as e:
        if debug:
            raise
        print(f"knowcat: refused to load a file that is not plain tensors and values "
              f"({_one_line(e)[:200]}); remove it", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # library refusals and file-system problems: the message says which
        if debug:
            raise
        print(f"knowcat: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"knowcat: {_one_line(e.code)}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
