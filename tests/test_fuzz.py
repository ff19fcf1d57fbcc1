"""Fuzz: malformed records, files and arguments through the loaders, ``knowcat filter`` and the CLI.

For every case: a clear error (exit code 2 and one line naming the file, record or field; or a
:class:`DataError` from the Python API) or a reject with its reason, with in = out + rejects, and
no traceback. The counts (cases, clear errors, rejects, crashes) are printed at the end (run with
``-s`` to see them) and the test fails on any crash.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from knowcat.cli import main
from knowcat.errors import DataError
from knowcat.loaders import load_records, read_rejects

GOOD = {"question": "Where was Ann born?", "answers": ["Paris"], "relation": "P19", "split": "train"}


def _bad_record_mutations():
    """(name, record or raw line bytes, expected 'bad' or 'ok')."""
    g = dict(GOOD)
    muts = []

    def rec(name, d, exp):
        muts.append((name, json.dumps(d, ensure_ascii=False).encode("utf-8"), exp))

    def raw(name, b, exp):
        muts.append((name, b, exp))

    for v in (None, 3, 2.5, True, [], ["q?"], {"q": 1}, "", "   ", "\u200b" * 0):
        rec(f"question={v!r}", {**g, "question": v}, "bad")
    rec("question missing", {k: v for k, v in g.items() if k != "question"}, "bad")
    for v in (None, [], [""], ["  "], [3], [None], [["a"]], {"a": 1}, 3, True, [{"x": 1}]):
        rec(f"answers={v!r}", {**g, "answers": v}, "bad")
    rec("answers missing", {k: v for k, v in g.items() if k != "answers"}, "bad")
    rec("answers a string", {**g, "answers": "Paris"}, "ok")
    for v in (1.5, [1], {"a": 1}, True):
        rec(f"id={v!r}", {**g, "id": v}, "bad")
    rec("id integer", {**g, "id": 7}, "ok")
    for v in (3, ["P19"], {"r": 1}):
        rec(f"relation={v!r}", {**g, "relation": v}, "bad")
    rec("split a number", {**g, "split": 1}, "bad")
    rec("nested nulls in metadata", {**g, "meta": {"a": None, "b": [None, {"c": None}]}}, "ok")
    rec("unicode everywhere", {**g, "question": "Où est né Ünal? 東京", "answers": ["Zürich"]}, "ok")
    rec("empty metadata object", {**g, "meta": {}}, "ok")
    rec("metadata deep", {**g, "meta": json.loads("[" * 200 + "]" * 200)}, "ok")
    raw("not an object: list", b'["Where?", ["Paris"]]', "bad")
    raw("not an object: string", b'"Where?"', "bad")
    raw("not an object: number", b"42", "bad")
    raw("null record", b"null", "bad")
    raw("truncated JSON", b'{"question": "Where?", "answers": ["Par', "bad")
    raw("trailing comma", b'{"question": "Where?", "answers": ["Paris"],}', "bad")
    raw("single quotes", b"{'question': 'Where?', 'answers': ['Paris']}", "bad")
    raw("NaN constant", b'{"question": "Where?", "answers": ["Paris"], "score": NaN}', "bad")
    raw("Infinity constant", b'{"question": "Where?", "answers": ["Paris"], "score": -Infinity}', "bad")
    raw("invalid UTF-8 in question", b'{"question": "Wh\xffere?", "answers": ["Paris"]}', "bad")
    raw("invalid UTF-8 in metadata", b'{"question": "Where?", "answers": ["Paris"], "m": "caf\xe9"}', "bad")
    raw("invalid UTF-8 in a key", b'{"question": "Where?", "answers": ["Paris"], "k\xfe": 1}', "bad")
    raw("lone surrogate escape", b'{"question": "Where\\ud800?", "answers": ["Paris"]}', "bad")
    raw("deep nesting", b'{"question": "Where?", "answers": ["Paris"], "m": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        "bad")
    raw("huge line", b'{"question": "' + b"x" * (1 << 20) + b'?", "answers": ["Paris"]}', "bad")
    raw("duplicate keys (last wins)", b'{"question": "A?", "question": "B?", "answers": ["Paris"]}', "ok")
    raw("control characters", b'{"question": "Wh\\u0000ere?\\t", "answers": ["Pa\\u0007ris"]}', "ok")
    return muts


def fake_model(folder):
    """A folder that looks like a saved model; every case here is refused before it would load."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {}}}))
    return folder


