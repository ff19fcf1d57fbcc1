"""Nothing written where the user did not ask, nothing unpickled, every format read back equal, and
every user mistake one line with exit code 2 (each test here failed before its fix)."""

import json
import os
import pickle
import shlex

import pytest
import torch

from knowcat.cli import main
from knowcat.errors import DataError


def fake_model(folder, shards=False):
    """A folder that looks like a saved model (config, safetensors weights, tokenizer); it is refused or
    guarded before anything would load it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if shards:
        save_file({"w": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    else:
        save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {}}}))
    return folder


def folder_digest(folder) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n_dev=2, n_train=2, relation="R"):
    rows = [{"question": f"dev q{i}?", "answers": [f"a{i}"], "relation": relation, "split": "dev"} for i in range(n_dev)]
    rows += [{"question": f"train q{i}?", "answers": [f"b{i}"], "relation": relation, "split": "train"}
             for i in range(n_train)]
    return rows


# ---------------------------------------------------------------------------------------------
# 1. never write into a model folder; nothing unpickled


def test_guard_refuses_every_overlap(tmp_path):
    from knowcat.errors import UsageError
    from knowcat.paths import check_output_separate

    model = fake_model(tmp_path / "F" / "model")
    refused = [
        (model, None),  # out == model
        (model / "sub", None),  # out inside model
        (tmp_path / "F", None),  # model inside out (the whole folder is the command's)
        (tmp_path / "F", ("model",)),  # a written entry is the model folder
        (tmp_path, ("F",)),  # a written entry holds the model folder
        (tmp_path / "F" / ".." / "F" / "model", None),  # relative spelling
    ]
    os.symlink(model, tmp_path / "link")
    refused.append((tmp_path / "link", None))  # a symbolic link to the model folder
    for out, writes in refused:
        with pytest.raises(UsageError, match="model folder"):
            check_output_separate([model], out, writes)
    with pytest.raises(UsageError):  # the model named through the link, the output by its real path
        check_output_separate([tmp_path / "link"], model / "x", None)
    # a run directory beside the model, or holding it where nothing is written over it, is fine
    check_output_separate([model], tmp_path / "F" / "run", None)
    check_output_separate([model], tmp_path / "F", ("categorize", "categorized.jsonl"))
    check_output_separate(["org/hub-model"], tmp_path / "F", None)  # a hub id: nothing local to protect


def test_finetune_out_holding_the_model_is_refused(tmp_path, capsys):
    """``knowcat finetune --model F/model --out F`` wrote into F/model."""
    model = fake_model(tmp_path / "F" / "model")
    before = folder_digest(model)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "prompt": "Q?", "completion": "A", "category": "Unknown"}])
    rc, _, err = run_cli(["finetune", "--model", model, "--train", train, "--out", tmp_path / "F", "--epochs", 1], capsys)
    assert_one_line_error(rc, err, "model folder")
    assert folder_digest(model) == before
    from knowcat.finetune import finetune

    with pytest.raises(ValueError, match="model folder"):  # the Python API keeps the same guard
        finetune(str(model), [], {}, tmp_path / "F")


@pytest.mark.parametrize("command", ["categorize", "greedy", "surrogate", "experiment"])
def test_commands_refuse_output_in_model(tmp_path, capsys, command):
    model = fake_model(tmp_path / "M")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows())
    if command in ("categorize", "greedy"):
        argv = [command, "--model", model, data, "--out", model]
    else:
        argv = [command, model, "--model", model]
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, "model folder")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def _categorized_run(run):
    """A run directory with a categorized train and test split (what ``knowcat experiment`` starts from)."""
    rows = [{"id": f"{s}{i}", "question": f"q{s}{i}?", "answers": [f"a{i}"], "relation": "R", "split": s,
             "category": c} for s in ("train", "test") for i, c in enumerate(("HighlyKnown", "Unknown") * 2)]
    run.mkdir(parents=True, exist_ok=True)
    write_jsonl(run / "categorized.jsonl", rows)
    return run


# a model folder somewhere under what the study writes in RUN (mixtures/, finetune/, replicates/, analysis)
STUDY_NESTINGS = ["mixtures/m", "finetune/unknown_50/model", "finetune/a/b/c/model", "replicates/rep_01/finetune/x/m"]


@pytest.mark.parametrize("nesting", STUDY_NESTINGS)
def test_experiment_cli_refuses_a_model_under_what_it_writes(tmp_path, capsys, nesting):
    """``knowcat experiment RUN --model RUN/replicates/...`` was let through (replicates/ was not among the
    entries the guard checked)."""
    run = _categorized_run(tmp_path / "run")
    model = fake_model(run / nesting)
    before = folder_digest(run)
    rc, _, err = run_cli(["experiment", run, "--model", model, "--epochs", 1], capsys)
    assert_one_line_error(rc, err, "model folder")
    assert folder_digest(run) == before  # nothing written anywhere in the run, the model's folder included


@pytest.mark.parametrize("nesting", STUDY_NESTINGS)
def test_run_experiment_refuses_a_model_under_what_it_writes(tmp_path, nesting):
    """The Python API had no guard: ``run_experiment`` wrote mixtures/ (and fine-tuned) into the model's folder."""
    from knowcat.errors import UsageError
    from knowcat.experiment import ExperimentConfig, run_experiment

    run = _categorized_run(tmp_path / "run")
    model = fake_model(run / nesting)
    before = folder_digest(run)
    with pytest.raises(UsageError, match="model folder"):
        run_experiment(run, str(model), ExperimentConfig(), dev=[], log=lambda *a: None, progress=False)
    assert folder_digest(run) == before


