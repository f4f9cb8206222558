"""The PyTorch reference of docs/SPEC.md: the executable form of that page.

Every other backend (Triton, native CPU, CUDA, fused linear) is tested against this module, and
this module is tested against float64 math written independently in the tests. It processes rows
in chunks so that its extra memory stays bounded for large N x V; float64 logits are computed in
float64 (the tests' ground truth), everything else in float32.

It implements the backend contract of ``ops/base.py`` (``ReferenceBackend``; the module functions
are its methods). Its fused forward + backward is the forward then the backward (two sweeps), its
in-place variants write through ``out=logits`` chunk by chunk (each chunk is read before it is
written), and ``scale_grad_`` is a torch multiply (a device op, no host read).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..policy import policy_weight
from ..spec import KernelOptions, RowStats, accumulate_dtype
from .base import Backend, check_scale_args, export

# Rows per chunk are chosen so one chunk's float32 working copy stays near this many elements.
CHUNK_ELEMENTS = 1 << 22


def row_chunks(n_rows: int, n_cols: int):
    """(start, end) row ranges whose float32 working copy stays near CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def capped(x: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """The soft cap c tanh(x / c) (x itself when softcap is None)."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _row_targets(target: torch.Tensor, n_cols: int, ignore_index: int):
    """(valid, in_range, safe index): out-of-range targets are never used as an index."""
    target = target.long()
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    safe = torch.where(in_range, target, torch.zeros_like(target))
    return valid, in_range, safe


def _row_forward(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor], opts: KernelOptions) -> RowStats:
    n, v = logits.shape
    dt = accumulate_dtype(logits.dtype)
    dev = logits.device
    lse = torch.empty(n, dtype=dt, device=dev)
    tgt_logit = torch.empty(n, dtype=dt, device=dev)
    mean_logit = torch.empty(n, dtype=dt, device=dev)
    pred = torch.empty(n, dtype=torch.int64, device=dev)
    valid, in_range, safe = _row_targets(target, v, opts.ignore_index)
    for a, b in row_chunks(n, v):
        x = capped(logits[a:b].to(dt), opts.softcap)
        # A +inf logit makes the row NaN, as F.cross_entropy's log_softmax (inf - inf) does; plain
        # logsumexp would give inf (and ce = inf at a non-target +inf).
        lse[a:b] = torch.logsumexp(x, dim=-1).masked_fill_(torch.isposinf(x).any(dim=-1), math.nan)
        tgt_logit[a:b] = x.gather(1, safe[a:b, None]).squeeze(1)
        if opts.label_smoothing:
            mean_logit[a:b] = x.mean(dim=-1)
        pred[a:b] = torch.argmax(x, dim=-1)
    return row_stats_from_parts(lse, tgt_logit, mean_logit, pred, valid, in_range, token_weight, opts)


def row_stats_from_parts(lse, tgt_logit, mean_logit, pred, valid, in_range, token_weight, opts: KernelOptions) -> RowStats:
    """SPEC.md's per-row quantities from a row's lse, target logit and mean logit (the mean is read
    only with label smoothing). Shared with the vocab-parallel loss, which gets these by all-reduce."""
    ce = torch.where(in_range, lse - tgt_logit, torch.full_like(lse, math.nan))
    eps, z = opts.label_smoothing, opts.z_loss
    loss = (1.0 - eps) * ce
    if eps:
        loss = loss + eps * (lse - mean_logit)
    if z:
        loss = loss + z * lse * lse
    zero = torch.zeros_like(lse)
    return RowStats(
        lse=torch.where(valid, lse, zero),
        ce=torch.where(valid, ce, zero),
        prob=torch.where(valid, torch.exp(-ce), zero),
        pred=pred,
        weight=policy_weight(ce, valid, token_weight, opts),
        loss=torch.where(valid, loss, zero),
    )


def _row_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    opts: KernelOptions,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    n, v = logits.shape
    dt = accumulate_dtype(logits.dtype)
    if out is None:
        out = torch.empty_like(logits)
    valid, in_range, safe = _row_targets(target, v, opts.ignore_index)
    # Rows whose target is out of range (validate=False) have a NaN loss; their gradient row is
    # NaN too, unless their coef is 0 (e.g. token weight 0): such a row gets exact zeros, as every
    # row with coef 0 does, in every backend (the kernels write it without reading it). Folding that
    # into the row factor keeps every step below a tensor op (no host sync).
    row_factor = torch.where(valid & ~in_range & (coef != 0), torch.full_like(coef, math.nan, dtype=dt), coef.to(dt))
    for a, b in row_chunks(n, v):
        x = capped(logits[a:b].to(dt), opts.softcap)
        # q = exp(x - lse) from the saved lse (not softmax(x): a vocabulary slice passes the global lse),
        # in a new tensor that the steps below edit in place.
        g = (x - lse[a:b, None].to(dt)).exp_()
        if opts.z_loss:
            g.mul_(1.0 + 2.0 * opts.z_loss * lse[a:b, None].to(dt))
        if opts.label_smoothing:
            g.sub_(opts.label_smoothing * opts.inv_vocab(v))
        rows = torch.arange(b - a, device=logits.device)
        g[rows, safe[a:b]] -= (1.0 - opts.label_smoothing) * in_range[a:b].to(dt)
        if opts.softcap is not None:
            g.mul_(1.0 - (x / opts.softcap) ** 2)
        c = row_factor[a:b, None]
        g.mul_(c)
        # A row with coef 0 (ignored, or weight 0) gets exact zeros, whatever its logits hold.
        g.masked_fill_(c == 0, 0.0)
        out[a:b] = g
    return out


class ReferenceBackend(Backend):
    name = "torch"

    def availability(self) -> Optional[str]:
        return None

    def supports(self, logits: torch.Tensor) -> Optional[str]:
        return None  # any device and float dtype torch has

    def row_forward(self, logits, target, token_weight, opts: KernelOptions) -> RowStats:
        return _row_forward(logits, target, token_weight, opts)

    def row_backward(self, logits, target, lse, coef, opts: KernelOptions, out=None) -> torch.Tensor:
        return _row_backward(logits, target, lse, coef, opts, out=out)

    def row_backward_(self, logits, target, lse, coef, opts: KernelOptions) -> torch.Tensor:
        return _row_backward(logits, target, lse, coef, opts, out=logits)

    def row_forward_backward(self, logits, target, token_weight, opts: KernelOptions, scale, grad) -> RowStats:
        stats = _row_forward(logits, target, token_weight, opts)
        coef = stats.weight * scale.to(stats.weight.dtype)
        _row_backward(logits, target, stats.lse, coef, opts, out=grad)
        return stats

    def row_forward_backward_(self, logits, target, token_weight, opts: KernelOptions, scale) -> RowStats:
        return self.row_forward_backward(logits, target, token_weight, opts, scale, logits)

    def scale_grad_(self, grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        check_scale_args(grad, factor)
        f = factor.reshape(()).to(grad.device)
        if grad.dtype == torch.float64:
            return grad.mul_(f.double())
        # Half-precision rows are scaled in float32 and rounded once, as the kernels do.
        return grad.copy_(grad.float() * f.float())


export(ReferenceBackend(), globals())