def _ctx():
    return Counter(), []


def _load_case(path, counts, failures, name, expect_bad: int, n_in: int, fmt=None):
    """Load ``path`` in raise mode and in skip mode; check the outcome."""
    counts["cases"] += 1
    try:
        load_records(path, format=fmt)
        if expect_bad:
            failures.append(f"{name}: raise mode accepted a bad record")
    except DataError as e:
        counts["clear errors"] += 1
        if str(path) not in str(e):
            failures.append(f"{name}: error does not name the file: {e}")
        if "\n" in str(e):
            failures.append(f"{name}: error is not one line: {e!r}")
    except Exception as e:  # noqa: BLE001
        counts["crashes"] += 1
        failures.append(f"{name}: raise mode crashed: {type(e).__name__}: {e}")
    counts["cases"] += 1
    rej_dir = path.parent / "rejects"
    rej_dir.mkdir(exist_ok=True)
    rej_path = rej_dir / (path.name + ".rejects.jsonl")
    try:
        out = load_records(path, format=fmt, on_error="skip", rejects=rej_path)
    except DataError as e:  # a file-level error (nothing readable) is still a clear error
        counts["clear errors"] += 1
        if str(path) not in str(e):
            failures.append(f"{name}: skip-mode error does not name the file: {e}")
        return
    except Exception as e:  # noqa: BLE001
        counts["crashes"] += 1
        failures.append(f"{name}: skip mode crashed: {type(e).__name__}: {e}")
        return
    rej = read_rejects(rej_path)
    counts["rejects"] += len(rej)
    if any(not r.get("reason") for r in rej):
        failures.append(f"{name}: a reject without a reason")
    if n_in is not None and len(out) + len(rej) != n_in:
        failures.append(f"{name}: in {n_in} != out {len(out)} + rejects {len(rej)}")
    if len(rej) != expect_bad and n_in is not None:
        failures.append(f"{name}: expected {expect_bad} rejects, got {len(rej)}: {[r['reason'] for r in rej]}")


def _jsonl_cases(tmp: Path, counts, failures, rng):
    muts = _bad_record_mutations()
    good_line = json.dumps(GOOD).encode()
    for i, (name, line, exp) in enumerate(muts):
        # the mutated record between good ones, at a random place
        n_good = rng.randint(1, 4)
        pos = rng.randint(0, n_good)
        lines = [json.dumps({**GOOD, "question": f"Where was person {j} born?"}).encode() for j in range(n_good)]
        lines.insert(pos, line)
        path = tmp / f"j{i}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        _load_case(path, counts, failures, f"jsonl {name}", 1 if exp == "bad" else 0, n_good + 1)
        # the same record alone in a JSON list (raw lines that are not JSON make the list unreadable)
        if not line.startswith(b'{"question": "Where?", "answers": ["Par') and exp in ("bad", "ok") and b"\xff" not in line:
            path = tmp / f"j{i}.json"
            path.write_bytes(b"[" + good_line + b",\n" + line + b"]")
            try:
                json.loads(path.read_bytes())
                parses = True
            except (ValueError, RecursionError):
                parses = False
            if parses:
                _load_case(path, counts, failures, f"json {name}", 1 if exp == "bad" else 0, 2)
    # a BOM, CRLF line ends and blank lines are fine
    path = tmp / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good_line + b"\r\n\r\n" + json.dumps({**GOOD, "question": "B?"}).encode() + b"\r\n")
    _load_case(path, counts, failures, "jsonl BOM + CRLF", 0, 2)
    # duplicate ids
    path = tmp / "dup.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "id": "x", "question": f"Q{j}?"}) + "\n" for j in range(3)))
    _load_case(path, counts, failures, "jsonl duplicate ids", 2, 3)


