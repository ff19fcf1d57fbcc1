"""What the surrogates ask a model: pre-norm and readout states, answer-token Jacobians,
subject states at a middle layer and the last MLP's margin gradients, through plain
forward hooks, for any ``transformers`` causal LM (Llama, Qwen, Mistral, GPT-2 ...).

The *readout state* of a position is the input of the output embedding (the
``lm_head``): the vector h with logits = W_U h (+ bias). It is taken with a
forward pre-hook on ``model.get_output_embeddings()``. The *pre-norm state* r is the
last block's output, the input of the final norm (h = norm(r)): the surrogates are
linearized there, because a state after RMSNorm/LayerNorm has a null radial direction
(norm(c r) = norm(r)) that would make every Jacobian block rank-deficient by one
whatever the example. :func:`final_norm` finds the norm (Llama/Qwen/Mistral
``model.norm``, GPT-2 ``transformer.ln_f``, ...), and every system built here checks
that norm(r) equals the captured readout state, so a model where they differ is an
error, not a silent wrong answer.

Jacobians are computed with reverse-mode autograd, many rows at once by the
batch trick: the input is replicated once per output row, each copy's output
row is weighted by a one-hot vector, and one backward pass returns every row.
Matrix-free products come from ``torch.func``: A V by forward mode
(``torch.func.jvp``: one forward pass carrying the tangents, no graph kept) and
A^T U by ``torch.func.vjp`` (one forward, one backward), a batch of vectors at
once by replicating the input. Only the inputs (the answer embeddings) are
differentiated, never the parameters, so the model is called as it is (no
``functional_call`` needed). The fused scaled-dot-product-attention kernels have
no forward-mode derivative in torch 2.13 (``_scaled_dot_product_flash_attention_for_cpu``
raises NotImplementedError under ``jvp``), so the products run under
``sdpa_kernel(SDPBackend.MATH)``, whose composite kernel has one; checked on the
``transformers`` 5.x Llama, Qwen2, Mistral and GPT-2 models with ``sdpa`` and
``eager`` attention. For an attention implementation with no forward mode at all,
``mode="double_backward"`` (taken automatically when jvp raises) computes A V as
the derivative of A^T W with respect to W.

Forward mode is not the cheaper one everywhere. Measured on this 2-core CPU (the
quick demo's model, d = 128, 2 layers, 4 answer tokens; torch 2.13, 1 thread, best
of 5): one vector 27 ms by jvp against 11 ms by double backward (vjp 9 ms), a batch
of 74 vectors 67 ms against 53 ms (vjp 33 ms); in the profile a forward-mode
``linear`` runs four matrix products and a copy where the forward runs one. What
forward mode saves is memory: it keeps no graph, where double backward keeps the
forward's and the backward's, and memory is what bounds the batch on a large model
on a GPU. ``knowcat surrogate
--matrix-free-products`` chooses; jvp is the default.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from probes.generation import cache_kwargs, output_cache


@contextlib.contextmanager
def capture_readout(model):
    """Collects the inputs of the output embedding (the readout states) of each forward pass."""
    store: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _find(model, paths, what):
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"cannot find the {what} of {type(model).__name__}")


def final_norm(model):
    """The final norm between the last block and the lm_head."""
    return _find(model, ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm",
                         "gpt_neox.final_layer_norm", "transformer.norm_f", "model.final_layernorm"), "final norm")


def down_projection(model):
    """The last block's MLP output projection (Llama/Qwen/Mistral ``mlp.down_proj``, GPT-2
    ``mlp.c_proj``, NeoX ``mlp.dense_4h_to_h``, OPT-style ``fc2``) and its weight as [d, d_ff]."""
    block = decoder_layers(model)[-1]
    mod = _find(block, ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2", "mlp.fc2"),
                "last MLP's down projection")
    W = mod.weight
    if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        W = W.T
    return mod, W


@contextlib.contextmanager
def capture_prenorm(model):
    """Collects the last block's output hidden states (the final norm's input) of each forward pass."""
    store: list[torch.Tensor] = []
    handle = decoder_layers(model)[-1].register_forward_hook(
        lambda mod, args, out: store.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield store
    finally:
        handle.remove()


def check_prenorm(model, prenorm: torch.Tensor, readout: torch.Tensor) -> None:
    """norm(prenorm) must be the readout state: the last block feeds the final norm, which feeds the head."""
    with torch.no_grad():
        got = final_norm(model)(prenorm)
    if not torch.allclose(got, readout, atol=1e-4, rtol=1e-3):
        raise ValueError(f"{type(model).__name__}: the final norm of the last block's output is not the lm_head's "
                         f"input (max difference {float((got - readout).abs().max()):.3g}); the pre-norm surrogates "
                         "do not apply to this architecture")


def decoder_layers(model):
    """The transformer blocks, for Llama/Qwen/Mistral (``model.model.layers``), GPT-2
    (``transformer.h``) and most others."""
    return _find(model, ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
                         "transformer.blocks"), "decoder layers")


def _expand_cache(cache, batch: int):
    c = copy.deepcopy(cache)
    c.reorder_cache(torch.zeros(batch, dtype=torch.long, device=_cache_device(cache)))
    return c


def _cache_device(cache):
    try:
        return cache.layers[0].keys.device
    except (AttributeError, IndexError):
        return cache[0][0].device


@dataclass
class AnswerSystem:
    """The teacher-forced pieces of surrogate (a) for one example."""

    prompt_len: int
    answer_ids: list[int]  # gold answer tokens (x_gen)
    targets: list[int]  # next-token targets at the answer positions: answer tokens then the end token
    readout: torch.Tensor  # [m + 1, d] readout states at the last prompt position and the answer tokens
    prenorm: torch.Tensor  # [m + 1, d] the same positions' pre-norm states (the last block's output)
    x_gen: torch.Tensor  # [m, d] input embeddings of the answer tokens
    cache: object  # the prompt's KV cache (constants: they do not depend on x_gen)


@torch.no_grad()
def answer_system(model, tokenizer, prompt: str, answer: str, end_token: int) -> AnswerSystem:
    dev = model.device
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    a_ids = full[len(p_ids):] if full[:len(p_ids)] == p_ids else \
        tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if not a_ids:
        raise ValueError(f"answer {answer!r} has no tokens")
    with capture_readout(model) as store, capture_prenorm(model) as pre:
        out = model(input_ids=torch.tensor([p_ids], device=dev), use_cache=True)
    h_last, r_last = store[-1][0, -1], pre[-1][0, -1]
    cache = output_cache(out)
    emb = model.get_input_embeddings()
    x_gen = emb(torch.tensor(a_ids, device=dev))
    with capture_readout(model) as store, capture_prenorm(model) as pre:
        c = copy.deepcopy(cache)
        model(inputs_embeds=x_gen[None], **cache_kwargs(model, c), use_cache=True,
              position_ids=torch.arange(len(p_ids), len(p_ids) + len(a_ids), device=dev)[None],
              attention_mask=torch.ones(1, len(p_ids) + len(a_ids), dtype=torch.long, device=dev))
    readout = torch.cat([h_last[None], store[-1][0]], dim=0)
    prenorm = torch.cat([r_last[None], pre[-1][0]], dim=0)
    check_prenorm(model, prenorm, readout)
    return AnswerSystem(len(p_ids), list(a_ids), list(a_ids) + [end_token], readout, prenorm, x_gen, cache)


def _tail_readout(model, sysm: AnswerSystem, X: torch.Tensor) -> torch.Tensor:
    """Pre-norm states (the last block's output) at the answer tokens for a batch of answer
    embeddings X [B, m, d]."""
    B, m, _ = X.shape
    P = sysm.prompt_len
    dev = X.device
    with capture_prenorm(model) as store:
        model(inputs_embeds=X, **cache_kwargs(model, _expand_cache(sysm.cache, B)), use_cache=True,
              position_ids=torch.arange(P, P + m, device=dev)[None].expand(B, m),
              attention_mask=torch.ones(B, P + m, dtype=torch.long, device=dev))
    return store[-1]  # [B, m, d]


def answer_jacobian(model, sysm: AnswerSystem) -> torch.Tensor:
    """J = d r(answer positions) / d x_gen (r: the pre-norm states), as an [m*d, m*d] matrix (row:
    output position-major, column: input token-major). The last prompt position's block is
    zero by causality and is not included. Block row t depends on the first t answer
    tokens only, so it is computed from a pass over those t tokens (d copies, one per row)."""
    m, d = sysm.x_gen.shape
    n = m * d
    J = torch.zeros(n, n, dtype=sysm.x_gen.dtype, device=sysm.x_gen.device)
    eye = torch.eye(d, dtype=sysm.x_gen.dtype, device=sysm.x_gen.device)
    for t in range(1, m + 1):
        X = sysm.x_gen.detach()[None, :t].repeat(d, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            H = _tail_readout(model, sysm, X)[:, t - 1]  # [d, d]: copy i's readout at answer token t
            (g,) = torch.autograd.grad(H, X, grad_outputs=eye)
        J[(t - 1) * d:t * d, :t * d] = g.reshape(d, t * d)
    return J


def answer_operators(model, sysm: AnswerSystem, mode: str = "auto"):
    """``(matvec, rmatvec)`` of the same Jacobian, for batches of vectors: matvec(V [n, p]) = J V,
    rmatvec(U [n, p]) = J^T U, without forming J. The products run in the model's dtype on its
    device and come back in the dtype of their argument. ``mode``: "jvp" (forward mode),
    "double_backward", or "auto" (jvp, falling back to double backward for good if the model's
    attention has no forward-mode derivative)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode not in ("auto", "jvp", "double_backward"):
        raise ValueError(f"mode must be auto, jvp or double_backward, not {mode!r}")
    m, d = sysm.x_gen.shape
    n = m * d
    x0 = sysm.x_gen.detach()
    state = {"mode": "jvp" if mode == "auto" else mode}

    def f(X):
        return _tail_readout(model, sysm, X)

    def rmatvec(U: torch.Tensor) -> torch.Tensor:
        p = U.shape[1]
        X = x0[None].expand(p, m, d).contiguous()
        with torch.enable_grad():
            _, pullback = torch.func.vjp(f, X)
            (g,) = pullback(U.T.reshape(p, m, d).to(x0.dtype))
        return g.reshape(p, n).T.to(U.dtype)

    def jvp(X, T):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(f, (X,), (T,))[1]

    def double_backward(X, T):
        # A T = d/dW <A^T W, T>; the fused attention kernels have no second derivative, the math one does
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            X = X.requires_grad_(True)
            H = f(X)
            W = torch.zeros_like(H, requires_grad=True)
            (g,) = torch.autograd.grad(H, X, grad_outputs=W, create_graph=True)
            (jv,) = torch.autograd.grad(g, W, grad_outputs=T)
        return jv

    def matvec(V: torch.Tensor) -> torch.Tensor:
        p = V.shape[1]
        X = x0[None].expand(p, m, d).contiguous()
        T = V.T.reshape(p, m, d).to(x0.dtype)
        if state["mode"] == "jvp":
            try:
                out = jvp(X, T)
            except NotImplementedError:
                if mode == "jvp":
                    raise
                state["mode"] = "double_backward"
        if state["mode"] == "double_backward":
            out = double_backward(X, T)
        return out.reshape(p, n).T.to(V.dtype)

    matvec.state = state  # which product is in use (for reports and tests)
    return matvec, rmatvec


def margin_targets(readout: torch.Tensor, targets: list[int], W_U: torch.Tensor, bias, margin: float):
    """b of surrogate (a): per position, the smallest change of the readout state that makes the
    target token beat its strongest competitor by ``margin`` logits (zero where it already does):
    delta = max(0, margin - (w_y - w_c).h - (b_y - b_c)) / ||w_y - w_c||^2 * (w_y - w_c).
    Returns (delta [m+1, d], current margins [m+1], competitors [m+1])."""
    logits = readout @ W_U.T
    if bias is not None:
        logits = logits + bias
    t = torch.tensor(targets, device=readout.device)
    rows = torch.arange(len(targets), device=readout.device)
    tgt = logits[rows, t]
    masked = logits.clone()
    masked[rows, t] = -torch.inf
    comp = masked.argmax(-1)
    mu = tgt - logits[rows, comp]
    w = W_U[t] - W_U[comp]
    need = torch.clamp(margin - mu, min=0)
    delta = (need / (w * w).sum(-1).clamp(min=1e-30))[:, None] * w
    return delta, mu, comp


def prenorm_margin_targets(model, prenorm: torch.Tensor, targets: list[int], margin: float):
    """b of surrogates (a) and (b') in pre-norm coordinates: per position, the smallest change of the
    pre-norm state r that makes the target token beat its strongest competitor c by ``margin``
    logits to first order through the final norm: with v = J_norm(r)^T (w_y - w_c),
    delta = max(0, margin - mu) v / ||v||^2 (zero where the target already wins by the margin).
    Returns (delta [T, d], current margins mu [T], competitors [T], v [T, d])."""
    norm = final_norm(model)
    W_U = model.get_output_embeddings().weight.detach()
    bias = getattr(model.get_output_embeddings(), "bias", None)
    r = prenorm.detach()
    with torch.enable_grad():
        h, pullback = torch.func.vjp(lambda x: norm(x), r)
    logits = h.detach() @ W_U.T
    if bias is not None:
        logits = logits + bias.detach()
    t = torch.tensor(targets, device=r.device)
    rows = torch.arange(len(targets), device=r.device)
    masked = logits.clone()
    masked[rows, t] = -torch.inf
    comp = masked.argmax(-1)
    mu = logits[rows, t] - logits[rows, comp]
    w = W_U[t] - W_U[comp]
    with torch.enable_grad():
        (v,) = pullback(w.to(h.dtype))
    v = v.detach()
    need = torch.clamp(margin - mu, min=0)
    delta = (need / (v * v).sum(-1).clamp(min=1e-30))[:, None] * v
    return delta, mu, comp, v


# ---------------------------------------------------------------------------------------------
# surrogate (c): margin gradients of a low-dimensional update of the last MLP's down projection


def down_projection_basis(model, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed subspace of surrogate (c): the top-``k`` singular pairs of the last down projection
    W_down = U S V^T ([d, d_ff]): (U_k [d, k], V_k [d_ff, k])."""
    _, W = down_projection(model)
    U, _, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U[:, :k].to(W.dtype), Vh[:k].T.to(W.dtype)


def _answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    a_ids = full[len(p_ids):] if full[:len(p_ids)] == p_ids else \
        tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return p_ids, list(a_ids)


@torch.no_grad()
def margin_gradients_batch(model, tokenizer, items: list[tuple[str, str]], end_token: int, U: torch.Tensor,
                           V: torch.Tensor, margin: float, first_only: bool = False,
                           max_batch_tokens: int = 4096) -> list[dict]:
    """Surrogate (c)'s rows for each (prompt, answer) of ``items``, from teacher-forced passes batched
    with right padding (causal attention: padding after a row's tokens does not change them). Per item,
    at each answer position (the last prompt position, then each answer token; ``first_only``: the first
    only): the margin mu_t of the next gold token (then the end token) over its strongest competitor, how
    much it must grow (max(0, margin - mu_t)) and its gradient with respect to theta in
    dW = sum_j theta_j u_j v_j^T: g_t[j] = (v_t . u_j)(v_j . a_t), v_t = J_norm(r_t)^T (w_y - w_c), a_t
    the down projection's input. Exact to first order: the down projection's output is added to r_t and
    nothing after it but the final norm and the head depends on it."""
    mod, _ = down_projection(model)
    dev = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token
    toks = [_answer_ids(tokenizer, p, a) for p, a in items]
    out: list[dict | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(toks[i][0]) + len(toks[i][1]))
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (len(toks[order[j]][0]) + len(toks[order[j]][1])) * (j + 1 - i) <= max_batch_tokens:
            j += 1
        chunk = order[i:j]
        seqs = [toks[k][0] + toks[k][1] for k in chunk]
        L = max(len(x) for x in seqs)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(chunk), L), dtype=torch.long, device="cpu")
        for r, x in enumerate(seqs):
            ids[r, :len(x)] = torch.tensor(x, device="cpu")
            mask[r, :len(x)] = 1
        got = {}
        handle = mod.register_forward_pre_hook(lambda m_, args: got.__setitem__("a", args[0]))
        try:
            with capture_readout(model) as store, capture_prenorm(model) as pre:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        finally:
            handle.remove()
        for r, k in enumerate(chunk):
            p_ids, a_ids = toks[k]
            P = len(p_ids)
            T = 1 if first_only else len(a_ids) + 1
            pos = slice(P - 1, P - 1 + T)
            rr, h, a = pre[-1][r, pos], store[-1][r, pos], got["a"][r, pos]
            check_prenorm(model, rr, h)
            targets = (a_ids + [end_token])[:T]
            _, mu, _, v = prenorm_margin_targets(model, rr, targets, margin)
            out[k] = {"G": (v @ U) * (a @ V), "mu": mu, "need": torch.clamp(margin - mu, min=0),
                      "answer_tokens": len(a_ids)}
        i = j
    return out


def margin_gradients(model, tokenizer, prompt: str, answer: str, end_token: int, U: torch.Tensor, V: torch.Tensor,
                     margin: float, first_only: bool = False) -> dict:
    """:func:`margin_gradients_batch` for one example: ``G`` [T, k], ``mu`` [T], ``need`` [T], ``answer_tokens``."""
    return margin_gradients_batch(model, tokenizer, [(prompt, answer)], end_token, U, V, margin, first_only)[0]


# ---------------------------------------------------------------------------------------------
# surrogate (b): subject states at a middle layer and the relation's local Jacobian


def subject_position(tokenizer, prompt: str, subject: str | None) -> int:
    """Index of the subject's last token in the tokenized prompt (the prompt's last token when
    the subject cannot be located)."""
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if subject:
        end = prompt.rfind(subject)
        if end >= 0:
            end += len(subject)
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                if a < end <= b or (b == end and b > a):
                    return i
    return len(ids) - 1


@torch.no_grad()
def layer_and_readout_states(model, tokenizer, prompts: list[str], positions: list[int], layer: int) -> tuple:
    """For each prompt: the output of block ``layer`` at ``positions[i]`` and the pre-norm state (the
    last block's output) at the last position. Returns ([N, d], [N, d])."""
    blocks = decoder_layers(model)
    hs, zs = [], []
    for prompt, pos in zip(prompts, positions):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=model.device)
        got = {}

        def hook(mod, args, out):
            got["h"] = (out[0] if isinstance(out, tuple) else out)[0, pos].detach().clone()

        handle = blocks[layer].register_forward_hook(hook)
        try:
            with capture_prenorm(model) as store:
                model(input_ids=ids, logits_to_keep=1) if _takes_logits_to_keep(model) else model(input_ids=ids)
        finally:
            handle.remove()
        hs.append(got["h"])
        zs.append(store[-1][0, -1])
    return torch.stack(hs), torch.stack(zs)


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def layer_jacobian(model, tokenizer, prompt: str, position: int, layer: int) -> torch.Tensor:
    """d z / d h: the pre-norm state at the last position with respect to block ``layer``'s output
    at ``position`` (the subject's last token), an [d, d] matrix (Hernandez et al. 2023). The
    tokens before ``position`` do not depend on h: they are encoded once into a KV cache and the
    d copies (one per row) run only from ``position`` to the end."""
    blocks = decoder_layers(model)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    dev = model.device
    d = model.get_input_embeddings().weight.shape[1]
    cache = None
    if position > 0:
        with torch.no_grad():
            cache = output_cache(model(input_ids=torch.tensor([ids[:position]], device=dev), use_cache=True))
        cache = _expand_cache(cache, d)
    tail = torch.tensor([ids[position:]], device=dev).repeat(d, 1)
    state = {}

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        leaf = h[:, 0].detach().clone().requires_grad_(True)
        state["leaf"] = leaf
        h = torch.cat([leaf[:, None], h[:, 1:]], dim=1)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad(), capture_prenorm(model) as store:
            model(input_ids=tail, **cache_kwargs(model, cache), use_cache=cache is not None,
                  position_ids=torch.arange(position, len(ids), device=dev)[None].expand(d, -1),
                  attention_mask=torch.ones(d, len(ids), dtype=torch.long, device=dev))
            z = store[-1][:, -1]  # [d, d]: copy i's readout state
            (g,) = torch.autograd.grad(z, state["leaf"], grad_outputs=torch.eye(d, dtype=z.dtype, device=z.device))
    finally:
        handle.remove()
    return g  # row i = d z_i / d h
