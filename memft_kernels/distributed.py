"""Vocab-parallel MemFT loss: ``memft_loss`` when the lm_head is split over the vocabulary.

Each rank of a tensor-parallel group holds the logits of one contiguous vocabulary slice
``[vocab_start, vocab_start + V_local)`` for the same rows and the same global ``target``. The loss,
the statistics and each rank's gradient slice equal ``memft_loss`` on the gathered logits
(docs/SPEC.md); nothing of size N x V is communicated:

1. one small all_gather of each rank's slice geometry and checksums of its target and options,
   checked identically on every rank, so a bad split raises the same error everywhere instead of
   hanging in a later collective;
2. per-slice row statistics (slice lse, slice max and its first index, the target logit on the
   owning rank, the row sum for label smoothing), computed locally with the backend's row kernel;
3. one all_gather of those ``[5, N]`` statistics; every rank combines them in rank order, so the
   global lse, ce, pred and policy weights are bit-identical on every rank;
4. only for ``reduction="mean"`` with ``dp_group`` and no explicit denominator: one all_reduce of
   the weight sum / valid count over the data-parallel group, and the count of ranks that failed:
   a failure in 1. (on any rank of the group) or of ``weight_fn`` takes part in it, then raises,
   so it raises on every rank of ``dp_group`` too (``raise_over_dp``, ``dp_sum_checked``).

The backward is local to the slice: softmax from the global lse, target term only on the owning
rank, no communication: the backend's own row_backward, given the global V (``KernelOptions.vocab_size``)
for the label-smoothing term eps / V.

Reading order: slice statistics -> the checked exchange -> combination and reduction ->
autograd.Function -> public function.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, List, NamedTuple, NoReturn, Optional

import torch
import torch.distributed as dist

from . import dispatch
from .dtensor import refuse
from .ops.base import Backend
from .ops.reference import BACKEND as REFERENCE
from .ops.reference import capped, row_chunks, row_stats_from_parts
from .policy import Reduced, reduce_rows, weight_fn_factor
from .spec import (
    KernelOptions,
    NO_VMAP,
    READS_VALUES,
    LossOptions,
    MemFTStats,
    RowStats,
    accumulate_dtype,
    check_inplace_target,
    check_target_range,
    keep_outer_inputs,
    once_differentiable_grads,
    prepare_call,
    refuse_vmap,
    takes_loss_options,
)

# ---------------------------------------------------------------------------------------------
# Per-slice row statistics and the slice backward (local work, through the backend's row kernels)
# ---------------------------------------------------------------------------------------------

# Rows of the [5, N] float64 statistics tensor each rank contributes. float64 so that the global
# argmax index (an integer) and the float32 slice values travel exactly.
LSE, MAX, ARGMAX, TARGET_LOGIT, ROW_SUM = range(5)
_N_SLICE_STATS = 5

# Local target codes for the backward (opts.ignore_index is replaced by _NOT_OWNED there):
# a row whose target lies in another rank's slice gets no target term; a row whose target lies
# outside [0, V) altogether (only reachable with validate=False) gets a NaN gradient row, like the
# reference.
_NOT_OWNED = -1
_OUT_OF_RANGE = -2


def slice_row_stats(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, opts: KernelOptions, module: Backend = REFERENCE
) -> torch.Tensor:
    """``[5, N]`` float64 statistics of this rank's slice ``logits[N, V_local]`` (see LSE..ROW_SUM).

    ``target`` holds global ids; TARGET_LOGIT is 0 on rows whose target this slice does not own.
    The backend ``module``'s row kernel gives the slice lse and first argmax in one pass over the
    slice; the two values needed besides (the max and the target logit) are N-element gathers, with
    the soft cap applied to them as the reference applies it. Label smoothing adds one pass for the
    row sums (torch ops in row chunks).
    """
    n, v = logits.shape
    dt = accumulate_dtype(logits.dtype)
    out = torch.zeros(_N_SLICE_STATS, n, dtype=torch.float64, device=logits.device)
    if n == 0:
        return out
    t = target.long()
    owned = (t >= vocab_start) & (t < vocab_start + v)
    local = torch.where(owned, t - vocab_start, torch.zeros_like(t))
    # Every row made a valid row of the slice (target code inside it, no ignore, no policy, no
    # smoothing, no z-loss): the kernel then reports lse and pred for every row.
    plain = dataclasses.replace(opts, policy="none", ignore_index=-1, label_smoothing=0.0, z_loss=0.0)
    row = module.row_forward(logits, local, None, plain)
    pred = row.pred.long()
    out[LSE] = row.lse
    out[ARGMAX] = pred + vocab_start
    picked = capped(logits.gather(1, torch.stack([pred, local], dim=1)).to(dt), opts.softcap)
    out[MAX] = picked[:, 0]  # NaN when the slice row holds a NaN (pred points at it)
    out[TARGET_LOGIT] = torch.where(owned, picked[:, 1], torch.zeros_like(picked[:, 1]))
    if opts.label_smoothing:
        for a, b in row_chunks(n, v):
            out[ROW_SUM, a:b] = capped(logits[a:b].to(dt), opts.softcap).sum(dim=-1)
    return out


def slice_options(opts: KernelOptions, vocab_size: int) -> KernelOptions:
    """The options of a slice's row backward: targets coded by ``slice_target`` (``_NOT_OWNED`` plays
    the ignored row: no target term, the coef still applies) and the global V for eps / V."""
    return dataclasses.replace(opts, ignore_index=_NOT_OWNED, vocab_size=vocab_size)


def slice_target(
    target: torch.Tensor, vocab_start: int, v_local: int, vocab_size: int, ignore_index: int
) -> torch.Tensor:
    """Global target ids -> this slice's codes for a row backward run with ignore_index=_NOT_OWNED:
    the index in the slice where this rank owns the target, _OUT_OF_RANGE for a target outside
    [0, V), else (another rank's target, or an ignored row) _NOT_OWNED."""
    t = target.long()
    valid = t != ignore_index
    owned = valid & (t >= vocab_start) & (t < vocab_start + v_local)
    outside = valid & ((t < 0) | (t >= vocab_size))
    code = torch.where(outside, torch.full_like(t, _OUT_OF_RANGE), torch.full_like(t, _NOT_OWNED))
    return torch.where(owned, t - vocab_start, code)


# ---------------------------------------------------------------------------------------------
# The checked exchange: one small all_gather before any shape-dependent collective
# ---------------------------------------------------------------------------------------------

# Fields of the int64 layout record each rank contributes.
(_F_ERROR, _F_V_LOCAL, _F_HAS_START, _F_START, _F_NUMEL, _F_SHAPE, _F_TARGET, _F_HAS_WEIGHT,
 _F_WEIGHT, _F_OPTIONS) = range(10)
_N_FIELDS = 10
_PRIME = 2147483647  # 2**31 - 1: checksum terms stay below 2**62, sums below 2**63 for N < 2**32


def _checksum(values: torch.Tensor) -> torch.Tensor:
    """Order-sensitive checksum of an integer tensor, exact in int64 (0-d tensor, no host sync)."""
    flat = values.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    mix = (pos * 2654435761) % _PRIME + 1
    return (((flat % _PRIME) * mix) % _PRIME).sum() % _PRIME


def _crc(obj) -> int:
    # crc32 of the repr, not hash(): Python's str hash differs between processes.
    return zlib.crc32(repr(obj).encode())


def _comm_device(group, device: torch.device) -> torch.device:
    """gloo gets CPU tensors; every other backend (nccl) the tensors' own device."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


class Layout(NamedTuple):
    vocab_start: int  # this rank's first global id
    vocab_size: int  # V, the whole vocabulary
    starts: List[int]  # every rank's vocab_start, in group rank order


def check_layout(records: List[List[int]], rank: int, own_error: Optional[BaseException] = None,
                 where: str = "vocab_parallel_memft_loss") -> Layout:
    """Check the gathered layout records (one per rank, identical on every rank) and return this
    rank's Layout, or raise. Every rank raises the same ValueError, except a rank whose own local
    validation failed, which raises its own error. ``where`` names the caller in the messages."""
    failed = [r for r, rec in enumerate(records) if rec[_F_ERROR]]
    if failed:
        if own_error is not None:
            raise own_error
        raise ValueError(
            f"{where}: rank(s) {failed} of the group rejected their inputs "
            f"(the error is raised there); nothing was computed on any rank"
        )
    world = len(records)

    def differing(field):
        return [r for r in range(world) if records[r][field] != records[0][field]]

    if differing(_F_NUMEL) or differing(_F_SHAPE):
        numels = [rec[_F_NUMEL] for rec in records]
        raise ValueError(
            f"{where}: target must have the same shape on every rank of the group "
            f"(every rank holds the same rows); target.numel() per rank = {numels}"
        )
    if differing(_F_TARGET):
        raise ValueError(
            f"{where}: target differs across ranks of the group (ranks "
            f"{differing(_F_TARGET)} differ from rank 0); every rank must pass the same global token ids"
        )
    if differing(_F_HAS_WEIGHT) or differing(_F_WEIGHT):
        raise ValueError(
            f"{where}: token_weight differs across ranks of the group (ranks "
            f"{sorted(set(differing(_F_HAS_WEIGHT) + differing(_F_WEIGHT)))} differ from rank 0); pass the same "
            "token_weight (or none) on every rank"
        )
    if differing(_F_OPTIONS):
        raise ValueError(
            f"{where}: the loss options differ across ranks of the group (ranks "
            f"{differing(_F_OPTIONS)} differ from rank 0); pass the same options on every rank"
        )
    widths = [rec[_F_V_LOCAL] for rec in records]
    given = [bool(rec[_F_HAS_START]) for rec in records]
    if any(given) and not all(given):
        raise ValueError(
            f"{where}: vocab_start must be given on every rank or on none; given on "
            f"ranks {[r for r in range(world) if given[r]]} only"
        )
    if all(given):
        starts = [rec[_F_START] for rec in records]
    else:  # contiguous slices in rank order
        starts = [sum(widths[:r]) for r in range(world)]
    expected = 0
    for r in range(world):
        if starts[r] != expected:
            slices = ", ".join(f"rank {i}: [{starts[i]}, {starts[i] + widths[i]})" for i in range(world))
            raise ValueError(
                f"{where}: the vocabulary slices do not tile [0, V) in rank order: "
                f"rank {r} starts at {starts[r]} but the slices before it end at {expected} ({slices})"
            )
        expected += widths[r]
    return Layout(vocab_start=starts[rank], vocab_size=expected, starts=starts)


def fill_record(record: torch.Tensor, call, *, v_local: int, vocab_start, target, token_weight, dp_group,
                extra=()) -> None:
    """Fill this rank's int64 layout ``record`` (raises on a bad ``vocab_start``): the slice geometry,
    checksums of ``target`` and ``token_weight``, and a checksum of the options of the prepared
    ``call`` plus ``extra`` (anything else every rank must agree on)."""
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    ):
        raise ValueError(
            f"vocab_start={vocab_start!r} must be an int >= 0 (or None for contiguous slices in rank order)"
        )
    o = call.options
    record[_F_V_LOCAL] = v_local
    record[_F_HAS_START] = vocab_start is not None
    record[_F_START] = vocab_start or 0
    record[_F_NUMEL] = target.numel()
    record[_F_SHAPE] = _crc(tuple(target.shape))
    record[_F_TARGET] = _checksum(target)
    if token_weight is not None:
        record[_F_HAS_WEIGHT] = 1
        record[_F_WEIGHT] = _checksum(token_weight.to(torch.float32).contiguous().view(torch.int32))
    number_denominator = call.denominator if not isinstance(call.denominator, torch.Tensor) else "tensor"
    record[_F_OPTIONS] = _crc((dataclasses.astuple(call.kernel), o.reduction, o.normalize, o.fallback,
                               number_denominator, o.validate, dp_group is not None, o.weight_fn is not None,
                               tuple(extra)))
    if isinstance(call.denominator, torch.Tensor):  # its value too (tensor ops: no host sync on a device)
        bits = call.denominator.detach().to(torch.float64).reshape(()).view(torch.int64)
        record[_F_OPTIONS] += (bits % _PRIME).to(record.device)


def _exchange_layout(group, device, record: torch.Tensor, own_error, where: str) -> Layout:
    world = dist.get_world_size(group)
    record = record.to(_comm_device(group, device))
    gathered = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(gathered, record, group=group)
    records = torch.stack(gathered).cpu().tolist()
    return check_layout(records, dist.get_rank(group), own_error, where)


# torch.compile(fullgraph=True) cannot trace the layout check (a host read each call); this is its error.
LAYOUT_CHECK_EAGER = ("vocab_parallel_memft_loss / vocab_parallel_memft_linear_loss exchange a layout check between "
                      "the group's ranks and read it on the host each call (also with validate=False), which "
                      "torch.compile(fullgraph=True) cannot trace. Compile without fullgraph=True (the check then runs "
                      "eagerly at a graph break, with the same result), or call the loss outside the "
                      "fullgraph-compiled function")


@torch.compiler.disable(reason=LAYOUT_CHECK_EAGER)
def checked_layout(where: str, single: str, group, device: torch.device, prepare: Callable[[torch.Tensor], Any], *,
                   options: LossOptions, target, dp_group=None):
    """The opening of every vocab-parallel call: ``prepare(record)`` validates this rank's inputs and
    fills its layout ``record`` (``fill_record``); then one exchange of the records, after which a
    bad split, differing inputs, or a local error on any rank raise on every rank of ``group``
    together; then, with ``options.validate``, the range of ``target`` (the same on every rank of
    ``group``: checked) against the global V. Local validation never raises before the exchange:
    the other ranks would wait in it forever. With ``dp_group``, a failure of any of this takes
    part in the call's ``dp_group`` all_reduce before it raises (``raise_over_dp``): the dp peers,
    whose own groups may have passed their checks, raise too (NaN with validate=False) instead of
    waiting in it. ``single``: the one-process function named when no process group exists.
    Returns ``(layout, what prepare returned)``. Runs eagerly under torch.compile (one graph break;
    ``fullgraph=True``: an error naming the alternatives, ``LAYOUT_CHECK_EAGER``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where} needs an initialized torch.distributed process group "
            f"(torch.distributed.init_process_group); for one process use {single}"
        )
    try:
        if dist.get_rank(group) < 0:
            raise ValueError(f"{where}: this process is not a member of `group`")
        record = torch.zeros(_N_FIELDS, dtype=torch.int64, device=device)
        own_error = prepared = None
        try:
            # a dp_group this process is not a member of: refused by name, as memft_loss refuses it
            dp_used(dp_group, reduction=options.reduction, denominator=options.denominator, where=where)
            prepared = prepare(record)
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks
            own_error = exc
            record.zero_()
            record[_F_ERROR] = 1
        layout = _exchange_layout(group, device, record, own_error, where)
        if options.validate:
            # The target is the same on every rank of the group (checked): they raise here together.
            check_target_range(target, layout.vocab_size, options.ignore_index)
    except Exception as exc:  # noqa: BLE001 - raised on every rank of group and, through its all_reduce, of dp_group
        raise_over_dp(exc, dp_group, options, where, device)
    return layout, prepared


