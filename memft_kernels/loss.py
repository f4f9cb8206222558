"""``memft_loss``: a drop-in replacement for ``F.cross_entropy`` that computes docs/SPEC.md.

Reading order: the autograd.Function (calls a backend's row kernels, then the reduction), then the
public function (one ``spec.prepare_call``, backend choice), then the ``nn.Module``.
docs/ARCHITECTURE.md follows one call through these steps.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from . import dispatch
from .distributed import dp_plan, dp_used, weigh_and_reduce
from .dtensor import is_dtensor
from .ops.base import Backend
from .policy import unit_scale
from .spec import (
    KernelOptions,
    LossOptions,
    accumulate_dtype,
    check_inplace_target,
    NO_VMAP,
    keep_outer_inputs,
    once_differentiable_grads,
    prepare_call,
    refuse_vmap,
    takes_loss_options,
)


def _single_pass(want_grad: bool, weight_fn, reduction: str, normalize: str, denominator) -> bool:
    """True when the gradient is written during the forward: it is wanted, and coef_i = s * w_i with
    s known before the forward ("sum", a denominator, or normalize="valid") and w_i known in the
    kernel (no weight_fn, whose weights exist only after the row pass)."""
    known = reduction == "sum" or (reduction == "mean" and (denominator is not None or normalize == "valid"))
    return bool(want_grad) and weight_fn is None and known


class _MemFTLossFunction(torch.autograd.Function):
    """Row kernels of a backend, then the reduction; forward / setup_context / backward (the form
    torch.func transforms need). ``want_grad`` tells the forward whether the logits need a gradient
    (it cannot ask ctx). ``dp_group`` (only for the "mean" whose denominator is not known before the
    row pass, see ``distributed.dp_plan``): the reduction's denominator is summed over it, and a
    ``weight_fn`` failing on this rank is raised after that all_reduce (on every rank)."""

    @staticmethod
    def forward(logits, target, token_weight, backend: Backend, opts: KernelOptions, reduction, normalize,
                fallback, denominator, inplace, weight_fn, user_target, validate, want_grad, dp_group):
        valid = target != opts.ignore_index
        fused = _single_pass(want_grad, weight_fn, reduction, normalize, denominator)
        grad = row_scale = None
        if fused:
            # Gradient written during the forward with grad_out = 1; the backward scales it on the device.
            scale = unit_scale(valid, reduction, denominator, accumulate_dtype(logits.dtype))
            if inplace:
                stats = backend.row_forward_backward_(logits, target, token_weight, opts, scale)
            else:
                grad = torch.empty_like(logits)
                stats = backend.row_forward_backward(logits, target, token_weight, opts, scale, grad)
            row_scale = stats.weight.to(scale.dtype) * scale
        else:
            stats = backend.row_forward(logits, target, token_weight, opts)
        stats, reduced = weigh_and_reduce(
            stats, valid, target, opts, weight_fn=weight_fn, user_target=user_target, validate=validate,
            reduction=reduction, normalize=normalize, fallback=fallback, denominator=denominator, dp_group=dp_group,
            where="memft_loss",
        )
        if not fused:
            row_scale = reduced.row_scale
        if grad is None:  # outputs are tensors (torch.compile's backward wants no None): an empty stand-in
            grad = logits.new_empty(0)
        return (reduced.loss, stats.lse, stats.ce, stats.prob, stats.pred, stats.weight, reduced.fell_back,
                row_scale, grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (logits, target, _, backend, opts, reduction, normalize, _, denominator, inplace, weight_fn, _, _,
         want_grad, _) = inputs
        _, lse, ce, prob, pred, weight, fell_back, row_scale, grad = output
        ctx.backend, ctx.opts, ctx.inplace = backend, opts, inplace
        keep_outer_inputs(ctx, logits)
        ctx.fused = _single_pass(want_grad, weight_fn, reduction, normalize, denominator)
        if not ctx.fused:
            grad = None
        elif inplace:
            grad = logits
        ctx.traced = torch.compiler.is_compiling()
        if ctx.fused and ctx.traced:
            # Traced (torch.compile): the graph is functional and its backward runs once per forward.
            ctx.save_for_backward(grad)
        else:
            # The single-pass gradient goes to the first backward as an attribute, not a saved tensor:
            # it is scaled in place there and may become the logits' .grad; a later backward through
            # a retained graph recomputes it from the saved logits instead.
            ctx.grad = grad if ctx.fused else None
            ctx.save_for_backward(logits, target, lse, row_scale)
        ctx.mark_non_differentiable(lse, ce, prob, pred, weight, fell_back, row_scale, output[8])

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_vmap("memft_loss")  # jacrev / jacfwd: the backward under vmap
        (grad,) = once_differentiable_grads(_MemFTLossFunction._backward(ctx, grad_loss), ctx=ctx)
        return (grad,) + (None,) * 14

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(NO_VMAP.format(where="memft_loss"))

    @staticmethod
    def _backward(ctx, grad_loss):
        # The kernels are not differentiable (no double backward): under a torch.func transform the
        # upstream gradient may track gradients itself, which must not reach the custom ops.
        grad_loss = grad_loss.detach()
        if ctx.fused and ctx.traced:
            (grad,) = ctx.saved_tensors
            return ctx.backend.scale_grad_(grad, grad_loss)
        if ctx.fused and ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            # Scaled in place on the device: no host sync (CUDA graphs, torch.compile), and a
            # grad_loss of exactly 1 costs no pass over the gradient on the compiled backends.
            return ctx.backend.scale_grad_(grad, grad_loss)
        # The two-pass path, and any later backward of the single-pass path (retain_graph=True):
        # the gradient from the saved logits. With inplace_backward the logits were consumed by
        # the first backward, and reading them raises autograd's in-place modification error.
        logits, target, lse, row_scale = ctx.saved_tensors
        if not ctx.inplace:
            logits = logits.detach()
        coef = (grad_loss * row_scale.detach()).to(accumulate_dtype(logits.dtype))
        if ctx.inplace:
            grad = ctx.backend.row_backward_(logits, target, lse, coef, ctx.opts)
        else:
            grad = ctx.backend.row_backward(logits, target, lse, coef, ctx.opts)
        return grad


@takes_loss_options()
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
    weight_fn: Optional[Callable] = None,
    dp_group=None,
):
    """The MemFT loss of docs/SPEC.md; with ``policy="none"`` exactly ``F.cross_entropy``.

    ``logits`` is ``[..., V]`` (class dimension last), ``target`` the leading shape. Returns a float32
    loss (float64 for float64 logits; 0-d for "mean"/"sum", the shape of ``target`` for "none"), and
    with ``return_stats=True`` the pair ``(loss, MemFTStats)``. ``token_weight`` (target's shape,
    float, >= 0) multiplies each token's policy weight; like it, a constant (no gradient: one that
    requires grad is refused). No second derivative: a double backward raises. DTensor ``logits``
    (tensor parallelism, classes sharded with ``Shard(-1)`` or replicated) are computed vocab-parallel
    and the loss is a ``Replicate()`` DTensor, as under torch's ``loss_parallel()`` (docs/DISTRIBUTED.md).

    ``dp_group`` (data parallelism): with ``reduction="mean"``, ``normalize`` "active" or "valid" and no
    ``denominator``, the denominator and the fallback decision are summed over this process group (one
    all_reduce of two or three numbers; every rank of it must call), so each rank's loss is its share of
    the global mean and its gradient is exact: the sum of the losses over ``dp_group`` is the mean over
    all ranks' tokens (DDP then averages the gradients over the ranks: multiply the loss by the dp world
    size to get the global mean's gradient). The statistics stay this rank's, except ``fell_back``.
    No effect for "sum", "none" or an explicit ``denominator``. A bad input or a failing ``weight_fn``
    on some ranks only raises on every rank (the failure rides in that all_reduce; with
    ``validate=False`` the other ranks get a NaN loss instead: docs/SPEC.md).
    """
    options = LossOptions(
        policy=policy, threshold=threshold, sharpness=sharpness, reduction=reduction, normalize=normalize,
        denominator=denominator, fallback=fallback, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, return_stats=return_stats, validate=validate,
        inplace_backward=inplace_backward, backend=backend, weight_fn=weight_fn, dp_group=dp_group,
    )
    return memft_loss_with(logits, target, token_weight, options)


def _prepared(logits, target, token_weight, options: LossOptions):
    """The call's checks and choices: (``prepare_call``'s call, the backend module, in-place or not,
    whether the logits want a gradient)."""
    call = prepare_call(logits, target, token_weight, options)
    module = dispatch.resolve(options.backend, call.logits)
    # In-place only when the caller asked and the storage really is the logits' (no copy was made).
    # (logits.is_contiguous() <=> the flattening made no copy; a data_ptr is not traceable.)
    inplace = bool(options.inplace_backward) and logits.is_contiguous()
    want_grad = torch.is_grad_enabled() and call.logits.requires_grad
    if inplace and want_grad:
        check_inplace_target(logits)
    return call, module, inplace, want_grad


def memft_loss_with(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                    options: LossOptions):
    """``memft_loss`` taking its options as one ``LossOptions`` (what ``MemFTLoss`` calls)."""
    if is_dtensor(logits):  # tensor-parallel logits: memft_kernels/dtensor.py (docs/DISTRIBUTED.md)
        from .dtensor import route

        return route(logits, target, token_weight, options)
    dp_group = None
    if options.dp_group is None or not dp_used(options.dp_group, reduction=options.reduction,
                                               denominator=options.denominator, where="memft_loss"):
        call, module, inplace, want_grad = _prepared(logits, target, token_weight, options)
        denominator = call.denominator
    else:  # data parallelism: the "mean" denominator over the dp group
        options.checked()  # option errors: the same on every rank, raised alike before any collective
        # A failure of this rank's checks is carried by the dp all_reduce and raised on every rank.
        call = own_error = None
        try:
            call, module, inplace, want_grad = _prepared(logits, target, token_weight, options)
        except Exception as exc:  # noqa: BLE001 - raised by dp_plan after the all_reduce
            own_error = exc
        dp_group, denominator = dp_plan(
            options.dp_group, normalize=options.normalize, before=options.normalize == "valid" and options.weight_fn is None,
            valid=None if call is None else call.target != call.kernel.ignore_index, own_error=own_error,
            validate=options.validate, where="memft_loss",
            device=logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu"))
    outputs = _MemFTLossFunction.apply(
        call.logits, call.target, call.token_weight, module, call.kernel, options.reduction, options.normalize,
        options.fallback, denominator, inplace, options.weight_fn, target, options.validate, want_grad, dp_group,
    )
    return call.finish(logits.dtype, *outputs[:7])


class MemFTLoss(nn.Module):
    """``nn.Module`` form of ``memft_loss``, usable where ``nn.CrossEntropyLoss`` was.

    Takes every option of ``memft_loss`` (``spec.LossOptions``) at construction;
    ``forward(logits, target, token_weight=None)``. Options are validated here, at construction.

    A ``dp_group`` is a handle on this process's communicator, not data: ``copy.copy`` and
    ``copy.deepcopy`` share it; pickling (``torch.save(model)``, multiprocessing) leaves it out, and
    the unpickled module raises at its first call until ``set_dp_group(group)`` re-attaches one
    (``set_dp_group(None)``: the plain, local mean), so it never silently computes a local mean
    where a global one was asked for (docs/DISTRIBUTED.md).
    """

    def __init__(self, **options):
        super().__init__()
        if "token_weight" in options:
            raise ValueError("token_weight is per call: pass it to forward(), not to MemFTLoss()")
        self.loss_options = LossOptions.from_kwargs("MemFTLoss", **options)
        self.loss_options.checked()
        self.options = options

    def forward(self, logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor] = None):
        if self.__dict__.get("_dp_group_detached"):
            raise RuntimeError(
                "MemFTLoss was unpickled (torch.load / pickle) without its dp_group: a torch.distributed process "
                "group cannot be saved. Re-attach one before use: loss_module.set_dp_group(group) in this process "
                "(or set_dp_group(None) for the local mean)")
        return memft_loss_with(logits, target, token_weight, self.loss_options)

    def set_dp_group(self, group) -> None:
        """Set (or, with None, remove) this module's ``dp_group``, e.g. after unpickling."""
        options = {k: v for k, v in self.options.items() if k != "dp_group"}
        if group is not None:
            options["dp_group"] = group
        loss_options = LossOptions.from_kwargs("MemFTLoss", **options)
        loss_options.checked()
        self.loss_options, self.options = loss_options, options
        self.__dict__.pop("_dp_group_detached", None)

    def __getstate__(self):
        # Pickling leaves a dp_group out (a ProcessGroup cannot be pickled; pickle's own TypeError named no
        # fix): the unpickled module refuses to run until set_dp_group re-attaches one (see the docstring).
        state = super().__getstate__()
        if self.loss_options.dp_group is not None:
            state["loss_options"] = dataclasses.replace(self.loss_options, dp_group=None)
            state["options"] = {k: v for k, v in self.options.items() if k != "dp_group"}
            state["_dp_group_detached"] = True
        return state

    def __copy__(self):
        copied = type(self).__new__(type(self))
        copied.__setstate__(nn.Module.__getstate__(self))  # copy.copy's default, the dp_group kept
        return copied

    def __deepcopy__(self, memo):
        # A dp_group is a handle on this process's communicator, not data: the copy shares it (a
        # ProcessGroup cannot be copied, which made copy.deepcopy of a model holding this module fail).
        group = self.loss_options.dp_group
        if group is not None:
            memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def extra_repr(self) -> str:
        detached = ["dp_group=<detached by pickling: call set_dp_group>"] if self.__dict__.get("_dp_group_detached") else []
        return ", ".join([f"{k}={v!r}" for k, v in self.options.items()] + detached)
