"""Where a command may write, and whether a model folder can be loaded, checked before any work.

:func:`check_output_separate` is the one guard every command that takes a model and an output
calls: nothing a command writes may be the model folder, lie inside it, or hold it, whatever the
nesting, relative path or symbolic link used to name either. :func:`check_model_source` refuses a
missing, incomplete or corrupt local model folder with a message that says what is missing.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

from knowcat.errors import UsageError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def normalized(path) -> Path:
    """``path`` made absolute with ``~``, ``..`` and symbolic links resolved (also for a path that
    does not exist yet: its existing part is resolved)."""
    return Path(os.path.expanduser(str(path))).resolve()


def is_local_model(model) -> bool:
    """True when ``model`` names something on this machine (otherwise it is a hub id)."""
    s = str(model)
    return Path(os.path.expanduser(s)).exists() or s.startswith((".", "/", "~")) or s.count("/") > 1 \
        or os.sep != "/" and os.sep in s


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_separate(models: Iterable, out, writes: Iterable[str] | None = None, what: str = "output") -> None:
    """Refuse (:class:`UsageError`) an output that would write into a model folder it was given.

    ``out`` is the output folder (or file); ``writes`` the entries the command creates inside it
    (``None``: the whole folder is the command's, so a model anywhere inside it is refused). Refused
    when ``out`` is a model folder or lies inside one, or when one of the written entries is a model
    folder, lies inside one or holds one. Hub ids (nothing on this machine) are not checked.
    """
    o = normalized(out)
    for model in models:
        if model is None or not Path(os.path.expanduser(str(model))).exists():
            continue
        m = normalized(model)
        hint = (f"choose an {what} outside the model folder {model} (knowcat never writes into a base model's "
                f"folder)")
        if o == m or m in o.parents:
            raise UsageError(f"the {what} {out} is {'the' if o == m else 'inside the'} model folder {model}; {hint}")
        if o in m.parents:
            targets = [o] if writes is None else [normalized(o / w) for w in writes]
            for t in targets:
                if _overlap(t, m):
                    name = "it" if t == o else t.name
                    raise UsageError(f"the {what} {out} holds the model folder {model}, and knowcat would write "
                                     f"{name} there; {hint}")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        need = 8 + n + max(ends, default=0)
        if need > size:
            raise ValueError(f"truncated: {size} bytes, the header describes {need}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise UsageError(f"model weights {path} are corrupt ({e}); copy or save the model again") from None


def check_model_source(model) -> None:
    """A local model folder must hold a readable config.json, weights (complete safetensors, every
    shard of an index) and a tokenizer; a hub id is left to the loader."""
    if model is None:
        return
    p = Path(os.path.expanduser(str(model)))
    if not p.exists():
        if is_local_model(model):
            raise UsageError(f"model folder {model} does not exist; give a folder saved with save_pretrained "
                             f"or a hub id")
        return
    if not p.is_dir():
        raise UsageError(f"model {model} is a file, not a folder; give the folder saved with save_pretrained")
    if not any(p.iterdir()):
        raise UsageError(f"model folder {model} is empty; give a folder saved with save_pretrained")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UsageError(f"model folder {model} has no config.json: not a saved model, or an incomplete copy")
    try:
        c = json.loads(cfg.read_text(encoding="utf-8"))
        if not isinstance(c, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"model folder {model}: config.json is corrupt ({e}); copy or save the model again") from None
    present = [w for w in WEIGHT_FILES if (p / w).is_file()]
    if not present:
        raise UsageError(f"model folder {model} has no weights (none of {', '.join(WEIGHT_FILES)}): "
                         f"an incomplete copy")
    for w in present:
        if w.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads((p / w).read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise UsageError(f"model folder {model}: {w} is corrupt ({e})") from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise UsageError(f"model folder {model} is incomplete: {w} lists {missing[0]}"
                                 f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, not there")
            for s in shards:
                if s.endswith(".safetensors"):
                    _check_safetensors(p / s)
        elif w.endswith(".safetensors"):
            _check_safetensors(p / w)
    if (p / "tokenizer.json").is_file():
        try:
            tj = json.loads((p / "tokenizer.json").read_text(encoding="utf-8"))
            if not isinstance(tj, dict) or "model" not in tj:
                raise ValueError("no 'model' entry")
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"model folder {model}: tokenizer.json is corrupt ({e}); save the tokenizer again") from None
    if not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise UsageError(f"model folder {model} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         f"save the tokenizer beside the model")
