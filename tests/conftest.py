import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# the real EntityQuestions copy: ../shared/data/entityquestions beside the checkout, or $KNOWCAT_ENTITYQUESTIONS
ENTITYQUESTIONS = Path(os.environ.get("KNOWCAT_ENTITYQUESTIONS") or ROOT.parent / "shared" / "data" / "entityquestions")


# tests that need these fixtures are marked ``slow`` (the quick demo: world, model and study, a few minutes;
# a quick world and a model pretrained on it; the default-size world): ``python -m pytest -m "not slow"``
# runs the rest
SLOW_FIXTURES = frozenset({"quick_demo_cli", "quick_demo", "quick_world", "default_world"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _transformers_patches_restored():
    """Fails a test that leaves transformers' model-building patches in place (``tie_weights`` a no-op, the init
    functions or ``torch.linspace`` replaced, the default dtype changed: tests/transformers_patches.py), which
    would poison every later model load; restores them so that the next test starts clean."""
    from transformers_patches import leftovers, restore, snapshot

    before = snapshot()
    yield
    left = leftovers(before)
    if left:
        restore(before, left)
        pytest.fail("left transformers' model-building patches in place: " + ", ".join(left)
                    + " (build and load models under probes.loading.MODEL_BUILD_LOCK)")


@pytest.fixture(scope="session")
def quick_demo_cli(tmp_path_factory):
    """The quick demo run, once per test session, as a user runs it: ``python -m knowcat demo --preset quick``
    in a subprocess, its terminal output captured. Returns (run dir, summary, stdout + stderr)."""
    import json
    import subprocess
    import sys

    prebuilt = os.environ.get("KNOWCAT_QUICK_DEMO")  # a quick demo run already built: reuse it (read only)
    if prebuilt:
        # its terminal output, if it was kept beside it as terminal.txt (else None: the terminal test skips)
        summary, terminal = Path(prebuilt) / "demo_summary.json", Path(prebuilt) / "terminal.txt"
        return (Path(prebuilt), json.loads(summary.read_text()) if summary.exists() else {},
                terminal.read_text() if terminal.exists() else None)
    run = tmp_path_factory.mktemp("quick_demo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "knowcat", "demo", "--preset", "quick", "--out", str(run),
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=3600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    summary = json.loads((run / "demo_summary.json").read_text())
    return run, summary, r.stdout + r.stderr


@pytest.fixture(scope="session")
def quick_demo(quick_demo_cli):
    """The quick demo run (world, model, categories, study, surrogates): (run dir, summary)."""
    run, summary, _ = quick_demo_cli
    return run, summary


@pytest.fixture(scope="session")
def quick_model(quick_demo):
    from probes.loading import load_model

    run, _ = quick_demo
    return load_model(str(run / "model"), device="cpu")


@pytest.fixture(scope="session")
def quick_split(quick_demo):
    """``(run, train examples, dev examples)`` of the quick demo's world."""
    from knowcat.demo import world_examples

    run, _ = quick_demo
    ex = world_examples(run / "world")
    return run, [e for e in ex if e.split == "train"], [e for e in ex if e.split == "dev"]


def first_per_relation(examples, n: int):
    """The first ``n`` examples of each relation, in input order."""
    seen: dict = {}
    return [e for e in examples if seen.setdefault(e.relation, []).append(e) or len(seen[e.relation]) <= n]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a few lines (no quick demo needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["Q: Where was Kel Mar born?\nA: Vorma Rusk", "Q: Who founded Tessa Lind?\nA: Oren Vale",
             "Answer the following question. What is the capital of Dorn?\nDorn City"] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model(path, tokenizer, seed: int = 0):
    """A randomly initialised two-layer Llama (a few hundred kilobytes) saved with ``tokenizer`` at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny random model folder of this test's own (tests may overwrite its weights)."""
    return save_tiny_model(tmp_path / "tiny_model", tiny_tokenizer)


@pytest.fixture
def tiny_qa():
    """``(examples, exemplar pool)``: 2 relations, 6 questions and 6 dev exemplars each (no model needed)."""
    from knowcat.examples import QAExample

    names = ["Kel Mar", "Oren Vale", "Tessa Lind", "Vorma Rusk", "Dorn", "Ilsa Brek", "Pell Toma", "Rhun Adde",
             "Sorn Kalt", "Wend Ferro", "Yara Mont", "Zeb Hollis"]
    exs, pool = [], []
    for r, (rel, q) in enumerate([("P19", "Where was {} born?"), ("P17", "Which country is {} in?")]):
        for i in range(6):
            exs.append(QAExample(f"{rel}-t{i}", rel, q.format(names[i]), [names[(i + 5 + r) % 12]], split="train"))
            pool.append(QAExample(f"{rel}-d{i}", rel, q.format(names[6 + i]), [names[(i + 1 + r) % 12]], split="dev"))
    return exs, pool
