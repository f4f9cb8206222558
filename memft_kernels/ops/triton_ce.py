"""Fused Triton kernels for the MemFT loss (docs/SPEC.md), backend ``"triton"``.

Four kernels, each named for what it writes:

* ``_row_forward_kernel``: one program per row, ONE sweep over the row's logits in vocab blocks
  (online max / sum-exp, argmax, smoothing sum), then the row's lse, ce, prob, pred, weight and loss.
* ``_row_backward_kernel``: a 2-D grid (row, vocab block) that recomputes softmax from the saved lse
  and writes ``coef_i * (q (1 + 2 z lse) - (1 - eps)[j = y] - eps / V) * cap``.
* ``_row_forward_backward_kernel``: the forward sweep, then, in the same program, a second sweep
  over the same row that writes the gradient with ``coef_i = scale * weight_i`` (scale read from a
  0-d device tensor, so no host sync). The second sweep re-reads, last block first, a row the
  program has just read, so it is served from L2 when the rows in flight fit there;
  docs/KERNELS.md counts the bytes.
* ``_scale_rows_kernel``: ``grad *= grad_out`` with grad_out read on the device, for the backward of
  the single-pass path; a grad_out of exactly 1 costs no pass.

Reading order: kernels, launch heuristics, launchers, ``torch.library`` custom ops (with fake
implementations, so ``torch.compile(fullgraph=True)`` traces them; separate in-place ops that
declare the logits mutated), then ``TritonBackend``, the contract of ``ops/base.py``. The
autograd.Function and the reduction live in ``loss.py``. The policy reaches the kernels as a
constexpr (one specialization per policy).

Only Triton features present in 3.6 are used (no block pointers, no libdevice): tanh is written
with exp, so the same source compiles on the GPU host's Triton and on this project's CI one.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..spec import KernelOptions, KernelScalars, RowStats
from .base import Backend, check_scale_args, export

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # the module still imports; availability() says why it cannot run
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); `pip install triton`"

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(u):
        # tanh from exp: libdevice-free, and exp(-2|u|) never overflows (|u| = inf gives +-1).
        # Below |u| = 0.625, (1 - e) / (1 + e) cancels (at |u| = 1e-8 it is exactly 0, so a large
        # softcap would flatten every logit to 0): there the odd polynomial of the CPU kernels
        # (csrc/cpu/vec_avx2.h), relatively accurate down to 0.
        a = tl.abs(u)
        e = tl.exp(-2.0 * a)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        z = u * u
        p = -5.70498872745e-3 * z + 2.06390887954e-2
        p = p * z - 5.37397155531e-2
        p = p * z + 1.33314422036e-1
        p = p * z - 3.33332819422e-1
        small = p * z * u + u
        return tl.where(a < 0.625, small, t)

    @triton.jit
    def _argmax_combine(v1, i1, v2, i2):
        # torch.argmax's order: NaN above everything, ties (and NaN vs NaN) to the lower index.
        nan1 = v1 != v1
        nan2 = v2 != v2
        same = (v1 == v2) | (nan1 & nan2)
        take1 = (v1 > v2) | (nan1 & ~nan2) | (same & (i1 < i2))
        return tl.where(take1, v1, v2), tl.where(take1, i1, i2)

    @triton.jit
    def _row_stats(
        row_ptr, tgt, V, ignore_index, threshold, ce_threshold, sharpness, eps, z_loss, softcap,
        token_weight_ptr, row,
        POLICY: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One sweep over a row: (lse, ce, prob, pred, weight, loss) before zeroing ignored rows,
        plus the flags the gradient needs."""
        offs = tl.arange(0, BLOCK_V)
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(x - m)
        x_sum = 0.0  # sum of (capped) logits, for label smoothing
        best = float("-inf")
        best_idx = 0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            if HAS_SOFTCAP:
                # The cap maps the -inf padding to -softcap: put the padding back to -inf.
                x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
            b_max, b_idx = tl.reduce((x, cols), 0, _argmax_combine)
            best, best_idx = _argmax_combine(best, best_idx, b_max, b_idx)
            m_new = tl.maximum(m, b_max)
            # A block (or row) of -inf: shift by 0 instead of -inf so exp gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_shift) + tl.sum(tl.exp(x - m_shift), 0)
            m = m_new
            if HAS_SMOOTHING:
                x_sum += tl.sum(tl.where(mask, x, 0.0), 0)
        lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
        # A +inf logit makes the row NaN, as F.cross_entropy's log_softmax (inf - inf) does.
        lse = tl.where(m == float("inf"), float("nan"), lse)

        valid = tgt != ignore_index
        in_range = (tgt >= 0) & (tgt < V)
        # An out-of-range target (validate=False) is never used as an address: read column 0.
        x_t = tl.load(row_ptr + tl.where(in_range, tgt, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = softcap * _tanh(x_t / softcap)
        ce = tl.where(in_range, lse - x_t, float("nan"))
        prob = tl.exp(-ce)
        loss = (1.0 - eps) * ce
        if HAS_SMOOTHING:
            loss += eps * (lse - x_sum / V)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse

        if POLICY == 1:  # hard (MemFT-OT): written on p as SPEC.md states it
            w = tl.where(prob < threshold, 1.0, 0.0)
        elif POLICY == 2:  # sigmoid (MemFT-SW gate)
            w = 1.0 / (1.0 + tl.exp(-sharpness * (ce - ce_threshold)))
        else:
            w = 1.0
        w = tl.where(ce != ce, 1.0, w)  # a NaN row always reaches the loss
        if HAS_TOKEN_WEIGHT:
            w = w * tl.load(token_weight_ptr + row).to(tl.float32)
        w = tl.where(valid, w, 0.0)
        return lse, ce, prob, best_idx, w, loss, valid, in_range

    @triton.jit
    def _grad_block(
        x, cols, tgt, in_range, bad_row, lse, lse_factor, coef, inv_V, eps, softcap,
        HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    ):
        """Gradient of one block of a row, float32, exact zeros when coef == 0."""
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        g = tl.exp(x - lse) * lse_factor
        if HAS_SMOOTHING:
            g = g - eps * inv_V
        # The target term is formed here in float32, before the caller rounds to the logits' dtype.
        g = g - tl.where((cols == tgt) & in_range, 1.0 - eps, 0.0)
        g = tl.where(bad_row, float("nan"), g)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        return tl.where(coef != 0.0, g * coef, 0.0)

    @triton.jit
    def _store_row_stats(lse_ptr, ce_ptr, prob_ptr, pred_ptr, weight_ptr, loss_ptr, row,
                         lse, ce, prob, pred, w, loss, valid):
        """Write one row's RowStats; lse, ce, prob and loss are 0 at ignored rows."""
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
        tl.store(prob_ptr + row, tl.where(valid, prob, 0.0))
        tl.store(pred_ptr + row, pred.to(tl.int64))
        tl.store(weight_ptr + row, w)
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    @triton.jit
    def _row_forward_kernel(
        logits_ptr, logits_row_stride, target_ptr, token_weight_ptr,
        lse_ptr, ce_ptr, prob_ptr, pred_ptr, weight_ptr, loss_ptr,
        V, ignore_index, threshold, ce_threshold, sharpness, eps, z_loss, softcap,
        POLICY: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64 so row * stride is safe past 2^31 elements
        row_ptr = logits_ptr + row * logits_row_stride
        tgt = tl.load(target_ptr + row).to(tl.int64)
        lse, ce, prob, pred, w, loss, valid, in_range = _row_stats(
            row_ptr, tgt, V, ignore_index, threshold, ce_threshold, sharpness, eps, z_loss, softcap,
            token_weight_ptr, row,
            POLICY, HAS_TOKEN_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, HAS_Z_LOSS, BLOCK_V,
        )
        _store_row_stats(lse_ptr, ce_ptr, prob_ptr, pred_ptr, weight_ptr, loss_ptr, row,
                         lse, ce, prob, pred, w, loss, valid)

    @triton.jit
    def _row_backward_kernel(
        logits_ptr, logits_row_stride, target_ptr, lse_ptr, coef_ptr, grad_ptr, grad_row_stride,
        V, ignore_index, inv_V, eps, z_loss, softcap,
        HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        tgt = tl.load(target_ptr + row).to(tl.int64)
        coef = tl.load(coef_ptr + row).to(tl.float32)
        lse = tl.load(lse_ptr + row).to(tl.float32)
        in_range = (tgt >= 0) & (tgt < V)
        bad_row = (tgt != ignore_index) & ~in_range
        lse_factor = 1.0
        if HAS_Z_LOSS:
            lse_factor = 1.0 + 2.0 * z_loss * lse
        # A row with coef 0 is written as zeros without reading its logits (load bound 0).
        load_end = tl.where(coef != 0.0, V, 0)
        x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=cols < load_end, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        g = _grad_block(x, cols, tgt, in_range, bad_row, lse, lse_factor, coef, inv_V, eps, softcap,
                        HAS_SOFTCAP, HAS_SMOOTHING)
        tl.store(grad_ptr + row * grad_row_stride + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_forward_backward_kernel(
        logits_ptr, logits_row_stride, target_ptr, token_weight_ptr,
        lse_ptr, ce_ptr, prob_ptr, pred_ptr, weight_ptr, loss_ptr,
        scale_ptr, grad_ptr, grad_row_stride,
        V, ignore_index, threshold, ce_threshold, sharpness, inv_V, eps, z_loss, softcap,
        POLICY: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        tgt = tl.load(target_ptr + row).to(tl.int64)
        # Sweep 1: the row's statistics (the gradient needs its final lse).
        lse, ce, prob, pred, w, loss, valid, in_range = _row_stats(
            row_ptr, tgt, V, ignore_index, threshold, ce_threshold, sharpness, eps, z_loss, softcap,
            token_weight_ptr, row,
            POLICY, HAS_TOKEN_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, HAS_Z_LOSS, BLOCK_V,
        )
        _store_row_stats(lse_ptr, ce_ptr, prob_ptr, pred_ptr, weight_ptr, loss_ptr, row,
                         lse, ce, prob, pred, w, loss, valid)

        # Sweep 2: the gradient, re-reading the row just read (from L2 when it is still there).
        coef = tl.load(scale_ptr).to(tl.float32) * w
        bad_row = valid & ~in_range
        lse_factor = 1.0
        if HAS_Z_LOSS:
            lse_factor = 1.0 + 2.0 * z_loss * lse
        grad_row_ptr = grad_ptr + row * grad_row_stride
        load_end = tl.where(coef != 0.0, V, 0)  # a row with coef 0 is written without reading it
        offs = tl.arange(0, BLOCK_V)
        last = (V - 1) // BLOCK_V * BLOCK_V
        # Backwards over the row: the blocks sweep 1 read last are the likeliest still in L2.
        for back in range(0, V, BLOCK_V):
            cols = last - back + offs
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=cols < load_end, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            g = _grad_block(x, cols, tgt, in_range, bad_row, lse, lse_factor, coef, inv_V, eps, softcap,
                            HAS_SOFTCAP, HAS_SMOOTHING)
            tl.store(grad_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _scale_rows_kernel(grad_ptr, grad_row_stride, factor_ptr, V, BLOCK_V: tl.constexpr):
        """grad *= factor in place, with the factor read on the device: no host sync (CUDA graphs,
        torch.compile), and a factor of exactly 1 (the usual loss.backward()) costs no pass at all."""
        factor = tl.load(factor_ptr).to(tl.float32)
        if factor != 1.0:
            row = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = cols < V
            ptrs = grad_ptr + row * grad_row_stride + cols
            g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)

# ----------------------------------------------------------------------------------------------
# Launch heuristics: one configuration per shape class, no autotuning.
# ----------------------------------------------------------------------------------------------
# Largest vocab block, in elements. 4096 keeps ~16 elements per thread at 8 warps: vectorised
# 16-byte loads, no spills (docs/KERNELS.md) and several programs per SM to hide memory latency.
MAX_BLOCK_V = 4096
_forced: Optional[Tuple[int, Optional[int]]] = None


@contextlib.contextmanager
def forced_block(block_v: Optional[int], num_warps: Optional[int] = None):
    """Tests and benchmarks only: run every kernel with this BLOCK_V (and num_warps), e.g. 16 with
    V = 37 to exercise the online max / sum-exp across several blocks and a partial last block.
    ``None`` restores the heuristic."""
    global _forced
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v={block_v} must be a power of 2 (or None for the heuristic)")
    previous, _forced = _forced, (None if block_v is None else (block_v, num_warps))
    try:
        yield
    finally:
        _forced = previous


def _warps_for(block: int) -> int:
    return max(1, min(8, block // 512))


def launch_config(num_classes: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``num_classes`` logits."""
    if _forced is not None:
        block, num_warps = _forced
        return block, num_warps or _warps_for(block)
    block = min(triton.next_power_of_2(num_classes), MAX_BLOCK_V)
    return block, _warps_for(block)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; the custom ops below wrap them)
# ----------------------------------------------------------------------------------------------
def _scalar_options(k: KernelScalars) -> dict:
    """Kernel arguments shared by the forward kernels; a feature that is off becomes a False
    constexpr, so its code is not in the binary."""
    return dict(
        threshold=k.threshold,
        ce_threshold=k.ce_threshold,
        sharpness=k.sharpness,
        eps=k.label_smoothing,
        z_loss=k.z_loss,
        softcap=k.softcap if k.softcap > 0.0 else 1.0,
        POLICY=k.policy,
        HAS_SOFTCAP=k.softcap > 0.0,
        HAS_SMOOTHING=k.label_smoothing != 0.0,
        HAS_Z_LOSS=k.z_loss != 0.0,
    )


def _empty_stats(n: int, device) -> Tuple[Tensor, ...]:
    f32 = dict(dtype=torch.float32, device=device)
    return (torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32),
            torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, **f32), torch.empty(n, **f32))


def _launch_forward(logits, target, token_weight, stats, grad, scale, k: KernelScalars) -> None:
    """Forward (grad is None) or forward + gradient into ``grad`` (which may be ``logits``)."""
    n, v = logits.shape
    if n == 0:
        return
    block, num_warps = launch_config(v)
    has_tw = token_weight is not None
    tw = token_weight if has_tw else stats[0]  # any float pointer; never read
    common = dict(V=v, ignore_index=k.ignore_index, HAS_TOKEN_WEIGHT=has_tw, BLOCK_V=block,
                  num_warps=num_warps, **_scalar_options(k))
    if grad is None:
        _row_forward_kernel[(n,)](logits, logits.stride(0), target, tw, *stats, **common)
    else:
        _row_forward_backward_kernel[(n,)](
            logits, logits.stride(0), target, tw, *stats, scale, grad, grad.stride(0), inv_V=k.inv_vocab, **common
        )


def _launch_backward(logits, target, lse, coef, grad, k: KernelScalars) -> None:
    n, v = logits.shape
    if n == 0:
        return
    block, num_warps = launch_config(v)
    _row_backward_kernel[(n, triton.cdiv(v, block))](
        logits, logits.stride(0), target, lse, coef, grad, grad.stride(0),
        V=v, ignore_index=k.ignore_index, inv_V=k.inv_vocab, eps=k.label_smoothing, z_loss=k.z_loss,
        softcap=k.softcap if k.softcap > 0.0 else 1.0,
        HAS_SOFTCAP=k.softcap > 0.0, HAS_SMOOTHING=k.label_smoothing != 0.0, HAS_Z_LOSS=k.z_loss != 0.0,
        BLOCK_V=block, num_warps=num_warps,
    )


def _launch_scale(grad, factor) -> None:
    n, v = grad.shape
    if n == 0:
        return
    block, num_warps = launch_config(v)
    _scale_rows_kernel[(n, triton.cdiv(v, block))](grad, grad.stride(0), factor, V=v, BLOCK_V=block,
                                                    num_warps=num_warps)


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake implementations for tracing. Mutated arguments are
# declared, so functionalization (and CUDA-graph capture) sees the gradient writes. The scalar
# arguments are spec.KernelScalars, in that order.
# ----------------------------------------------------------------------------------------------
_STATS = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("memft::triton_row_forward", mutates_args=())
def _row_forward_op(
    logits: Tensor, target: Tensor, token_weight: Optional[Tensor], policy: int, threshold: float,
    ce_threshold: float, sharpness: float, ignore_index: int, label_smoothing: float, inv_vocab: float,
    z_loss: float, softcap: float,
) -> _STATS:
    k = KernelScalars(policy, threshold, ce_threshold, sharpness, ignore_index, label_smoothing, inv_vocab, z_loss, softcap)
    stats = _empty_stats(logits.shape[0], logits.device)
    _launch_forward(logits, target, token_weight, stats, None, None, k)
    return stats


@torch.library.custom_op("memft::triton_row_forward_backward", mutates_args=("grad",))
def _row_forward_backward_op(
    logits: Tensor, target: Tensor, token_weight: Optional[Tensor], scale: Tensor, grad: Tensor,
    policy: int, threshold: float, ce_threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, inv_vocab: float, z_loss: float, softcap: float,
) -> _STATS:
    k = KernelScalars(policy, threshold, ce_threshold, sharpness, ignore_index, label_smoothing, inv_vocab, z_loss, softcap)
    stats = _empty_stats(logits.shape[0], logits.device)
    _launch_forward(logits, target, token_weight, stats, grad, scale, k)
    return stats


@torch.library.custom_op("memft::triton_row_forward_backward_inplace", mutates_args=("logits",))
def _row_forward_backward_inplace_op(
    logits: Tensor, target: Tensor, token_weight: Optional[Tensor], scale: Tensor,
    policy: int, threshold: float, ce_threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, inv_vocab: float, z_loss: float, softcap: float,
) -> _STATS:
    k = KernelScalars(policy, threshold, ce_threshold, sharpness, ignore_index, label_smoothing, inv_vocab, z_loss, softcap)
    stats = _empty_stats(logits.shape[0], logits.device)
    _launch_forward(logits, target, token_weight, stats, logits, scale, k)
    return stats


@torch.library.custom_op("memft::triton_row_backward", mutates_args=("grad",))
def _row_backward_op(
    logits: Tensor, target: Tensor, lse: Tensor, coef: Tensor, grad: Tensor,
    policy: int, threshold: float, ce_threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, inv_vocab: float, z_loss: float, softcap: float,
) -> None:
    k = KernelScalars(policy, threshold, ce_threshold, sharpness, ignore_index, label_smoothing, inv_vocab, z_loss, softcap)
    _launch_backward(logits, target, lse, coef, grad, k)


@torch.library.custom_op("memft::triton_row_backward_inplace", mutates_args=("logits",))
def _row_backward_inplace_op(
    logits: Tensor, target: Tensor, lse: Tensor, coef: Tensor,
    policy: int, threshold: float, ce_threshold: float, sharpness: float, ignore_index: int,
    label_smoothing: float, inv_vocab: float, z_loss: float, softcap: float,
) -> None:
    k = KernelScalars(policy, threshold, ce_threshold, sharpness, ignore_index, label_smoothing, inv_vocab, z_loss, softcap)
    _launch_backward(logits, target, lse, coef, logits, k)


@torch.library.custom_op("memft::triton_scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, factor: Tensor) -> None:
    _launch_scale(grad, factor)


def _fake_stats(logits: Tensor, *args, **kwargs) -> _STATS:
    return _empty_stats(logits.shape[0], logits.device)


def _fake_none(*args, **kwargs) -> None:
    return None


_row_forward_op.register_fake(_fake_stats)
_row_forward_backward_op.register_fake(_fake_stats)
_row_forward_backward_inplace_op.register_fake(_fake_stats)
_row_backward_op.register_fake(_fake_none)
_row_backward_inplace_op.register_fake(_fake_none)
_scale_grad_op.register_fake(_fake_none)


# ----------------------------------------------------------------------------------------------
# The backend (ops/base.py's contract)
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unit_stride_in_v(t: Tensor) -> bool:
    # The stride of a dimension of size <= 1 is never used (torch leaves it arbitrary for such shapes).
    return t.stride(1) == 1 or t.shape[1] <= 1 or t.numel() == 0


def _row_tensor(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


class TritonBackend(Backend):
    name = "triton"

    def availability(self) -> Optional[str]:
        """None when Triton can run here: it imports and there is a CUDA device or TRITON_INTERPRET=1."""
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if torch.cuda.is_available() or _interpreting():
            return None
        return "no CUDA device (Triton runs on CPU only in its interpreter: set TRITON_INTERPRET=1, slow)"

    def supports(self, logits: Tensor) -> Optional[str]:
        if logits.dtype not in _SUPPORTED_DTYPES:
            return f"the Triton kernels take float32/float16/bfloat16 logits, not {logits.dtype}"
        if logits.device.type == "cuda":
            return None
        if logits.device.type == "cpu" and _interpreting():
            return None
        return f"logits on {logits.device} (Triton needs CUDA, or CPU with TRITON_INTERPRET=1)"

    def _check_rows(self, logits: Tensor, *rows: Optional[Tensor]) -> None:
        if logits.dim() != 2 or not _unit_stride_in_v(logits):
            raise ValueError(f"logits must be 2-D [N, V] with unit stride in V, got shape {tuple(logits.shape)} "
                             f"and strides {logits.stride()}")
        reason = self.supports(logits)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run these logits: {reason}")
        for t in rows:
            if t is not None and (t.shape != logits.shape[:1] or t.device != logits.device):
                raise ValueError(f"per-row tensor of shape {tuple(t.shape)} on {t.device} does not match logits "
                                 f"{tuple(logits.shape)} on {logits.device}")

    @staticmethod
    def _check_grad(logits: Tensor, grad: Tensor) -> None:
        if (grad.shape != logits.shape or grad.dtype != logits.dtype or not _unit_stride_in_v(grad)
                or grad.device != logits.device):
            raise ValueError(f"grad must match logits {tuple(logits.shape)} {logits.dtype} with unit stride in V, "
                             f"got {tuple(grad.shape)} {grad.dtype} strides {grad.stride()}")

    def row_forward(self, logits: Tensor, target: Tensor, token_weight: Optional[Tensor], opts: KernelOptions) -> RowStats:
        self._check_rows(logits, target, token_weight)
        stats = _row_forward_op(logits, target.contiguous(), _row_tensor(token_weight, torch.float32),
                                *opts.scalars(logits.shape[1]))
        return RowStats(*stats)

    def row_backward(self, logits: Tensor, target: Tensor, lse: Tensor, coef: Tensor, opts: KernelOptions,
                     out: Optional[Tensor] = None) -> Tensor:
        if out is logits:
            return self.row_backward_(logits, target, lse, coef, opts)
        self._check_rows(logits, target, lse, coef)
        if out is None:
            out = torch.empty_like(logits)
        self._check_grad(logits, out)
        _row_backward_op(logits, target.contiguous(), _row_tensor(lse, torch.float32),
                         _row_tensor(coef, torch.float32), out, *opts.scalars(logits.shape[1]))
        return out

    def row_backward_(self, logits: Tensor, target: Tensor, lse: Tensor, coef: Tensor, opts: KernelOptions) -> Tensor:
        self._check_rows(logits, target, lse, coef)
        _row_backward_inplace_op(logits, target.contiguous(), _row_tensor(lse, torch.float32),
                                 _row_tensor(coef, torch.float32), *opts.scalars(logits.shape[1]))
        return logits

    def row_forward_backward(self, logits: Tensor, target: Tensor, token_weight: Optional[Tensor],
                             opts: KernelOptions, scale: Tensor, grad: Tensor) -> RowStats:
        if grad is logits:
            return self.row_forward_backward_(logits, target, token_weight, opts, scale)
        self._check_rows(logits, target, token_weight)
        self._check_grad(logits, grad)
        scale = scale.to(device=logits.device, dtype=torch.float32).reshape(())
        stats = _row_forward_backward_op(logits, target.contiguous(), _row_tensor(token_weight, torch.float32),
                                         scale, grad, *opts.scalars(logits.shape[1]))
        return RowStats(*stats)

    def row_forward_backward_(self, logits: Tensor, target: Tensor, token_weight: Optional[Tensor],
                              opts: KernelOptions, scale: Tensor) -> RowStats:
        self._check_rows(logits, target, token_weight)
        scale = scale.to(device=logits.device, dtype=torch.float32).reshape(())
        stats = _row_forward_backward_inplace_op(logits, target.contiguous(), _row_tensor(token_weight, torch.float32),
                                                 scale, *opts.scalars(logits.shape[1]))
        return RowStats(*stats)

    def scale_grad_(self, grad: Tensor, factor: Tensor) -> Tensor:
        """``grad *= factor`` in place with the factor read on the device; a factor of exactly 1
        leaves ``grad`` untouched without reading it."""
        _scale_grad_op(grad, check_scale_args(grad, factor))
        return grad


export(TritonBackend(), globals())
