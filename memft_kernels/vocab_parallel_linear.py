"""``vocab_parallel_memft_linear_loss``: ``memft_linear_loss`` for a tensor-parallel lm_head.

Each rank of ``group`` holds rows ``[vocab_start, vocab_start + V_local)`` of the head's weight
(and bias): the ``ColwiseParallel`` layout of an ``nn.Linear(D, V)``, whose weight is ``[V, D]``
sharded on dimension 0. ``hidden`` ``[..., D]`` and ``target`` are the same on every rank. The
loss, the statistics and ``hidden``'s gradient equal ``memft_linear_loss(hidden, full_weight,
target, ...)`` on every rank; each rank gets the gradient of its own weight (and bias) slice. No
N x V_local logits exist: one row chunk of them at a time, as in ``memft_linear_loss``.

It is composed of the existing pieces:

* the checked layout exchange of ``distributed.py`` (one small all_gather of every rank's slice
  geometry and checksums of target, token_weight, options, D, dtype), so that bad input raises
  the same error on every rank instead of hanging in a later collective;
* forward: one sweep over the row chunks (``linear_loss._chunk_logits``) computing each chunk's
  slice statistics (``distributed.slice_row_stats``, the backend's row kernel) into a ``[5, N]``
  float64 tensor; then ``distributed.global_rows``: ONE all_gather of those statistics for the
  whole call, their combination in rank order (bit-identical on every rank), ``weight_fn`` and
  the reduction (one all_reduce of three numbers over ``dp_group`` when it is given: two sums and
  the count of ranks that failed);
* backward: a second sweep (``linear_loss._gradient_sweep``) recomputing each chunk's logits and
  writing its gradient over them in place with the backend's ``row_backward_`` (global lse, the
  target term only on the owning rank, ``eps / V`` with the global V: ``distributed.slice_target``
  and ``slice_options``), accumulating ``g @ W_local`` into the hidden gradient and
  ``g.T @ hidden`` into the local weight gradient. The hidden gradient is a sum over ranks: ONE
  all_reduce of ``[N, D]`` (float32 for half-precision inputs) over ``group`` -- or, for
  ``memft_linear_loss``'s sequence-parallel DTensor route (internal ``_own_rows``), ONE
  reduce-scatter delivering each rank only its own rows' sum. The weight and bias gradients are local.

Unlike ``memft_linear_loss`` (whose row statistics are local, so it forms the gradients during
the forward), the gradient here needs the global lse, which exists only after the all_gather: the
chunk logits are computed twice per step (forward and backward), never kept.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from . import dispatch
from .distributed import (
    _N_SLICE_STATS,
    _comm_device,
    checked_layout,
    fill_record,
    global_rows,
    slice_options,
    slice_row_stats,
    slice_target,
    Layout,
)
from .dtensor import refuse
from .linear_loss import _check_linear_inputs, _chunk_logits, _gradient_sweep, _Grads, chunk_rows_for
from .spec import (
    KernelOptions,
    NO_VMAP,
    LossOptions,
    accumulate_dtype,
    keep_outer_inputs,
    once_differentiable_grads,
    prepare_call,
    refuse_vmap,
    takes_loss_options,
)

_WHERE = "vocab_parallel_memft_linear_loss"


def _stats_sweep(hidden, weight, bias, target, vocab_start: int, module, opts: KernelOptions, rows: int) -> torch.Tensor:
    """``[5, N]`` float64 slice statistics of ``hidden @ weight.T + bias``, one row chunk at a time."""
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty(_N_SLICE_STATS, n, dtype=torch.float64, device=hidden.device)
    buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=hidden.device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        logits = _chunk_logits(buf[: b - a], hidden[a:b], weight, bias)
        out[:, a:b] = slice_row_stats(logits, target[a:b], vocab_start, opts, module)
    return out


def _power_of_two_scale(coef: torch.Tensor) -> torch.Tensor:
    """0-d: 2**round(log2(max|coef|)), or 1 where that is not a positive finite number (no host sync)."""
    top = coef.abs().amax() if coef.numel() else torch.ones((), dtype=coef.dtype, device=coef.device)
    usable = torch.isfinite(top) & (top > 0)
    exponent = torch.round(torch.log2(torch.where(usable, top, torch.ones_like(top))))
    return torch.exp2(exponent.clamp(-126, 126))  # a normal float32 number, never 0 or inf


def _all_reduce_sum(t: torch.Tensor, group, scale: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ``group`` times ``scale`` (float32 or wider on the wire and for the scaling,
    rounded once to ``t``'s dtype; the same bits on every rank)."""
    wire = t if t.dtype in (torch.float32, torch.float64) else t.float()
    wire = wire.to(_comm_device(group, t.device))
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
    wire = wire.to(t.device).mul_(scale.to(wire.dtype))
    return wire.to(dtype=t.dtype)