def test_run_experiment_refuses_a_run_inside_the_model_folder(tmp_path):
    from knowcat.errors import UsageError
    from knowcat.experiment import ExperimentConfig, run_experiment

    model = fake_model(tmp_path / "M")
    run = _categorized_run(model / "a" / "run")
    before = folder_digest(model)
    with pytest.raises(UsageError, match="model folder"):
        run_experiment(run, str(model), ExperimentConfig(), dev=[], log=lambda *a: None, progress=False)
    assert folder_digest(model) == before


def test_run_experiment_allows_the_model_beside_the_study(tmp_path):
    """A demo's layout: the model in RUN/model, which the study never writes, passes the guard."""
    from knowcat.experiment import check_run_separate
    from knowcat.rundir import RunDir

    run = _categorized_run(tmp_path / "run")
    check_run_separate(RunDir(run), str(fake_model(run / "model")))


@pytest.mark.parametrize("nesting", ["model", "a/model", "a/b/c/model", "checkpoints/model"])
def test_finetune_refuses_a_model_anywhere_under_its_output(tmp_path, capsys, nesting):
    """``knowcat finetune`` and ``knowcat.finetune.finetune`` own their whole output folder: a model
    at any depth inside it is refused, before anything is written."""
    from knowcat.errors import UsageError
    from knowcat.finetune import FinetuneConfig, finetune

    out = tmp_path / "F"
    model = fake_model(out / nesting)
    before = folder_digest(out)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "prompt": "Q?", "completion": "A", "category": "Unknown"}])
    rc, _, err = run_cli(["finetune", "--model", model, "--train", train, "--out", out, "--epochs", 1], capsys)
    assert_one_line_error(rc, err, "model folder")
    with pytest.raises(UsageError, match="model folder"):
        finetune(str(model), [{"id": "1", "prompt": "Q?", "completion": "A"}], {}, out, FinetuneConfig(epochs=1),
                 log=lambda *a: None, progress=False)
    assert folder_digest(out) == before


def test_pretrain_checkpoint_is_not_unpickled(tmp_path):
    """A crafted ``pretrain_checkpoint/state.pt`` ran code with ``weights_only=False``."""
    from knowcat.world.build import PRESETS, build_world
    from knowcat.world.pretrain import PretrainConfig, pretrain

    world = tmp_path / "w"
    build_world(world, PRESETS["quick"], log=lambda *a: None)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (world / "pretrain_checkpoint").mkdir()
    torch.save({"config": Payload()}, world / "pretrain_checkpoint" / "state.pt")
    tiny = PretrainConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                          block_size=128, batch_size=16, epochs=1)
    with pytest.raises(pickle.UnpicklingError):
        pretrain(world, tmp_path / "m", tiny, log=lambda *a: None, progress=False)
    assert not marker.exists()