CSV_CASES = [
    ("short row", "question,answers,source\nq1?,a,s\nq2?,a\n", 1, 2),
    ("long row", "question,answers\nq1?,a\nq2?,a,extra\n", 1, 2),
    ("empty question cell", "question,answers\n,a\nq2?,a\n", 1, 2),
    ("empty answers cell", "question,answers\nq1?,\nq2?,a\n", 1, 2),
    ("bad JSON list cell", 'question,answers\nq1?,"[""a"", b]"\nq2?,a\n', 1, 2),
    ("JSON list cell", 'question,answers\nq1?,"[""a"", ""b""]"\n', 0, 1),
    ("empty JSON list cell", "question,answers\nq1?,[]\nq2?,a\n", 1, 2),
    ("quoted newline", 'question,answers\n"q1\nstill q1?",a\n', 0, 1),
    ("BOM and CRLF", "\ufeffquestion,answers\r\nq1?,a\r\nq2?,b\r\n", 0, 2),
    ("blank lines", "question,answers\n\nq1?,a\n\n", 0, 1),
    ("non-UTF-8 cell", b"question,answers\nq1\xff?,a\nq2?,b\n", 1, 2),
    ("unbalanced quote", 'question,answers\nq1?,a\n"q2?,b\n', 1, None),
    ("duplicate header", "question,answers,answers\nq1?,a,b\n", 1, None),
    ("header only", "question,answers\n", 1, None),
    ("no question column", "prompt,answers\nq1?,a\n", 1, 1),
    ("whitespace header", " , \n", 1, None),
]


def _csv_cases(tmp: Path, counts, failures):
    for i, (name, text, n_bad, n_in) in enumerate(CSV_CASES):
        path = tmp / f"c{i}.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        _load_case(path, counts, failures, f"csv {name}", n_bad, n_in)


def _parquet_cases(tmp: Path, counts, failures):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = [
        ("null question", {"question": ["a?", None], "answers": [["x"], ["y"]]}, 1, 2),
        ("empty answers list", {"question": ["a?", "b?"], "answers": [["x"], []]}, 1, 2),
        ("answers numbers", {"question": ["a?", "b?"], "answers": [1, 2]}, 2, 2),
        ("NaN metadata", {"question": ["a?"], "answers": [["x"]], "score": [float("nan")]}, 0, 1),
        ("timestamp metadata", {"question": ["a?"], "answers": [["x"]],
                                "when": pa.array([0], type=pa.timestamp("s"))}, 0, 1),
        ("binary metadata", {"question": ["a?"], "answers": [["x"]], "blob": [b"\xff\x00"]}, 1, 1),
        ("struct with nulls", {"question": ["a?", "b?"], "answers": [["x"], ["y"]],
                               "m": [{"a": 1, "b": None}, None]}, 0, 2),
    ]
    for i, (name, cols, n_bad, n_in) in enumerate(cases):
        path = tmp / f"p{i}.parquet"
        pq.write_table(pa.table(cols), path)
        _load_case(path, counts, failures, f"parquet {name}", n_bad, n_in)


def _file_cases(tmp: Path, counts, failures):
    files = {
        "empty.jsonl": b"", "spaces.jsonl": b"  \n\n ", "empty.json": b"", "list.json": b"[]",
        "object.json": b'{"question": "a?"', "binary.parquet": bytes(range(256)), "empty.csv": b"",
        "garbage.jsonl": bytes(range(256)) * 4, "bom-only.jsonl": b"\xef\xbb\xbf",
    }
    for name, data in files.items():
        path = tmp / name
        path.write_bytes(data)
        _load_case(path, counts, failures, f"file {name}", 1, None)
    d = tmp / "a-folder.jsonl"
    d.mkdir()
    _load_case(d, counts, failures, "a folder named .jsonl", 1, None, fmt="jsonl")
    _load_case(tmp / "missing.jsonl", counts, failures, "a missing file", 1, None)


