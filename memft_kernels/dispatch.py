"""Backend choice and availability.

A backend is a module in ``memft_kernels/ops`` with the interface described in ``ops/reference.py``
(``row_forward``, ``row_backward``, optionally ``row_forward_backward``) plus two functions:

* ``availability() -> str | None``: None when usable in this process, else why not and how to get it;
* ``supports(logits) -> str | None``: None when it handles this tensor (device, dtype), else why not.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Dict, Optional

import torch

_MODULES = {
    "torch": "memft_kernels.ops.reference",
    "triton": "memft_kernels.ops.triton_ce",
    "cpu": "memft_kernels.ops.native_cpu",
    "cuda": "memft_kernels.ops.native_cuda",
}
# "auto" tries these in order for each device type; the reference is always last.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_loaded: Dict[str, ModuleType] = {}
_failed: Dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        _failed[name] = f"could not import {_MODULES[name]}: {exc}"
        return None
    reason = module.availability() if hasattr(module, "availability") else None
    if reason is not None:
        _failed[name] = reason
        return None
    _loaded[name] = module
    return module


@torch.compiler.assume_constant_result
def _load_reason(name: str) -> Optional[str]:
    """None once backend ``name`` is imported and usable, else why not. Under torch.compile Dynamo
    runs this eagerly and keeps the result as a constant: it cannot trace an import."""
    return None if _load(name) is not None else _failed[name]


def _module(name: str) -> Optional[ModuleType]:
    """The loaded backend module (looked up in sys.modules, which Dynamo can trace), or None."""
    return sys.modules[_MODULES[name]] if _load_reason(name) is None else None


def availability(name: str) -> Optional[str]:
    """None if backend ``name`` is usable here, else the reason it is not."""
    return None if _load(name) is not None else _failed[name]


def available_backends() -> Dict[str, bool]:
    """Each backend's name and whether it can run in this process (on some device)."""
    return {name: _load(name) is not None for name in _MODULES}


def backend_report() -> Dict[str, str]:
    """Each backend's name with 'available' or the reason it is not (for `memft info`)."""
    return {name: ("available" if _load(name) is not None else _failed[name]) for name in _MODULES}


def resolve(backend: str, logits: torch.Tensor) -> ModuleType:
    """The backend module for these logits; RuntimeError if an explicit choice cannot run them."""
    if backend == "auto":
        for name in _AUTO_ORDER.get(logits.device.type, ("torch",)):
            module = _module(name)
            if module is not None and (name == "torch" or module.supports(logits) is None):
                return module
        return _module("torch")
    module = _module(backend)
    if module is None:
        raise RuntimeError(f"backend={backend!r} is not available: {_load_reason(backend)}")
    reason = module.supports(logits) if hasattr(module, "supports") else None
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run these logits: {reason}")
    return module
