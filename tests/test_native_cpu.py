"""The native CPU backend (memft_kernels/ops/native_cpu.py, csrc/cpu/) against float64.

Ground truth is the PyTorch reference run on the same values upcast to float64; the kernels are
never compared with another backend. Per-row outputs and gradient buffers are poisoned (NaN / -1)
before a kernel writes them. Every code path the host can run is tested: the best one (AVX-512F
where available), AVX2 (MEMFT_CPU_ISA=avx2) and the portable scalar one (MEMFT_CPU_ISA=scalar).
V = 2053 makes a row span two 2048-element blocks plus a tail.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memft_kernels import dispatch, memft_loss
from memft_kernels.ops import native, native_cpu, reference
from memft_kernels.spec import KernelOptions

from helpers import make, poison_stats, rel
from helpers import run as _run

pytestmark = pytest.mark.skipif(native_cpu.availability() is not None, reason=str(native_cpu.availability()))

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # ~4 ulp of the gradient dtype
ALL_MODES = [("mean", "active", "mean"), ("mean", "active", "zero"), ("mean", "valid", "mean"),
             ("sum", "active", "mean"), ("none", "active", "mean")]
OPTION_SETS = [
    dict(policy="hard"),
    dict(policy="none", label_smoothing=0.1),
    dict(policy="sigmoid", threshold=0.7, sharpness=4.0, z_loss=1e-3),
    dict(policy="hard", softcap=5.0, label_smoothing=0.05, z_loss=1e-4),
]


@pytest.fixture(autouse=True, params=["best", "avx2", "scalar"])
def isa(request, monkeypatch):
    """Run every test on each code path; poison every per-row output."""
    if request.param != "best":
        if request.param == "avx2" and native_cpu.isa() != "avx512f":
            pytest.skip("the best path here is already AVX2 (or there is no AVX2)")
        monkeypatch.setenv("MEMFT_CPU_ISA", request.param)
        assert native_cpu.isa() == {"avx2": "avx2+fma", "scalar": "scalar"}[request.param]
    poison_stats(monkeypatch, native, "new_row_stats")
    return request.param


def run(logits, target, backend, grad_out=None, **opts):
    return _run(logits, target, backend, grad_out, **opts)


def check_loss(logits, target, grad_out=None, loss_tol=1e-5, atol=0.0, **opts):
    """Relative error against float64; ``atol`` is a floor on the absolute error for results that
    are tiny by cancellation (V = 1: ce = lse - x is 0 in exact math, one float32 ulp of lse here)."""
    loss, grad = run(logits, target, "cpu", grad_out, **opts)
    ref_loss, ref_grad = run(logits.double(), target, "torch", grad_out, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    loss_err = float((loss.double() - ref_loss).norm())
    grad_err = float((grad.double() - ref_grad).norm())
    assert rel(loss, ref_loss) < loss_tol or loss_err <= atol, opts
    assert rel(grad, ref_grad) < GRAD_TOL[logits.dtype] or grad_err <= atol, opts
    return loss, grad


# ------------------------------------------------------------------------------- row kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 7, 37, 2053])
@pytest.mark.parametrize("opt_set", range(len(OPTION_SETS)))
def test_row_kernels_vs_float64(dtype, v, opt_set):
    opts = KernelOptions(**OPTION_SETS[opt_set])
    logits, target = make(n=19, v=v, dtype=dtype, seed=v + opt_set)
    tw = torch.rand(19, generator=torch.Generator().manual_seed(1)) * 2
    got = native_cpu.row_forward(logits, target, tw, opts)
    want = reference.row_forward(logits.double(), target, tw.double(), opts)
    for name in ("lse", "ce", "prob", "weight", "loss"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float32
        assert float((a.double() - b).abs().max()) <= 2e-5 * max(1.0, float(b.abs().max())), name
    assert torch.equal(got.pred, want.pred)

    coef = torch.randn(19, generator=torch.Generator().manual_seed(2))
    coef[::4] = 0.0
    out = torch.full_like(logits, math.nan)
    native_cpu.row_backward(logits, target, got.lse, coef, opts, out=out)
    ref = reference.row_backward(logits.double(), target, want.lse, coef.double(), opts)
    assert torch.all(out[coef == 0] == 0)
    if dtype == torch.float16:  # a float64 value past float16's range (65504) is inf in float16
        rounded = ref.to(dtype)
        assert torch.equal(out.isinf(), rounded.isinf()) and torch.equal(out[out.isinf()], rounded[rounded.isinf()])
        out, ref = out[rounded.isfinite()], ref[rounded.isfinite()]
    # The terms are O(|coef|); with V = 1 they cancel to ~2 z lse, so the bound counts them too.
    err = float((out.double() - ref).abs().max())
    assert err <= GRAD_TOL[dtype] * float(ref.abs().max()) + 3e-7 * float(coef.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_set", range(len(OPTION_SETS)))
def test_fused_single_pass_matches_two_passes(dtype, opt_set):
    opts = KernelOptions(**OPTION_SETS[opt_set])
    logits, target = make(n=21, v=2053, dtype=dtype, seed=opt_set)
    scale = torch.tensor(0.37)
    grad = torch.full_like(logits, math.nan)
    fused = native_cpu.row_forward_backward(logits, target, None, opts, scale, grad)
    stats = native_cpu.row_forward(logits, target, None, opts)
    for a, b in zip(fused, stats):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
    two_pass = native_cpu.row_backward(logits, target, stats.lse, stats.weight * scale, opts)
    # the fused sweep reuses the scan's exp values: the same gradient up to float32 rounding
    assert rel(grad, two_pass) < {torch.float32: 3e-7, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    want = reference.row_forward(logits.double(), target, None, opts)
    ref = reference.row_backward(logits.double(), target, want.lse, want.weight * 0.37, opts)
    assert rel(grad, ref) < GRAD_TOL[dtype]


# ------------------------------------------------------------------------------- memft_loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction,normalize,fallback", ALL_MODES)
def test_loss_modes_vs_float64(dtype, reduction, normalize, fallback):
    logits, target = make(n=40, v=61, dtype=dtype)
    grad_out = torch.linspace(-1, 2, 40) if reduction == "none" else torch.tensor(1.7)
    for opt_set in OPTION_SETS:
        check_loss(logits, target, grad_out=grad_out, reduction=reduction, normalize=normalize,
                   fallback=fallback, **opt_set)


def test_denominator_token_weight_and_ignore_index():
    logits, target = make(n=32, v=50)
    target[target == -100] = 7
    target[::5] = -1
    tw = torch.rand(32) * 3
    check_loss(logits, target, ignore_index=-1, token_weight=tw)
    check_loss(logits, target, ignore_index=-1, token_weight=tw, denominator=torch.tensor(11.0))
    check_loss(logits, target, ignore_index=-1, reduction="sum", token_weight=tw, policy="sigmoid")


def test_fallback_when_every_row_is_recalled():
    logits, target = make(n=16, v=23, ignore_frac=0.0)
    logits = logits / 3
    logits[torch.arange(16), target] += 8.0
    for fallback in ("mean", "zero"):
        # ce ~ 1e-3 is lse - x_y with lse ~ 8: float32 cancellation bounds the loss accuracy
        loss, grad = check_loss(logits, target, fallback=fallback, loss_tol=1e-3)
        if fallback == "zero":
            assert float(loss) == 0.0 and torch.all(grad == 0)
    _, stats = memft_loss(logits, target, backend="cpu", return_stats=True)
    assert bool(stats.fell_back) and int(stats.n_active) == 0


def test_3d_and_non_contiguous_inputs():
    logits, target = make(n=2 * 5 * 3, v=29)
    x3 = logits.reshape(2, 5, 3, 29).transpose(1, 2)  # non-contiguous leading dims
    t3 = target.reshape(2, 5, 3).transpose(1, 2)
    check_loss(x3, t3, reduction="none", grad_out=torch.rand(2, 3, 5))
    wide = torch.randn(30, 64, dtype=torch.float64)
    wide[:, :29] = logits
    check_loss(wide[:, :29].float(), target)  # row stride 64 (cast keeps the layout dense)
    sliced = wide.float()[:, :29]  # row stride 64, no copy
    assert not sliced.is_contiguous()
    check_loss(sliced, target)
    col = torch.randn(29, 30).t()  # column stride != 1: the backend copies
    check_loss(col, target)


def test_int32_target_and_strided_target():
    logits, target = make(n=20, v=33)
    check_loss(logits, target.to(torch.int32))
    t2 = torch.stack([target, target], 1)[:, 0]  # stride 2
    check_loss(logits, t2, reduction="none", grad_out=torch.rand(20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", ["active", "valid"])  # valid: the fused in-place path
def test_inplace_backward(dtype, normalize):
    logits, target = make(n=24, v=41, dtype=dtype)
    _, want = run(logits, target, "cpu", normalize=normalize)
    x = logits.clone().requires_grad_(True)
    storage = x.detach()
    memft_loss(x, target, backend="cpu", normalize=normalize, inplace_backward=True).backward()
    assert torch.equal(x.grad, want)
    assert x.grad.data_ptr() == storage.data_ptr()


def test_ties_pick_the_lowest_index_and_nan_rows():
    v = 2053
    logits = torch.zeros(6, v)
    logits[0, [5, 900, 2050]] = 3.0  # ties across lanes, blocks and the tail
    logits[1, [2052, 2051]] = 1.0
    logits[2] = -math.inf
    logits[3, 17] = math.nan
    logits[3, 1000] = math.nan
    logits[4, [0, 8]] = 2.0  # the same lane
    logits[5, 2049] = math.inf
    target = torch.tensor([5, 2051, 3, 4, 8, 0])
    stats = native_cpu.row_forward(logits, target, None, KernelOptions(policy="hard"))
    assert stats.pred.tolist() == torch.argmax(logits, dim=-1).tolist() == [5, 2051, 0, 17, 0, 2049]
    assert math.isnan(stats.loss[3]) and float(stats.weight[3]) == 1.0  # NaN is never masked away
    ref = reference.row_forward(logits, target, None, KernelOptions(policy="hard"))
    assert torch.equal(stats.lse.isnan(), ref.lse.isnan()) and math.isnan(stats.lse[5])  # +inf: NaN, as F.cross_entropy
    loss = memft_loss(logits.clone(), target, backend="cpu")
    assert math.isnan(loss)


def test_out_of_range_target_gives_nan_not_a_memory_access():
    logits, target = make(n=8, v=19, ignore_frac=0.0)
    target[2] = 19
    target[5] = -7
    target[6] = 1 << 40
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend="cpu", validate=False, reduction="none")
    loss.backward(torch.ones_like(loss))
    bad = torch.tensor([2, 5, 6])
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[[0, 1, 3, 4, 7]]).any()
    assert torch.isnan(x.grad[bad]).all() and not torch.isnan(x.grad[[0, 1, 3, 4, 7]]).any()
    with pytest.raises(ValueError, match="19"):
        memft_loss(logits, target, backend="cpu")


def test_ignored_and_zero_weight_rows_get_exact_zeros():
    logits, target = make(n=12, v=31, ignore_frac=0.0)
    logits[3] = math.nan  # ignored: contributes nothing, not even its NaN
    target[3] = -100
    logits[7, target[7]] += 40.0  # recalled: weight 0 under the hard policy
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend="cpu")
    loss.backward()
    assert not math.isnan(loss.item())
    assert torch.all(x.grad[3] == 0) and torch.all(x.grad[7] == 0)


def test_zero_rows_and_empty_batch():
    logits = torch.randn(0, 17, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    loss = memft_loss(logits, target, backend="cpu")
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad.shape == (0, 17)
    assert memft_loss(logits, target, backend="cpu", reduction="none").shape == (0,)


def test_threads_do_not_change_a_bit():
    logits, target = make(n=67, v=2053, seed=3)
    opts = KernelOptions(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            stats = native_cpu.row_forward(logits, target, None, opts)
            grad = torch.empty_like(logits)
            fused = native_cpu.row_forward_backward(logits, target, None, opts, torch.tensor(0.5), grad)
            results.append((stats, fused, grad))
    finally:
        torch.set_num_threads(before)
    for stats, fused, grad in results[1:]:
        for a, b in zip(stats + fused, results[0][0] + results[0][1]):
            assert torch.equal(a, b)
        assert torch.equal(grad, results[0][2])


def test_supports_and_dispatch():
    assert native_cpu.supports(torch.zeros(2, 3, dtype=torch.float64)) is not None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert native_cpu.supports(torch.zeros(2, 3, dtype=dtype)) is None
    with pytest.raises(RuntimeError, match="float64"):
        memft_loss(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), backend="cpu")
    # auto picks the native backend for float32, bfloat16 and float16 CPU tensors
    logits, target = make(n=8, v=9)
    assert rel(memft_loss(logits, target), memft_loss(logits.double(), target, backend="torch")) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        assert dispatch.resolve("auto", logits.to(dtype)).name == "cpu"
        half = memft_loss(logits.to(dtype), target)
        assert half.dtype == torch.float32


def test_float16_gradient_is_the_float32_gradient_rounded():
    """float16 logits are exact in float32, so the float16 gradient must be the float32 path's
    gradient rounded to nearest even, bit for bit (torch's .half()), subnormals and +-65504
    included, in the two-pass and the fused single-pass backward; the loss is the same float."""
    torch.manual_seed(1)
    x = (torch.randn(24, 1031) * 6).half()
    x[0, :5] = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 0.0]).half()
    y = torch.randint(0, 1031, (24,))
    y[5] = -100
    for normalize in ("active", "valid"):  # valid: the fused single-pass path
        got, want = [], []
        for dtype, out in ((torch.float16, got), (torch.float32, want)):
            xi = x.to(dtype).clone().requires_grad_(True)
            loss = memft_loss(xi, y, backend="cpu", policy="sigmoid", threshold=0.05, normalize=normalize)
            loss.backward()
            out += [loss.detach(), xi.grad]
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1].half()), normalize
        subnormal = (got[1] != 0) & (got[1].abs() < 2.0**-14)
        assert int(subnormal.sum()) > 1000  # the test reaches float16's subnormal range


def test_bad_direct_calls_raise():
    logits, target = make(n=4, v=9)
    opts = KernelOptions()
    with pytest.raises(ValueError, match="grad"):
        native_cpu.row_backward(logits, target, torch.zeros(4), torch.ones(4), opts, out=torch.empty(4, 8))
    with pytest.raises(ValueError, match="target"):
        native_cpu.row_forward(logits, target[:3], None, opts)


def test_custom_ops_trace_under_torch_compile():
    logits, target = make(n=16, v=33)
    want_loss, want_grad = run(logits, target, "cpu", normalize="valid")
    compiled = torch.compile(
        lambda x, t: memft_loss(x, t, backend="cpu", normalize="valid", validate=False),
        backend="aot_eager", fullgraph=True,
    )
    x = logits.clone().requires_grad_(True)
    loss = compiled(x, target)
    loss.backward()
    assert torch.equal(loss.detach(), want_loss) and torch.equal(x.grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_past_element_2_to_the_31(dtype):
    """A row that starts past element 2^31 of its storage (row stride 2^31 + 64 over 8 or 4 GiB of
    lazily committed memory, two rows touched): the row offsets are 64-bit in forward, backward and
    the fused pass, on each instruction set."""
    v, stride = 64, 2**31 + 64
    storage = torch.empty(stride + v, dtype=dtype)  # virtual: only the two rows' pages are touched
    x = storage.as_strided((2, v), (stride, 1))
    dense, target = make(n=2, v=v, ignore_frac=0.0, seed=3)
    x.copy_(dense.to(dtype))
    dense = x.contiguous()
    opts = KernelOptions(policy="none")
    got, want = native_cpu.row_forward(x, target, None, opts), reference.row_forward(dense.double(), target, None, opts)
    assert rel(got.lse, want.lse) < 1e-6 and torch.equal(got.pred, want.pred)
    coef = torch.tensor([0.5, 2.0])
    grad = native_cpu.row_backward(x, target, got.lse, coef, opts)
    want_grad = reference.row_backward(dense.double(), target, want.lse, coef.double(), opts)
    assert rel(grad, want_grad) < (1e-6 if dtype == torch.float32 else 1e-2)
    fused = torch.full((2, v), math.nan, dtype=dtype)
    stats = native_cpu.row_forward_backward(x, target, None, opts, torch.tensor(0.5), fused)
    assert rel(stats.lse, want.lse) < 1e-6
    assert rel(fused, reference.row_backward(dense.double(), target, want.lse, torch.full((2,), 0.5).double(), opts)) < (
        1e-6 if dtype == torch.float32 else 1e-2)


def test_custom_ops_under_inductor_fullgraph():
    """The default torch.compile backend (inductor, C++ codegen here) over the three paths: two-pass
    "active" mean with masked rows, single-pass "valid" mean, per-row "none" with an upstream
    gradient; one graph, no break, no host sync (validate=False), same loss and gradient as eager.
    The Triton and CUDA ops are registered the same way; their inductor test runs on a GPU."""
    logits, target = make(n=32, v=301)
    w = torch.rand(32, generator=torch.Generator().manual_seed(1))

    def f(x, t):
        active = memft_loss(x, t, backend="cpu", validate=False)
        valid = memft_loss(x, t, backend="cpu", normalize="valid", label_smoothing=0.1, validate=False)
        per_row = memft_loss(x, t, backend="cpu", reduction="none", policy="sigmoid", validate=False)
        return 2.0 * active + valid + (per_row * w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (want_loss, want_grad), (loss, grad) = results
    assert rel(loss, want_loss) < 1e-6 and rel(grad, want_grad) < 1e-6
    assert bool((want_grad != 0).any()) and bool((want_grad == 0).all(dim=1).any())  # ignored rows: exact zeros


@given(
    n=st.integers(1, 12),
    v=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    policy=st.sampled_from(["none", "hard", "sigmoid"]),
    mode=st.sampled_from(ALL_MODES),
    smoothing=st.sampled_from([0.0, 0.2]),
    z=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 3.0, 30.0]),
    scale=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_vs_float64(isa, n, v, dtype, policy, mode, smoothing, z, softcap, scale, seed):
    logits, target = make(n=n, v=v, dtype=torch.float64, seed=seed)
    logits = (logits * scale / 3).to(dtype)
    reduction, normalize, fallback = mode
    grad_out = torch.rand(n) if reduction == "none" else None
    check_loss(logits, target, grad_out=grad_out, loss_tol=3e-5, atol=1e-6 if v == 1 else 0.0, policy=policy, reduction=reduction,
               normalize=normalize, fallback=fallback, label_smoothing=smoothing, z_loss=z, softcap=softcap)


@pytest.mark.parametrize("dtype,n", [(torch.float32, 260), (torch.bfloat16, 520), (torch.float16, 520)])
def test_large_gradient_streaming_stores(dtype, n):
    """>= 32 MiB of gradient takes the non-temporal-store path; odd V leaves rows unaligned."""
    v = 32771
    logits, target = make(n=n, v=v, dtype=dtype, seed=9)
    assert logits.numel() * logits.element_size() >= 32 << 20
    opts = KernelOptions(policy="hard", label_smoothing=0.1)
    grad = torch.full_like(logits, math.nan)
    stats = native_cpu.row_forward_backward(logits, target, None, opts, torch.tensor(0.01), grad)
    rows = torch.arange(0, n, 13)
    want = reference.row_forward(logits[rows].double(), target[rows], None, opts)
    ref = reference.row_backward(logits[rows].double(), target[rows], want.lse, want.weight * 0.01, opts)
    assert rel(grad[rows], ref) < GRAD_TOL[dtype]
    assert rel(stats.loss[rows], want.loss) < 1e-5
    two_pass = native_cpu.row_backward(logits, target, stats.lse, stats.weight * 0.01, opts)
    assert rel(two_pass[rows], ref) < GRAD_TOL[dtype]
    assert not torch.isnan(grad).any() and not torch.isnan(two_pass).any()


def test_unknown_isa_request_is_reported_not_silently_ignored(monkeypatch):
    from memft_kernels.ops import native_cpu

    monkeypatch.setenv("MEMFT_CPU_ISA", "avx-2")  # a typo: the compiled module ignores it
    assert "MEMFT_CPU_ISA='avx-2' is ignored" in native_cpu.isa_request_problem()
    for good in ("avx2", "scalar", ""):
        monkeypatch.setenv("MEMFT_CPU_ISA", good)
        assert native_cpu.isa_request_problem() is None


def test_long_rows_sum_as_accurately_as_torch():
    """lse and loss of V = 2^20 + 5 rows within 2e-7 of float64 on every code path (torch's own
    float32 logsumexp is 1-5e-8 off here). The scan used to add a row's exp values (and its logits,
    for label smoothing) into one float32 accumulator per lane: 1M sequential additions on the
    scalar path (every non-x86 host), which put the loss 7e-5 off, 3e-7 with AVX-512's 16 lanes."""
    v = (1 << 20) + 5
    logits, target = make(n=2, v=v, ignore_frac=0.0, scale=2.0, seed=11)
    opts = KernelOptions(policy="none", label_smoothing=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        got = native_cpu.row_forward(x, target, None, opts)
        want = reference.row_forward(x.double(), target, None, opts)
        assert rel(got.lse, want.lse) < 2e-7 and rel(got.loss, want.loss) < 2e-7, (dtype, rel(got.loss, want.loss))
        grad = torch.full_like(x, math.nan)
        fused = native_cpu.row_forward_backward(x, target, None, opts, torch.tensor(0.5), grad)
        assert torch.equal(fused.lse, got.lse) and torch.equal(fused.loss, got.loss)
        ref = reference.row_backward(x.double(), target, want.lse, torch.full((2,), 0.5, dtype=torch.float64), opts)
        assert rel(grad, ref) < GRAD_TOL[dtype]


def test_direct_calls_check_per_row_inputs_and_gradient_rows():
    """The kernels read lse[i] / coef[i] at address + i and write row i of the gradient at
    grad + i * stride: a short or strided lse / coef was read out of bounds (or the wrong elements),
    a gradient whose rows share memory (expand) was written by several rows at once, and a float64
    factor of scale_grad_ was read as a float32 (0.5 became 0). Each now raises."""
    logits, target = make(n=64, v=300)
    opts = KernelOptions()
    stats = native_cpu.row_forward(logits, target, None, opts)
    with pytest.raises(ValueError, match="lse"):
        native_cpu.row_backward(logits, target, stats.lse[:1], torch.ones(64), opts)
    with pytest.raises(ValueError, match="coef"):
        native_cpu.row_backward(logits, target, stats.lse, torch.ones(63), opts)
    strided = torch.stack([stats.lse, torch.zeros(64)], 1)[:, 0]
    with pytest.raises(ValueError, match="lse"):
        torch.ops.memft.cpu_row_backward(logits, target, strided, torch.ones(64), torch.empty_like(logits),
                                         *opts.scalars(300))
    shared = torch.zeros(300).expand(64, 300)
    with pytest.raises(ValueError, match="overlap"):
        native_cpu.row_backward(logits, target, stats.lse, torch.ones(64), opts, out=shared)
    with pytest.raises(ValueError, match="overlap"):
        native_cpu.row_forward_backward(logits, target, None, opts, torch.tensor(1.0), shared)
    grad = torch.ones(4, 5)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.memft.cpu_scale_grad_(grad, torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(grad, torch.ones(4, 5))
    native_cpu.scale_grad_(grad, torch.tensor(0.5, dtype=torch.float64))  # the contract converts it
    assert torch.equal(grad, torch.full((4, 5), 0.5))


def test_soft_capped_target_logit_is_the_one_the_scan_saw():
    """ce = lse - x_target took x_target capped by other code (libm tanhf, and in the AVX files
    FMA-fused arithmetic) than the row's scan: with softcap=30, 3% of confident rows got ce < 0
    (p > 1) on AVX-512, and V = 1 rows (ce = 0 exactly in the reference) a nonzero ce on every path."""
    g = torch.Generator().manual_seed(4)
    n, v = 2000, 37
    x = torch.randn(n, v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    x[torch.arange(n), t] = 25 + 5 * torch.rand(n, generator=g)  # p ~ 1: ce ~ 1e-7
    opts = KernelOptions(policy="hard", softcap=30.0)
    grad = torch.empty_like(x)
    for stats in (native_cpu.row_forward(x, t, None, opts),
                  native_cpu.row_forward_backward(x, t, None, opts, torch.tensor(1.0), grad)):
        assert float(stats.ce.min()) >= 0.0 and float(stats.prob.max()) <= 1.0
    one = torch.randn(n, 1, generator=g) * 10
    zero = torch.zeros(n, dtype=torch.long)
    stats = native_cpu.row_forward(one, zero, None, KernelOptions(policy="none", softcap=30.0))
    assert torch.equal(stats.ce, torch.zeros(n)) and torch.equal(stats.prob, torch.ones(n))


@pytest.mark.parametrize("v", [17, 33, 2063])
def test_soft_capped_max_tied_between_lanes_and_tail_gives_the_first_index(v):
    """The tail (the last V mod W logits) was capped with libm's tanh and the vector lanes with the
    vector one: a maximum tied between a lane and the tail came out one ulp higher in the tail, so
    pred named the tail's index (V = 17: 16 instead of 0), not torch.argmax's lowest one."""
    g = torch.Generator().manual_seed(v)
    x = torch.randint(-3, 3, (48, v), generator=g).float() / 2
    x[:, -1] = x.max(dim=1).values  # every row's maximum is also in the tail
    target = torch.randint(0, v, (48,), generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for softcap in (1.0, 3.0):
            opts = KernelOptions(policy="none", softcap=softcap)
            xd = x.to(dtype)
            want = torch.argmax(softcap * torch.tanh(xd.float() / softcap), dim=-1)
            assert torch.equal(native_cpu.row_forward(xd, target, None, opts).pred, want), (dtype, softcap)
            grad = torch.empty_like(xd)
            fused = native_cpu.row_forward_backward(xd, target, None, opts, torch.tensor(1.0), grad)
            assert torch.equal(fused.pred, want), (dtype, softcap)
