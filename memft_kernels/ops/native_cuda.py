"""The native CUDA backend: hand-written CUDA row kernels (csrc/cuda/memft_cuda.cu), an alternative
to the Triton backend on GPU hosts.

The compiled module ``memft_kernels._native_cuda`` (raw addresses and a stream handle, CUDA runtime
linked statically, no libtorch) is wrapped by ``ops/native.py``'s ``NativeBackend``, which defines
the ``memft::cuda_*`` custom ops and the backend contract; this file gives the execution context
(the logits' device and its current torch stream), availability and what the kernels take. Nothing
synchronizes the host: the gradient scale of the single-pass path is read by a kernel.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .base import export
from .native import NativeBackend

try:
    from .. import _native_cuda as _C

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # not built (no nvcc at install time, or MEMFT_CUDA=0)
    _C = None
    _IMPORT_ERROR = str(exc)

_INT32_MAX = 2**31 - 1


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


class CudaBackend(NativeBackend):
    name = "cuda"
    prefix = "cuda"

    @contextlib.contextmanager
    def context(self, t: torch.Tensor):
        with torch.cuda.device(t.device):
            yield dict(stream=torch.cuda.current_stream(t.device).cuda_stream)

    def availability(self) -> Optional[str]:
        reason = self.built_reason("CUDA", "nvcc is on PATH or MEMFT_CUDA=1")
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return f"the CUDA module is built ({' '.join(built_architectures())}) but torch sees no CUDA device"
        from .cuda_driver import module_problem  # the driver must support the runtime the module carries

        return module_problem(self.ext, [a for a in built_architectures() if a.startswith("sm_")])

    def supports(self, logits: torch.Tensor) -> Optional[str]:
        if logits.device.type != "cuda":
            return f"the native CUDA backend runs CUDA tensors, got logits on {logits.device}"
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the native CUDA backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
        if logits.shape[-1] > _INT32_MAX or logits.numel() // max(1, logits.shape[-1]) > _INT32_MAX:
            return f"the native CUDA backend takes fewer than 2^31 rows and classes, got shape {tuple(logits.shape)}"
        return None


export(CudaBackend(lambda: (_C, _IMPORT_ERROR)), globals())