# ---------------------------------------------------------------------------------------------
# Combination of the slices and the reduction
# ---------------------------------------------------------------------------------------------


def combine_slices(
    parts: torch.Tensor,
    target: torch.Tensor,
    token_weight: Optional[torch.Tensor],
    opts: KernelOptions,
    vocab_size: int,
    dtype: torch.dtype,
) -> RowStats:
    """Global RowStats from every rank's ``[5, N]`` slice statistics stacked as ``[world, 5, N]``
    in rank order (= vocabulary order). Pure: the same input gives the same bits on every rank."""
    lse64 = torch.logsumexp(parts[:, LSE], dim=0)  # log sum_r exp(slice lse_r): max + rescaled sum-exp
    top = parts[:, MAX]
    has_nan = torch.isnan(top)
    best = torch.where(has_nan, torch.full_like(top, -math.inf), top).amax(dim=0)
    # argmax's rule over the whole row: the first NaN if there is one, else the first maximum;
    # slices are in vocabulary order, so the first winning rank holds the lowest index.
    wins = torch.where(has_nan.any(dim=0, keepdim=True), has_nan, top == best)
    first_rank = wins.to(torch.int32).argmax(dim=0)
    pred = parts[:, ARGMAX].gather(0, first_rank[None]).squeeze(0).long()

    # From here on the reference's formulas, in the reference's dtype.
    lse = lse64.to(dtype)
    tgt_logit = parts[:, TARGET_LOGIT].sum(dim=0).to(dtype)  # one owner, others add 0.0: exact
    t = target.long()
    valid = t != opts.ignore_index
    in_range = (t >= 0) & (t < vocab_size)
    mean_logit = (parts[:, ROW_SUM].sum(dim=0) / vocab_size).to(dtype) if opts.label_smoothing else None
    return row_stats_from_parts(lse, tgt_logit, mean_logit, pred, valid, in_range, token_weight, opts)


