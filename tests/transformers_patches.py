"""The process-wide state transformers patches while it builds or loads a model, and whether it was left patched.

``from_pretrained`` and model construction replace ``PreTrainedModel.tie_weights`` (a no-op while the weights
load), the ``torch.nn.init`` functions (guarded or no-op versions, in every module that imported them),
``torch.linspace`` and the default dtype, and put the originals back on the way out. When two threads do it at
once, one restores what the other patched, and the patch stays for the rest of the process: a test that ends
with any of these still patched poisons every later model load (tests/conftest.py fails it)."""

from __future__ import annotations

import sys

INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
                  "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_", "sparse_")
METHODS = ("tie_weights", "init_weights")
_pristine: dict = {}  # PreTrainedModel's own methods, recorded the first time they are seen unpatched


def _init_modules() -> tuple[str, ...]:
    init = sys.modules.get("transformers.initialization")
    return getattr(init, "TORCH_MODULES_TO_PATCH", ("torch.nn.init",))


def _replaced(obj) -> bool:
    """A transformers stand-in: defined inside one of its context managers, or its guarded init functions."""
    return "<locals>" in getattr(obj, "__qualname__", "") or getattr(obj, "__module__", "") == "transformers.initialization"


def snapshot() -> dict:
    """``{name: current object}`` for every patched attribute of the modules already imported."""
    state: dict = {}
    torch = sys.modules.get("torch")
    if torch is None:
        return state
    state["torch.linspace"] = torch.linspace
    state["torch default dtype"] = torch.get_default_dtype()
    for mod_name in _init_modules():
        mod = sys.modules.get(mod_name)
        for f in INIT_FUNCTIONS:
            if mod is not None and hasattr(mod, f):
                state[f"{mod_name}.{f}"] = getattr(mod, f)
    mu = sys.modules.get("transformers.modeling_utils")
    if mu is not None:
        for m in METHODS:
            obj = mu.PreTrainedModel.__dict__.get(m)
            state[f"PreTrainedModel.{m}"] = obj
            if obj is not None and not _replaced(obj):
                _pristine.setdefault(m, obj)
    return state


def leftovers(before: dict | None = None) -> list[str]:
    """The names that now hold a transformers stand-in, or differ from ``before`` (a :func:`snapshot`)."""
    now = snapshot()
    before = before or {}
    return sorted(k for k, v in now.items()
                  if (k in before and before[k] is not v and before[k] != v) or _replaced(v)
                  or (k == "torch.linspace" and v is not sys.modules["torch"]._C._VariableFunctions.linspace))


def restore(before: dict, names) -> None:
    """Put back the originals of ``names``: from ``before`` where it held an unpatched value, else from the
    originals transformers and torch keep."""
    torch = sys.modules["torch"]
    init = sys.modules.get("transformers.initialization")
    originals = dict(getattr(init, "TORCH_INIT_FUNCTIONS", {}))
    for name in names:
        old = before.get(name)
        if name == "torch default dtype":
            torch.set_default_dtype(old if old is not None else torch.float32)
        elif name == "torch.linspace":
            torch.linspace = torch._C._VariableFunctions.linspace
        elif name.startswith("PreTrainedModel."):
            m = name.split(".", 1)[1]
            if m in _pristine:
                setattr(sys.modules["transformers.modeling_utils"].PreTrainedModel, m, _pristine[m])
        else:
            mod_name, f = name.rsplit(".", 1)
            fn = old if old is not None and not _replaced(old) else originals.get(f)
            if fn is not None:
                setattr(sys.modules[mod_name], f, fn)