def test_no_unpickling_anywhere_in_the_code():
    """Every checkpoint is read as safetensors or with ``torch.load(weights_only=True)``."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for p in list(root.glob("knowcat/**/*.py")) + list(root.glob("probes/**/*.py")) + list(root.glob("reports/**/*.py")) \
            + list(root.glob("linear_models/**/*.py")):
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{p}: {m.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M) and p.name != "cli.py":
            bad.append(f"{p}: imports a pickle library")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# 2. every format round-trips

MIXED = [
    {"id": "a", "question": "Q1?", "answers": ["x", "y"], "relation": "R", "score": 1, "tags": ["t"],
     "extra": {"k": 1}, "note": None},
    {"id": "b", "question": "Q2?", "answers": ["z"], "relation": "R", "score": "high", "tags": [],
     "extra": {"other": [1, "two"]}, "note": "n"},
    {"id": "c", "question": "Q3?", "answers": ["w"], "relation": "S", "score": 2.5, "tags": ["u", "v"],
     "extra": None, "note": True},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_read_round_trip_with_mixed_types(tmp_path, suffix):
    """A metadata field with a number in one record and text in another crashed the Parquet writer
    (categorize's last step, after every generation)."""
    from knowcat.filtering import read_records, write_records

    path = tmp_path / f"r{suffix}"
    write_records(path, MIXED)
    assert read_records(path) == MIXED


def test_csv_round_trip_lists_as_json(tmp_path):
    """``knowcat filter`` to .csv wrote answer lists as Python repr, which knowcat's loader refused."""
    from knowcat.filtering import read_records, write_records
    from knowcat.loaders import load_records

    path = tmp_path / "r.csv"
    write_records(path, MIXED)
    back = read_records(path)
    for orig, got in zip(MIXED, back):
        for k in ("id", "question", "answers", "relation", "tags", "extra"):
            assert got[k] == (orig[k] if orig[k] is not None else ""), k
    ex = load_records(path)
    assert [e.answers for e in ex] == [r["answers"] for r in MIXED]
    assert "['x', 'y']" not in path.read_text()


def test_nan_is_never_written_as_json(tmp_path):
    from knowcat.filtering import write_records

    path = tmp_path / "r.jsonl"
    write_records(path, [{"id": "a", "v": float("nan"), "w": [float("inf")]}])
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"id": "a", "v": None, "w": [None]}


def test_nan_in_json_input_is_a_bad_record(tmp_path):
    from knowcat.loaders import load_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q?", "answers": ["a"], "score": NaN}\n')
    with pytest.raises(DataError, match="NaN"):
        load_records(path)


def test_short_csv_row_is_a_bad_record(tmp_path):
    """A CSV row with missing cells became "" or NaN."""
    from knowcat.loaders import load_records, read_rejects

    path = tmp_path / "d.csv"
    path.write_text("question,answers,source\nq1?,a1,s1\nq2?,a2\nq3?,a3,s3\n")
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert ei.value.record == 1 and ei.value.field == "source"
    out = load_records(path, on_error="skip", rejects=tmp_path / "rej.jsonl")
    assert [e.question for e in out] == ["q1?", "q3?"]
    rej = read_rejects(tmp_path / "rej.jsonl")
    assert [(r["record"], r["field"]) for r in rej] == [(1, "source")]