def _dp_groups(dp_group) -> tuple:
    return tuple(dp_group) if isinstance(dp_group, (tuple, list)) else (dp_group,)


def dp_sum(values: torch.Tensor, dp_group) -> torch.Tensor:
    """``values`` (a few numbers) summed over ``dp_group``, in float64 on their device: one all_reduce
    (a tuple of groups: one per group, summed over each in turn, i.e. over their product)."""
    device = values.device
    groups = _dp_groups(dp_group)
    wire = values.to(torch.float64).to(_comm_device(groups[0], device))
    for g in groups:
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=g)
    return wire.to(device)


@torch.compiler.disable(reason=READS_VALUES)
def _raise_if_failed_elsewhere(failed: torch.Tensor, where: str) -> None:
    n = int(failed.item())
    if n > 0:
        raise ValueError(
            f"{where}: {n} other rank(s) of dp_group failed before the loss's all_reduce (each raises its own "
            f"error there): check that rank's inputs (target in [0, V), token_weight finite and >= 0, the tensors' "
            f"shapes, dtypes and devices) and its weight_fn; no rank returned a loss")


def dp_sum_checked(values: torch.Tensor, dp_group, *, own_error: Optional[BaseException], validate: bool,
                   where: str) -> torch.Tensor:
    """``dp_sum`` of ``values`` with one more number riding in the same all_reduce: 1 on a rank whose
    checks or ``weight_fn`` failed (``own_error``; its ``values`` are zeros of the same length), so
    that a failure on some ranks raises on every rank instead of leaving the others waiting in the
    collective. After the all_reduce a failed rank raises its own error; the others, with
    ``validate``, read the count of failed ranks (a host read) and raise ValueError naming it; with
    ``validate=False`` (no host sync) their sums become NaN instead (a NaN loss and gradient)."""
    flag = torch.full((1,), 0.0 if own_error is None else 1.0, dtype=torch.float64, device=values.device)
    total = dp_sum(torch.cat([values.reshape(-1).to(torch.float64), flag]), dp_group)
    if own_error is not None:
        raise own_error
    sums, failed = total[:-1], total[-1]
    if validate:
        _raise_if_failed_elsewhere(failed, where)
        return sums
    return torch.where(failed > 0, torch.full_like(sums, math.nan), sums)


