"""The native CPU backend: C++ row kernels (csrc/cpu/, OpenMP over rows; AVX-512F, AVX2+FMA or
portable code, chosen at run time).

Reading order: the compiled module (``memft_kernels._native_cpu``, built by setup.py with CMake and
pybind11; it takes raw addresses and never links libtorch), then the ``torch.library`` custom ops
``memft::cpu_row_*`` with their fake implementations, then the backend interface of
``ops/reference.py``. The autograd lives in ``loss.py``, shared by every backend.

Threads: ``torch.get_num_threads()``; every row is reduced by one thread in a fixed order, so the
results are bitwise the same for any thread count.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import KernelOptions, RowStats
from . import native_args
from .native_args import (
    NOT_BUILT,
    check_grad,
    make_input,
    make_options,
    new_row_stats,
    stats_args,
)

try:
    from .. import _native_cpu as _C
except ImportError as exc:  # not built: the package works on the other backends
    _C = None
    _IMPORT_ERROR = str(exc)

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------- custom ops
def _require_built() -> None:
    if _C is None:
        raise RuntimeError(availability())


@torch.library.custom_op("memft::cpu_row_forward", mutates_args=())
def cpu_row_forward(
    logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor], policy: int,
    threshold: float, sharpness: float, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_built()
    stats = new_row_stats(logits)
    if logits.shape[0]:
        _C.row_forward(
            make_input(_C, logits, target, token_weight),
            make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
            stats_args(_C, stats), threads=torch.get_num_threads(),
        )
    return stats


@cpu_row_forward.register_fake
def _(logits, target, token_weight, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap):
    return new_row_stats(logits)


@torch.library.custom_op("memft::cpu_row_backward", mutates_args=("grad",))
def cpu_row_backward(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, grad: torch.Tensor,
    policy: int, threshold: float, sharpness: float, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float,
) -> None:
    _require_built()
    check_grad(grad, logits)
    if logits.shape[0]:
        _C.row_backward(
            make_input(_C, logits, target, None),
            make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
            lse=lse.data_ptr(), coef=coef.data_ptr(), grad=grad.data_ptr(), grad_row_stride=grad.stride(0),
            threads=torch.get_num_threads(),
        )


@cpu_row_backward.register_fake
def _(logits, target, lse, coef, grad, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap):
    return None


@torch.library.custom_op("memft::cpu_row_forward_backward", mutates_args=("grad",))
def cpu_row_forward_backward(
    logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor], scale: torch.Tensor,
    grad: torch.Tensor, policy: int, threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_built()
    check_grad(grad, logits)
    stats = new_row_stats(logits)
    if logits.shape[0]:
        _C.row_forward_backward(
            make_input(_C, logits, target, token_weight),
            make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
            stats_args(_C, stats), scale=scale.data_ptr(), grad=grad.data_ptr(), grad_row_stride=grad.stride(0),
            threads=torch.get_num_threads(),
        )
    return stats


@cpu_row_forward_backward.register_fake
def _(logits, target, token_weight, scale, grad, policy, threshold, sharpness, ignore_index, label_smoothing,
      z_loss, softcap):
    return new_row_stats(logits)


# ---------------------------------------------------------------------------- backend interface
def availability() -> Optional[str]:
    if _C is None:
        return NOT_BUILT.format(what="CPU", name="_native_cpu", error=_IMPORT_ERROR,
                                 needs="a C++17 compiler with OpenMP, CMake and pybind11 are available")
    return None


def supports(logits: torch.Tensor) -> Optional[str]:
    if logits.device.type != "cpu":
        return f"the native CPU backend runs CPU tensors, got logits on {logits.device}"
    if logits.dtype not in (torch.float32, torch.bfloat16):
        return f"the native CPU backend takes float32 or bfloat16 logits, got {logits.dtype}"
    if logits.shape[-1] > _INT32_MAX:
        return f"the native CPU backend takes V <= 2^31 - 1, got V={logits.shape[-1]}"
    return None


def isa() -> Optional[str]:
    """The vector code path the kernels take here: "avx512f", "avx2+fma" or "scalar" (the best the
    host has, capped by MEMFT_CPU_ISA=avx2|scalar), None if not built."""
    return None if _C is None else _C.isa()


def row_forward(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                opts: KernelOptions) -> RowStats:
    return native_args.row_forward(cpu_row_forward, logits, target, token_weight, opts)


def row_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 opts: KernelOptions, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return native_args.row_backward(cpu_row_backward, logits, target, lse, coef, opts, out)


def row_forward_backward(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                         opts: KernelOptions, scale: torch.Tensor, grad: torch.Tensor) -> RowStats:
    return native_args.row_forward_backward(cpu_row_forward_backward, logits, target, token_weight, opts, scale, grad)
