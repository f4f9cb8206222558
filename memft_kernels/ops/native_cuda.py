"""The native CUDA backend: hand-written CUDA row kernels (csrc/cuda/memft_cuda.cu), an alternative
to the Triton backend on GPU hosts.

Reading order: the compiled module (``memft_kernels._native_cuda``: raw addresses and a stream
handle, CUDA runtime linked statically, no libtorch), then the ``torch.library`` custom ops
``memft::cuda_row_*`` with fake implementations, then the backend interface of ``ops/reference.py``.
Kernels run on the current torch stream of the logits' device; nothing synchronizes the host.
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
    from .. import _native_cuda as _C
except ImportError as exc:  # not built (no nvcc at install time, or MEMFT_CUDA=0)
    _C = None
    _IMPORT_ERROR = str(exc)

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------- custom ops
def _require_built() -> None:
    reason = availability()
    if reason is not None:
        raise RuntimeError(reason)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


@torch.library.custom_op("memft::cuda_row_forward", mutates_args=())
def cuda_row_forward(
    logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor], policy: int,
    threshold: float, sharpness: float, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_built()
    stats = new_row_stats(logits)
    if logits.shape[0]:
        with torch.cuda.device(logits.device):
            _C.row_forward(
                make_input(_C, logits, target, token_weight),
                make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
                stats_args(_C, stats), stream=_stream(logits),
            )
    return stats


@cuda_row_forward.register_fake
def _(logits, target, token_weight, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap):
    return new_row_stats(logits)


@torch.library.custom_op("memft::cuda_row_backward", mutates_args=("grad",))
def cuda_row_backward(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, grad: torch.Tensor,
    policy: int, threshold: float, sharpness: float, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float,
) -> None:
    _require_built()
    check_grad(grad, logits)
    if logits.shape[0]:
        with torch.cuda.device(logits.device):
            _C.row_backward(
                make_input(_C, logits, target, None),
                make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
                lse=lse.data_ptr(), coef=coef.data_ptr(), grad=grad.data_ptr(), grad_row_stride=grad.stride(0),
                stream=_stream(logits),
            )


@cuda_row_backward.register_fake
def _(logits, target, lse, coef, grad, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap):
    return None


@torch.library.custom_op("memft::cuda_row_forward_backward", mutates_args=("grad",))
def cuda_row_forward_backward(
    logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor], scale: torch.Tensor,
    grad: torch.Tensor, policy: int, threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_built()
    check_grad(grad, logits)
    stats = new_row_stats(logits)
    if logits.shape[0]:
        with torch.cuda.device(logits.device):
            _C.row_forward_backward(
                make_input(_C, logits, target, token_weight),
                make_options(_C, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap),
                stats_args(_C, stats), scale=scale.data_ptr(), grad=grad.data_ptr(),
                grad_row_stride=grad.stride(0), stream=_stream(logits),
            )
    return stats


@cuda_row_forward_backward.register_fake
def _(logits, target, token_weight, scale, grad, policy, threshold, sharpness, ignore_index, label_smoothing,
      z_loss, softcap):
    return new_row_stats(logits)


# ---------------------------------------------------------------------------- backend interface
def built_architectures() -> Optional[Tuple[str, ...]]:
    """What the CUDA module holds, e.g. ('sm_80', 'sm_90', 'compute_90'), None if it was not built."""
    if _C is None:
        return None
    names = []
    for item in _C.BUILT_ARCHITECTURES.split():
        arch, _, kind = item.partition("-")
        if kind in ("", "real"):
            names.append(f"sm_{arch}")
        if kind in ("", "virtual"):
            names.append(f"compute_{arch}")
    return tuple(names)


def availability() -> Optional[str]:
    if _C is None:
        return NOT_BUILT.format(what="CUDA", name="_native_cuda", error=_IMPORT_ERROR,
                                 needs="nvcc is on PATH or MEMFT_CUDA=1")
    if not torch.cuda.is_available():
        return f"the CUDA module is built ({' '.join(built_architectures())}) but torch sees no CUDA device"
    from .cuda_driver import module_problem  # the driver must support the runtime the module carries

    return module_problem(_C, [a for a in built_architectures() if a.startswith("sm_")])


def supports(logits: torch.Tensor) -> Optional[str]:
    if logits.device.type != "cuda":
        return f"the native CUDA backend runs CUDA tensors, got logits on {logits.device}"
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the native CUDA backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
    if logits.shape[-1] > _INT32_MAX or logits.numel() // max(1, logits.shape[-1]) > _INT32_MAX:
        return f"the native CUDA backend takes fewer than 2^31 rows and classes, got shape {tuple(logits.shape)}"
    return None


def row_forward(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                opts: KernelOptions) -> RowStats:
    return native_args.row_forward(cuda_row_forward, logits, target, token_weight, opts)


def row_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 opts: KernelOptions, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return native_args.row_backward(cuda_row_backward, logits, target, lse, coef, opts, out)


def row_forward_backward(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                         opts: KernelOptions, scale: torch.Tensor, grad: torch.Tensor) -> RowStats:
    return native_args.row_forward_backward(cuda_row_forward_backward, logits, target, token_weight, opts, scale, grad)
