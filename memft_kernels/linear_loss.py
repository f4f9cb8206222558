"""``memft_linear_loss``: the MemFT loss of ``hidden @ weight.T + bias`` without the N x V logits.

The logits of a language-model head (N tokens x V vocabulary) and their gradient are the largest
tensors of LoRA fine-tuning. Here they only ever exist one row chunk at a time: for each chunk

    logits_chunk = hidden_chunk @ weight.T (+ bias)                (input dtype, one reused buffer)
    backend row kernel: row statistics, and the gradient written into logits_chunk in place
    grad_hidden_chunk = g @ weight;  grad_weight += g.T @ hidden_chunk;  grad_bias += g.sum(0)

so the extra memory is one chunk x V buffer (plus the backend's per-chunk temporaries), the
N x D gradient of ``hidden`` and, only when ``weight.requires_grad``, a float32 V x D accumulator.
The gradients are computed during the forward (as Liger-Kernel's fused linear cross-entropy does)
and returned, scaled by the upstream gradient, in the backward.

Normalization. Every chunk's gradient uses coef_i = w_i (grad_out taken as 1, no denominator);
the small results are multiplied once at the end by 1/D, where D = sum_i w_i ("active"),
n_valid ("valid"), the given ``denominator``, or 1 ("sum"). The one case where that is not enough
is the "active" fallback (every weight 0 but some row valid, ``fallback="mean"``): the gradient
then needs w_i = 1 on every valid row, which the first sweep could not know. It is recomputed by a
second sweep over the chunks, only in that rare case (it costs one host read of ``fell_back`` per
call when the "active" mean is used with gradients). ``reduction="none"`` needs per-row upstream
gradients, so there the forward only computes the loss and the backward recomputes the chunks.

Reading order: chunk sizing, the chunk sweeps, the autograd.Function, the public function.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import dispatch
from .distributed import dp_mean_terms, dp_plan, dp_used
from .dtensor import is_dtensor, route_linear
from .ops.base import Backend
from .policy import reduce_rows, weight_fn_factor
from .spec import (
    KernelOptions,
    LossOptions,
    MemFTStats,
    accumulate_dtype,
    has_values,
    NO_VMAP,
    keep_outer_inputs,
    once_differentiable_grads,
    prepare_call,
    refuse_vmap,
    takes_loss_options,
)

# Default budget for the chunk's logits buffer (the caller may set its own).
DEFAULT_MEMORY_BUDGET_BYTES = 256 << 20

# torch.compile(fullgraph=True) cannot trace the host read of the "active" fallback decision; this is its message.
FALLBACK_READ = ("memft_linear_loss with reduction='mean', normalize='active', fallback='mean' and a gradient reads on "
                 "the host whether every weight is 0 (the fallback's gradient needs a second sweep over the chunks), "
                 "which torch.compile(fullgraph=True) cannot trace: pass fallback='zero', normalize='valid' or a "
                 "denominator inside a fullgraph-compiled function, or compile without fullgraph=True (a graph break "
                 "there, the same result)")


@torch.compiler.disable(reason=FALLBACK_READ)
def _fell_back(fell_back: torch.Tensor) -> bool:
    """The fallback decision on the host (a meta or fake tensor has no value: False, shapes only)."""
    return has_values(fell_back) and bool(fell_back)


# --------------------------------------------------------------------------------------------
# Chunk sizing
# --------------------------------------------------------------------------------------------


def chunk_rows_for(n_rows: int, vocab: int, dim: int, dtype: torch.dtype, *, chunk_size=None, memory_budget_bytes=None) -> int:
    """Rows per chunk. ``chunk_size`` wins; else as many rows as ``memory_budget_bytes`` of chunk
    logits hold. Without a caller budget, the chunk is also kept near the size of ``hidden`` itself
    (about N / (V / D) rows, a power of two, at least 64): larger chunks save no time, only memory."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (rows per chunk) or None")
        return max(1, min(chunk_size, n_rows))
    row_bytes = vocab * torch.empty((), dtype=dtype).element_size()
    if memory_budget_bytes is not None:
        if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) or memory_budget_bytes < row_bytes:
            raise ValueError(
                f"memory_budget_bytes={memory_budget_bytes!r} must be an int >= one row of logits "
                f"({row_bytes} bytes for V={vocab}, {dtype})"
            )
        return max(1, min(n_rows, memory_budget_bytes // row_bytes))
    budget_rows = DEFAULT_MEMORY_BUDGET_BYTES // row_bytes
    # Chunk logits about as large as hidden itself: N / ceil(V / D) rows, rounded up to a power of two.
    balanced_rows = math.ceil(n_rows / math.ceil(vocab / max(1, dim)))
    balanced = max(64, 1 << math.ceil(math.log2(max(1, balanced_rows))))
    return max(1, min(n_rows, budget_rows, balanced))


# --------------------------------------------------------------------------------------------
# Chunk sweeps
# --------------------------------------------------------------------------------------------


def _chunk_logits(buf: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """hidden @ weight.T (+ bias) written into ``buf`` (no new N x V allocation)."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=buf)
    return torch.addmm(bias, hidden, weight.t(), out=buf)


class _Grads:
    """The small gradient results of a sweep, unscaled (coef_i without the 1/D factor)."""

    def __init__(self, hidden, weight, bias, needs, rows):
        need_h, need_w, need_b = needs
        acc = accumulate_dtype(weight.dtype)
        self.hidden = torch.empty_like(hidden) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        # Half-precision weight gradient: each chunk's g.T @ h is rounded once to the input dtype in a
        # V-tile buffer no larger than the chunk logits, then summed in float32 (no V x D half copy).
        self._tile = None
        if self.weight is not None and weight.dtype != acc:
            v, d = weight.shape
            self._tile_rows = max(1, min(v, (rows * v) // max(1, d)))
            self._tile = torch.empty(self._tile_rows, d, dtype=weight.dtype, device=weight.device)

    def add_chunk(self, a: int, b: int, g: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor) -> None:
        if self.hidden is not None:
            torch.mm(g, weight, out=self.hidden[a:b])
        if self.weight is not None:
            if self._tile is None:
                self.weight.addmm_(g.t(), hidden_chunk)
            else:
                for v0 in range(0, weight.shape[0], self._tile_rows):
                    v1 = min(weight.shape[0], v0 + self._tile_rows)
                    tile = torch.mm(g[:, v0:v1].t(), hidden_chunk, out=self._tile[: v1 - v0])
                    self.weight[v0:v1] += tile
        if self.bias is not None:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def zero_(self) -> None:
        for t in (self.hidden, self.weight, self.bias):
            if t is not None:
                t.zero_()


def _forward_sweep(hidden, weight, bias, target, token_weight, module: Backend, opts: KernelOptions, rows: int,
                   grads: Optional[_Grads]):
    """Row statistics of every chunk; with ``grads``, also the gradients for coef_i = w_i."""
    n, v = hidden.shape[0], weight.shape[0]
    stat_dtype = accumulate_dtype(hidden.dtype)
    dev = hidden.device
    lse, ce, prob, wgt, loss = (torch.empty(n, dtype=stat_dtype, device=dev) for _ in range(5))
    pred = torch.empty(n, dtype=torch.int64, device=dev)
    buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=dev)
    one = torch.ones((), dtype=stat_dtype, device=dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        h = hidden[a:b]
        logits = _chunk_logits(buf[: b - a], h, weight, bias)
        tw = None if token_weight is None else token_weight[a:b]
        if grads is not None:  # statistics and the gradient (coef_i = w_i) over the chunk, in place
            stats = module.row_forward_backward_(logits, target[a:b], tw, opts, one)
        else:
            stats = module.row_forward(logits, target[a:b], tw, opts)
        lse[a:b], ce[a:b], prob[a:b] = stats.lse, stats.ce, stats.prob
        wgt[a:b], loss[a:b], pred[a:b] = stats.weight, stats.loss, stats.pred
        if grads is not None:
            grads.add_chunk(a, b, logits, h, weight)
    return lse, ce, prob, pred, wgt, loss


def _gradient_sweep(hidden, weight, bias, target, lse, coef, module, opts: KernelOptions, rows: int, grads: _Grads) -> None:
    """Recompute each chunk's logits and accumulate the gradients for the given per-row coef."""
    n, v = hidden.shape[0], weight.shape[0]
    buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=hidden.device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        h = hidden[a:b]
        logits = _chunk_logits(buf[: b - a], h, weight, bias)
        module.row_backward_(logits, target[a:b], lse[a:b], coef[a:b], opts)
        grads.add_chunk(a, b, logits, h, weight)


# --------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, or 0 where d <= 0 (no host sync)."""
    positive = ~(d <= 0)  # a NaN d (a NaN weight with validate=False) stays NaN
    return torch.where(positive, 1.0 / torch.where(positive, d, torch.ones_like(d)), torch.zeros_like(d))


def _scaled(t: torch.Tensor, factor: torch.Tensor, out: torch.Tensor, rows: int) -> torch.Tensor:
    """out = t * factor computed in float32 or wider (a half-precision 1/D would lose 3 digits),
    in row blocks so that the float32 temporary stays small; ``out`` may be ``t``."""
    if t.dtype in (torch.float32, torch.float64):
        return torch.mul(t, factor.to(t.dtype), out=out)
    step = max(1, rows)
    for a in range(0, t.shape[0], step):
        out[a : a + step] = t[a : a + step].float() * factor.float()
    return out


def _finish(grads: _Grads, scale: torch.Tensor, weight: torch.Tensor, rows: int):
    """Apply the 1/D scale to the small results and give them the parameters' dtypes."""
    gh = None if grads.hidden is None else _scaled(grads.hidden, scale, grads.hidden, rows)
    gw = None if grads.weight is None else grads.weight.mul_(scale).to(weight.dtype)
    gb = None if grads.bias is None else grads.bias.mul_(scale).to(weight.dtype)
    return gh, gw, gb


class _Config(NamedTuple):
    """The constant arguments of one call, as ONE argument of the autograd.Function: its apply binds
    every argument to the forward's signature (inspect, tens of Python calls per argument)."""

    module: Backend
    opts: KernelOptions
    reduction: str
    normalize: str
    fallback: str
    rows: int
    weight_fn: Optional[Callable]
    validate: bool
    needs: tuple  # (hidden, weight, bias) need a gradient: the forward cannot ask ctx
    dp_group: Any  # only for the "mean" (distributed.dp_plan): its denominator summed over it


class _MemFTLinearLossFunction(torch.autograd.Function):
    """The chunk sweeps, then the reduction; forward / setup_context / backward (the form torch.func
    transforms need). The gradients computed during the forward leave it as outputs (empty
    stand-ins where not needed) for setup_context to save."""

    @staticmethod
    def forward(hidden, weight, bias, target, token_weight, denominator, user_target, cfg: _Config):
        module, opts, reduction, normalize, fallback, rows, weight_fn, validate, needs, dp_group = cfg
        want_grad = any(needs)
        # reduction="none" has per-row upstream gradients: the backward recomputes the chunks.
        grads = _Grads(hidden, weight, bias, needs, rows) if (want_grad and reduction != "none") else None
        # With weight_fn no chunk's gradient can be formed before every row's final weight is known:
        # the first sweep computes statistics only, a second one the gradients.
        lse, ce, prob, pred, wgt, row_loss = _forward_sweep(hidden, weight, bias, target, token_weight, module, opts,
                                                            rows, grads if weight_fn is None else None)
        valid = target != opts.ignore_index
        own_error = None
        if weight_fn is not None:
            # weight_fn sees this rank's own fell_back (with dp_group the decision comes below).
            own = reduce_rows(row_loss, wgt, valid, reduction=reduction, normalize=normalize, fallback=fallback,
                              denominator=denominator)
            seen = MemFTStats.from_rows(user_target.shape, target, opts.ignore_index, lse, ce, prob, pred, wgt,
                                        own.fell_back)
            try:
                wgt = wgt * weight_fn_factor(weight_fn, user_target, seen, check_values=validate).to(wgt.dtype)
            except Exception as exc:  # noqa: BLE001 - with dp_group: raised after the all_reduce, on every rank
                if dp_group is None:
                    raise
                own_error = exc  # no gradient sweep: dp_mean_terms raises it after the all_reduce
            if grads is not None and own_error is None:
                _gradient_sweep(hidden, weight, bias, target, lse, wgt, module, opts, rows, grads)
        global_d = None
        if dp_group is None:
            reduced = reduce_rows(row_loss, wgt, valid, reduction=reduction, normalize=normalize, fallback=fallback,
                                  denominator=denominator)
        else:  # the mean over the data-parallel group: one all_reduce of three numbers (dp_mean_terms)
            w_eff, global_d, fell_back = dp_mean_terms(wgt, valid, normalize=normalize, fallback=fallback,
                                                       dp_group=dp_group, own_error=own_error, validate=validate,
                                                       where="memft_linear_loss")
            acc = accumulate_dtype(row_loss.dtype)
            reduced = reduce_rows(row_loss, w_eff, valid, reduction="mean", normalize="valid", fallback=fallback,
                                  denominator=global_d.to(acc))._replace(fell_back=fell_back)
        gh = gw = gb = None
        if grads is not None:
            acc = wgt.dtype
            if reduction == "sum":
                scale = torch.ones((), dtype=acc, device=hidden.device)
            elif denominator is not None:
                scale = _inverse(torch.as_tensor(denominator, dtype=acc, device=hidden.device))
            elif global_d is not None and normalize == "valid":  # the global valid count (dp_group)
                scale = _inverse(global_d.to(acc))
            elif normalize == "valid":
                scale = _inverse(valid.sum().to(acc))
            else:
                # D: the weight sum; with dp_group the global one (the global valid count on a fallback).
                scale = _inverse(wgt.sum() if global_d is None else global_d.to(acc))
                # The rare "active" fallback: weights were all 0, the gradient needs w_i = 1 on
                # valid rows instead. One host read decides; a second sweep computes it (a meta
                # tensor has no value to read: shapes are all it computes).
                if fallback == "mean" and _fell_back(reduced.fell_back):
                    grads.zero_()
                    coef = valid.to(acc)
                    _gradient_sweep(hidden, weight, bias, target, lse, coef, module, opts, rows, grads)
                    if global_d is None:
                        scale = _inverse(coef.sum())
            gh, gw, gb = _finish(grads, scale, weight, rows)
        # Outputs are tensors: a fresh empty stand-in for each gradient not computed here.
        gh, gw, gb = (hidden.new_empty(0) if g is None else g for g in (gh, gw, gb))
        return reduced.loss, lse, ce, prob, pred, wgt, reduced.fell_back, gh, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, _, _, _, cfg = inputs
        _, lse, ce, prob, pred, wgt, fell_back, gh, gw, gb = output
        needs = cfg.needs
        ctx.module, ctx.opts, ctx.rows, ctx.reduction, ctx.needs = cfg.module, cfg.opts, cfg.rows, cfg.reduction, needs
        keep_outer_inputs(ctx, hidden, weight, bias)
        if cfg.reduction == "none":
            if any(needs):
                ctx.save_for_backward(hidden, weight, bias, target, lse, wgt)
        elif any(needs):
            # The gradients of the forward, None where not needed.
            ctx.save_for_backward(*(g if need else None for g, need in zip((gh, gw, gb), needs)))
        ctx.mark_non_differentiable(lse, ce, prob, pred, wgt, fell_back, gh, gw, gb)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        refuse_vmap("memft_linear_loss")  # jacrev / jacfwd: the backward under vmap
        # The gradients are not differentiable (no double backward): under a torch.func transform the
        # upstream gradient may track gradients itself.
        grad_loss = grad_loss.detach()
        none = (None,) * 5
        if ctx.reduction == "none":
            hidden, weight, bias, target, lse, wgt = ctx.saved_tensors
            # Without grad mode (on under create_graph=True): the sweep's out= matmuls refuse it, and
            # once_differentiable_grads refuses the second derivative.
            with torch.no_grad():
                coef = (grad_loss.to(wgt.dtype) * wgt).contiguous()
                grads = _Grads(hidden, weight, bias, ctx.needs, ctx.rows)
                _gradient_sweep(hidden, weight, bias, target, lse, coef, ctx.module, ctx.opts, ctx.rows, grads)
                one = torch.ones((), dtype=wgt.dtype, device=wgt.device)
                out = _finish(grads, one, weight, ctx.rows)
            return once_differentiable_grads(*out, ctx=ctx) + none
        out = list(ctx.saved_tensors)  # (hidden, weight, bias) gradients, None where not needed
        # Always multiplied (a pass over the small N x D / V x D results), never compared on the host.
        out = [None if g is None else _scaled(g, grad_loss, torch.empty_like(g), ctx.rows) for g in out]
        return once_differentiable_grads(*out, ctx=ctx) + none

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(NO_VMAP.format(where="memft_linear_loss"))


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _check_linear_inputs(hidden, weight, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D] (2-D, as nn.Linear stores it), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden.shape={tuple(hidden.shape)} must end in D={weight.shape[1]} (weight.shape={tuple(weight.shape)})")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden.dtype={hidden.dtype} and weight.dtype={weight.dtype} must be equal (cast one first)")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}; put both on one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias.shape={tuple(bias.shape)} must be (V,)=({weight.shape[0]},)")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match weight ({weight.dtype}, {weight.device})")


