"""The native backends (``cpu``, ``cuda``), written once over a compiled module.

The compiled modules (``memft_kernels._native_cpu`` / ``_native_cuda``, csrc/bindings.cpp) take raw
addresses, sizes and strides, never a torch tensor (they link no libtorch). ``NativeBackend`` wraps
one of them: it defines the module's ``torch.library`` custom ops ``memft::{prefix}_*`` from the one
description below (schemas, fake implementations, declared mutations), and implements the backend
contract of ``ops/base.py`` over them. The two native backends differ only in their execution
context (``threads=`` for OpenMP or ``stream=`` for CUDA, and a device guard), in ``availability``
and in ``supports``: see ``native_cpu.py`` and ``native_cuda.py``.

The ops: ``row_forward``; ``row_backward`` (into a separate ``grad``) and ``row_backward_inplace``
(into the logits); ``row_forward_backward`` and ``row_forward_backward_inplace``; ``scale_grad_``
(``grad *= factor`` with the factor read by the kernel: on the CPU that is host memory anyway, on
CUDA it never reaches the host). Scalar options travel as ``spec.KernelScalars``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Tuple

import torch

from ..spec import KernelOptions, KernelScalars, RowStats
from .base import Backend, check_scale_args

# The compiled modules' argument-struct version (csrc/memft_native.h MEMFT_NATIVE_ABI).
ABI = 3
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NOT_BUILT = (
    "the native {what} module memft_kernels.{name} was not built ({error}); reinstall with "
    "`pip install .` where {needs} (MEMFT_NATIVE=0 skips native code), see docs/BUILDING.md"
)
STALE = (
    "the native {what} module memft_kernels.{name} was built from other sources (ABI {found}, this package "
    "needs {ABI}): rebuild it with `python setup.py build_ext --inplace` or reinstall, see docs/BUILDING.md"
)

# The one description of the ops: the scalar options (KernelScalars, in order) and each op's schema.
_SCALARS = ("int policy, float threshold, float ce_threshold, float sharpness, int ignore_index, "
            "float label_smoothing, float inv_vocab, float z_loss, float softcap")
_STATS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_SCHEMAS = {
    "row_forward": (f"(Tensor logits, Tensor target, Tensor? token_weight, {_SCALARS}) -> {_STATS}", ()),
    "row_backward": (f"(Tensor logits, Tensor target, Tensor lse, Tensor coef, Tensor(a!) grad, {_SCALARS}) -> ()",
                     ("grad",)),
    "row_backward_inplace": (f"(Tensor(a!) logits, Tensor target, Tensor lse, Tensor coef, {_SCALARS}) -> ()",
                             ("logits",)),
    "row_forward_backward": (f"(Tensor logits, Tensor target, Tensor? token_weight, Tensor scale, Tensor(a!) grad, "
                             f"{_SCALARS}) -> {_STATS}", ("grad",)),
    "row_forward_backward_inplace": (f"(Tensor(a!) logits, Tensor target, Tensor? token_weight, Tensor scale, "
                                     f"{_SCALARS}) -> {_STATS}", ("logits",)),
    "scale_grad_": ("(Tensor(a!) grad, Tensor factor) -> ()", ("grad",)),
}


# --------------------------------------------------------------------------- argument helpers
def make_options(ext, k: KernelScalars):
    return ext.make_options(
        policy=k.policy, threshold=k.threshold, sharpness=k.sharpness, ce_threshold=k.ce_threshold,
        ignore_index=k.ignore_index, label_smoothing=k.label_smoothing, inv_vocab=k.inv_vocab, z_loss=k.z_loss,
        softcap=k.softcap,
    )


def make_input(ext, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor]):
    """The compiled RowInput: addresses, sizes and strides of [N, V] logits (unit column stride)."""
    if logits.dim() != 2 or (logits.numel() > 0 and logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"native kernels take [N, V] logits with unit column stride, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if target.dtype not in (torch.int32, torch.int64) or target.shape != logits.shape[:1]:
        raise ValueError(f"target must be int32/int64 of shape {tuple(logits.shape[:1])}, "
                         f"got {target.dtype} {tuple(target.shape)}")
    if token_weight is not None and (token_weight.dtype != torch.float32 or token_weight.shape != target.shape):
        raise ValueError("token_weight must be float32 of the target's shape")
    # The kernel dereferences every address on the logits' device: a tensor elsewhere would be read
    # through a pointer of another address space (a crash, or silently wrong values).
    for name, t in (("target", target), ("token_weight", token_weight)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} must be on the logits' device {logits.device}, got {t.device}")
    return ext.make_input(
        logits=logits.data_ptr(), dtype=DTYPE_CODES[logits.dtype], n_rows=logits.shape[0],
        n_cols=logits.shape[1], row_stride=logits.stride(0), target=target.data_ptr(),
        target_int64=target.dtype == torch.int64, target_stride=target.stride(0) if target.numel() else 1,
        token_weight=0 if token_weight is None else token_weight.data_ptr(),
        token_weight_stride=1 if token_weight is None or token_weight.numel() == 0 else token_weight.stride(0),
    )


def new_row_stats(logits: torch.Tensor):
    """Empty per-row outputs: lse, ce, prob, pred (int64), weight, loss."""
    n = logits.shape[0]
    f = lambda: torch.empty(n, dtype=torch.float32, device=logits.device)  # noqa: E731
    return f(), f(), f(), torch.empty(n, dtype=torch.int64, device=logits.device), f(), f()


def stats_args(ext, stats):
    lse, ce, prob, pred, weight, loss = stats
    return ext.make_stats(lse=lse.data_ptr(), ce=ce.data_ptr(), prob=prob.data_ptr(), pred=pred.data_ptr(),
                          weight=weight.data_ptr(), loss=loss.data_ptr())


def check_grad(grad: torch.Tensor, logits: torch.Tensor) -> None:
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
        raise ValueError(f"grad must match the logits ({logits.dtype}, {tuple(logits.shape)}), "
                         f"got {grad.dtype}, {tuple(grad.shape)}")
    if grad.numel() > 0 and grad.shape[1] > 1 and grad.stride(1) != 1:
        raise ValueError(f"grad needs unit column stride, got strides {grad.stride()}")
    # Rows that share memory (an expand()ed or as_strided buffer) would be written by several rows
    # at once, concurrently: the result depends on the thread schedule.
    if grad.numel() > 0 and grad.shape[0] > 1 and grad.stride(0) < grad.shape[1]:
        raise ValueError(f"grad rows overlap (row stride {grad.stride(0)} < {grad.shape[1]} columns): "
                         f"the gradient needs a row of its own for every row")


def check_rows(name: str, t: torch.Tensor, logits: torch.Tensor, dtype=torch.float32) -> None:
    """A per-row input of the kernels (lse, coef): [N], ``dtype``, unit stride, the logits' device.
    The kernels read element i of row i at ``address + i``: anything else is read out of bounds."""
    n = logits.shape[0]
    if t.shape != (n,) or t.dtype != dtype or t.device != logits.device or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape ({n},) on {logits.device}, "
                         f"got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def check_scale(scale: torch.Tensor, logits: torch.Tensor) -> None:
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != logits.device:
        raise ValueError(f"scale must be one float32 element on {logits.device}, got {scale.dtype} "
                         f"{tuple(scale.shape)} on {scale.device}")


def prepare(logits, target, token_weight):
    """Unit column stride and float32 token weights, as the compiled kernels need them."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if token_weight is not None and token_weight.dtype != torch.float32:
        token_weight = token_weight.to(torch.float32)
    return logits, target, token_weight


