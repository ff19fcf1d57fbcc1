"""The probes work on Llama-, Qwen-, Mistral- and GPT-2-style transformers models (tiny random
ones built from their configs: no download), for generation, readout states and Jacobians."""

import pytest
import torch

from probes.generation import PromptRequest, generate
from probes.jacobians import (answer_jacobian, answer_operators, answer_system, decoder_layers, layer_jacobian,
                              subject_position)


def _tiny(kind: str, vocab: int):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif kind.startswith("mistral_window_"):  # Mistral-7B's own config has a 4,096-position sliding window
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=int(kind.rsplit("_", 1)[1])))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    return m.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "mistral_window_4096", "gpt2"])
def test_probes_on_architecture(kind, quick_model):
    _, tok = quick_model
    model = _tiny(kind, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    assert len(decoder_layers(model)) == 2
    prompt = "Q: Where was Kel Mar born?\nA:"
    # generation through the shared-prefix engine equals step-by-step greedy decoding
    out = generate(model, tok, [PromptRequest("a", "Q: Where", " was Kel Mar born?\nA:")], max_new_tokens=5)
    ids = tok(prompt)["input_ids"]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    from probes.generation import decode_answer

    assert out["a"].greedy == decode_answer(tok, ref[0, len(ids):].tolist())
    # Jacobians: the dense matrix agrees with the products
    end = tok("\n", add_special_tokens=False)["input_ids"][-1]
    sysm = answer_system(model, tok, prompt, "Vorma Rusk", end)
    J = answer_jacobian(model, sysm)
    mv, rmv = answer_operators(model, sysm)
    V = torch.randn(J.shape[1], 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mv(V), J @ V, atol=1e-4, rtol=1e-3)
    assert torch.allclose(rmv(V), J.T @ V, atol=1e-4, rtol=1e-3)
    pos = subject_position(tok, prompt, "Kel Mar")
    W = layer_jacobian(model, tok, prompt, pos, 0)  # block 1 is the last: its subject state cannot reach the readout
    assert W.shape == (32, 32) and torch.isfinite(W).all() and W.abs().sum() > 0


@pytest.mark.parametrize("window", [4096, 12])
def test_generation_with_a_sliding_window(window, quick_model):
    """A sliding window longer than prompt and answer is full attention: batched generation equals
    ``model.generate``; one shorter than them is refused with a clear error, never answered wrong."""
    _, tok = quick_model
    model = _tiny(f"mistral_window_{window}", len(tok))
    model.config.pad_token_id = tok.pad_token_id
    reqs = [PromptRequest("a", "Q: Where", " was Kel Mar born?\nA:"), PromptRequest("b", "Q: Where", " is Oslo?\nA:")]
    if window < 20:
        with pytest.raises(NotImplementedError, match="sliding attention window"):
            generate(model, tok, reqs, max_new_tokens=5)
        return
    out = generate(model, tok, reqs, max_new_tokens=5)
    from probes.generation import decode_answer

    for r in reqs:
        ids = tok(r.prefix + r.suffix)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out[r.key].greedy == decode_answer(tok, ref[0, len(ids):].tolist())