def test_skip_without_rejects_writes_a_default_rejects_file(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q?", "answers": ["a"]}) + "\n" + '{"question": 3}\n')
    rc, out, err = run_cli(["data", data, "--on-error", "skip", "--out", tmp_path / "clean.jsonl"], capsys)
    assert rc == 0, err
    rej = tmp_path / "clean.rejects.jsonl"
    assert rej.exists() and str(rej) in out
    assert len(rej.read_text().splitlines()) == 1
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("content", ["", "\n\n", "[]", "question,answers\n"])
def test_empty_input_file_is_a_clear_error(tmp_path, capsys, content):
    suffix = ".csv" if content.startswith("question") else (".json" if content == "[]" else ".jsonl")
    data = tmp_path / f"d{suffix}"
    data.write_text(content)
    rc, _, err = run_cli(["data", data, "--out", tmp_path / "o.jsonl"], capsys)
    assert_one_line_error(rc, err, str(data))
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 3. one error path


def _misuse_cases(tmp_path):
    model = fake_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows())
    out = tmp_path / "run"
    cat = ["categorize", "--model", model, data, "--out", out]
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = fake_model(tmp_path / "corrupt")
    (corrupt / "config.json").write_text("{not json")
    truncated = fake_model(tmp_path / "truncated")
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[:-8])
    incomplete = fake_model(tmp_path / "incomplete", shards=True)
    no_weights = fake_model(tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    eq = tmp_path / "eq"
    (eq / "dev").mkdir(parents=True)
    (eq / "relation_query_templates.json").write_text(json.dumps({"P1": "Where is [X]?"}))
    (eq / "dev" / "P1.dev.json").write_text(json.dumps([{"question": "Where is a?", "answers": ["b"]}]))
    cats = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answers": ["a"], "category": "Unknown"}])
    return {
        "n-prompts 0": (cat + ["--n-prompts", 0], "--n-prompts"),
        "k beyond the dev set": (cat + ["--k", 5], "--k 5"),
        "negative temperature": (cat + ["--temperature", -1], "temperature"),
        "negative top-k": (cat + ["--top-k", -3], "--top-k"),
        "shard-size 0": (cat + ["--shard-size", 0], "--shard-size"),
        "per-relation 0": (cat + ["--per-relation", 0], "--per-relation"),
        "alpha above 1": (cat + ["--alpha", 2], "--alpha"),
        "alpha nan": (cat + ["--alpha", "nan"], "--alpha"),
        "unknown format": (["data", data, "--format", "xml", "--out", tmp_path / "o.jsonl"], "xml"),
        "unknown dtype": (cat + ["--dtype", "int3"], "--dtype"),
        "missing model folder": (["categorize", "--model", tmp_path / "nope", data, "--out", out], "does not exist"),
        "empty model folder": (["categorize", "--model", empty, data, "--out", out], "empty"),
        "corrupt config": (["categorize", "--model", corrupt, data, "--out", out], "config.json"),
        "truncated weights": (["categorize", "--model", truncated, data, "--out", out], "corrupt"),
        "missing shard": (["categorize", "--model", incomplete, data, "--out", out], "incomplete"),
        "no weights": (["categorize", "--model", no_weights, data, "--out", out], "no weights"),
        "empty data folder": (["data", empty, "--out", tmp_path / "o.jsonl"], "empty"),
        "missing data": (["data", tmp_path / "nothing.jsonl", "--out", tmp_path / "o.jsonl"], "nothing.jsonl"),
        "entityquestions --split bad": (["data", eq, "--split", "validation", "--out", tmp_path / "o.jsonl"], "--split"),
        "entityquestions --field": (["data", eq, "--field", "question=q", "--out", tmp_path / "o.jsonl"], "--field"),
        "entityquestions --relation": (["data", eq, "--relation", "P1", "--out", tmp_path / "o.jsonl"], "--relation"),
        "bad --field": (["data", data, "--field", "question", "--out", tmp_path / "o.jsonl"], "--field"),
        "unknown --field key": (["data", data, "--field", "nope=q", "--out", tmp_path / "o.jsonl"], "--field"),
        "filter missing input": (["filter", tmp_path / "none.jsonl", "--out", tmp_path / "k.jsonl"], "none.jsonl"),
        "filter bad suffix": (["filter", cats, "--out", tmp_path / "k.txt"], ".txt"),
        "filter input suffix": (["filter", tmp_path / "x.tsv", "--out", tmp_path / "k.jsonl"], ".tsv"),
        "filter unknown category": (["filter", cats, "--keep", "Known", "--out", tmp_path / "k.jsonl"], "Known"),
        "filter cap 0": (["filter", cats, "--cap-per-relation", 0, "--out", tmp_path / "k.jsonl"], "cap-per-relation"),
        "filter over its input": (["filter", cats, "--out", cats], "input"),
        "mixtures bad percents": (["mixtures", cats, "--unknown-percents", "a,b"], "--unknown-percents"),
        "report of nothing": (["report", tmp_path / "no-run"], "no-run"),
        "bad flag": (cat + ["--bogus"], "--bogus"),
    }


def test_every_misuse_is_one_line_exit_2(tmp_path, capsys):
    for name, (argv, word) in _misuse_cases(tmp_path).items():
        try:
            rc, _, err = run_cli(argv, capsys)
        except BaseException as e:  # noqa: BLE001 - a crash is what this test looks for
            pytest.fail(f"{name}: {type(e).__name__}: {e}")
        assert rc == 2, (name, err)
        assert "Traceback" not in err, name
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (name, err)
        assert word in lines[0], (name, word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing written before the arguments were checked


def test_entityquestions_split_selects_splits(tmp_path, capsys):
    eq = tmp_path / "eq"
    for split in ("train", "dev"):
        (eq / split).mkdir(parents=True)
        (eq / split / f"P1.{split}.json").write_text(json.dumps([{"question": f"Where is {split}?", "answers": ["b"]}]))
    (eq / "relation_query_templates.json").write_text(json.dumps({"P1": "Where is [X]?"}))
    rc, _, err = run_cli(["data", eq, "--split", "dev", "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 0, err
    assert [json.loads(line)["split"] for line in (tmp_path / "o.jsonl").read_text().splitlines()] == ["dev"]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(DataError):
        main(["--debug", "data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")])


def test_subprocess_error_has_no_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "knowcat", "categorize", "--model", str(tmp_path / "nope"),
                        str(tmp_path), "--out", str(tmp_path / "r"), "--shard-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------------------------------------
# 4. report


def test_mathtext_relation_name_does_not_crash_the_report():
    from reports import figures as F

    html = F.category_bars({"$\\foo{$": {"HighlyKnown": 1, "Unknown": 2}, "a$b$c": {"MaybeKnown": 1}})
    assert "<figure" in html


def test_rerun_command_has_every_flag_and_quotes_paths(tmp_path):
    from dataclasses import asdict

    from knowcat.cli import build_parser
    from knowcat.slick import SliCKConfig
    from reports.build import _rerun_command

    proto = asdict(SliCKConfig(n_prompts=3, exact=True, exemplar_split="my dev", alpha=0.1))
    cfg = {"protocol": proto, "model": str(tmp_path / "my model"), "data": str(tmp_path / "data; rm -rf x.jsonl"),
           "shard_size": 7, "backend": "transformers"}
    cmd = _rerun_command(tmp_path / "my run", None, cfg)
    argv = shlex.split(cmd)
    assert argv[:2] == ["knowcat", "categorize"]
    args = build_parser().parse_args(argv[1:])
    assert args.model == cfg["model"] and args.data == cfg["data"] and args.out == str(tmp_path / "my run")
    assert args.shard_size == 7
    for k, v in proto.items():
        assert getattr(args, k) == v, k


def test_rerun_command_repeats_the_options_knowcat_categorize_was_given(tmp_path, capsys, tiny_model_dir, tiny_qa):
    """The report's rerun command left out --splits, --per-relation, --field, --exemplars and the rest of
    what a categorize run was asked with beyond its identity; now each is recorded and repeated, quoted."""
    from knowcat.cli import build_parser
    from knowcat.rundir import RunDir
    from reports.build import _rerun_command

    exs, pool = tiny_qa
    rows = [{"uid": e.id, "q": e.question, "answers": e.answers, "relation": e.relation, "split": e.split}
            for e in exs + pool]
    data = write_jsonl(tmp_path / "my data.jsonl", rows)
    ex_file = write_jsonl(tmp_path / "ex; ls.jsonl", rows[len(exs):])
    run = tmp_path / "my run"
    argv = ["categorize", "--model", tiny_model_dir, data, "--out", run, "--field", "id=uid", "--field", "question=q",
            "--splits", "train", "--per-relation", 2, "--exemplars", ex_file, "--n-prompts", 2, "--n-samples", 1,
            "--k", 2, "--max-new-tokens", 4, "--batch-size", 8, "--no-progress"]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    rd = RunDir(run)
    cmd = _rerun_command(run, None, rd.read_categorize_config(), rd.read_categorize_command())
    again = build_parser().parse_args(shlex.split(cmd)[1:])
    given = build_parser().parse_args([str(a) for a in argv])
    for k, v in vars(given).items():
        if k in ("func", "no_progress") or v is None:  # None: the default, which the protocol records as a value
            continue
        want = str(ex_file.resolve()) if k == "exemplars" else str(data.resolve()) if k == "data" else v
        assert getattr(again, k) == want, (k, getattr(again, k), want)


def test_run_surrogates_refuses_a_model_inside_surrogates(tmp_path):
    from knowcat.errors import UsageError
    from knowcat.surrogate import run_surrogates

    run = _categorized_run(tmp_path / "run")
    model = fake_model(run / "surrogates" / "m")
    before = folder_digest(run)
    with pytest.raises(UsageError, match="model folder"):
        run_surrogates(run, str(model), log=lambda *a: None, progress=False)
    assert folder_digest(run) == before