def _cli_case(argv, counts, failures, name, expect_rc=(2,), check=None):
    counts["cases"] += 1
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001
        counts["crashes"] += 1
        failures.append(f"cli {name}: {type(e).__name__}: {e}")
        return None
    e = err.getvalue()
    if "Traceback" in e:
        counts["crashes"] += 1
        failures.append(f"cli {name}: traceback")
    if rc not in expect_rc:
        failures.append(f"cli {name}: exit code {rc}: {e.strip()}")
    if rc == 2:
        counts["clear errors"] += 1
        lines = [line for line in e.splitlines() if line.strip()]
        if len(lines) != 1:
            failures.append(f"cli {name}: {len(lines)} lines on stderr: {e!r}")
    if check is not None:
        msg = check(out.getvalue(), e)
        if msg:
            failures.append(f"cli {name}: {msg}")
    return rc


def _cli_cases(tmp: Path, counts, failures, rng):
    model = fake_model(tmp / "model")
    data = tmp / "data.jsonl"
    rows = [{**GOOD, "question": f"Q{j}?", "split": "dev" if j < 6 else "train"} for j in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["categorize", "--model", model, data, "--out", tmp / "run"]
    bad_values = {
        "--n-prompts": ["0", "-1", "x"], "--k": ["0", "-2", "100", "1.5"], "--n-samples": ["-1", "nan"],
        "--temperature": ["0", "-0.5", "nan", "inf", "1e999", "hot"], "--top-k": ["0", "-40"],
        "--max-new-tokens": ["0"], "--alpha": ["0", "1", "-0.1", "nan", "5"], "--shard-size": ["0", "-5"],
        "--per-relation": ["0", "-1"], "--batch-size": ["0"], "--match": ["fuzzy"], "--device": ["tpu9", "cuda:x"],
        "--dtype": ["int4"], "--backend": ["torch"], "--format": ["xml", "EQQ"], "--on-error": ["ignore"],
        "--ray-workers": ["0"], "--tensor-parallel-size": ["0"], "--data-parallel-size": ["-1"],
        "--field": ["question", "nope=q", "=q"], "--seed": ["x"],
    }
    for flag, vals in bad_values.items():
        for v in vals:
            _cli_case(base + [flag, v], counts, failures, f"categorize {flag} {v}")
    ft = ["finetune", "--model", model, "--train", data, "--out", tmp / "ft"]
    for flag, v in (("--epochs", "0"), ("--lr", "0"), ("--lr", "-1"), ("--batch-size", "0"), ("--warmup-ratio", "2"),
                    ("--lora-dropout", "1.5"), ("--lora-r", "0"), ("--max-new-tokens", "0")):
        _cli_case(ft + [flag, v], counts, failures, f"finetune {flag} {v}")
    # the output in the model folder, in every spelling
    for name, out in (("out = model", model), ("out inside model", model / "x"),
                      ("out via ..", tmp / "model" / ".." / "model"), ("out holds model", tmp)):
        _cli_case(["finetune", "--model", model, "--train", data, "--out", out], counts, failures, f"finetune {name}")
    # the data command over every malformed file: skip mode keeps in = out + rejects
    for src in sorted(tmp.glob("j*.jsonl"))[:40] + sorted(tmp.glob("c*.csv")):
        n_in = None
        if src.suffix == ".jsonl":
            n_in = sum(1 for line in src.read_bytes().split(b"\n") if line.strip())
        outp = tmp / "cli-out" / (src.stem + ".jsonl")

        def check(o, e, outp=outp, n_in=n_in):
            rej = outp.with_name(outp.stem + ".rejects.jsonl")
            if not rej.exists():
                return "skip mode left no rejects file"
            if str(rej) not in o:
                return "skip mode did not say where the rejects are"
            n_out = len(outp.read_text(encoding="utf-8").splitlines()) if outp.exists() else 0
            n_rej = len(rej.read_text(encoding="utf-8").splitlines())
            counts["rejects"] += n_rej
            if n_in is not None and n_out + n_rej != n_in:
                return f"in {n_in} != out {n_out} + rejects {n_rej}"
            return None

        rc = _cli_case(["data", src, "--on-error", "skip", "--out", outp], counts, failures, f"data skip {src.name}",
                       expect_rc=(0, 2), check=lambda o, e, c=check: c(o, e) if "bad input" not in e else None)
        _cli_case(["data", src, "--out", tmp / "cli-out" / "raise.jsonl"], counts, failures, f"data raise {src.name}",
                  expect_rc=(0, 2), check=lambda o, e, s=src: None if not e or s.name in e else f"error without the file: {e}")
        del rc
    # knowcat filter's inputs
    cats = [{"id": str(j), "question": f"Q{j}?", "answers": ["a"], "relation": "R", "category": c}
            for j, c in enumerate(["HighlyKnown", "Unknown", "MaybeKnown", "WeaklyKnown"])]
    bad_cats = {
        "missing category": {k: v for k, v in cats[0].items() if k != "category"},
        "unknown category": {**cats[0], "category": "Known"},
        "category a number": {**cats[0], "category": 3},
        "category a list": {**cats[0], "category": ["Unknown"]},
        "record a list": [1, 2],
        "record null": None,
    }
    for i, (name, rec) in enumerate(bad_cats.items()):
        src = tmp / f"f{i}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in cats + [rec]))
        _cli_case(["filter", src, "--out", tmp / "fo.jsonl"], counts, failures, f"filter {name}",
                  check=lambda o, e, s=src: None if str(s) in e else f"error without the file: {e}")
    src = tmp / "rel-list.jsonl"
    src.write_text("".join(json.dumps({**r, "relation": [r["relation"]]}) + "\n" for r in cats))
    _cli_case(["filter", src, "--cap-per-relation", "1", "--out", tmp / "fo.csv"], counts, failures,
              "filter a list-valued relation with a cap", expect_rc=(0,))
    src = tmp / "no-answers.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answers"}) + "\n" for r in cats))
    _cli_case(["filter", src, "--relabel", "Unknown", "--out", tmp / "fo.jsonl"], counts, failures,
              "filter relabel without answers")
    for ext in ("csv", "parquet", "json"):
        _cli_case(["filter", tmp / f"c0.{ext}" if ext == "csv" else tmp / f"missing.{ext}", "--out",
                   tmp / "fo.jsonl"], counts, failures, f"filter bad {ext}")


