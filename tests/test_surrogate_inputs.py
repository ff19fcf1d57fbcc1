"""probes.surrogate_inputs on a tiny random model: the inputs the surrogates' systems are built from."""

import torch

from probes.jacobians import _answer_ids, capture_prenorm, decoder_layers, subject_position
from probes.surrogate_inputs import (answer_end_token, default_subject_layer, first_answer_token, free_memory_bytes,
                                     load_frozen, subject_states)

PROMPTS = ["Q: Where was Kel Mar born?\nA:", "Q: Who founded Tessa Lind?\nA:"]
SUBJECTS = ["Kel Mar", "Tessa Lind"]
ANSWERS = ["Vorma Rusk", "Oren Vale"]


def test_load_frozen_and_memory(tiny_model_dir):
    model, tok = load_frozen(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    assert free_memory_bytes(model) > 0
    assert tok.decode([answer_end_token(tok)]).endswith("\n")


def test_subject_states_agree_with_the_other_surrogates_tokens(tiny_model_dir):
    """The first answer token is the one surrogate (c) forces first, the states are the block's output at the
    subject's last token and the last block's output at the prompt's end, Y the lm_head's rows."""
    model, tok = load_frozen(str(tiny_model_dir), device="cpu")
    n = len(decoder_layers(model))
    assert n == 2 and default_subject_layer(model) == 0  # the middle block, 1, is the last: the one before it
    st = subject_states(model, tok, PROMPTS, SUBJECTS, ANSWERS)
    assert st.layer == default_subject_layer(model)
    assert st.positions == [subject_position(tok, p, s) for p, s in zip(PROMPTS, SUBJECTS)]
    for p, a, f in zip(PROMPTS, ANSWERS, st.first):
        assert f == first_answer_token(tok, p, a) == _answer_ids(tok, p, a)[1][0]
    W = model.get_output_embeddings().weight
    assert torch.equal(st.Y, W[torch.tensor(st.first)])
    blocks = decoder_layers(model)
    for i, p in enumerate(PROMPTS):
        got = {}
        h = blocks[st.layer].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad(), capture_prenorm(model) as pre:
                model(input_ids=torch.tensor([tok(p)["input_ids"]]))
        finally:
            h.remove()
        assert torch.allclose(st.S[i], got["h"][0, st.positions[i]], atol=1e-5)
        assert torch.allclose(st.Z[i], pre[-1][0, -1], atol=1e-5)
    assert subject_states(model, tok, PROMPTS, SUBJECTS, ANSWERS, layer=n - 1).layer == n - 1