# How many numbers dp_mean_terms sums (the weight sum, the valid count), before the failure flag.
_MEAN_TERMS = 2


def dp_mean_terms(weight, valid, *, normalize, fallback, dp_group, own_error=None, validate=False,
                  where="the MemFT loss"):
    """(w_eff, D, fell_back) of the "mean" reduction whose denominator is summed over ``dp_group``
    (one all_reduce of the weight sum, the valid count and the failure flag, ``dp_sum_checked``):
    ``loss = sum w_eff_i l_i / D``. The fallback is decided on the global sums, the same on every dp
    rank; D == 0 (nothing active anywhere, or no valid row anywhere) gives loss 0 and zero gradient
    in ``reduce_rows``. ``own_error``: this rank's weight_fn failed (``weight`` may be anything of
    the right device): it takes part in the all_reduce, then raises it."""
    if own_error is not None:
        terms = torch.zeros(_MEAN_TERMS, dtype=torch.float64, device=valid.device)
    else:
        terms = torch.stack([weight.sum().to(torch.float64), valid.sum().to(torch.float64)])
    global_wsum, global_valid = dp_sum_checked(terms, dp_group, own_error=own_error, validate=validate, where=where)
    no = torch.zeros((), dtype=torch.bool, device=weight.device)
    if normalize == "valid":
        return weight, global_valid, no
    fell_back = (global_wsum == 0) & (global_valid > 0)
    if fallback == "mean":
        return (torch.where(fell_back, valid.to(weight.dtype), weight), torch.where(fell_back, global_valid, global_wsum),
                fell_back)
    return weight, global_wsum, fell_back


