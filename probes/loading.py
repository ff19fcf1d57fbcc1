"""Load any causal LM the way the field does: ``AutoModelForCausalLM`` from a hub id
or a local folder, safetensors weights, ``trust_remote_code`` off unless asked."""

from __future__ import annotations

import threading

import torch

# Held while a model is constructed or loaded, by every place knowcat does either. transformers builds a model
# inside save-and-restore patches of process-wide state (``PreTrainedModel.tie_weights`` made a no-op, the
# ``torch.nn.init`` functions replaced, ``torch.linspace`` and the default dtype changed): two threads building
# at once restore each other's patched values, and one load can leave ``tie_weights`` a no-op for the rest of
# the process (every later tied-embedding model then keeps its ``lm_head`` on the meta device). Reentrant, so a
# caller may hold it around several loads.
MODEL_BUILD_LOCK = threading.RLock()

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device):
    if isinstance(dtype, torch.dtype):
        return dtype
    key = (dtype or "auto").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    if key == "auto":
        # half precision on GPUs, full precision on the CPU
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[key]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        # pad-token fallback: the eos token (padding is masked out anyway)
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_model(name_or_path: str, device: str | torch.device | None = "auto", dtype: str | None = "auto",
               trust_remote_code: bool = False, revision: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode on the resolved device."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
            revision=revision, use_safetensors=None,
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(dev)
    model.eval()
    return model, tok


# files that define a model folder's behaviour: config, tokenizer and weights
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".tiktoken", ".gguf")
FULL_HASH_LIMIT = 1 << 30  # files up to 1 GiB are hashed whole


def model_identity(name_or_path: str, revision: str | None = None) -> dict:
    """What identifies a model: for a local folder its resolved path and a digest of its
    config, tokenizer and weight files (each file's name, size and content: a SHA-256 of the
    whole file up to :data:`FULL_HASH_LIMIT`; above it the safetensors header, which lists
    every tensor's name, dtype, shape and offsets, and the modification time); for a hub id,
    the id and revision. A relative and an absolute path to one folder give one identity;
    new weights saved at the same path give another."""
    import hashlib
    from pathlib import Path

    p = Path(name_or_path).expanduser()
    if not p.exists():
        return {"name": str(name_or_path), "revision": revision, "digest": None}
    p = p.resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        if size <= FULL_HASH_LIMIT:
            d = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    d.update(block)
            h.update(d.digest())
        else:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if f.suffix == ".safetensors" and len(head) == 8:
                    h.update(fh.read(int.from_bytes(head, "little")))
            h.update(str(f.stat().st_mtime_ns).encode())
    return {"name": str(p), "revision": revision, "digest": h.hexdigest()}
