"""Pretraining: deterministic, resumable to the same weights, saved like any hub model."""

import json

import pytest
import torch

from knowcat.world.build import PRESETS, build_world
from knowcat.world.pretrain import PretrainConfig, pretrain

TINY = PretrainConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      block_size=128, batch_size=16, epochs=1, checkpoint_every=4)


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("qw")
    build_world(out, PRESETS["quick"], log=lambda *a: None)
    return out


def _weights(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_resume_gives_the_uninterrupted_weights(quick_world, tmp_path):
    quiet = dict(log=lambda *a: None, progress=False)
    whole = pretrain(quick_world, tmp_path / "whole", TINY, **quiet)
    assert pretrain(quick_world, tmp_path / "resumed", TINY, stop_after=6, **quiet) is None
    assert (quick_world / "pretrain_checkpoint" / "state.pt").exists()
    assert not (tmp_path / "resumed" / "config.json").exists()
    pretrain(quick_world, tmp_path / "resumed", TINY, **quiet)
    a, b = _weights(whole), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = json.loads((tmp_path / "resumed" / "knowcat_pretrain.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, len(hist) + 1))


def test_saved_model_loads_like_a_hub_model(quick_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pretrain(quick_world, tmp_path / "m", TINY, log=lambda *a: None, progress=False)
    assert (folder / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama"
    ids = tok("Q: Where was Tom born?\nA:", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    assert tok.decode(tok("Q: x\nA: y\n", add_special_tokens=False)["input_ids"]) == "Q: x\nA: y\n"
