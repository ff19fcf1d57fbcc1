"""The code's layout rules, checked on the source: one owner of the run directory, names defined once,
the command line free of file writing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("knowcat", "probes", "linear_models", "reports")


def sources():
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            yield p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")


# every file name a run directory holds, as a path would be built from it
RUN_FILES = ("categorize", "categorized.jsonl", "categorized.parquet", "categorize_summary.json", "shards",
             "greedy.jsonl", "exposure_check.json", "demo_summary.json", "mixtures", "manifest.json", "finetune",
             "epochs", "metrics.json", "analysis.json", "surrogates", "tests.json", "baseline.jsonl", "report.html",
             "exposures.jsonl", "world.json", "corpus.jsonl", "replicates", "estimated.jsonl", "calibration",
             "estimate_summary.json", "estimate", "load_rejects.jsonl", "filter", "filter_summary.json", "kept.jsonl",
             "kept.stats.json", "kept.rejects.jsonl", "sft")


def test_only_rundir_builds_run_paths():
    pattern = re.compile(r"/\s*f?[\"'](" + "|".join(re.escape(n) for n in RUN_FILES) + r")[\"']")
    bad = [f"{name}: {m.group(0)}" for name, text in sources() if name != "knowcat/rundir.py"
           for m in pattern.finditer(text)]
    assert not bad, bad


def test_only_rundir_and_the_loaders_parse_jsonl():
    """Run files are parsed by knowcat.rundir; the user's files by the loaders (and the readers of a file the
    user names: a training set, a labels file, a rejects file)."""
    allowed = {"knowcat/rundir.py", "knowcat/examples.py", "knowcat/mixtures.py", "knowcat/estimate.py",
               "knowcat/filtering.py"}
    bad = [name for name, text in sources() if "json.loads(line" in text and name not in allowed
           and not name.startswith("knowcat/loaders/")]
    assert not bad, bad


def test_shared_names_are_defined_once():
    defs = re.compile(r"^(CATEGORIES|KNOWN|CLASSES|UNDETERMINED|PAPER_\w+)\s*=", re.M)
    found = {}
    for name, text in sources():
        for m in defs.finditer(text):
            found.setdefault(m.group(1), []).append(name)
    assert found and all(v == ["linear_models/names.py"] for v in found.values()), found
    literal = re.compile(r"\(\s*\"HighlyKnown\",\s*\"MaybeKnown\",\s*\"WeaklyKnown\"")
    assert [n for n, t in sources() if literal.search(t)] == ["linear_models/names.py"]
    assert not [n for n, t in sources() if n != "linear_models/names.py" and re.search(r"36\.9|0\.24\b|61\.8", t)]


def test_the_command_line_writes_no_file_itself():
    text = (ROOT / "knowcat" / "cli.py").read_text(encoding="utf-8")
    for call in ("atomic_write", "open(", ".write_text(", ".write_bytes(", "json.dump(", "to_parquet("):
        assert call not in text, call


GENERATE_FUNCTIONS = {"generate", "generate_greedy"}


def _imports_generate(text: str) -> list[str]:
    """The generate functions of probes.generation that ``text`` imports or calls by their module path."""
    found = []
    for m in re.finditer(r"from\s+probes\.generation\s+import\s+(\([^)]*\)|[^\n]*)", text):
        names = {n.split(" as ")[0].strip() for n in m.group(1).strip("()").replace("\\\n", " ").split(",")}
        found += sorted(names & GENERATE_FUNCTIONS)
    found += re.findall(r"\bprobes\.generation\.(generate(?:_greedy)?)\b", text)
    found += re.findall(r"from\s+probes\s+import\s+[^\n]*\bgeneration\b", text)
    return found


def test_only_probes_generates_outside_the_engine():
    """Outside probes/, a model answers through the engine (probes.engine.open_engine and its generate), never
    through probes.generation's generate functions."""
    assert _imports_generate("from probes.generation import PromptRequest, generate_greedy\n") == ["generate_greedy"]
    assert _imports_generate("from probes.generation import (\n    PromptRequest,\n    generate,\n)\n") == ["generate"]
    assert _imports_generate("from probes.generation import PromptRequest, decode_answer\n") == []
    bad = {name: _imports_generate(text) for name, text in sources() if not name.startswith("probes/")}
    assert not {k: v for k, v in bad.items() if v}, bad


def _imports_score(text: str) -> list[str]:
    """``score`` imported from probes.scoring, or called by its module path."""
    found = []
    for m in re.finditer(r"from\s+probes\.scoring\s+import\s+(\([^)]*\)|[^\n]*)", text):
        names = {n.split(" as ")[0].strip() for n in m.group(1).strip("()").replace("\\\n", " ").split(",")}
        found += sorted(names & {"score"})
    found += re.findall(r"\bprobes\.scoring\.(score)\(", text)
    return found


def test_only_probes_scores_outside_the_engine():
    """Outside probes/, a model scores continuations through the engine (its ``score``), never through
    probes.scoring.score on a model and tokenizer."""
    assert _imports_score("from probes.scoring import ScoreRequest, score\n") == ["score"]
    assert _imports_score("from probes.scoring import (\n    ScoreRequest,\n    score,\n)\n") == ["score"]
    assert _imports_score("from probes.scoring import ScoreRequest, ScoreStats, split_tokens\n") == []
    bad = {name: _imports_score(text) for name, text in sources() if not name.startswith("probes/")}
    assert not {k: v for k, v in bad.items() if v}, bad


# what reads a model or runs its tokenizer: in probes/ (the surrogates' inputs are probes/surrogate_inputs.py)
MODEL_FACING = {"calls the tokenizer": r"\b(tok|tokenizer)\(", "reads the output embedding": r"\.get_output_embeddings\b",
                "reads the input embedding": r"\.get_input_embeddings\b", "reads the unembedding": r"\bW_U\b",
                "walks the blocks": r"\bdecoder_layers\b", "reads parameters": r"\.weight\b|\.parameters\(",
                "sets gradients": r"\.requires_grad_\(", "asks the device": r"torch\.cuda\.|\.device\b",
                "loads the model itself": r"\bload_model\b", "scores around the engine": r"\bscore\(model\b"}


def _model_facing(text: str) -> list[str]:
    return [what for what, pattern in MODEL_FACING.items() if re.search(pattern, text)]


def test_the_surrogates_orchestrate_and_probes_read_the_model():
    """knowcat/surrogate.py loads data, asks probes for the systems' inputs, lets linear_models classify and
    writes through the run directory: it neither runs the tokenizer nor reads a model's parts."""
    assert _model_facing('ids = tok("\\n", add_special_tokens=False)') == ["calls the tokenizer"]
    assert _model_facing("W_U = model.get_output_embeddings().weight.detach()") == [
        "reads the output embedding", "reads the unembedding", "reads parameters"]
    assert _model_facing("end = answer_end_token(tok)\nst = subject_states(model, tok, prompts)") == []
    text = (ROOT / "knowcat" / "surrogate.py").read_text(encoding="utf-8")
    assert _model_facing(text) == []
    # nowhere in knowcat/ is the output or input embedding read
    bad = [name for name, t in sources() if name.startswith("knowcat/")
           and re.search(r"\.get_(output|input)_embeddings\b|\bW_U\b", t)]
    assert not bad, bad
