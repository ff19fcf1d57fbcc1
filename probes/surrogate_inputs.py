"""What the surrogates' systems are built from, read off a model and its tokenizer.

:mod:`knowcat.surrogate` builds and classifies the systems; everything that tokenizes text or
reads a model's parts for it is here (the Jacobians and margin targets themselves are in
:mod:`probes.jacobians`):

- :func:`load_frozen`: the model in float32, its parameters frozen (only inputs are differentiated);
- :func:`answer_end_token`: the token that ends an answer (the newline generation stops at);
- :func:`free_memory_bytes`: free memory where the model's readout lives (a CUDA device's, else the
  host's), which bounds the dense Jacobians;
- :func:`subject_states`: per prompt, the subject's state at a middle block, the pre-norm state at
  the last position, the gold answer's first token and its unembedding row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from probes.jacobians import decoder_layers, layer_and_readout_states, subject_position, unembedding


def load_frozen(model_name: str, device: str = "auto"):
    """``(model, tokenizer)`` in float32 with every parameter's gradient off."""
    from probes.loading import load_model

    model, tok = load_model(model_name, device=device, dtype="float32")
    model.requires_grad_(False)
    return model, tok


def answer_end_token(tokenizer) -> int:
    """The token that ends an answer: the newline's last token (the end-of-sequence token when the
    tokenizer has no newline)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return ids[-1] if ids else tokenizer.eos_token_id


def free_memory_bytes(model) -> int:
    """Free memory where a Jacobian of ``model`` would live: the CUDA device of its output embedding when
    it is one, else the host's."""
    device = unembedding(model)[0].device
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_subject_layer(model) -> int:
    """The middle block, and never the last one (its output at the subject position cannot reach the last
    position's readout: no block is left to move it)."""
    n_layers = len(decoder_layers(model))
    return max(0, min(n_layers // 2, n_layers - 2))


@dataclass
class SubjectStates:
    """Per prompt (rows in the order given): ``S`` [N, d] the output of block ``layer`` at the subject's last
    token (``positions``), ``Z`` [N, d] the pre-norm state at the last position, ``first`` the gold answer's
    first token, ``Y`` [N, d] that token's unembedding row."""

    S: torch.Tensor
    Z: torch.Tensor
    first: list[int]
    positions: list[int]
    layer: int
    Y: torch.Tensor


def first_answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of ``" " + answer`` after ``prompt``, as the prompt and answer are tokenized together
    (the answer alone when it adds no token after the prompt's)."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    if len(full) > len(p_ids):
        return full[len(p_ids)]
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def subject_states(model, tokenizer, prompts: list[str], subjects: list[str | None], answers: list[str],
                   layer: int | None = None) -> SubjectStates:
    """The subject and readout states of each prompt (:func:`probes.jacobians.layer_and_readout_states`) at
    block ``layer`` (None: :func:`default_subject_layer`), with each gold answer's first token and its row of
    the output embedding."""
    layer = layer if layer is not None else default_subject_layer(model)
    pos = [subject_position(tokenizer, p, s) for p, s in zip(prompts, subjects)]
    S, Z = layer_and_readout_states(model, tokenizer, prompts, pos, layer)
    first = [first_answer_token(tokenizer, p, a) for p, a in zip(prompts, answers)]
    W_U = unembedding(model)[0].detach()
    Y = W_U[torch.tensor(first, device=W_U.device)]
    return SubjectStates(S, Z, first, pos, layer, Y)
