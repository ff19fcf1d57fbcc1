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
