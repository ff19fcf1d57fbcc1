"""Pretrain a small Llama-architecture model on the world's corpus, on the CPU.

nanoGPT-style loop: documents are tokenized once (``<s> text </s>``) and packed
whole into blocks of ``block_size`` tokens (padding, masked from the loss, fills
the rest), so no fact is cut in two. Each epoch visits the blocks in an order
fixed by the seed. AdamW with warmup and cosine decay. Checkpoints every
``checkpoint_every`` steps (written atomically) let an interrupted run resume
and end exactly where an uninterrupted one would. The result is saved with
``save_pretrained`` (safetensors) together with its tokenizer, so it loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` like any local model.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from knowcat.io import atomic_write_json


@dataclass
class PretrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    block_size: int = 256
    batch_size: int = 16
    epochs: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    # bfloat16 autocast (weights stay float32). False (the default): float32 on every CPU, so a seed gives the
    # same model whatever the CPU's instruction set. True: bfloat16 (1.5-2x faster where the CPU computes it
    # natively, AVX-512 BF16 or AMX; 10x+ slower where autocast emulates it, measured on AVX2). None: bfloat16
    # where native, else float32 (the model then depends on the CPU)
    bf16: bool | None = False
    checkpoint_every: int = 100
    threads: int | None = None


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (else autocast to bfloat16 is slow)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private torch API: absent or failing means "no"
            pass
    return False


def read_corpus(world_dir) -> list[str]:
    from knowcat.rundir import WorldDir

    return WorldDir(world_dir).read_corpus()


def pack_blocks(docs_ids: list[list[int]], block_size: int, pad_id: int) -> np.ndarray:
    """Greedy packing of whole documents into fixed-size blocks (order kept)."""
    blocks, cur = [], []
    for ids in docs_ids:
        ids = ids[:block_size]
        if len(cur) + len(ids) > block_size:
            blocks.append(cur + [pad_id] * (block_size - len(cur)))
            cur = []
        cur = cur + ids
    if cur:
        blocks.append(cur + [pad_id] * (block_size - len(cur)))
    return np.asarray(blocks, dtype=np.int64)


def _lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(1024, cfg.block_size), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    from probes.loading import MODEL_BUILD_LOCK

    torch.manual_seed(cfg.seed)
    with MODEL_BUILD_LOCK:  # construction patches process-wide state (probes.loading.MODEL_BUILD_LOCK)
        return LlamaForCausalLM(mcfg)


def pretrain(world_dir, out_dir=None, cfg: PretrainConfig | None = None, log=print, progress: bool = True,
             stop_after: int | None = None) -> Path | None:
    """Train tokenizer and model on ``world_dir``'s corpus; save into ``out_dir`` (default
    ``world_dir/model``). Returns the model folder.

    ``stop_after``: stop at that step with a checkpoint written, as a killed run would
    (returns ``None``); the next call resumes from it.
    """
    from tqdm.auto import tqdm

    from knowcat.world.tokenizer import train_tokenizer

    cfg = cfg or PretrainConfig()
    from knowcat.rundir import WorldDir

    world_dir = Path(world_dir)
    out = Path(out_dir) if out_dir else WorldDir(world_dir).model
    ckpt_dir = WorldDir(world_dir).pretrain_checkpoint
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    docs = read_corpus(world_dir)

    tok_dir = ckpt_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(docs, cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    enc = tokenizer(docs, add_special_tokens=True)["input_ids"]
    docs_ids = [ids + [tokenizer.eos_token_id] for ids in enc]
    blocks = pack_blocks(docs_ids, cfg.block_size, tokenizer.pad_token_id)
    n_tokens = int((blocks != tokenizer.pad_token_id).sum())
    steps_per_epoch = math.ceil(len(blocks) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    log(f"pretrain: {len(docs)} documents, {n_tokens} tokens in {len(blocks)} blocks of {cfg.block_size}; "
        f"{total} steps of {cfg.batch_size}")

    model = build_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step = 0
    history: list[dict] = []
    ckpt = ckpt_dir / "state.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values: nothing is unpickled
        if state["config"] == asdict(cfg):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, history = state["step"], state["history"]
            log(f"pretrain: resuming at step {step}/{total}")
        else:
            log("pretrain: checkpoint was made with another config; starting over")

    pad = tokenizer.pad_token_id
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    log(f"pretrain: {'bfloat16 autocast' if bf16 else 'float32'} on the CPU")
    model.train()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not progress)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(blocks))
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x = torch.from_numpy(blocks[idx])
        labels = x.masked_fill(x == pad, -100)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lv = loss.item()
        history.append({"step": step, "loss": round(lv, 5)})
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.3f}")
        if (step % cfg.checkpoint_every == 0 or step == stop_after) and step < total:
            _save_state(ckpt, model, opt, step, history, cfg)
        if stop_after is not None and step >= stop_after and step < total:
            bar.close()
            log(f"pretrain: stopped at step {step}/{total}; checkpoint in {ckpt}")
            return None
    bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / "knowcat_pretrain.json", {
        "config": asdict(cfg), "bf16": bf16, "precision": "bfloat16 autocast" if bf16 else "float32",
        "parameters": sum(p.numel() for p in model.parameters()), "world": str(world_dir), "tokens": n_tokens, "steps": total,
        "final_loss": history[-1]["loss"] if history else None, "seconds_this_session": round(time.time() - t0, 1),
        "history": history,
    })
    if ckpt.exists():
        ckpt.unlink()
    log(f"pretrain: saved model and tokenizer to {out} (final loss {history[-1]['loss'] if history else float('nan'):.3f})")
    return out


def _save_state(path: Path, model, opt, step: int, history: list, cfg: PretrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "history": history, "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)
