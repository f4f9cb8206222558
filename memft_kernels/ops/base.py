"""The backend contract: what every module in ``memft_kernels/ops`` implements, whole.

A backend is a subclass of ``Backend`` with every abstract method defined (Python refuses to create
an instance otherwise); its module exposes the one instance as ``BACKEND`` and, for direct use, its
methods as module functions. ``dispatch.py`` loads ``BACKEND`` and checks that it is a ``Backend``;
``loss.py``, ``linear_loss.py`` and ``distributed.py`` call these methods and nothing else. There
are no optional parts: a backend without a faster fused path implements it as forward then backward
(see the reference), and one without a device-side scale kernel multiplies with torch ops.

Shapes and dtypes (N rows, V columns; docs/SPEC.md for the math):

* ``logits``: ``[N, V]`` float, unit stride along V (the callers flatten and make it so);
* ``target``: ``[N]`` int32/int64 (an id outside ``[0, V)`` that is not ``opts.ignore_index`` gives a
  NaN row, never an out-of-bounds read); ``token_weight``: ``[N]`` float or None;
* ``RowStats``: per-row ``lse, ce, prob, loss, weight`` (float32; float64 for float64 logits where the
  backend supports them) and ``pred`` (int64);
* the gradient row of the backward is ``coef_i * (q_ij (1 + 2 z lse_i) - (1 - eps)[j = y_i] - eps / V)
  * cap'_ij`` with ``q = exp(x - lse)`` from the *given* lse and ``1 / V = opts.inv_vocab(V_cols)``
  (the global vocabulary when ``opts.vocab_size`` is set: a vocabulary slice then computes its part
  of the full gradient); rows with ``coef_i == 0`` get exact zeros without their logits being read.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch

from ..spec import KernelOptions, RowStats


class Backend(abc.ABC):
    """One implementation of the MemFT row kernels. Subclasses define every abstract method."""

    #: the name users pass as ``backend=`` ("torch", "triton", "cpu", "cuda")
    name: str = ""

    # --------------------------------------------------------------------------- availability
    @abc.abstractmethod
    def availability(self) -> Optional[str]:
        """None when usable in this process, else why not and how to get it (one sentence)."""

    @abc.abstractmethod
    def supports(self, logits: torch.Tensor) -> Optional[str]:
        """None when this backend runs these logits (device, dtype, size), else why not."""

    # ------------------------------------------------------------------------------- kernels
    @abc.abstractmethod
    def row_forward(self, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                    opts: KernelOptions) -> RowStats:
        """Per-row statistics, reading each row once."""

    @abc.abstractmethod
    def row_backward(self, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                     opts: KernelOptions, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient for per-row ``coef`` into ``out`` (a fresh tensor when None; ``out`` must not
        share storage with ``logits``: that is ``row_backward_``). Returns it."""

    @abc.abstractmethod
    def row_backward_(self, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                      opts: KernelOptions) -> torch.Tensor:
        """``row_backward`` written over ``logits`` itself (in place). Returns ``logits``."""

    @abc.abstractmethod
    def row_forward_backward(self, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                             opts: KernelOptions, scale: torch.Tensor, grad: torch.Tensor) -> RowStats:
        """``row_forward`` and the gradient for ``coef_i = scale * weight_i`` into ``grad`` (not sharing
        the logits' storage), in one sweep where the backend can. ``scale`` is a 0-d tensor on the
        logits' device, read there (never on the host)."""

    @abc.abstractmethod
    def row_forward_backward_(self, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                              opts: KernelOptions, scale: torch.Tensor) -> RowStats:
        """``row_forward_backward`` with the gradient written over ``logits`` itself."""

    @abc.abstractmethod
    def scale_grad_(self, grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``grad *= factor`` in place, ``factor`` a one-element tensor on grad's device that is read on
        the device, never on the host (no synchronization: CUDA graphs, torch.compile). Returns grad."""

    def __repr__(self) -> str:
        return f"<memft backend {self.name!r}>"


def check_scale_args(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shared argument check of ``scale_grad_``; returns the factor as a 0-d float32 tensor."""
    # (The stride of an empty tensor, or of a dimension of size 1, is never used.)
    if grad.dim() != 2 or (grad.numel() > 0 and grad.shape[1] > 1 and grad.stride(1) != 1):
        raise ValueError(f"grad must be 2-D with unit stride in V, got shape {tuple(grad.shape)} strides {grad.stride()}")
    if factor.numel() != 1:
        raise ValueError(f"factor must have one element, got shape {tuple(factor.shape)}")
    return factor.to(device=grad.device, dtype=torch.float32).reshape(())


def export(backend: Backend, namespace: dict) -> None:
    """Put ``BACKEND`` and its contract methods into a backend module's namespace, so that
    ``native_cpu.row_forward(...)`` and ``dispatch`` use the same object."""
    namespace["BACKEND"] = backend
    for name in ("availability", "supports", "row_forward", "row_backward", "row_backward_", "row_forward_backward",
                 "row_forward_backward_", "scale_grad_"):
        namespace[name] = getattr(backend, name)
