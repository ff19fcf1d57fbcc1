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
def quick_demo_cli(tmp_path_factory):
    """The quick demo run, once per test session, as a user runs it: ``python -m knowcat demo --preset quick``
    in a subprocess, its terminal output captured. Returns (run dir, summary, stdout + stderr)."""
    import json
    import subprocess
    import sys

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
