"""What the benchmarks compare: each provider is a loss function, the pass structure its bytes are
counted from, and a check that says why it cannot run here (None when it can).

Two registries:

* ``LOSS_PROVIDERS`` (``memft bench loss``): N x V logits -> the MemFT loss. The memft backends
  through ``memft_loss(..., backend=...)``, their in-place variants, the loss as a user writes it in
  PyTorch, ``torch.compile`` of that, and Liger-Kernel's cross-entropy with the same mask.
* ``LINEAR_PROVIDERS`` (``memft bench linear-loss``): ``hidden @ weight.T -> loss`` without or with
  the N x V logits: ``memft_linear_loss``, the materialized path, torch's ``F.linear_cross_entropy``
  and Liger's fused linear cross-entropy.

Only the package's public API is used (``memft_loss``, ``memft_linear_loss``, ``dispatch``), so the
harness does not move when the backends' internals do. A provider whose package is missing
(``liger_kernel`` is optional) is reported as skipped with the reason, never an error.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
IGNORE_INDEX = -100
MODES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# The losses a user would otherwise write


def plain_memft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MemFT-OT loss in plain PyTorch: tokens with p >= 0.5 (ce <= ln 2) get no gradient."""
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE_INDEX).float()
    return masked_mean(ce, target)


def masked_mean(ce: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of ``ce`` over the active tokens (ce > ln 2, not ignored); the plain mean over the
    valid tokens when none is active. No host sync: the fallback is chosen on the device."""
    valid = target != IGNORE_INDEX
    active = (ce > LN2) & valid
    n_active = active.sum()
    active_mean = (ce * active).sum() / n_active.clamp_min(1)
    plain_mean = (ce * valid).sum() / valid.sum().clamp_min(1)
    return torch.where(n_active > 0, active_mean, plain_mean)


def liger_memft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's per-token cross-entropy with the same masking (overwrites ``logits`` with the
    gradient when they require grad: Liger's own memory trick)."""
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    ce = LigerCrossEntropyFunction.apply(logits, target, None, IGNORE_INDEX, 0.0, 0.0, "none", None, False, False, False)[0]
    return masked_mean(ce.float(), target)


# ---------------------------------------------------------------------------------------------
# Availability checks (None: can run; else the reason, stored in the row's status)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def memft_unavailable(backend: str) -> Callable[[torch.Tensor, bool], Optional[str]]:
    """Why ``memft_loss(..., backend=backend)`` cannot run these logits, from ``dispatch``."""

    def check(logits: torch.Tensor, smoke: bool) -> Optional[str]:
        from memft_kernels import dispatch

        reason = dispatch.availability(backend)
        if reason is not None:
            return reason
        try:
            dispatch.resolve(backend, logits)
        except RuntimeError as exc:  # available, but not for this device / dtype
            return str(exc)
        if backend == "triton" and logits.device.type == "cpu" and not smoke:
            return "Triton's CPU interpreter is for correctness, not timed (smoke runs only)"
        return None

    return check


def liger_import_error(module: str = "liger_kernel.ops.cross_entropy") -> Optional[str]:
    """None when Liger-Kernel imports here, else why not (it is optional: benchmarks/README.md)."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return f"liger_kernel not importable ({type(exc).__name__}: {exc}); pip install liger-kernel"
    return None


def liger_unavailable(logits: torch.Tensor, smoke: bool) -> Optional[str]:
    reason = liger_import_error()
    if reason is not None:
        return reason
    if logits.device.type != "cuda" and not (smoke and _interpreter_on()):
        return "Liger-Kernel runs on GPU (CPU only in Triton's interpreter, smoke runs)"
    return None


def compile_unavailable(logits: torch.Tensor, smoke: bool) -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "torch.compile is not in this torch"
    return None


# ---------------------------------------------------------------------------------------------
# The loss providers (memft bench loss)


@dataclass
class LossProvider:
    name: str
    # mode -> (reads, writes) of N x V elements of the logits' dtype
    passes: Dict[str, Tuple[int, int]]
    pass_note: str
    make: Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    # why it cannot run these logits (smoke run or not), or None
    unavailable: Callable[[torch.Tensor, bool], Optional[str]]
    overwrites_input: bool = False
    # Its backward re-reads only the rows whose gradient coefficient is nonzero (the others are
    # written as zeros unread): of its fwd+bwd reads, one pass counts active_frac of the rows.
    skips_inactive_rows: bool = False
    # the memft kernels themselves (the targets of docs/KERNELS.md apply to them)
    is_memft_kernel: bool = False


def _memft_make(backend: str, inplace: bool = False):
    def make():
        from memft_kernels import memft_loss

        return lambda x, y: memft_loss(x, y, backend=backend, inplace_backward=inplace)

    return make


def _compile_make():
    torch._dynamo.reset()  # a fresh cache per shape: never silently past the recompile limit
    return torch.compile(plain_memft_loss, fullgraph=True, dynamic=False)


KERNEL_PASSES = {"fwd": (1, 0), "fwd+bwd": (2, 1)}
KERNEL_NOTE = ("fwd 1R; fwd+bwd two-pass (1+active_frac)R+1W: forward 1R, backward re-reads only the rows "
               "with a nonzero gradient coefficient and writes every row (active mean: the gradient scale "
               "needs the forward's weight sum)")
MEMFT_BACKENDS = ("triton", "cuda", "cpu", "torch")
INPLACE_BACKENDS = ("triton", "cuda", "cpu")

LOSS_PROVIDERS: Dict[str, LossProvider] = {
    f"memft-{b}": LossProvider(
        f"memft-{b}",
        dict(KERNEL_PASSES),
        KERNEL_NOTE if b != "torch" else KERNEL_NOTE + "; chunked float32 temporaries of the reference not counted",
        _memft_make(b),
        memft_unavailable(b),
        skips_inactive_rows=True,
        is_memft_kernel=b != "torch",
    )
    for b in MEMFT_BACKENDS
}
# The same kernels writing the gradient into the logits' storage (inplace_backward=True): no N x V
# allocation, so no fresh pages for the OS to zero on a CPU; the caller's logits are overwritten
# (restored outside the timed region).
LOSS_PROVIDERS.update({
    f"memft-{b}-inplace": LossProvider(
        f"memft-{b}-inplace",
        dict(KERNEL_PASSES),
        KERNEL_NOTE + "; gradient written into the logits",
        _memft_make(b, inplace=True),
        memft_unavailable(b),
        overwrites_input=True,
        skips_inactive_rows=True,
        is_memft_kernel=True,
    )
    for b in INPLACE_BACKENDS
})
LOSS_PROVIDERS["torch-plain"] = LossProvider(
    "torch-plain",
    {"fwd": (1, 1), "fwd+bwd": (3, 3)},
    "fwd log_softmax 1R+1W; bwd nll_loss_backward 1W, log_softmax_backward 2R+1W",
    lambda: plain_memft_loss,
    lambda logits, smoke: None,
)
LOSS_PROVIDERS["liger"] = LossProvider(
    "liger",
    {"fwd": (1, 0), "fwd+bwd": (3, 2)},
    "fwd no-grad 1R; fwd+bwd: kernel 2R+1W (gradient into the logits), per-row scale in backward 1R+1W",
    lambda: liger_memft_loss,
    liger_unavailable,
    overwrites_input=True,
)
# Last: its first call at each new shape compiles, the slowest warm-up, so a time cap hits it first.
LOSS_PROVIDERS["torch-compile"] = LossProvider(
    "torch-compile",
    dict(KERNEL_PASSES),
    "modeled as fused: fwd 1R; fwd+bwd 2R+1W (inductor recomputes softmax in the backward, every row)",
    _compile_make,
    compile_unavailable,
)

# Issue 13's side-by-side set on a GPU: the memft kernels (both backends, both gradient modes) and
# the peers their targets name; the chunked reference is left out (slow, and not a peer).
GPU_LOSS_SET = ("memft-triton", "memft-cuda", "memft-triton-inplace", "memft-cuda-inplace", "torch-plain", "liger",
                "torch-compile")


# ---------------------------------------------------------------------------------------------
# The linear-loss providers (memft bench linear-loss): fn(hidden, weight, target) -> loss


@dataclass
class LinearProvider:
    name: str
    what: str
    make: Callable[[], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    # why it cannot run on this device type (smoke run or not), or None
    unavailable: Callable[[str, bool], Optional[str]] = field(default=lambda device, smoke: None)
    plain_ce: bool = False  # computes plain cross-entropy, not MemFT (its loss differs by design)


def _materialized():
    from memft_kernels import memft_loss

    return lambda h, w, t: memft_loss(h @ w.T, t)


def _fused():
    from memft_kernels import memft_linear_loss

    return lambda h, w, t: memft_linear_loss(h, w, t)


def _torch_linear_ce():
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)


def _torch_linear_ce_unavailable(device: str, smoke: bool) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions (torch >= 2.13)"
    return None


def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: module(w, h, t)


def _liger_flce_unavailable(device: str, smoke: bool) -> Optional[str]:
    reason = liger_import_error("liger_kernel.transformers")
    if reason is not None:
        return reason
    if device != "cuda" and not (smoke and _interpreter_on()):
        return "Liger-Kernel's fused linear cross-entropy runs on GPU (CPU only in Triton's interpreter, smoke runs)"
    return None


LINEAR_PROVIDERS: Dict[str, LinearProvider] = {
    p.name: p
    for p in (
        LinearProvider("memft-materialized", "memft_loss(hidden @ weight.T, target): the N x V logits and gradient exist",
                       _materialized),
        LinearProvider("memft-fused", "memft_linear_loss(hidden, weight, target): row chunks, no N x V tensor", _fused),
        LinearProvider("torch-linear-ce", "torch's chunked F.linear_cross_entropy (plain CE)", _torch_linear_ce,
                       _torch_linear_ce_unavailable, plain_ce=True),
        LinearProvider("liger-flce", "Liger-Kernel's fused linear cross-entropy (plain CE)", _liger_flce,
                       _liger_flce_unavailable, plain_ce=True),
    )
}
