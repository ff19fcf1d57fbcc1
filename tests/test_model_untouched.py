"""The base model folder's files are byte-identical after every README command run against it, with
the outputs beside it (and the refused outputs inside or over it)."""

import hashlib
import json
import shutil

from knowcat.cli import main


def digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_readme_commands_leave_the_model_unchanged(quick_demo, tmp_path, capsys):
    src, _ = quick_demo
    run = tmp_path / "R"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("report.html"))
    model = run / "model"
    before = digest(model)
    mtimes = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    assert before

    # a small dataset from the run's own questions, with a metadata field of mixed types (a number in
    # one record, text in the next): the Parquet output after generation must not fail on it
    rows = [json.loads(line) for line in (run / "categorized.jsonl").read_text().splitlines()]
    # (the categorized file holds the train and test splits: the first three of a relation serve as its dev)
    rels = sorted({r["relation"] for r in rows if r.get("split") == "train"})[:2]
    pick = []
    for rel in rels:
        mine = [r for r in rows if r["relation"] == rel]
        pick += [{**r, "split": "dev"} for r in mine[:3]] + [{**r, "split": "train"} for r in mine[3:5]]
    data = run / "small.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"],
                                        "relation": r["relation"], "split": r["split"],
                                        "extra": i if i % 2 else f"text {i}"}) + "\n" for i, r in enumerate(pick)))
    small = ["--device", "cpu"]

    def ok(argv):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 0, (argv, err)

    def refused(argv):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and "model folder" in err, (argv, err)

    ok(["categorize", "--model", model, data, "--out", run / "again", "--n-prompts", 2, "--n-samples", 2, "--k", 2,
        "--shard-size", 4, "--no-progress", *small])
    from knowcat.filtering import read_records

    assert read_records(run / "again" / "categorized.parquet") == read_records(run / "again" / "categorized.jsonl")
    ok(["greedy", "--model", model, data, "--out", run / "greedy", "--n-prompts", 1, "--k", 2, *small])
    train = sorted((run / "mixtures").glob("*.jsonl"))
    assert train
    ok(["finetune", "--model", model, "--train", train[0], "--test", run / "categorized.jsonl", "--out", run / "ft",
        "--epochs", 1, "--batch-size", 8, "--lr", "1e-3", "--no-progress", *small])
    ok(["surrogate", run, "--model", model, "--no-progress", *small])
    ok(["report", run])
    ok(["filter", run / "categorized.jsonl", "--drop", "Unknown", "--out", run / "kept.csv"])
    # outputs that would write over the model are refused before any work
    refused(["finetune", "--model", model, "--train", train[0], "--out", run, "--epochs", 1, *small])
    refused(["finetune", "--model", model, "--train", train[0], "--out", model / "ft", "--epochs", 1, *small])
    refused(["categorize", "--model", model, data, "--out", model, *small])
    refused(["greedy", "--model", run / "." / "model", data, "--out", run / "model" / ".." / "model", *small])

    assert digest(model) == before
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == mtimes