def dp_used(dp_group, *, reduction, denominator, where: str) -> bool:
    """Whether ``memft_loss`` / ``memft_linear_loss`` sum over ``dp_group``: only ``"mean"`` without
    an explicit denominator does. Raises (locally: the same on every rank) without an initialized
    process group, or on a process that is not a member of ``dp_group``."""
    if dp_group is None or reduction != "mean" or denominator is not None:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: dp_group needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group); pass dp_group=None for one process")
    if any(dist.get_rank(g) < 0 for g in _dp_groups(dp_group)):
        raise ValueError(f"{where}: this process is not a member of dp_group")
    return True


def _dp_reduces(dp_group, options: LossOptions) -> bool:
    """Whether a call with these options makes its ``dp_group`` all_reduce (``_reduce``: "mean" with no
    denominator) and this process can take part in it (a member of every group; no raising)."""
    return (dp_group is not None and options.reduction == "mean" and options.denominator is None
            and dist.is_available() and dist.is_initialized()
            and all(dist.get_rank(g) >= 0 for g in _dp_groups(dp_group)))


def raise_over_dp(exc: BaseException, dp_group, options: LossOptions, where: str, device) -> NoReturn:
    """Raise ``exc``, a failure of this rank's call before its ``dp_group`` all_reduce (its own input
    checks or those of its tensor-parallel group), after taking part in that all_reduce when the call
    makes one (``_dp_reduces``): zeros and the failure flag (``dp_sum_checked``, the same length as
    ``dp_mean_terms``'s), so the dp peers raise too (``validate=False``: their loss is NaN) instead
    of waiting in it. The collective the call makes anyway: nothing is added on the success path."""
    if _dp_reduces(dp_group, options):
        dp_sum_checked(torch.zeros(_MEAN_TERMS, dtype=torch.float64, device=device), dp_group, own_error=exc,
                       validate=bool(options.validate), where=where)
    raise exc


