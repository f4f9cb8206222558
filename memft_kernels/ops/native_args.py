"""Arguments of the compiled modules, shared by the native CPU and CUDA backends: tensors become
the raw addresses, sizes and strides that ``csrc/bindings.cpp`` takes (the modules never see a
torch tensor, so they link no libtorch), options become the scalars of its ``RowOptions``; and the
backend interface of ``ops/reference.py`` written once over a module's three custom ops.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..spec import KernelOptions, RowStats

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_POLICY_CODES = {"none": 0, "hard": 1, "sigmoid": 2}
NOT_BUILT = (
    "the native {what} module memft_kernels.{name} was not built ({error}); reinstall with "
    "`pip install .` where {needs} (MEMFT_NATIVE=0 skips native code), see docs/BUILDING.md"
)


def option_args(opts: KernelOptions) -> Tuple[int, float, float, int, float, float, float]:
    """KernelOptions as the scalars the custom ops take (softcap 0.0 means none)."""
    return (
        _POLICY_CODES[opts.policy], float(opts.threshold), float(opts.sharpness), int(opts.ignore_index),
        float(opts.label_smoothing), float(opts.z_loss), float(opts.softcap or 0.0),
    )


def make_options(ext, policy, threshold, sharpness, ignore_index, label_smoothing, z_loss, softcap):
    return ext.make_options(
        policy=policy, threshold=threshold, sharpness=sharpness, ce_threshold=-math.log(threshold),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )


def make_input(ext, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor]):
    """The compiled RowInput: addresses, sizes and strides of [N, V] logits (unit column stride)."""
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"native kernels take [N, V] logits with unit column stride, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if target.dtype not in (torch.int32, torch.int64) or target.shape != logits.shape[:1]:
        raise ValueError(f"target must be int32/int64 of shape {tuple(logits.shape[:1])}, "
                         f"got {target.dtype} {tuple(target.shape)}")
    if token_weight is not None and (token_weight.dtype != torch.float32 or token_weight.shape != target.shape):
        raise ValueError("token_weight must be float32 of the target's shape")
    return ext.make_input(
        logits=logits.data_ptr(), dtype=_DTYPE_CODES[logits.dtype], n_rows=logits.shape[0],
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
    if grad.shape[1] > 1 and grad.stride(1) != 1:
        raise ValueError(f"grad needs unit column stride, got strides {grad.stride()}")


def prepare(logits, target, token_weight):
    """Unit column stride and float32 token weights, as the compiled kernels need them."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if token_weight is not None and token_weight.dtype != torch.float32:
        token_weight = token_weight.to(torch.float32)
    return logits, target, token_weight


# ------------------------------------------------------ the backend interface over a module's custom ops
def row_forward(op, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                opts: KernelOptions) -> RowStats:
    logits, target, token_weight = prepare(logits, target, token_weight)
    return RowStats(*op(logits, target, token_weight, *option_args(opts)))


def row_backward(op, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 opts: KernelOptions, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    logits, target, _ = prepare(logits, target, None)
    if out is None:
        out = torch.empty_like(logits)
    lse = lse.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    op(logits, target, lse, coef, out, *option_args(opts))
    return out


def row_forward_backward(op, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                         opts: KernelOptions, scale: torch.Tensor, grad: torch.Tensor) -> RowStats:
    logits, target, token_weight = prepare(logits, target, token_weight)
    scale = scale.to(device=logits.device, dtype=torch.float32).reshape(())
    return RowStats(*op(logits, target, token_weight, scale, grad, *option_args(opts)))
