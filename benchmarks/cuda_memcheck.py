"""Launch every native CUDA kernel once on small inputs, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/cuda_memcheck.py

(With torch's caching allocator a small tensor sits inside a larger cached block, so a read past
its end is not out of bounds for the sanitizer; without it every tensor is its own allocation.)

Covers forward, backward and fused forward+backward for float32, bfloat16 and float16, with and
without the soft cap, V = 1 / odd / larger than one block's sweep, rows that start off the 16-byte
boundary, in-place gradients, ignored and out-of-range targets (validate=False), and checks the
results against the reference so that a silent wrong answer also fails.
"""
from __future__ import annotations

import sys

import torch

from memft_kernels.ops import native_cuda, reference
from memft_kernels.spec import KernelOptions


def rel(a, b):
    a, b = a.double(), b.double()
    ok = torch.isfinite(b)
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


def main() -> int:
    reason = native_cuda.availability()
    if reason:
        print(f"cuda_memcheck: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    worst = 0.0
    launches = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for v in (1, 13, 1027, 40000):
            for offset in (0, 1):  # offset 1: every row starts off the 16-byte boundary
                n = 6
                wide = torch.randn(n, v + 2, device="cuda").to(dtype) * 2
                logits = wide[:, offset:offset + v]
                target = torch.randint(0, v, (n,), device="cuda")
                target[1] = -100  # ignored
                target[2] = v + 5  # out of range (validate=False): NaN, never an index
                target[3] = -3
                for softcap in (None, 20.0):
                    opts = KernelOptions(policy="sigmoid", softcap=softcap, label_smoothing=0.1, z_loss=1e-3)
                    got = native_cuda.row_forward(logits, target, None, opts)
                    coef = torch.rand(n, device="cuda")
                    grad = native_cuda.row_backward(logits, target, got.lse, coef, opts)
                    fused_grad = torch.empty_like(logits)
                    native_cuda.row_forward_backward(logits, target, None, opts,
                                                     torch.tensor(0.5, device="cuda"), fused_grad)
                    inplace = logits.clone()
                    native_cuda.row_backward(inplace, target, got.lse, coef, opts, out=inplace)
                    launches += 4
                    want = reference.row_forward(logits.double(), target, None, opts)
                    ref = reference.row_backward(logits.double(), target, want.lse, coef.double(), opts)
                    worst = max(worst, rel(got.loss, want.loss), rel(grad, ref), rel(inplace, ref))
    torch.cuda.synchronize()
    print(f"cuda_memcheck: {launches} kernel launches, worst relative error vs float64 {worst:.2e}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
