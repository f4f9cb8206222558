"""Backend choice and availability.

A backend is a module in ``memft_kernels/ops`` whose ``BACKEND`` is an instance of ``ops.base.Backend``
(the whole contract: availability, supports, row forward / backward, fused forward + backward,
in-place variants, device-side gradient scaling). ``resolve`` returns that instance; docs/ARCHITECTURE.md
says how to add one.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

from .ops.base import Backend

_MODULES = {
    "torch": "memft_kernels.ops.reference",
    "triton": "memft_kernels.ops.triton_ce",
    "cpu": "memft_kernels.ops.native_cpu",
    "cuda": "memft_kernels.ops.native_cuda",
}
# "auto" tries these in order for each device type; the reference is always last.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_loaded: Dict[str, Backend] = {}
_failed: Dict[str, str] = {}


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        _failed[name] = f"could not import {_MODULES[name]}: {exc}"
        return None
    backend = module.BACKEND
    if not isinstance(backend, Backend):
        raise TypeError(f"{_MODULES[name]}.BACKEND must be an ops.base.Backend, got {type(backend).__name__}")
    reason = backend.availability()
    if reason is not None:
        _failed[name] = reason
        return None
    _loaded[name] = backend
    return backend


@torch.compiler.assume_constant_result
def _load_reason(name: str) -> Optional[str]:
    """None once backend ``name`` is imported and usable, else why not. Under torch.compile Dynamo
    runs this eagerly and keeps the result as a constant: it cannot trace an import."""
    return None if _load(name) is not None else _failed[name]


def _backend(name: str) -> Optional[Backend]:
    """The loaded backend (a dict lookup, which Dynamo can trace), or None."""
    return _loaded[name] if _load_reason(name) is None else None


def availability(name: str) -> Optional[str]:
    """None if backend ``name`` is usable here, else the reason it is not."""
    return None if _load(name) is not None else _failed[name]


def available_backends() -> Dict[str, bool]:
    """Each backend's name and whether it can run in this process (on some device)."""
    return {name: _load(name) is not None for name in _MODULES}


def backend_report() -> Dict[str, str]:
    """Each backend's name with 'available' or the reason it is not (for `memft info`): asked afresh,
    not from the cache that ``resolve`` uses."""
    report = {}
    for name, module_name in _MODULES.items():
        try:
            reason = importlib.import_module(module_name).BACKEND.availability()
        except ImportError as exc:
            reason = f"could not import {module_name}: {exc}"
        report[name] = "available" if reason is None else reason
    return report


def resolve(backend: str, logits: torch.Tensor) -> Backend:
    """The backend for these logits; RuntimeError if an explicit choice cannot run them."""
    if backend == "auto":
        for name in _AUTO_ORDER.get(logits.device.type, ("torch",)):
            chosen = _backend(name)
            if chosen is not None and (name == "torch" or chosen.supports(logits) is None):
                return chosen
        return _backend("torch")
    chosen = _backend(backend)
    if chosen is None:
        raise RuntimeError(f"backend={backend!r} is not available: {_load_reason(backend)}")
    reason = chosen.supports(logits)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run these logits: {reason}")
    return chosen