# ------------------------------------------------------------------------------ the backend
class NativeBackend(Backend):
    """A backend over one compiled module. Subclasses give ``name``, ``prefix`` (of the op names),
    ``context`` (the execution context of a call) and ``availability`` / ``supports``."""

    prefix: str = ""

    def __init__(self, module_state: Callable[[], Tuple[object, Optional[str]]]):
        # (compiled module or None, import error): read at each use, so that the module global of
        # native_cpu.py / native_cuda.py stays the one truth (tests substitute it).
        self._module_state = module_state
        self.ops = self._define_ops()

    @property
    def ext(self):
        return self._module_state()[0]

    @property
    def import_error(self) -> Optional[str]:
        return self._module_state()[1]

    # The one difference between the native backends: where and how a kernel runs.
    def context(self, t: torch.Tensor) -> ContextManager[dict]:
        raise NotImplementedError

    def built_reason(self, what: str, needs: str) -> Optional[str]:
        """None when the module is built and current, else why not (shared part of availability)."""
        name = f"_native_{self.name}"
        if self.ext is None:
            return NOT_BUILT.format(what=what, name=name, error=self.import_error, needs=needs)
        found = getattr(self.ext, "ABI", 1)
        if found != ABI:
            return STALE.format(what=what, name=name, found=found, ABI=ABI)
        return None

    def _require(self):
        reason = self.availability()
        if reason is not None:
            raise RuntimeError(reason)
        return self.ext

    def _define_ops(self) -> dict:
        """Register ``memft::{prefix}_<op>`` for every op of _SCHEMAS (once per process)."""
        impls = {
            "row_forward": self._op_row_forward,
            "row_backward": self._op_row_backward,
            "row_backward_inplace": self._op_row_backward_inplace,
            "row_forward_backward": self._op_row_forward_backward,
            "row_forward_backward_inplace": self._op_row_forward_backward_inplace,
            "scale_grad_": self._op_scale_grad,
        }
        ops = {}
        for op, (schema, mutates) in _SCHEMAS.items():
            qualname = f"memft::{self.prefix}_{op}"
            custom = torch.library.custom_op(qualname, impls[op], mutates_args=mutates, schema=schema)
            if schema.endswith(_STATS):
                custom.register_fake(lambda logits, *args: new_row_stats(logits))
            else:
                custom.register_fake(lambda *args: None)
            ops[op] = custom
        return ops

    # ----------------------------------------------------------- op implementations (eager)
    def _forward(self, logits, target, token_weight, scale, grad, scalars):
        ext = self._require()
        if grad is not None:
            check_scale(scale, logits)
        stats = new_row_stats(logits)
        if logits.shape[0]:
            with self.context(logits) as run:
                args = (make_input(ext, logits, target, token_weight), make_options(ext, KernelScalars(*scalars)),
                        stats_args(ext, stats))
                if grad is None:
                    ext.row_forward(*args, **run)
                else:
                    ext.row_forward_backward(*args, scale=scale.data_ptr(), grad=grad.data_ptr(),
                                             grad_row_stride=grad.stride(0), **run)
        return stats

    def _backward(self, logits, target, lse, coef, grad, scalars) -> None:
        ext = self._require()
        check_rows("lse", lse, logits)
        check_rows("coef", coef, logits)
        if logits.shape[0]:
            with self.context(logits) as run:
                ext.row_backward(make_input(ext, logits, target, None), make_options(ext, KernelScalars(*scalars)),
                                 lse=lse.data_ptr(), coef=coef.data_ptr(), grad=grad.data_ptr(),
                                 grad_row_stride=grad.stride(0), **run)

    def _op_row_forward(self, logits, target, token_weight, *scalars):
        return self._forward(logits, target, token_weight, None, None, scalars)

    def _op_row_forward_backward(self, logits, target, token_weight, scale, grad, *scalars):
        check_grad(grad, logits)
        return self._forward(logits, target, token_weight, scale, grad, scalars)

    def _op_row_forward_backward_inplace(self, logits, target, token_weight, scale, *scalars):
        check_grad(logits, logits)
        return self._forward(logits, target, token_weight, scale, logits, scalars)

    def _op_row_backward(self, logits, target, lse, coef, grad, *scalars) -> None:
        check_grad(grad, logits)
        self._backward(logits, target, lse, coef, grad, scalars)

    def _op_row_backward_inplace(self, logits, target, lse, coef, *scalars) -> None:
        check_grad(logits, logits)
        self._backward(logits, target, lse, coef, logits, scalars)

    def _op_scale_grad(self, grad, factor) -> None:
        ext = self._require()
        check_grad(grad, grad)
        check_scale(factor, grad)
        if grad.shape[0]:
            with self.context(grad) as run:
                ext.scale_rows(grad=grad.data_ptr(), dtype=DTYPE_CODES[grad.dtype], n_rows=grad.shape[0],
                               n_cols=grad.shape[1], row_stride=grad.stride(0), factor=factor.data_ptr(), **run)

    # ----------------------------------------------------------------------- the contract
    def row_forward(self, logits, target, token_weight, opts: KernelOptions) -> RowStats:
        logits, target, token_weight = prepare(logits, target, token_weight)
        return RowStats(*self.ops["row_forward"](logits, target, token_weight, *opts.scalars(logits.shape[1])))

    def row_backward(self, logits, target, lse, coef, opts: KernelOptions, out=None) -> torch.Tensor:
        if out is logits:
            return self.row_backward_(logits, target, lse, coef, opts)
        logits, target, _ = prepare(logits, target, None)
        if out is None:
            out = torch.empty_like(logits)
        self.ops["row_backward"](logits, target, lse.to(torch.float32).contiguous(),
                                 coef.to(torch.float32).contiguous(), out, *opts.scalars(logits.shape[1]))
        return out

    def row_backward_(self, logits, target, lse, coef, opts: KernelOptions) -> torch.Tensor:
        check_grad(logits, logits)  # unit column stride: the gradient is written where the logits are
        self.ops["row_backward_inplace"](logits, target, lse.to(torch.float32).contiguous(),
                                         coef.to(torch.float32).contiguous(), *opts.scalars(logits.shape[1]))
        return logits

    def row_forward_backward(self, logits, target, token_weight, opts: KernelOptions, scale, grad) -> RowStats:
        if grad is logits:
            return self.row_forward_backward_(logits, target, token_weight, opts, scale)
        logits, target, token_weight = prepare(logits, target, token_weight)
        scale = scale.to(device=logits.device, dtype=torch.float32).reshape(())
        return RowStats(*self.ops["row_forward_backward"](logits, target, token_weight, scale, grad,
                                                          *opts.scalars(logits.shape[1])))

    def row_forward_backward_(self, logits, target, token_weight, opts: KernelOptions, scale) -> RowStats:
        check_grad(logits, logits)
        _, target, token_weight = prepare(logits, target, token_weight)
        scale = scale.to(device=logits.device, dtype=torch.float32).reshape(())
        return RowStats(*self.ops["row_forward_backward_inplace"](logits, target, token_weight, scale,
                                                                  *opts.scalars(logits.shape[1])))

    def scale_grad_(self, grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        self.ops["scale_grad_"](grad, check_scale_args(grad, factor))
        return grad


@contextlib.contextmanager
def run_with(**run):
    """A context that only supplies the execution keywords (the CPU's ``threads=``)."""
    yield run
