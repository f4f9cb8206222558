"""The Triton backend (memft_kernels/ops/triton_ce.py) against the reference, run in float64.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are tiny; ``forced_block(16)`` with V = 37 makes every row span three vocab blocks (the last
one partial), which is what exercises the online max / sum-exp and the masked lanes. Kernel outputs
are poisoned (NaN / -1) before the kernels write them, so a value the kernel forgot to write fails.

Tests marked ``gpu`` run only on a CUDA host (benchmarks/gpu_check.sh, MEMFT_TEST_GPU=1) at real sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memft_kernels import memft_loss
from memft_kernels.ops import reference
from memft_kernels.ops import triton_ce
from memft_kernels.spec import KernelOptions

from helpers import make as _make
from helpers import poison_stats, rel, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(triton_ce.availability() is not None, reason=str(triton_ce.availability()))

V = 37  # with BLOCK_V = 16: three blocks per row, the last one partial
BLOCK = 16
ALL_MODES = [("mean", "active", "mean"), ("mean", "active", "zero"), ("mean", "valid", "mean"),
             ("sum", "active", "mean"), ("none", "active", "mean")]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch, request):
    """Every per-row output starts as NaN (pred as -1), and (CPU tests) rows span several blocks."""
    poison_stats(monkeypatch, triton_ce, "_empty_stats")
    with triton_ce.forced_block(None if request.node.get_closest_marker("gpu") else BLOCK):
        yield


def make(n=24, v=V, dtype=torch.float32, ignore_frac=0.2, seed=0):
    return _make(n=n, v=v, dtype=dtype, ignore_frac=ignore_frac, seed=seed, device=DEVICE)


def check_against_float64(logits, target, grad_out=None, **opts):
    """Triton on ``logits`` vs the reference on the same values upcast to float64."""
    loss, grad = run(logits, target, "triton", grad_out, **opts)
    ref_loss, ref_grad = run(logits.double(), target, "torch", grad_out, **opts)
    assert grad.dtype == logits.dtype and loss.dtype == torch.float32
    assert not torch.isnan(loss).any()
    assert rel(loss, ref_loss) < 1e-5, opts
    assert rel(grad, ref_grad) < GRAD_TOL[logits.dtype], opts
    # a row the loss does not weigh gets an exact zero gradient, never a rounding residue
    assert torch.equal(grad[ref_grad == 0], torch.zeros_like(grad[ref_grad == 0]))
    return loss, grad


def assert_stats_match(got, want, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    for name in ("lse", "ce", "prob", "weight", "loss"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float32
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        ok = ~torch.isnan(b)
        assert rel(a[ok], b[ok]) < tol, (name, a, b)
    assert got.pred.dtype == torch.int64
    assert torch.equal(got.pred, want.pred)


OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3, softcap=4.0),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=6.0, threshold=0.3, sharpness=4.0),
]


# ---------------------------------------------------------------------------------------------
# The row functions, one by one, against the reference's row functions in float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["none", "hard", "sigmoid"])
def test_row_functions_match_reference(policy):
    logits, target = make(n=12)
    token_weight = torch.rand(target.shape, device=DEVICE) * 2
    shift = ["none", "hard", "sigmoid"].index(policy)
    for i in (shift, shift + 1):  # two option sets per policy, every set used at least once
        extra = OPTION_SETS[i % len(OPTION_SETS)]
        opts = KernelOptions(policy=policy, **extra)
        tw = token_weight if i % 2 else None
        want = reference.row_forward(logits.double(), target, tw, opts)
        got = triton_ce.row_forward(logits, target, tw, opts)
        assert_stats_match(got, want)

        coef = torch.rand(target.shape, device=DEVICE, dtype=torch.float64) * 3
        coef[::3] = 0.0
        out = torch.full_like(logits, math.nan)
        grad = triton_ce.row_backward(logits, target, want.lse.float(), coef.float(), opts, out=out)
        assert grad is out
        ref_grad = reference.row_backward(logits.double(), target, want.lse, coef, opts)
        assert rel(grad, ref_grad) < 1e-5
        assert torch.count_nonzero(grad[::3]) == 0

        scale = torch.tensor(0.25, device=DEVICE)
        fused = torch.full_like(logits, math.nan)
        got = triton_ce.row_forward_backward(logits, target, tw, opts, scale, fused)
        assert_stats_match(got, want)
        ref_fused = reference.row_backward(logits.double(), target, want.lse, want.weight * 0.25, opts)
        assert rel(fused, ref_fused) < 1e-5
        assert torch.count_nonzero(fused[want.weight == 0]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_functions_low_precision(dtype):
    logits, target = make(dtype=dtype)
    opts = KernelOptions(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    want = reference.row_forward(logits.double(), target, None, opts)
    assert_stats_match(triton_ce.row_forward(logits, target, None, opts), want, dtype)
    grad = torch.full_like(logits, math.nan)
    triton_ce.row_forward_backward(logits, target, None, opts, torch.tensor(1.0, device=DEVICE), grad)
    assert grad.dtype == dtype
    assert rel(grad, reference.row_backward(logits.double(), target, want.lse, want.weight, opts)) < GRAD_TOL[dtype]


def test_single_block_and_odd_sizes():
    """V = 1, a V of exactly one block, and a V one past a block."""
    opts = KernelOptions(policy="sigmoid", label_smoothing=0.1)
    with triton_ce.forced_block(32):
        for v in (1, 32, 33):
            logits, target = make(n=5, v=v)
            want = reference.row_forward(logits.double(), target, None, opts)
            assert_stats_match(triton_ce.row_forward(logits, target, None, opts), want)


def test_launch_heuristic_one_config_per_shape_class():
    with triton_ce.forced_block(None):
        assert triton_ce.launch_config(37) == (64, 1)
        assert triton_ce.launch_config(32000) == (triton_ce.MAX_BLOCK_V, 8)
        assert triton_ce.launch_config(128256) == triton_ce.launch_config(262144)


# ---------------------------------------------------------------------------------------------
# memft_loss with backend="triton": the option matrix (fused and two-pass paths both run)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction,normalize,fallback", ALL_MODES)
def test_matrix_against_float64(reduction, normalize, fallback):
    logits, target = make()
    token_weight = torch.rand(target.shape, device=DEVICE) * 2
    for i, policy in enumerate(["none", "hard", "sigmoid"]):
        extra = dict(OPTION_SETS[(i + len(reduction)) % len(OPTION_SETS)])
        if i == 2:
            extra["token_weight"] = token_weight
        check_against_float64(logits, target, policy=policy, reduction=reduction, normalize=normalize,
                              fallback=fallback, **extra)


def test_denominator_ignore_index_and_int32_targets():
    logits, target = make()
    target = torch.where(target == -100, torch.full_like(target, 7), target)  # 7 is now the ignored class
    check_against_float64(logits, target.int(), ignore_index=7, denominator=torch.tensor(13.0, device=DEVICE))
    check_against_float64(logits, target, ignore_index=7, denominator=5, policy="sigmoid")


def test_fallback_when_every_token_is_recalled():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, V, (8,), generator=g).to(DEVICE)
    logits = torch.randn(8, V, generator=g).to(DEVICE)
    logits[torch.arange(8), target] += 7.0  # every p > 0.5: the hard policy weighs every row 0
    target[0] = -100
    _, stats = memft_loss(logits, target, backend="triton", return_stats=True)
    assert bool(stats.fell_back) and int(stats.n_active) == 0
    for fallback in ("mean", "zero"):
        loss, grad = check_against_float64(logits, target, fallback=fallback)
        if fallback == "zero":
            assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    logits, target = make(dtype=dtype)
    check_against_float64(logits, target, policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    check_against_float64(logits, target, normalize="valid")  # the single-pass path


def test_ties_take_the_lowest_index_and_nan_is_the_argmax():
    logits = torch.zeros(4, V, device=DEVICE)
    logits[0, [3, 20, 36]] = 5.0  # tie across blocks
    logits[1, [17, 18]] = 2.0  # tie inside a block
    logits[2, 30] = math.nan  # NaN is torch.argmax's maximum
    logits[2, 5] = 9.0
    logits[3] = -math.inf
    logits[3, [33, 34]] = -1.0  # every other lane -inf: no NaN from exp(-inf - -inf)
    target = torch.tensor([3, 0, 1, 34], device=DEVICE)
    for opts in (KernelOptions(policy="none"), KernelOptions(policy="hard", softcap=3.0)):
        got = triton_ce.row_forward(logits, target, None, opts)
        want = reference.row_forward(logits.double(), target, None, opts)
        assert got.pred.tolist() == [3, 17, 30, 33] == want.pred.tolist()
        assert_stats_match(got, want)
        assert math.isnan(got.loss[2]) and got.weight[2] == 1.0  # NaN rule: a NaN row is never masked
        assert math.isclose(float(got.ce[3]), math.log(2.0), rel_tol=1e-6) or opts.softcap


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy computing inf - inf
def test_infinite_logits_match_the_reference():
    logits, target = make(n=6, ignore_frac=0.0)
    logits[0, 20] = math.inf  # not the target: NaN, as F.cross_entropy
    target[1] = 3
    logits[1, 3] = math.inf  # the target: ce = inf - inf = NaN
    logits[2, 30:] = -math.inf
    for opts in (KernelOptions(policy="hard"), KernelOptions(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3)):
        got = triton_ce.row_forward(logits, target, None, opts)
        want = reference.row_forward(logits.double(), target, None, opts)
        for name in ("lse", "ce", "prob", "weight", "loss"):
            a, b = getattr(got, name), getattr(want, name).float()
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)), name
        assert got.pred[:2].tolist() == [20, 3] == want.pred[:2].tolist()
        assert math.isnan(got.lse[0]) and math.isnan(got.ce[0]) and math.isnan(got.ce[1])


def test_masked_vocab_entries_at_minus_infinity():
    logits, target = make()
    logits[:, 30:] = -math.inf  # padded vocab (no target points there)
    target = torch.where(target >= 30, torch.zeros_like(target), target)
    for extra in (dict(), dict(z_loss=1e-3, softcap=5.0)):
        check_against_float64(logits, target, policy="sigmoid", **extra)


def test_three_d_and_non_contiguous_inputs():
    logits, target = make(n=24)
    check_against_float64(logits.reshape(2, 3, 4, V), target.reshape(2, 3, 4), policy="sigmoid")
    wide, _ = make(n=24, v=V + 11, seed=1)
    strided = wide[:, 5:5 + V]  # row stride V + 11, unit stride in V: goes to the kernels as is
    assert not strided.is_contiguous()
    check_against_float64(strided, target, label_smoothing=0.1)
    check_against_float64(strided, target, normalize="valid")
    opts = KernelOptions(policy="hard")
    assert_stats_match(triton_ce.row_forward(strided, target, None, opts),
                       reference.row_forward(strided.double(), target, None, opts))


def test_upstream_gradient_not_one():
    logits, target = make()
    for normalize in ("active", "valid"):  # two-pass and single-pass paths
        check_against_float64(logits, target, grad_out=torch.tensor(2.5), normalize=normalize, z_loss=1e-3)
    per_row = torch.randn(target.shape, device=DEVICE)
    check_against_float64(logits, target, grad_out=per_row, reduction="none", policy="sigmoid", label_smoothing=0.1)
    check_against_float64(logits, target, grad_out=torch.tensor(-0.5), reduction="sum", softcap=5.0)


@pytest.mark.parametrize("normalize", ["active", "valid"])  # two-pass and single-pass
def test_inplace_backward_writes_into_the_logits(normalize):
    logits, target = make()
    ref_loss, ref_grad = run(logits.double(), target, "torch", normalize=normalize, policy="sigmoid")
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend="triton", normalize=normalize, policy="sigmoid", inplace_backward=True)
    loss.backward()
    assert rel(loss, ref_loss) < 1e-5
    assert rel(x.grad, ref_grad) < 1e-5
    assert rel(x.detach(), ref_grad) < 1e-5  # the logits' own storage now holds the gradient


def test_out_of_range_target_without_validation_is_nan_not_a_crash():
    logits, target = make(n=8, ignore_frac=0.0)
    target[2] = V + 1000
    target[5] = -7
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend="triton", validate=False, reduction="none")
    assert torch.isnan(loss[[2, 5]]).all() and not torch.isnan(loss[[0, 1, 3, 4, 6, 7]]).any()
    loss.sum().backward()
    assert torch.isnan(x.grad[[2, 5]]).all() and not torch.isnan(x.grad[[0, 1, 3, 4, 6, 7]]).any()
    for normalize in ("active", "valid"):  # two-pass and single-pass
        x = logits.clone().requires_grad_(True)
        loss = memft_loss(x, target, backend="triton", validate=False, normalize=normalize)
        loss.backward()
        assert torch.isnan(loss)
        assert torch.isnan(x.grad[[2, 5]]).all() and not torch.isnan(x.grad[[0, 1, 3, 4, 6, 7]]).any()


def test_zero_rows_and_all_ignored():
    empty = torch.empty(0, V, device=DEVICE)
    none = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert memft_loss(empty, none, backend="triton", reduction="none").shape == (0,)
    assert float(memft_loss(empty, none, backend="triton")) == 0.0
    logits, target = make(n=6, ignore_frac=1.0)
    loss, grad = run(logits, target, "triton", normalize="valid")
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0


def test_return_stats_match_reference():
    logits, target = make()
    _, got = memft_loss(logits, target, backend="triton", policy="sigmoid", return_stats=True)
    _, want = memft_loss(logits.double(), target, backend="torch", policy="sigmoid", return_stats=True)
    for name, value in got.as_dict().items():
        expect = getattr(want, name)
        if value.is_floating_point():
            assert rel(value, expect) < 1e-5, name
        else:
            assert torch.equal(value, expect), name


@settings(max_examples=20)  # each example runs the interpreter: a few, drawn the same every run
@given(
    n=st.integers(0, 12), v=st.integers(1, 40), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    policy=st.sampled_from(["none", "hard", "sigmoid"]), mode=st.sampled_from(ALL_MODES),
    ignore_frac=st.floats(0.0, 1.0), label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-3]), softcap=st.sampled_from([None, 5.0]), threshold=st.floats(0.05, 1.0),
)
def test_property_matches_float64(n, v, seed, dtype, policy, mode, ignore_frac, label_smoothing, z_loss, softcap,
                                  threshold):
    reduction, normalize, fallback = mode
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype).to(DEVICE)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_frac] = -100
    check_against_float64(logits, target.to(DEVICE), policy=policy, reduction=reduction, normalize=normalize,
                          fallback=fallback, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                          threshold=threshold)


# ---------------------------------------------------------------------------------------------
# Backend interface, custom ops and torch.compile
# ---------------------------------------------------------------------------------------------

def test_supports_and_availability():
    assert triton_ce.availability() is None
    assert "float64" in triton_ce.supports(torch.zeros(2, 3, dtype=torch.float64, device=DEVICE))
    assert triton_ce.supports(torch.zeros(2, 3, dtype=torch.bfloat16, device=DEVICE)) is None
    with pytest.raises(RuntimeError, match="backend='triton'"):
        memft_loss(torch.zeros(2, 3, dtype=torch.float64, device=DEVICE), torch.zeros(2, dtype=torch.long,
                                                                                   device=DEVICE), backend="triton")


def _warm_dispatch():
    """dispatch.py imports a backend at its first use, and Dynamo cannot trace an import: load it
    eagerly first (not needed once dispatch resolves backends through assume_constant_result)."""
    memft_loss(torch.randn(2, 3, device=DEVICE), torch.tensor([0, 1], device=DEVICE), backend="triton")


@pytest.mark.parametrize("normalize", ["active", "valid"])
def test_compiles_fullgraph(normalize):
    """validate=False: the loss, the stats and the backward trace with no graph break and no host sync."""
    _warm_dispatch()
    logits, target = make(n=8)

    def f(t, y):
        loss, stats = memft_loss(t, y, backend="triton", policy="sigmoid", normalize=normalize,
                                 validate=False, return_stats=True)
        return loss, stats.recalled_frac, stats.n_active

    x = logits.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, target)
    out[0].backward()
    ref_loss, ref_grad = run(logits.double(), target, "torch", policy="sigmoid", normalize=normalize)
    assert rel(out[0], ref_loss) < 1e-5 and rel(x.grad, ref_grad) < 1e-5
    eager = f(logits, target)
    for a, b in zip(out[1:], eager[1:]):
        assert torch.equal(a, b)

    def g(t, y):  # the in-place gradient traces too (loss.py decides it without a data pointer)
        return memft_loss(t * 1.0, y, backend="triton", policy="sigmoid", normalize=normalize,
                          validate=False, inplace_backward=True)

    x = logits.clone().requires_grad_(True)
    torch.compile(g, fullgraph=True, backend="aot_eager")(x, target).backward()
    assert rel(x.grad, ref_grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU only (benchmarks/gpu_check.sh): real sizes, N x V > 2^31, inductor, CUDA graphs.
# Sizes and device are module constants so the bodies can be dry-run small on the interpreter.
# ---------------------------------------------------------------------------------------------
GPU = "cuda"
REAL_SIZE = (4096, 128256)
HUGE_SIZE = (17000, 128256)  # 2.18e9 elements > 2^31
GRAPH_SIZE = (512, 32000)


def _reference_rows(logits, target, rows, opts, coef_of):
    """Reference stats and gradient of ``rows`` only, in float64, 64 rows at a time."""
    stats, grads = [], []
    for chunk in rows.split(64):
        x, y = logits[chunk].double(), target[chunk]
        s = reference.row_forward(x, y, None, opts)
        stats.append(s)
        grads.append(reference.row_backward(x, y, s.lse, coef_of(s), opts))
    return ({name: torch.cat([getattr(s, name) for s in stats]) for name in stats[0]._fields},
            torch.cat(grads))


def _real_size(n, v, dtype, seed=0):
    g = torch.Generator(device=GPU).manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, device=GPU, dtype=torch.float32) * 2).to(dtype)
    target = torch.randint(0, v, (n,), generator=g, device=GPU)
    target[torch.rand(n, generator=g, device=GPU) < 0.1] = -100
    return logits, target


# prob = exp(-ce) turns ce's absolute error into a relative one: ~3e-6 on the GPU (approximate exp,
# and tanh from exp under the soft cap: 30 * 1e-7), measured by emulation; the other stats ~2e-7.
_STATS_TOL = {"prob": 3e-5}


def _assert_rows_match(stats, rows, want, grad, ref_grad, dtype):
    for name in ("lse", "ce", "prob", "weight", "loss"):
        if hasattr(stats, name):  # RowStats has loss, MemFTStats does not
            assert rel(getattr(stats, name)[rows], want[name]) < _STATS_TOL.get(name, 1e-5), name
    assert torch.equal(stats.pred[rows], want["pred"])
    assert rel(grad[rows], ref_grad) < GRAD_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_size_against_reference(dtype):
    n, v = REAL_SIZE
    logits, target = _real_size(n, v, dtype)
    opts = dict(policy="sigmoid", label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    kopts = KernelOptions(**opts)
    rows = torch.randperm(n, device=GPU)[:256].sort().values
    for normalize in ("active", "valid"):  # two-pass and single-pass
        x = logits.clone().requires_grad_(True)
        loss, stats = memft_loss(x, target, backend="triton", normalize=normalize, return_stats=True, **opts)
        loss.backward()
        ref_loss = memft_loss(logits, target, backend="torch", normalize=normalize, **opts)
        assert rel(loss, ref_loss) < 1e-5
        d = stats.weight.sum() if normalize == "active" else (target != -100).sum()
        want, ref_grad = _reference_rows(logits, target, rows, kopts, lambda s: s.weight / d.double())
        _assert_rows_match(stats, rows, want, x.grad, ref_grad, dtype)


@pytest.mark.gpu
def test_gpu_more_than_2_to_the_31_elements():
    n, v = HUGE_SIZE
    logits, target = _real_size(n, v, torch.bfloat16, seed=1)
    k = 2**31 // v  # row k straddles element 2^31, row k + 1 starts past it
    rows = torch.tensor(sorted({0, 1, min(k, n - 1), min(k + 1, n - 1), n - 1}), device=GPU)
    kopts = KernelOptions(policy="hard")
    want, ref_grad = _reference_rows(logits, target, rows, kopts, lambda s: s.weight / n)
    grad = torch.empty_like(logits)
    got = triton_ce.row_forward_backward(logits, target, None, kopts, torch.tensor(1.0 / n, device=GPU), grad)
    _assert_rows_match(got, rows, want, grad, ref_grad, torch.bfloat16)
    del grad
    _, ref_grad = _reference_rows(logits, target, rows, kopts, lambda s: s.weight * 2.0)
    stats = triton_ce.row_forward(logits, target, None, kopts)
    out = triton_ce.row_backward(logits, target, stats.lse, stats.weight * 2.0, kopts, out=logits)  # in place
    assert out.data_ptr() == logits.data_ptr()
    _assert_rows_match(stats, rows, want, out, ref_grad, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    """One inductor compile covering both paths: the two-pass (active) and single-pass (valid) loss."""
    logits, target = _real_size(*GRAPH_SIZE, torch.bfloat16)
    _warm_dispatch()
    opts = dict(backend="triton", policy="sigmoid", validate=False)

    def f(t, y):
        return memft_loss(t, y, normalize="active", **opts) + memft_loss(t, y, normalize="valid", **opts)

    x = logits.clone().requires_grad_(True)
    loss = torch.compile(f, fullgraph=True)(x, target)
    loss.backward()
    ref = logits.double().requires_grad_(True)
    ref_loss = (memft_loss(ref, target, backend="torch", policy="sigmoid", normalize="active")
                + memft_loss(ref, target, backend="torch", policy="sigmoid", normalize="valid"))
    ref_loss.backward()
    assert rel(loss, ref_loss) < 1e-5 and rel(x.grad, ref.grad) < GRAD_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [
    "active",  # two-pass
    "valid",  # single pass: grad_out is applied on the device (scale_grad_), no host read
])
def test_gpu_cuda_graph_capture_forward_backward(normalize):
    logits, target = _real_size(*GRAPH_SIZE, torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    opts = dict(backend="triton", policy="hard", normalize=normalize, validate=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: JIT-compiles the kernels outside the capture
            x.grad = None
            memft_loss(x, target, **opts).backward()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = memft_loss(x, target, **opts)
        loss.backward()
    fresh, _ = _real_size(*GRAPH_SIZE, torch.bfloat16, seed=5)
    with torch.no_grad():
        x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = run(fresh, target, "torch", policy="hard", normalize=normalize)
    assert rel(loss, ref_loss) < 1e-5 and rel(x.grad, ref_grad) < GRAD_TOL[torch.bfloat16]


def test_scale_grad_reads_the_factor_on_the_device():
    for dtype in (torch.float32, torch.bfloat16):
        grad, _ = make(n=6, dtype=dtype)
        strided = grad[:, :20]  # row stride V, 20 columns: two blocks, the last partial
        before = grad.clone()
        triton_ce.scale_grad_(strided, torch.tensor(-2.5, device=DEVICE))
        want = before[:, :20].double() * -2.5
        # one rounding to the dtype (the interpreter truncates to bfloat16, the GPU rounds to nearest)
        assert torch.allclose(grad[:, :20].double(), want, rtol=torch.finfo(dtype).eps, atol=0)
        assert torch.equal(grad[:, 20:], before[:, 20:])  # outside the view: untouched
        kept = grad.clone()
        triton_ce.scale_grad_(grad, torch.ones((), device=DEVICE))
        assert torch.equal(grad, kept)


@pytest.mark.gpu
def test_gpu_device_denominator_is_range_checked_with_validate_on():
    logits, target = _real_size(64, 1000, torch.float32)
    for bad in (0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="denominator"):
            memft_loss(logits, target, denominator=torch.tensor(bad, device=GPU))
    good = memft_loss(logits, target, denominator=torch.tensor(5.0, device=GPU))
    want = memft_loss(logits, target, denominator=5.0)
    assert rel(good, want) < 1e-6