class OwnRows(NamedTuple):
    """Internal (``dtensor.py``'s sequence-parallel route; not for users): ``hidden``'s leading shape
    ``lead`` (its rows flattened are the N rows of the call) is split over the group on ``lead[dim]``
    by ``torch.chunk``'s rule (DTensor's ``Shard``: chunks of ``ceil(L / parts)``, the last ones
    shorter or empty), and only chunk ``index`` (this rank's position in the group) of ``hidden``'s
    gradient is used by the caller. The backward then REDUCE-SCATTERs the gradient instead of
    all-reducing it (see ``_reduce_scatter_rows``)."""

    lead: Tuple[int, ...]
    dim: int
    parts: int
    index: int

    def span(self, index: Optional[int] = None) -> Tuple[int, int]:
        """Rows ``[a, b)`` of ``lead[dim]`` in chunk ``index`` (default: this rank's)."""
        length = self.lead[self.dim]
        size = -(-length // self.parts)
        a = min(length, size * (self.index if index is None else index))
        return a, min(length, a + size)


def _reduce_scatter_rows(t: torch.Tensor, group, scale: torch.Tensor, rows: OwnRows) -> torch.Tensor:
    """``t`` ``[N, D]`` (this rank's part of a sum over ``group``) -> ``[N, D]`` of ``t``'s dtype whose
    rows in ``rows``'s chunk of this rank hold the sum over ``group`` times ``scale`` (the same
    values as ``_all_reduce_sum``'s rows: float32 or wider on the wire, scaled there, rounded once)
    and whose other rows are zero (the caller discards them). ONE reduce-scatter: chunk j of the
    wire (every rank's rows of chunk j, padded to the ceil(L / parts) rows of the first chunk, zeros
    in the padding) is summed onto rank j, so each rank receives ``1 / parts`` of the padded tensor
    where the all-reduce delivers all of it. ``t`` is overwritten and returned when its dtype is the
    wire's."""
    length, k = rows.lead[rows.dim], rows.parts
    size = -(-length // k)
    outer = inner = 1
    for n in rows.lead[: rows.dim]:
        outer *= n
    for n in rows.lead[rows.dim + 1:]:
        inner *= n
    src = t.view(outer, length, inner * t.shape[-1])  # the chunks are along dimension 1
    wire_dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    device = _comm_device(group, t.device)
    padded = size * k != length
    send = (torch.zeros if padded else torch.empty)(k, outer, size, src.shape[2], dtype=wire_dtype, device=device)
    for j in range(k):
        a, b = rows.span(j)
        if b > a:
            send[j, :, : b - a].copy_(src[:, a:b])
    recv = torch.empty(send.shape[1:], dtype=wire_dtype, device=device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(recv.view(-1), send.view(-1), op=dist.ReduceOp.SUM, group=group)  # flat: [k * M] -> [M]
    a, b = rows.span()
    src[:, :a].zero_()
    src[:, b:].zero_()
    if b > a:
        own = recv[:, : b - a].to(t.device).mul_(scale.to(wire_dtype))
        src[:, a:b].copy_(own)  # rounded once to t's dtype
    return t


class _VocabParallelLinearFunction(torch.autograd.Function):
    """forward / setup_context / backward (the form torch.func.grad and vjp need: ``needs`` tells
    which of hidden, weight, bias need a gradient, as the forward cannot ask ctx)."""

    @staticmethod
    def forward(hidden, weight, bias, target, token_weight, module, opts: KernelOptions, layout: Layout,
                reduction, normalize, fallback, denominator, rows, group, dp_group, weight_fn, user_target, validate,
                needs, own_rows):
        n = hidden.shape[0]
        local = _stats_sweep(hidden, weight, bias, target, layout.vocab_start, module, opts, rows) if n else None
        stats, reduced = global_rows(local, target, token_weight, opts, layout, group, accumulate_dtype(hidden.dtype),
                                     reduction=reduction, normalize=normalize, fallback=fallback,
                                     denominator=denominator, dp_group=dp_group, weight_fn=weight_fn,
                                     user_target=user_target, validate=validate)
        return (reduced.loss, stats.lse, stats.ce, stats.prob, stats.pred, stats.weight, reduced.fell_back,
                reduced.row_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, _, module, opts, layout, _, _, _, _, rows, group, *_, needs, own_rows = inputs
        _, lse, ce, prob, pred, wgt, fell_back, row_scale = output
        ctx.module, ctx.opts, ctx.layout, ctx.rows, ctx.group, ctx.needs = module, opts, layout, rows, group, needs
        ctx.own_rows = own_rows
        keep_outer_inputs(ctx, hidden, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, target, lse, row_scale)
        ctx.mark_non_differentiable(lse, ce, prob, pred, wgt, fell_back, row_scale)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_vmap(_WHERE)  # jacrev / jacfwd: the backward under vmap
        # The sweep's out= matmuls refuse grad mode (on under create_graph=True): the gradients are
        # computed without it, and once_differentiable_grads then refuses the second derivative.
        with torch.no_grad():
            gh, gw, gb = _VocabParallelLinearFunction._gradients(ctx, grad_loss.detach())
        return once_differentiable_grads(gh, gw, gb, ctx=ctx) + (None,) * 17

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(NO_VMAP.format(where=_WHERE))

    @staticmethod
    def _gradients(ctx, grad_loss):
        hidden, weight, bias, target, lse, row_scale = ctx.saved_tensors
        opts, layout = ctx.opts, ctx.layout
        coef = (grad_loss * row_scale).to(lse.dtype)
        # As memft_linear_loss applies 1/D and the upstream gradient to its small results in float32
        # (never to the chunk gradient, which has hidden's dtype): the sweep runs with coef / s, s the
        # power of two nearest max|coef| (exact scaling), and the results are multiplied by s in
        # float32. Without it a float16 chunk gradient underflows (coef ~ 1/D or a small upstream
        # gradient) or overflows (GradScaler's 65536 with reduction="sum").
        scale = _power_of_two_scale(coef)
        coef = (coef / scale).contiguous()
        local_target = slice_target(target, layout.vocab_start, weight.shape[0], layout.vocab_size, opts.ignore_index)
        grads = _Grads(hidden, weight, bias, ctx.needs, ctx.rows)
        if hidden.shape[0]:
            _gradient_sweep(hidden, weight, bias, local_target, lse, coef, ctx.module,
                            slice_options(opts, layout.vocab_size), ctx.rows, grads)
        gh = grads.hidden
        if gh is not None and ctx.own_rows is not None:  # the caller keeps this rank's rows only
            gh = _reduce_scatter_rows(gh, ctx.group, scale, ctx.own_rows)
        elif gh is not None:  # every rank of the group needs it (checked in the layout exchange)
            gh = _all_reduce_sum(gh, ctx.group, scale)
        gw = None if grads.weight is None else grads.weight.mul_(scale).to(weight.dtype)
        gb = None if grads.bias is None else grads.bias.mul_(scale).to(weight.dtype)
        return gh, gw, gb


@takes_loss_options(exclude=("inplace_backward",))
def vocab_parallel_memft_linear_loss(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    local_bias: Optional[torch.Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    dp_group=None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
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
    backend: str = "auto",
    weight_fn: Optional[Callable] = None,
    _own_rows: Optional[OwnRows] = None,
):
    """``memft_linear_loss(hidden, full_weight, target, full_bias, ...)`` computed from this rank's
    rows of the lm_head: ``local_weight`` ``[V_local, D]`` (and ``local_bias`` ``[V_local]`` or None)
    are rows ``[vocab_start, vocab_start + V_local)`` of the full ``[V, D]`` weight.

    ``hidden`` ``[..., D]``, ``target`` (global ids), ``token_weight`` and every option must be the
    same on every rank of ``group`` (default: the world); ``hidden`` itself is not checked (only its
    shape, dtype and whether it needs a gradient). ``vocab_start=None`` means contiguous slices in
    group rank order (any widths, each at least one row); give it on every rank to state the split.
    Returns what ``memft_linear_loss`` returns, identical on every rank. ``hidden``'s gradient is
    the full one on every rank (one all_reduce of ``[N, D]`` in the backward); ``local_weight`` and
    ``local_bias`` get their slices of the full gradients (none for a frozen weight).
    ``chunk_size`` / ``memory_budget_bytes`` size the row chunks of the ``[chunk, V_local]`` logits
    as in ``memft_linear_loss``. ``dp_group``: as ``vocab_parallel_memft_loss``'s (the "mean"
    denominator summed over a data-parallel group).

    Collective: every rank of ``group`` (and ``dp_group``) must call it in the same order, and, when
    ``hidden`` needs a gradient, run the backward. Bad input on any rank raises on every rank
    (ValueError, or the local error on the rank that had it) instead of hanging, on every rank of
    ``dp_group`` too where it is used (as ``vocab_parallel_memft_loss``'s: NaN with validate=False).

    ``_own_rows`` is internal (``memft_linear_loss``'s sequence-parallel DTensor route): an ``OwnRows``
    saying which rows of ``hidden``'s gradient this rank's caller keeps; the backward then
    reduce-scatters instead of all-reducing, and ``hidden``'s gradient holds only those rows (the
    others zero). Leave it None.
    """
    options = LossOptions(
        policy=policy, threshold=threshold, sharpness=sharpness, reduction=reduction, normalize=normalize,
        denominator=denominator, fallback=fallback, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, return_stats=return_stats, validate=validate, backend=backend,
        weight_fn=weight_fn,
    )

    def prepare(record):
        options.checked()
        refuse(_WHERE, "Pass the local tensors (weight.to_local(), bias.to_local(); the others whole), or pass the "
               "DTensor weight to memft_linear_loss, which calls this function",
               hidden=hidden, local_weight=local_weight, local_bias=local_bias, target=target,
               token_weight=token_weight)
        _check_linear_inputs(hidden, local_weight, local_bias)
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"target.shape={tuple(target.shape)} must equal hidden.shape[:-1]="
                             f"{tuple(hidden.shape[:-1])}")
        v_local, dim = local_weight.shape
        if v_local == 0:
            raise ValueError(f"{_WHERE}: local_weight has no rows; every rank must hold at least one row of the head")
        if _own_rows is not None:  # internal: dtensor.py's description of this rank's rows
            lead = tuple(hidden.shape[:-1])
            if (tuple(_own_rows.lead) != lead or not 0 <= _own_rows.dim < len(lead)
                    or _own_rows.parts != dist.get_world_size(group) or _own_rows.index != dist.get_rank(group)):
                raise ValueError(f"{_WHERE}: _own_rows={_own_rows} does not describe hidden's rows {lead} over a group "
                                 f"of {dist.get_world_size(group)} ranks (this rank {dist.get_rank(group)})")
        virtual_logits = hidden.new_empty(()).expand(*hidden.shape[:-1], v_local)
        call = prepare_call(virtual_logits, target, token_weight, options, check_range=False, flatten_logits=False)
        hidden2d = hidden.reshape(-1, dim)
        if not hidden2d.is_contiguous():
            hidden2d = hidden2d.contiguous()
        rows = chunk_rows_for(hidden2d.shape[0], v_local, dim, hidden.dtype, chunk_size=chunk_size,
                              memory_budget_bytes=memory_budget_bytes)
        module = dispatch.resolve(backend, hidden2d.new_empty((0, v_local)))
        # Every rank must agree on these too: the backward all_reduces an [N, D] tensor of this dtype
        # exactly when hidden needs a gradient.
        needs_hidden = torch.is_grad_enabled() and hidden.requires_grad
        fill_record(record, call, v_local=v_local, vocab_start=vocab_start, target=target, token_weight=token_weight,
                    dp_group=dp_group, extra=(dim, str(hidden.dtype), needs_hidden, local_bias is not None))
        return call, hidden2d, rows, module, needs_hidden

    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    layout, (call, hidden2d, rows, module, needs_hidden) = checked_layout(
        _WHERE, "memft_linear_loss", group, device, prepare, options=options, target=target, dp_group=dp_group)
    outputs = _VocabParallelLinearFunction.apply(
        hidden2d, local_weight, local_bias, call.target, call.token_weight, module, call.kernel, layout, reduction,
        normalize, fallback, call.denominator, rows, group, dp_group, weight_fn, target, validate,
        (needs_hidden, torch.is_grad_enabled() and local_weight.requires_grad,
         torch.is_grad_enabled() and local_bias is not None and local_bias.requires_grad),
        _own_rows,
    )
    return call.finish(hidden.dtype, *outputs[:7])
