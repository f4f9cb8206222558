"""``memft_loss``: a drop-in replacement for ``F.cross_entropy`` that computes docs/SPEC.md.

Reading order: the autograd.Function (calls a backend's row kernels, then the reduction), then the
public function (validation, flattening, backend choice), then the ``nn.Module``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import dispatch
from .policy import reduce_rows
from .spec import (
    KernelOptions,
    MemFTStats,
    check_target_range,
    validate_denominator,
    validate_options,
    validate_tensors,
)


def _accumulate_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits (the tests' ground truth), float32 for everything else."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scale_known_up_front(reduction: str, normalize: str, denominator) -> bool:
    """True when coef_i = scale * w_i with a scale known before the forward (single-pass path)."""
    return reduction == "sum" or (reduction == "mean" and (denominator is not None or normalize == "valid"))


class _MemFTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, token_weight, backend, opts: KernelOptions, reduction, normalize, fallback, denominator, inplace):
        valid = target != opts.ignore_index
        fused = (
            ctx.needs_input_grad[0]
            and hasattr(backend, "row_forward_backward")
            and _scale_known_up_front(reduction, normalize, denominator)
        )
        if fused:
            # Gradient written during the forward with grad_out = 1; backward rescales if needed.
            acc = _accumulate_dtype(logits)
            if denominator is not None:
                d = torch.as_tensor(denominator, dtype=acc, device=logits.device)
            elif reduction == "mean":
                d = valid.sum().to(acc)
            else:
                d = torch.ones((), dtype=acc, device=logits.device)
            scale = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
            grad = logits if inplace else torch.empty_like(logits)
            stats = backend.row_forward_backward(logits, target, token_weight, opts, scale, grad)
        else:
            grad = None
            stats = backend.row_forward(logits, target, token_weight, opts)
        reduced = reduce_rows(
            stats.loss, stats.weight, valid,
            reduction=reduction, normalize=normalize, fallback=fallback, denominator=denominator,
        )
        ctx.backend, ctx.opts, ctx.inplace, ctx.fused = backend, opts, inplace, fused
        if fused:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, target, stats.lse, reduced.row_scale)
        ctx.mark_non_differentiable(stats.lse, stats.ce, stats.prob, stats.pred, stats.weight, reduced.fell_back)
        return reduced.loss, stats.lse, stats.ce, stats.prob, stats.pred, stats.weight, reduced.fell_back

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.fused:
            (grad,) = ctx.saved_tensors
            if hasattr(ctx.backend, "scale_grad_"):
                # Scaled in place on the device: no host sync (CUDA graphs, torch.compile), and a
                # grad_loss of exactly 1 costs no pass over the gradient. The in-place update bumps
                # the saved tensor's version, so a second backward through the same graph fails
                # with autograd's own error instead of scaling twice.
                return (ctx.backend.scale_grad_(grad, grad_loss),) + (None,) * 9
            # grad_loss is a 0-d tensor; skip the N x V multiply when it is exactly 1 (the usual
            # loss.backward()), which needs a host read; under torch.compile always multiply.
            if torch.compiler.is_compiling() or float(grad_loss) != 1.0:
                grad = grad.mul_(grad_loss.to(grad.dtype)) if ctx.inplace else grad * grad_loss.to(grad.dtype)
            return (grad,) + (None,) * 9
        logits, target, lse, row_scale = ctx.saved_tensors
        coef = (grad_loss * row_scale).to(_accumulate_dtype(logits))
        out = logits if ctx.inplace else None
        grad = ctx.backend.row_backward(logits, target, lse, coef, ctx.opts, out=out)
        return (grad,) + (None,) * 9


def memft_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    policy: str = "hard",
    threshold: float = 0.5,
    sharpness: float = 10.0,
    token_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    normalize: str = "active",
    denominator=None,
    fallback: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_stats: bool = False,
    validate: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """The MemFT loss of docs/SPEC.md; with ``policy="none"`` exactly ``F.cross_entropy``.

    ``logits`` is ``[..., V]`` (class dimension last), ``target`` the leading shape. Returns a float32
    loss (0-d for "mean"/"sum", the shape of ``target`` for "none"), and with ``return_stats=True``
    the pair ``(loss, MemFTStats)``.
    """
    opts = validate_options(
        policy=policy, threshold=threshold, sharpness=sharpness, reduction=reduction,
        normalize=normalize, fallback=fallback, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, backend=backend, ignore_index=ignore_index,
    )
    denominator = validate_denominator(denominator)
    validate_tensors(logits, target, token_weight, check_values=validate)
    num_classes = logits.shape[-1]
    if validate:
        check_target_range(target, num_classes, ignore_index)
    if isinstance(denominator, torch.Tensor) and denominator.device != logits.device:
        denominator = denominator.to(logits.device)

    lead_shape = target.shape
    logits2d = logits.reshape(-1, num_classes)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    target1d = target.reshape(-1)
    weight1d = None if token_weight is None else token_weight.reshape(-1).to(_accumulate_dtype(logits))
    module = dispatch.resolve(backend, logits2d)
    # In-place only when the caller asked and the storage really is the logits' (no copy was made).
    # (logits.is_contiguous() <=> the flattening above made no copy; a data_ptr is not traceable.)
    inplace = bool(inplace_backward) and logits.is_contiguous()

    loss, lse, ce, prob, pred, weight, fell_back = _MemFTLossFunction.apply(
        logits2d, target1d, weight1d, module, opts, reduction, normalize, fallback, denominator, inplace
    )
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    loss = loss.to(_accumulate_dtype(logits))
    if not return_stats:
        return loss
    return loss, MemFTStats.from_rows(lead_shape, target1d, ignore_index, lse, ce, prob, pred, weight, fell_back)


class MemFTLoss(nn.Module):
    """``nn.Module`` form of ``memft_loss``, usable where ``nn.CrossEntropyLoss`` was.

    Takes every keyword of ``memft_loss`` at construction; ``forward(logits, target, token_weight=None)``.
    Options are validated here, at construction, not at the first call.
    """

    def __init__(self, **options):
        super().__init__()
        if "token_weight" in options:
            raise ValueError("token_weight is per call: pass it to forward(), not to MemFTLoss()")
        defaults = dict(
            policy="hard", threshold=0.5, sharpness=10.0, reduction="mean", normalize="active",
            fallback="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, backend="auto", ignore_index=-100,
        )
        unknown = set(options) - set(defaults) - {"denominator", "return_stats", "validate", "inplace_backward"}
        if unknown:
            raise TypeError(f"MemFTLoss got unknown option(s) {sorted(unknown)}")
        validate_options(**{k: options.get(k, v) for k, v in defaults.items()})
        validate_denominator(options.get("denominator"))
        self.options = options

    def forward(self, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor] = None):
        return memft_loss(logits, target, token_weight=token_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
