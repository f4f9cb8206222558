"""The native CUDA backend (memft_kernels/ops/native_cuda.py, csrc/cuda/).

Without a GPU (CI): the module was built when nvcc is present (pip install builds it with
MEMFT_CUDA=auto) and it links neither libtorch nor a shared CUDA runtime (readelf -d), so one
wheel serves every torch and needs no CUDA toolkit at run time.

On a GPU host (benchmarks/gpu_check.sh, MEMFT_TEST_GPU=1) the ``gpu`` tests check it against the
PyTorch reference in float64 at real sizes. Per-row outputs and gradients are poisoned first.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from memft_kernels import memft_loss
from memft_kernels.ops import native, native_cpu, native_cuda, reference
from memft_kernels.spec import KernelOptions

from helpers import poison_stats, rel, run

PACKAGE = Path(native_cpu.__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
FORBIDDEN = ("libtorch", "libc10", "libcudart.so", "libtorch_python")


def needed_libraries(path: Path):
    out = subprocess.run(["readelf", "-d", str(path)], check=True, capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def built_module(name: str):
    found = sorted(PACKAGE.glob(f"{name}*.so"))
    return found[0] if found else None


# -------------------------------------------------------------------------------- build checks
@pytest.mark.skipif(not NVCC or os.environ.get("MEMFT_CUDA") == "0" or os.environ.get("MEMFT_NATIVE") == "0",
                    reason="no nvcc here (or MEMFT_CUDA=0 / MEMFT_NATIVE=0): the CUDA module is not built")
def test_cuda_module_was_built_with_architectures():
    assert built_module("_native_cuda") is not None, "nvcc is here but memft_kernels/_native_cuda*.so is missing"
    archs = native_cuda.built_architectures()
    assert archs and any(a.startswith("sm_") for a in archs), archs


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
@pytest.mark.parametrize("name", ["_native_cpu", "_native_cuda"])
def test_modules_link_neither_libtorch_nor_shared_cudart(name):
    path = built_module(name)
    if path is None:
        pytest.skip(f"{name} not built here")
    libs = needed_libraries(path)
    bad = [lib for lib in libs if lib.startswith(FORBIDDEN)]
    assert not bad, f"{path.name} links {bad}"
    assert not any(lib.startswith("libcuda.so") for lib in libs)  # the driver is loaded at run time


def test_without_a_gpu_the_backend_says_why():
    reason = native_cuda.availability()
    if torch.cuda.is_available() and native_cuda._C is not None:
        assert reason is None
    else:
        assert reason and ("not built" in reason or "no CUDA device" in reason)
        assert native_cuda.supports(torch.zeros(2, 3)) is not None
        with pytest.raises(RuntimeError, match="cuda"):
            memft_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")


# ------------------------------------------------------------------------------- on the GPU
gpu = pytest.mark.gpu
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ALL_MODES = [("mean", "active", "mean"), ("mean", "active", "zero"), ("mean", "valid", "mean"),
             ("sum", "active", "mean"), ("none", "active", "mean")]
OPTION_SETS = [
    dict(policy="hard"),
    dict(policy="none", label_smoothing=0.1),
    dict(policy="sigmoid", threshold=0.7, sharpness=4.0, z_loss=1e-3),
    dict(policy="hard", softcap=30.0, label_smoothing=0.05, z_loss=1e-4),
]


@pytest.fixture
def poisoned(monkeypatch):
    poison_stats(monkeypatch, native, "new_row_stats")


def grad_close(out, ref, coef_scale, dtype):
    """Terms are O(|coef|): with V = 1 they cancel to ~2 z lse, so the bound counts them too."""
    err = float((out.double() - ref).abs().max())
    return err <= GRAD_TOL[dtype] * float(ref.abs().max()) + 3e-7 * coef_scale


def make(n, v, dtype=torch.float32, ignore_frac=0.2, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n, v, generator=g, device="cuda", dtype=torch.float32) * 3
    target = torch.randint(0, v, (n,), generator=g, device="cuda")
    conf = torch.rand(n, generator=g, device="cuda") < 0.35
    logits[conf, target[conf]] += 12.0
    target[torch.rand(n, generator=g, device="cuda") < ignore_frac] = -100
    return logits.to(dtype), target




def check_loss(logits, target, grad_out=None, loss_tol=1e-5, **opts):
    loss, grad = run(logits, target, "cuda", grad_out, **opts)
    ref_loss, ref_grad = run(logits.double(), target, "torch", grad_out, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert rel(loss, ref_loss) < loss_tol, opts
    assert rel(grad, ref_grad) < GRAD_TOL[logits.dtype], opts
    return loss, grad


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 37, 4099, 32000, 128256])
def test_row_kernels_vs_float64(poisoned, dtype, v):
    n = 64 if v > 4099 else 257
    logits, target = make(n, v, dtype, seed=v)
    tw = torch.rand(n, device="cuda") * 2
    for opt_set in OPTION_SETS:
        opts = KernelOptions(**opt_set)
        got = native_cuda.row_forward(logits, target, tw, opts)
        want = reference.row_forward(logits.double(), target, tw.double(), opts)
        for name in ("lse", "ce", "prob", "weight", "loss"):
            a, b = getattr(got, name).double(), getattr(want, name)
            assert float((a - b).abs().max()) <= 3e-5 * max(1.0, float(b.abs().max())), (name, opt_set)
        assert torch.equal(got.pred, want.pred)
        coef = torch.randn(n, device="cuda")
        coef[::3] = 0
        out = torch.full_like(logits, math.nan)
        native_cuda.row_backward(logits, target, got.lse, coef, opts, out=out)
        ref = reference.row_backward(logits.double(), target, want.lse, coef.double(), opts)
        assert grad_close(out, ref, float(coef.abs().max()), dtype), opt_set
        assert torch.all(out[coef == 0] == 0)
        grad = torch.full_like(logits, math.nan)
        fused = native_cuda.row_forward_backward(logits, target, tw, opts, torch.tensor(0.25, device="cuda"), grad)
        assert torch.equal(fused.pred, got.pred)
        for a, b in zip(fused, got):
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0, equal_nan=True)
        ref = reference.row_backward(logits.double(), target, want.lse, want.weight * 0.25, opts)
        assert grad_close(grad, ref, 0.25 * float(want.weight.abs().max()), dtype), opt_set


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction,normalize,fallback", ALL_MODES)
def test_loss_modes_real_size(dtype, reduction, normalize, fallback):
    logits, target = make(4096, 32000, dtype)
    grad_out = torch.linspace(-1, 2, 4096, device="cuda") if reduction == "none" else torch.tensor(1.3, device="cuda")
    for opt_set in OPTION_SETS[::3]:
        check_loss(logits, target, grad_out=grad_out, reduction=reduction, normalize=normalize,
                   fallback=fallback, **opt_set)


@gpu
def test_misaligned_rows_3d_and_inplace():
    base, target = make(3 * 50, 1001)
    wide = torch.randn(150, 1003, device="cuda")
    wide[:, 1:1002] = base
    sliced = wide[:, 1:1002]  # odd row stride, rows start off the 16-byte boundary
    check_loss(sliced, target)
    check_loss(sliced.bfloat16(), target)
    check_loss(base.reshape(3, 50, 1001).transpose(0, 1), target.reshape(3, 50).t(), reduction="none",
               grad_out=torch.rand(50, 3, device="cuda"))
    for normalize in ("active", "valid"):
        _, want = run(base, target, "cuda", normalize=normalize)
        x = base.clone().requires_grad_(True)
        memft_loss(x, target, backend="cuda", normalize=normalize, inplace_backward=True).backward()
        assert torch.equal(x.grad, want)


@gpu
def test_ties_nan_and_out_of_range_targets():
    v = 5000
    logits = torch.zeros(5, v, device="cuda")
    logits[0, [7, 1200, 4999]] = 3.0
    logits[1] = -math.inf
    logits[2, [30, 3000]] = math.nan
    logits[3, [4998, 4999]] = 1.0
    target = torch.tensor([7, 1, 2, 4999, 3], device="cuda")
    stats = native_cuda.row_forward(logits, target, None, KernelOptions())
    assert stats.pred.tolist() == torch.argmax(logits.cpu(), dim=-1).tolist()
    assert math.isnan(stats.loss[2]) and float(stats.weight[2]) == 1.0
    logits, target = make(16, 333, ignore_frac=0.0)
    target[[1, 4]] = torch.tensor([333, -5], device="cuda")
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend="cuda", validate=False, reduction="none")
    loss.backward(torch.ones_like(loss))
    assert torch.isnan(loss[[1, 4]]).all() and not torch.isnan(loss[[0, 2, 3]]).any()
    assert torch.isnan(x.grad[[1, 4]]).all() and not torch.isnan(x.grad[[0, 2, 3]]).any()


@gpu
def test_deterministic_and_traceable_by_torch_compile():
    logits, target = make(512, 32000, seed=5)
    a = run(logits, target, "cuda", policy="sigmoid")
    b = run(logits, target, "cuda", policy="sigmoid")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    compiled = torch.compile(lambda x, t: memft_loss(x, t, backend="cuda", normalize="valid", validate=False),
                             backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_(True)
    compiled(x, target).backward()
    assert rel(x.grad, run(logits, target, "cuda", normalize="valid")[1]) == 0


@gpu
def test_soft_cap_consistency_ties_and_long_rows(poisoned):
    """The CUDA side of three CPU bugs (tests/test_native_cpu.py, which run on every CPU path; the
    CPU emulation of this kernel passes the same checks): with a soft cap, ce >= 0 and p <= 1 for
    confident rows, ce = 0 exactly for V = 1 (the target logit is the value the max came from), a
    maximum tied across threads and packs gives torch.argmax's lowest index; and a 2^20 + 5 row's
    lse and loss stay within float32 rounding of float64."""
    g = torch.Generator(device="cuda").manual_seed(4)
    n, v = 2000, 37
    x = torch.randn(n, v, generator=g, device="cuda")
    t = torch.randint(0, v, (n,), generator=g, device="cuda")
    x[torch.arange(n, device="cuda"), t] = 25 + 5 * torch.rand(n, generator=g, device="cuda")
    opts = KernelOptions(policy="hard", softcap=30.0)
    grad = torch.empty_like(x)
    for stats in (native_cuda.row_forward(x, t, None, opts),
                  native_cuda.row_forward_backward(x, t, None, opts, torch.tensor(1.0, device="cuda"), grad)):
        assert float(stats.ce.min()) >= 0.0 and float(stats.prob.max()) <= 1.0
    one = torch.randn(n, 1, generator=g, device="cuda") * 10
    zero = torch.zeros(n, dtype=torch.long, device="cuda")
    stats = native_cuda.row_forward(one, zero, None, KernelOptions(policy="none", softcap=30.0))
    assert torch.equal(stats.ce, torch.zeros_like(stats.ce))

    ties = torch.randint(-3, 3, (48, 4133), generator=g, device="cuda").float() / 2
    ties[:, -1] = ties.max(dim=1).values
    target = torch.randint(0, 4133, (48,), generator=g, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        xd = ties.to(dtype)
        want = torch.argmax(torch.tanh(xd.float()), dim=-1)
        assert torch.equal(native_cuda.row_forward(xd, target, None, KernelOptions(policy="none", softcap=1.0)).pred, want)

    long_rows = torch.randn(2, (1 << 20) + 5, generator=g, device="cuda") * 2
    target = torch.randint(0, long_rows.shape[1], (2,), generator=g, device="cuda")
    opts = KernelOptions(policy="none", label_smoothing=0.1)
    got = native_cuda.row_forward(long_rows, target, None, opts)
    want = reference.row_forward(long_rows.double(), target, None, opts)
    assert rel(got.lse, want.lse) < 2e-7 and rel(got.loss, want.loss) < 2e-7
