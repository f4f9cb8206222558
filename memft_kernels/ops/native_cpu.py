"""The native CPU backend: C++ row kernels (csrc/cpu/, OpenMP over rows; AVX-512F, AVX2+FMA or
portable code, chosen at run time).

The compiled module ``memft_kernels._native_cpu`` (built by setup.py with CMake and pybind11; raw
addresses, no libtorch) is wrapped by ``ops/native.py``'s ``NativeBackend``, which defines the
``memft::cpu_*`` custom ops and the backend contract; this file gives the execution context
(``threads=torch.get_num_threads()``), availability and what the kernels take. The autograd lives
in ``loss.py``, shared by every backend.

Threads: every row is reduced by one thread in a fixed order, so the results are bitwise the same
for any thread count.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .base import export
from .native import NativeBackend, run_with

try:
    from .. import _native_cpu as _C

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # not built: the package works on the other backends
    _C = None
    _IMPORT_ERROR = str(exc)

_INT32_MAX = 2**31 - 1


class CpuBackend(NativeBackend):
    name = "cpu"
    prefix = "cpu"

    def context(self, t: torch.Tensor):
        return run_with(threads=torch.get_num_threads())

    def availability(self) -> Optional[str]:
        return self.built_reason("CPU", "a C++17 compiler with OpenMP, CMake and pybind11 are available")

    def supports(self, logits: torch.Tensor) -> Optional[str]:
        if logits.device.type != "cpu":
            return f"the native CPU backend runs CPU tensors, got logits on {logits.device}"
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the native CPU backend takes float32, bfloat16 or float16 logits, got {logits.dtype}"
        if logits.shape[-1] > _INT32_MAX:
            return f"the native CPU backend takes V <= 2^31 - 1, got V={logits.shape[-1]}"
        return None


ISA_CAPS = ("avx2", "scalar")


def isa_request_problem() -> Optional[str]:
    """None, or why MEMFT_CPU_ISA is ignored (the compiled module reads only "avx2" and "scalar")."""
    value = os.environ.get("MEMFT_CPU_ISA", "")
    if value in ("",) + ISA_CAPS:
        return None
    return (f"MEMFT_CPU_ISA={value!r} is ignored: it caps the CPU code path at one of {', '.join(ISA_CAPS)} "
            f"(unset, the kernels use the best the host has)")


if isa_request_problem() is not None:
    warnings.warn(isa_request_problem(), RuntimeWarning, stacklevel=2)


def isa() -> Optional[str]:
    """The vector code path the kernels take here: "avx512f", "avx2+fma" or "scalar" (the best the
    host has, capped by MEMFT_CPU_ISA=avx2|scalar), None if not built."""
    return None if _C is None else _C.isa()


export(CpuBackend(lambda: (_C, _IMPORT_ERROR)), globals())
