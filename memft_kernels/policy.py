"""Per-row policy weights and the reduction of SPEC.md, as small functions of the row statistics.

Kernels compute the same weight inline (it is one compare or one sigmoid per row); this module is
the readable form and what the PyTorch reference and the reduction use. Nothing here touches N x V
data: every tensor is one value per row.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .spec import READS_VALUES, KernelOptions, accumulate_dtype, has_values


def policy_weight(ce: torch.Tensor, valid: torch.Tensor, token_weight: Optional[torch.Tensor], opts: KernelOptions) -> torch.Tensor:
    """w_i of SPEC.md: policy gate, NaN rule (w = 1 where ce is NaN), token weight, 0 at ignored rows."""
    if opts.policy == "none":
        w = torch.ones_like(ce)
    elif opts.policy == "hard":
        # p < threshold  <=>  ce > ln(1/threshold); written on p as SPEC.md states it.
        w = (torch.exp(-ce) < opts.threshold).to(ce.dtype)
    elif opts.policy == "sigmoid":
        w = torch.sigmoid(opts.sharpness * (ce - opts.ce_threshold))
    else:  # validated earlier; kept so that a new policy cannot silently weigh 0
        raise ValueError(f"unknown policy {opts.policy!r}")
    w = torch.where(torch.isnan(ce), torch.ones_like(w), w)
    if token_weight is not None:
        w = w * token_weight.to(w.dtype)
    return torch.where(valid, w, torch.zeros_like(w))


class Reduced(NamedTuple):
    """The reduced loss and what the backward needs: coef_i = grad_out * row_scale_i."""

    loss: torch.Tensor  # 0-d (mean/sum) or [N] (none)
    row_scale: torch.Tensor  # [N]: w_eff_i / D (mean), w_i (sum/none)
    fell_back: torch.Tensor  # 0-d bool


def reduce_rows(
    row_loss: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    *,
    reduction: str,
    normalize: str,
    fallback: str,
    denominator=None,
) -> Reduced:
    """SPEC.md's reduction table, without host synchronization (every branch is a tensor op)."""
    acc = accumulate_dtype(row_loss.dtype)
    row_loss = row_loss.to(acc)
    weight = weight.to(acc)
    no = torch.zeros((), dtype=torch.bool, device=row_loss.device)
    if reduction == "none":
        return Reduced(weight * row_loss, weight, no)
    if reduction == "sum":
        return Reduced((weight * row_loss).sum(), weight, no)
    # mean
    if denominator is not None:
        d = torch.as_tensor(denominator, dtype=acc, device=row_loss.device)
        w_eff, fell_back = weight, no
    elif normalize == "valid":
        d = valid.sum().to(acc)
        w_eff, fell_back = weight, no
    else:  # active
        wsum = weight.sum()
        fell_back = (wsum == 0) & valid.any()
        if fallback == "mean":
            w_eff = torch.where(fell_back, valid.to(acc), weight)
        else:  # zero: the all-zero weights give loss 0 and zero gradient below
            w_eff = weight
        d = w_eff.sum()
    # D <= 0 (no weight at all) gives 0; a NaN D (a NaN weight, only reachable with validate=False)
    # gives NaN: a NaN is never turned into a finite loss.
    positive = ~(d <= 0)
    safe_d = torch.where(positive, d, torch.ones_like(d))
    loss = torch.where(positive, (w_eff * row_loss).sum() / safe_d, torch.zeros_like(d))
    row_scale = torch.where(positive, w_eff / safe_d, torch.zeros_like(w_eff))
    return Reduced(loss, row_scale, fell_back)


def unit_scale(valid: torch.Tensor, reduction: str, denominator, dtype: torch.dtype) -> torch.Tensor:
    """The factor s of coef_i = s * w_i (grad_out = 1) when it is known before the forward: 1/D for
    a given denominator or for normalize="valid", 1 for "sum"; 0 where D is not positive."""
    if denominator is not None:
        d = torch.as_tensor(denominator, dtype=dtype, device=valid.device)
    elif reduction == "mean":
        d = valid.sum().to(dtype)
    else:
        d = torch.ones((), dtype=dtype, device=valid.device)
    positive = ~(d <= 0)  # a NaN D (a failed dp_group rank with validate=False) stays NaN, as in reduce_rows
    return torch.where(positive, 1.0 / torch.where(positive, d, torch.ones_like(d)), torch.zeros_like(d))


def weight_fn_factor(weight_fn, target: torch.Tensor, stats, *, check_values: bool) -> torch.Tensor:
    """Call ``weight_fn(target, stats)`` once and return its result as an [N] factor of the policy
    weight (``target`` as the caller passed it, ``stats`` a MemFTStats of this forward whose per-token
    tensors have target's shape). Refuses a result that is not a floating tensor on target's
    device broadcastable to target's shape; with ``check_values`` (validate=True; it synchronizes)
    also a NaN, infinite or negative entry."""
    out = weight_fn(target, stats)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{_describe(weight_fn)} must return a tensor broadcastable to target's shape "
                        f"{tuple(target.shape)}, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"{_describe(weight_fn)} must return a floating-point tensor, got {out.dtype}")
    if out.device != target.device:
        raise ValueError(f"{_describe(weight_fn)} returned a tensor on {out.device}; target is on {target.device}")
    try:
        shape = torch.broadcast_shapes(out.shape, target.shape)
    except RuntimeError:
        shape = None
    if shape is None or tuple(shape) != tuple(target.shape):
        raise ValueError(f"{_describe(weight_fn)} returned shape {tuple(out.shape)}, which does not broadcast to "
                         f"target's shape {tuple(target.shape)}")
    if check_values:
        _check_weight_values(out, weight_fn)
    return out.expand(target.shape).reshape(-1)


def _describe(weight_fn) -> str:
    """How an error names ``weight_fn`` (built only when raising: traced by torch.compile, reading a
    function's ``__qualname__`` gave the attribute's descriptor, not the name)."""
    return f"weight_fn {getattr(weight_fn, '__qualname__', None) or type(weight_fn).__qualname__}"


@torch.compiler.disable(reason=READS_VALUES)
def _check_weight_values(out: torch.Tensor, weight_fn) -> None:
    if out.numel() > 0 and has_values(out):
        bad = ~torch.isfinite(out) | (out < 0)
        if bool(bad.any()):
            value = out[bad].flatten()[0].item()
            raise ValueError(f"{_describe(weight_fn)} returned {value!r}; weights must be finite and >= 0 "
                             f"(validate=False skips this check, which synchronizes)")