def _prepared(hidden, weight, bias, target, token_weight, options: LossOptions, chunking: dict):
    """The checks of the call's tensors (types, shapes, devices; with validate, the target range and
    token_weight values), ``prepare_call`` on the logits' shape, the rows and rows per chunk, the
    backend: ``(call, hidden2d, rows, module)``."""
    _check_linear_inputs(hidden, weight, bias)
    if isinstance(target, torch.Tensor) and tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target.shape={tuple(target.shape)} must equal hidden.shape[:-1]={tuple(hidden.shape[:-1])}")
    vocab, dim = weight.shape
    # The logits as a shape only (a 0-stride view, no memory) so that the shared checks apply.
    virtual_logits = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
    call = prepare_call(virtual_logits, target, token_weight, options, flatten_logits=False)
    hidden2d = hidden.reshape(-1, dim)
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    rows = chunk_rows_for(hidden2d.shape[0], vocab, dim, hidden.dtype, **chunking)
    module = dispatch.resolve(options.backend, hidden2d.new_empty((0, vocab)))
    return call, hidden2d, rows, module


@takes_loss_options(exclude=("inplace_backward",))
def memft_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
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
    dp_group=None,
):
    """``memft_loss(hidden @ weight.T + bias, target, ...)`` (docs/SPEC.md) computed in row chunks so
    that no N x V tensor exists.

    ``hidden`` is ``[..., D]``, ``weight`` ``[V, D]`` (an ``nn.Linear``'s), ``bias`` ``[V]`` or None,
    ``target`` the leading shape of ``hidden``. ``chunk_size`` (rows) or ``memory_budget_bytes`` (bytes
    of chunk logits) set the chunking; the default is at most 256 MiB of chunk logits. Every other
    keyword is ``memft_loss``'s (the chunk logits are always overwritten by their gradient, so there
    is no ``inplace_backward``). A frozen ``weight`` gets no gradient and no V x D buffer. With
    ``weight_fn`` the chunk logits are computed twice when gradients are needed (statistics first:
    no chunk's gradient can be formed before every row's final weight is known).
    ``torch.autocast`` does not reach inside: the chunk logits have ``hidden``'s dtype (cast
    ``hidden`` and ``weight`` to bfloat16 yourself for bfloat16 logits).
    A DTensor ``weight`` sharded ``Shard(0)`` (a ``ColwiseParallel`` lm_head) runs
    ``vocab_parallel_linear.vocab_parallel_memft_linear_loss`` over the sharding mesh dimension's
    group; the loss is then a ``Replicate()`` DTensor (docs/DISTRIBUTED.md). ``hidden`` may then be a
    DTensor with its rows sharded: gathered on the weight's vocabulary mesh dimension (sequence
    parallelism), data parallel on the others (the global loss, exact gradients).
    ``dp_group``: as ``memft_loss``'s (the "mean" denominator summed over a data-parallel group: each
    rank's loss is its share of the global mean, the gradients exact; a bad input or a failing
    ``weight_fn`` on some ranks only raises on every rank).
    ``torch.func.grad`` and ``torch.func.vjp`` work; ``torch.func.vmap`` (and jacrev, which uses it)
    is refused with a RuntimeError.
    """
    options = LossOptions(
        policy=policy, threshold=threshold, sharpness=sharpness, reduction=reduction, normalize=normalize,
        denominator=denominator, fallback=fallback, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, return_stats=return_stats, validate=validate, backend=backend,
        weight_fn=weight_fn, dp_group=dp_group,
    )
    options.checked()  # option errors first, as memft_loss reports them
    chunking = dict(chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    if any(is_dtensor(t) for t in (hidden, weight, bias, target, token_weight)):  # a tensor-parallel lm_head
        return route_linear(hidden, weight, target, bias, token_weight, options, chunking)
    if dp_group is None or not dp_used(dp_group, reduction=reduction, denominator=denominator,
                                       where="memft_linear_loss"):
        call, hidden2d, rows, module = _prepared(hidden, weight, bias, target, token_weight, options, chunking)
        dp, denominator = None, call.denominator
    else:  # data parallelism: the "mean" denominator over the dp group, after the chunk sweep
        # A failure of this rank's checks is carried by the dp all_reduce and raised on every rank.
        own_error = None
        try:
            call, hidden2d, rows, module = _prepared(hidden, weight, bias, target, token_weight, options, chunking)
        except Exception as exc:  # noqa: BLE001 - raised by dp_plan after the all_reduce
            own_error = exc
        dp, denominator = dp_plan(dp_group, normalize=normalize, before=False, valid=None, own_error=own_error,
                                  validate=validate, where="memft_linear_loss",
                                  device=hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu"))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden2d.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)

    cfg = _Config(module, call.kernel, reduction, normalize, fallback, rows, weight_fn, validate, needs, dp)
    outputs = _MemFTLinearLossFunction.apply(hidden2d, weight, bias, call.target, call.token_weight, denominator, target,
                                             cfg)
    return call.finish(hidden.dtype, *outputs[:7])