def test_fuzz(tmp_path):
    rng = random.Random(20241129)
    counts, failures = _ctx()
    _jsonl_cases(tmp_path, counts, failures, rng)
    _csv_cases(tmp_path, counts, failures)
    _parquet_cases(tmp_path, counts, failures)
    _file_cases(tmp_path, counts, failures)
    _cli_cases(tmp_path, counts, failures, rng)
    summary = {k: counts[k] for k in ("cases", "clear errors", "rejects", "crashes")}
    print(f"\nfuzz: {json.dumps(summary)}")
    (tmp_path / "fuzz_counts.json").write_text(json.dumps(summary))
    assert counts["cases"] > 300
    print("\n".join(failures))
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} failures)"
    assert counts["crashes"] == 0


@pytest.mark.parametrize("argv", [
    ["categorize", "--model", "{tmp}/nope", "{tmp}/d.jsonl", "--out", "{tmp}/r"],
    ["data", "{tmp}/d.jsonl", "--format", "xml", "--out", "{tmp}/o.jsonl"],
    ["filter", "{tmp}/d.jsonl", "--out", "{tmp}/o.jsonl"],
])
def test_fuzz_subprocess(tmp_path, argv):
    """The same error path in a fresh process (entry point, imports, exit code)."""
    (tmp_path / "d.jsonl").write_bytes(b'{"question": "a?", "answers": ["x"]}\n{"question": \xff}\n')
    r = subprocess.run([sys.executable, "-m", "knowcat"] + [a.format(tmp=tmp_path) for a in argv],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
