"""Launch every Triton kernel of the ``triton`` backend on small inputs, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/triton_memcheck.py

(With torch's caching allocator a small tensor sits inside a larger cached block, so a read past
its end is not out of bounds for the sanitizer; without it every tensor is its own allocation.)

Covers the forward, backward, fused forward+backward and gradient-scaling kernels, in place and
not, for float32, bfloat16 and float16; V = 1, a V inside one block, a V one past a block and a V
that spans several blocks with a partial last one (the heuristic's block and a forced small one);
rows that start off the 16-byte boundary (a different JIT specialization); every feature flag on
and off; ignored and out-of-range targets (validate=False: NaN, never an address). Results are
checked against the reference in float64, so a silent wrong answer also fails. Few configurations:
each new specialization is a JIT compile (about a second on the GPU host).

``--device cpu`` runs the same launches in Triton's interpreter (TRITON_INTERPRET=1 must be set
before the import); with ``--quick`` only the cases with V <= 64 (minutes otherwise): gpu_check.sh's
dry run uses both to catch Python errors here.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from memft_kernels.ops import reference, triton_ce
from memft_kernels.spec import KernelOptions

ALL_FEATURES = dict(policy="sigmoid", softcap=20.0, label_smoothing=0.1, z_loss=1e-3)
PLAIN = dict(policy="hard")

# (dtype, V, row offset, options, token weights, forced BLOCK_V or None for the heuristic)
CASES = [
    (torch.float32, 37, 1, ALL_FEATURES, True, 16),  # three blocks of 16, last partial; misaligned rows
    (torch.float32, 5000, 0, ALL_FEATURES, True, None),  # heuristic block 4096: a partial second block
    (torch.bfloat16, 5000, 1, ALL_FEATURES, False, None),
    (torch.bfloat16, 32000, 0, PLAIN, False, None),  # the benchmarks' specialization (V % 16 == 0)
    (torch.float16, 13, 0, PLAIN, False, None),  # one block, masked lanes
    (torch.bfloat16, 1, 0, ALL_FEATURES, False, None),  # V = 1 (the JIT specializes the value 1)
]
N_ROWS = 6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ok = torch.isfinite(b)
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


def run_case(dtype, v, offset, options, with_weights, block, device) -> tuple:
    """Every kernel once on one configuration; returns (launches, worst relative error)."""
    g = torch.Generator(device="cpu").manual_seed(v + offset)
    wide = (torch.randn(N_ROWS, v + 2, generator=g) * 2).to(device=device, dtype=dtype)
    logits = wide[:, offset:offset + v]  # offset 1: every row starts off the 16-byte boundary
    target = torch.randint(0, v, (N_ROWS,), generator=g).to(device)
    target[1] = -100  # ignored
    target[2] = v + 5  # out of range: NaN, never an index
    target[3] = -3
    token_weight = (torch.rand(N_ROWS, generator=g) * 2).to(device) if with_weights else None
    opts = KernelOptions(**options)
    launches = 0
    with triton_ce.forced_block(block):
        got = triton_ce.row_forward(logits, target, token_weight, opts)
        coef = torch.rand(N_ROWS, generator=g).to(device)
        coef[4] = 0.0  # a row written as zeros without reading its logits
        grad = torch.full_like(logits, math.nan)
        triton_ce.row_backward(logits, target, got.lse, coef, opts, out=grad)
        fused = torch.full_like(logits, math.nan)
        fused_stats = triton_ce.row_forward_backward(logits, target, token_weight, opts,
                                                     torch.tensor(0.5, device=device), fused)
        inplace = logits.clone()
        triton_ce.row_backward(inplace, target, got.lse, coef, opts, out=inplace)
        inplace_fused = logits.clone()
        triton_ce.row_forward_backward(inplace_fused, target, token_weight, opts,
                                       torch.tensor(0.5, device=device), inplace_fused)
        scaled = fused.clone()
        triton_ce.scale_grad_(scaled, torch.tensor(-2.0, device=device))
        launches += 6
    want = reference.row_forward(logits.double(), target, token_weight, opts)
    ref = reference.row_backward(logits.double(), target, want.lse, coef.double(), opts)
    ref_fused = reference.row_backward(logits.double(), target, want.lse, want.weight * 0.5, opts)
    worst = max(
        rel(got.loss, want.loss), rel(fused_stats.loss, want.loss), rel(grad, ref), rel(inplace, ref),
        rel(fused, ref_fused), rel(inplace_fused, ref_fused), rel(scaled, -2.0 * ref_fused),
    )
    return launches, worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton's interpreter)")
    parser.add_argument("--quick", action="store_true", help="only the cases with V <= 64 (the interpreter's dry run)")
    args = parser.parse_args(argv)
    reason = triton_ce.availability()
    if reason is None and args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    if reason:
        print(f"triton_memcheck: {reason}", file=sys.stderr)
        return 2
    launches, worst = 0, 0.0
    for dtype, v, offset, options, with_weights, block in CASES:
        if args.quick and v > 64:
            continue
        n, err = run_case(dtype, v, offset, options, with_weights, block, args.device)
        launches += n
        worst = max(worst, err)
        print(f"  {str(dtype):15s} V={v:<6} offset={offset} {options['policy']:8s} block={block or 'auto'}: "
              f"rel err {err:.1e}", flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"triton_memcheck: {launches} kernel launches, worst relative error vs float64 {worst:.2e}")
    return 0 if worst < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