def dp_plan(dp_group, *, normalize, valid, before: bool, own_error, validate: bool, device, where: str):
    """How ``memft_loss`` / ``memft_linear_loss`` use ``dp_group`` once ``dp_used``: ``(dp_group for the
    reduction after the row pass or None, the denominator or None)``. ``before`` (``normalize="valid"``
    with no weight_fn, in ``memft_loss``: the single-pass gradient needs D before the row pass): the
    valid count summed over ``dp_group`` becomes the denominator at once (one all_reduce); otherwise
    ``dp_group`` is kept for ``dp_mean_terms`` after the row pass. ``own_error``: this rank's input
    checks failed (``valid`` is then unused): it takes part in the all_reduce the others make
    first (the same length), then raises its error; the others raise too (``dp_sum_checked``)."""
    if before:
        count = torch.zeros(1, device=device) if own_error is not None else valid.sum().reshape(1)
        return None, dp_sum_checked(count, dp_group, own_error=own_error, validate=validate, where=where)[0]
    if own_error is not None:
        dp_sum_checked(torch.zeros(_MEAN_TERMS, device=device), dp_group, own_error=own_error, validate=validate,
                       where=where)
    return dp_group, None


def _reduce(row_loss, weight, valid, *, reduction, normalize, fallback, denominator, dp_group, own_error=None,
            validate=False, where="the MemFT loss") -> Reduced:
    """reduce_rows, with the "active"/"valid" denominator summed over ``dp_group`` when given (a
    tuple of groups: summed over each in turn, i.e. over their product, as the row-sharding mesh
    dimensions of DTensor logits are). ``own_error``, ``validate``, ``where``: ``dp_mean_terms``'s
    (a failure on some ranks raises on every rank)."""
    if dp_group is None or reduction != "mean" or denominator is not None:
        if own_error is not None:
            raise own_error
        return reduce_rows(
            row_loss, weight, valid,
            reduction=reduction, normalize=normalize, fallback=fallback, denominator=denominator,
        )
    acc = accumulate_dtype(row_loss.dtype)
    w_eff, d, fell_back = dp_mean_terms(weight, valid, normalize=normalize, fallback=fallback, dp_group=dp_group,
                                        own_error=own_error, validate=validate, where=where)
    r = reduce_rows(
        row_loss, w_eff, valid,
        reduction="mean", normalize="valid", fallback=fallback, denominator=d.to(acc),
    )
    return Reduced(r.loss, r.row_scale, fell_back)


