"""The Jacobian probes hand the prompt's KV cache to the model through the keyword transformers recommends
(``cache``; ``past_key_values`` only for a forward that predates it): no deprecation warning, on Llama-, Qwen-,
Mistral- and GPT-2-style models (tiny random ones, no quick demo needed)."""

import warnings

import pytest
import torch

from probes.jacobians import (answer_jacobian, answer_operators, answer_system, capture_prenorm, layer_jacobian,
                              subject_position)


def _tiny(kind: str, tok):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    from probes.loading import MODEL_BUILD_LOCK

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with MODEL_BUILD_LOCK:
        m = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
             "mistral": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=None)),
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=256))}[kind]()
    m.config.pad_token_id = tok.pad_token_id
    return m.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_jacobians_with_a_cache_raise_no_deprecation_warning(kind, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _tiny(kind, tok)
    prompt = "Q: Where was Kel Mar born?\nA:"
    end = tok("\n", add_special_tokens=False)["input_ids"][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        sysm = answer_system(model, tok, prompt, "Vorma Rusk", end)  # prompt encoded once, answer on its cache
        J = answer_jacobian(model, sysm)  # the cache expanded to a batch
        mv, _ = answer_operators(model, sysm)
        pos = subject_position(tok, prompt, "Kel Mar")
        W = layer_jacobian(model, tok, prompt, pos, 0)  # the tokens before the subject as a cache
    # the cache was used: the answer's states equal those of one uncached pass over prompt and answer
    P, m = sysm.prompt_len, len(sysm.answer_ids)
    full = tok(prompt, add_special_tokens=True)["input_ids"] + sysm.answer_ids
    with capture_prenorm(model) as pre:
        model(input_ids=torch.tensor([full]))
    assert torch.allclose(sysm.prenorm, pre[-1][0, P - 1:P + m], atol=1e-5, rtol=1e-4)
    V = torch.randn(J.shape[1], 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mv(V), J @ V, atol=1e-4, rtol=1e-3)
    assert W.shape == (32, 32) and torch.isfinite(W).all() and W.abs().sum() > 0
