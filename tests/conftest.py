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


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The quick demo run, once per test session: world, model, greedy evaluation."""
    from knowcat.demo import run_demo

    run = tmp_path_factory.mktemp("quick_demo")
    summary = run_demo(run, preset="quick", device="cpu", progress=False, log=lambda *a: None)
    return run, summary


@pytest.fixture(scope="session")
def quick_model(quick_demo):
    from probes.loading import load_model

    run, _ = quick_demo
    return load_model(str(run / "model"), device="cpu")


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