def weigh_and_reduce(stats: RowStats, valid, target, opts: KernelOptions, *, weight_fn, user_target, validate,
                     reduction, normalize, fallback, denominator, dp_group, where: str):
    """``(stats, Reduced)``: ``weight_fn``'s factor applied to the rows' weights (when given), then
    ``_reduce``. ``weight_fn`` sees this rank's own ``fell_back`` (with ``dp_group`` the decision
    comes with the reduction); with ``dp_group`` its failure is raised after the all_reduce, on
    every rank (``own_error``). Shared by ``memft_loss`` and the vocab-parallel losses."""
    own_error = None
    if weight_fn is not None:
        own = reduce_rows(stats.loss, stats.weight, valid, reduction=reduction, normalize=normalize,
                          fallback=fallback, denominator=denominator)
        seen = MemFTStats.from_rows(user_target.shape, target, opts.ignore_index, stats.lse, stats.ce, stats.prob,
                                    stats.pred, stats.weight, own.fell_back)
        try:
            factor = weight_fn_factor(weight_fn, user_target, seen, check_values=validate)
        except Exception as exc:  # noqa: BLE001 - with dp_group: raised after its all_reduce, on every rank
            if dp_group is None:
                raise
            own_error = exc
        else:
            stats = stats._replace(weight=stats.weight * factor.to(stats.weight.dtype))
    reduced = _reduce(stats.loss, stats.weight, valid, reduction=reduction, normalize=normalize, fallback=fallback,
                      denominator=denominator, dp_group=dp_group, own_error=own_error, validate=validate, where=where)
    return stats, reduced


def global_rows(local: Optional[torch.Tensor], target, token_weight, opts: KernelOptions, layout: Layout, group,
                dtype: torch.dtype, *, reduction, normalize, fallback, denominator, dp_group, weight_fn, user_target,
                validate, where: str = "the vocab-parallel MemFT loss"):
    """(global RowStats, Reduced) from this rank's ``[5, N]`` slice statistics ``local`` (None when
    N == 0, the same on every rank): one all_gather over ``group``, the rank-order combination,
    ``weight_fn``, and the reduction (one all_reduce over ``dp_group`` where ``_reduce`` needs it;
    ``weight_fn`` failing on some dp ranks raises on all of them: ``dp_sum_checked``).
    ``dtype`` is the statistics' dtype (the accumulate dtype of the logits)."""
    device = target.device
    if local is not None:  # N is the same on every rank (checked), so every rank skips together
        comm = local.to(_comm_device(group, device))
        gathered = [torch.empty_like(comm) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, comm, group=group)
        parts = torch.stack(gathered).to(device)
    else:
        parts = torch.zeros(1, _N_SLICE_STATS, 0, dtype=torch.float64, device=device)
    stats = combine_slices(parts, target, token_weight, opts, layout.vocab_size, dtype)
    valid = target != opts.ignore_index
    # weight_fn sees the global statistics (the same on every rank)
    stats, reduced = weigh_and_reduce(stats, valid, target, opts, weight_fn=weight_fn, user_target=user_target,
                                      validate=validate, reduction=reduction, normalize=normalize, fallback=fallback,
                                      denominator=denominator, dp_group=dp_group, where=where)
    return stats, reduced


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------


class _VocabParallelMemFTFunction(torch.autograd.Function):
    """forward / setup_context / backward: the form torch.func.grad and vjp need."""

    @staticmethod
    def forward(logits, target, token_weight, module, opts: KernelOptions, layout: Layout, reduction,
                normalize, fallback, denominator, group, dp_group, inplace, weight_fn, user_target, validate):
        local = slice_row_stats(logits, target, layout.vocab_start, opts, module) if logits.shape[0] else None
        stats, reduced = global_rows(local, target, token_weight, opts, layout, group, accumulate_dtype(logits.dtype),
                                     reduction=reduction, normalize=normalize, fallback=fallback,
                                     denominator=denominator, dp_group=dp_group, weight_fn=weight_fn,
                                     user_target=user_target, validate=validate)
        return (reduced.loss, stats.lse, stats.ce, stats.prob, stats.pred, stats.weight, reduced.fell_back,
                reduced.row_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, _, module, opts, layout, _, _, _, _, _, _, inplace, *_ = inputs
        _, lse, ce, prob, pred, wgt, fell_back, row_scale = output
        ctx.module, ctx.opts, ctx.inplace, ctx.layout = module, opts, inplace, layout
        keep_outer_inputs(ctx, logits)
        ctx.save_for_backward(logits, target, lse, row_scale)
        ctx.mark_non_differentiable(lse, ce, prob, pred, wgt, fell_back, row_scale)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(NO_VMAP.format(where="vocab_parallel_memft_loss"))

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_vmap("vocab_parallel_memft_loss")  # jacrev / jacfwd: the backward under vmap
        logits, target, lse, row_scale = ctx.saved_tensors
        if not ctx.inplace:
            logits = logits.detach()
        opts, layout = ctx.opts, ctx.layout
        dt = accumulate_dtype(logits.dtype)
        coef = (grad_loss.detach() * row_scale).to(dt)
        local_target = slice_target(target, layout.vocab_start, logits.shape[1], layout.vocab_size, opts.ignore_index)
        local_opts = slice_options(opts, layout.vocab_size)
        if ctx.inplace:
            grad = ctx.module.row_backward_(logits, local_target, lse, coef, local_opts)
        else:
            grad = ctx.module.row_backward(logits, local_target, lse, coef, local_opts)
        return once_differentiable_grads(grad, ctx=ctx) + (None,) * 15


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


@takes_loss_options()
def vocab_parallel_memft_loss(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    dp_group=None,
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
):
    """``memft_loss`` of the gathered logits, computed from this rank's vocabulary slice.

    ``local_logits`` is ``[..., V_local]``: classes ``[vocab_start, vocab_start + V_local)`` of the
    whole vocabulary, for the same rows on every rank of ``group`` (default: the world).
    ``vocab_start=None`` means contiguous slices in group rank order (any widths); give it on every
    rank to state the split explicitly. ``target`` (global ids), ``token_weight`` and every option
    must be the same on every rank. Returns what ``memft_loss`` returns, identical on every rank;
    the gradient reaching ``local_logits`` is this rank's slice of the full gradient.

    ``dp_group``: with ``reduction="mean"``, ``normalize`` "active" or "valid" and no
    ``denominator``, the denominator (and the fallback decision) is summed over this data-parallel
    group, so each rank's loss is its share of the global mean: sum the losses over ``dp_group``
    for the global value (DDP's gradient averaging then divides by the dp world size, as with
    ``num_items_in_batch``). The statistics stay local to this rank's rows, except ``fell_back``.

    Collective: every rank of ``group`` (and of ``dp_group``) must call it, in the same order. A
    bad split, differing targets or options, or a local input error on one rank raise on every
    rank of ``group`` (ValueError, or the local error on the rank that had it) instead of hanging;
    where ``dp_group`` is used, also on every rank of ``dp_group`` (the other replicas' groups):
    ValueError ("... other rank(s) of dp_group failed ..."), or with ``validate=False`` a NaN loss
    and gradient there (no host read), carried by the dp all_reduce the call makes anyway. A
    ``dp_group`` this process is not a member of raises ValueError.
    The layout check reads one small gathered tensor on the host each call, also with validate=False.

    ``weight_fn`` sees the global statistics of its rows (identical on every rank) and must return
    the same weights on every rank.
    """
    options = LossOptions(
        policy=policy, threshold=threshold, sharpness=sharpness, reduction=reduction, normalize=normalize,
        denominator=denominator, fallback=fallback, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, return_stats=return_stats, validate=validate,
        inplace_backward=inplace_backward, backend=backend, weight_fn=weight_fn,
    )

    def prepare(record):
        refuse("vocab_parallel_memft_loss", "Pass the DTensor logits to memft_loss (it calls this function on "
               "their local slices), or plain local tensors (.to_local(); target.full_tensor())",
               local_logits=local_logits, target=target, token_weight=token_weight)
        # The target range needs the global V: checked after the exchange.
        call = prepare_call(local_logits, target, token_weight, options, check_range=False)
        if inplace_backward and torch.is_grad_enabled() and local_logits.requires_grad:
            check_inplace_target(local_logits)
        module = dispatch.resolve(backend, call.logits)
        fill_record(record, call, v_local=local_logits.shape[-1], vocab_start=vocab_start, target=target,
                    token_weight=token_weight, dp_group=dp_group)
        return call, module

    device = local_logits.device if isinstance(local_logits, torch.Tensor) else torch.device("cpu")
    layout, (call, module) = checked_layout("vocab_parallel_memft_loss", "memft_loss", group, device, prepare,
                                            options=options, target=target, dp_group=dp_group)
    opts = call.kernel
    logits2d = call.logits
    inplace = bool(inplace_backward) and logits2d.data_ptr() == local_logits.data_ptr() and logits2d.is_contiguous()

    outputs = _VocabParallelMemFTFunction.apply(
        logits2d, call.target, call.token_weight, module, opts, layout, reduction, normalize, fallback,
        call.denominator, group, dp_group, inplace, weight_fn, target, validate,
    )
    return call.finish(local_logits.dtype, *outputs[:7])
