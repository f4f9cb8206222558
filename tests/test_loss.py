"""memft_loss (the reference backend) against float64 math written here, independently of the package.

The ``expected`` function below re-derives docs/SPEC.md from scratch with float64 torch ops and gets
its gradient by autograd with the weights and denominator held constant (SPEC: no gradient flows
through w). Every later backend is tested against the package's reference; this file is what makes
the reference itself trustworthy.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from memft_kernels import MemFTLoss, MemFTStats, available_backends, memft_loss
from memft_kernels.ops import reference

from helpers import make as _make
from helpers import BACKENDS, device_for, rel
from helpers import run as _run

LN2 = math.log(2.0)


def expected(logits, target, *, policy="hard", threshold=0.5, sharpness=10.0, token_weight=None, reduction="mean",
             normalize="active", denominator=None, fallback="mean", ignore_index=-100, label_smoothing=0.0,
             z_loss=0.0, softcap=None, grad_out=None):
    """(loss, grad, per-row dict) in float64, straight from SPEC.md."""
    v = logits.shape[-1]
    x0 = logits.detach().reshape(-1, v).double().requires_grad_(True)
    y = target.reshape(-1).long()
    x = softcap * torch.tanh(x0 / softcap) if softcap is not None else x0
    valid = y != ignore_index
    ysafe = torch.where(valid, y, torch.zeros_like(y))
    logp = torch.log_softmax(x, dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    ce = -logp.gather(1, ysafe[:, None])[:, 0]
    l = (1 - label_smoothing) * ce + label_smoothing * (lse - x.mean(-1)) + z_loss * lse ** 2
    with torch.no_grad():
        if policy == "none":
            w = torch.ones_like(ce)
        elif policy == "hard":
            w = (torch.exp(-ce) < threshold).double()
        else:
            w = 1.0 / (1.0 + torch.exp(-sharpness * (ce - math.log(1.0 / threshold))))
        w = torch.where(torch.isnan(ce), torch.ones_like(w), w)
        if token_weight is not None:
            w = w * token_weight.reshape(-1).double()
        w = torch.where(valid, w, torch.zeros_like(w))
    lw = torch.where(valid, w * l, torch.zeros_like(l))
    fell_back = False
    if reduction == "none":
        loss = lw
    elif reduction == "sum":
        loss = lw.sum()
    else:
        if denominator is not None:
            d = float(denominator)
        elif normalize == "valid":
            d = float(valid.sum())
        else:
            d = float(w.sum())
            if d == 0 and bool(valid.any()):
                fell_back = True
                if fallback == "mean":
                    w = valid.double()
                    lw = torch.where(valid, l, torch.zeros_like(l))
                    d = float(valid.sum())
        loss = lw.sum() / d if d > 0 else lw.sum() * 0.0
    go = torch.ones_like(loss) if grad_out is None else grad_out.double().reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x0, go, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x0)
    rows = dict(ce=torch.where(valid, ce, 0 * ce).detach(), prob=torch.where(valid, torch.exp(-ce), 0 * ce).detach(),
                lse=torch.where(valid, lse, 0 * lse).detach(), weight=w, pred=torch.argmax(x.detach(), -1),
                valid=valid, fell_back=fell_back)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.detach(), grad.reshape(logits.shape), rows


def run(logits, target, grad_out=None, **opts):
    """memft_loss forward + backward; returns (loss, grad)."""
    return _run(logits, target, opts.pop("backend", "auto"), grad_out, **opts)


def make(n=48, v=29, dtype=torch.float32, ignore_frac=0.2, scale=3.0, seed=0):
    return _make(n=n, v=v, dtype=dtype, ignore_frac=ignore_frac, scale=scale, seed=seed)


# ---------------------------------------------------------------------------------------------
# The option matrix
# ---------------------------------------------------------------------------------------------

MEAN_MODES = [("mean", "active", "mean"), ("mean", "active", "zero"), ("mean", "valid", "mean")]
ALL_MODES = MEAN_MODES + [("sum", "active", "mean"), ("none", "active", "mean")]


@pytest.mark.parametrize("policy", ["none", "hard", "sigmoid"])
@pytest.mark.parametrize("reduction,normalize,fallback", ALL_MODES)
@pytest.mark.parametrize("extras", [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 4.0},
    {"label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 2.5, "threshold": 0.3, "sharpness": 4.0},
])
def test_matrix_float32_against_float64(policy, reduction, normalize, fallback, extras):
    logits, target = make()
    opts = dict(policy=policy, reduction=reduction, normalize=normalize, fallback=fallback, **extras)
    go = torch.rand(target.shape, dtype=torch.float64) + 0.5 if reduction == "none" else None
    loss, grad = run(logits, target, grad_out=go, **opts)
    ref_loss, ref_grad, _ = expected(logits, target, grad_out=go, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel(loss, ref_loss) < 1e-5
    assert rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("reduction,normalize,fallback", ALL_MODES)
def test_token_weight_and_denominator(reduction, normalize, fallback):
    logits, target = make(seed=1)
    tw = torch.rand(target.shape) * 2
    opts = dict(policy="sigmoid", token_weight=tw, reduction=reduction, normalize=normalize, fallback=fallback)
    loss, grad = run(logits, target, **opts)
    ref_loss, ref_grad, _ = expected(logits, target, **opts)
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5
    if reduction == "mean":
        for d in (7.0, torch.tensor(3.5)):
            loss, grad = run(logits, target, denominator=d, **opts)
            ref_loss, ref_grad, _ = expected(logits, target, denominator=d, **opts)
            assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fallback", ["mean", "zero"])
def test_fallback_when_every_token_is_recalled(fallback, backend):
    n, v = 16, 11
    target = torch.randint(0, v, (n,))
    logits = torch.randn(n, v)
    logits[torch.arange(n), target] += 6.0  # every p > 0.5: the hard policy masks everything
    target[0] = -100
    dev = device_for(backend)
    logits, target = logits.to(dev), target.to(dev)
    x = logits.clone().requires_grad_(True)
    loss, stats = memft_loss(x, target, fallback=fallback, return_stats=True, backend=backend)
    loss.backward()
    assert bool(stats.fell_back) and int(stats.n_active) == 0
    if fallback == "zero":
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    else:
        plain = F.cross_entropy(logits.double(), target)
        assert abs(loss.item() - plain.item()) < 1e-6 * max(1.0, plain.item()) + 1e-9
        ref_loss, ref_grad, _ = expected(logits, target, fallback="mean")
        assert rel(x.grad, ref_grad) < 1e-5


def test_multi_chunk_equals_single_chunk(monkeypatch):
    logits, target = make(n=40, v=23)
    one_loss, one_grad = run(logits, target, policy="sigmoid", label_smoothing=0.1)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 23)  # 14 chunks, the last one short
    many_loss, many_grad = run(logits, target, policy="sigmoid", label_smoothing=0.1)
    assert torch.equal(one_loss, many_loss) and torch.equal(one_grad, many_grad)


# ---------------------------------------------------------------------------------------------
# Drop-in for F.cross_entropy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_policy_none_is_cross_entropy(reduction, label_smoothing, ignore_index):
    logits, target = make(n=33, v=17, dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    target = torch.where(target == -100, torch.full_like(target, ignore_index), target)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = memft_loss(x1, target, policy="none", **kw)
    b = F.cross_entropy(x2, target, **kw)
    assert rel(a, b) < 1e-12
    a.sum().backward()
    b.sum().backward()
    assert rel(x1.grad, x2.grad) < 1e-10


@pytest.mark.parametrize("policy", ["none", "hard"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}, {"normalize": "valid"}])
def test_gradcheck_float64(policy, opts):
    # the weights are piecewise constant under these policies, so finite differences see the same w
    logits, target = make(n=12, v=7, dtype=torch.float64, scale=1.0)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: memft_loss(t, target, policy=policy, **opts), (x,))


def test_module_replaces_cross_entropy_loss():
    logits, target = make(n=20, v=9)
    module = MemFTLoss(policy="none")
    assert torch.allclose(module(logits, target), torch.nn.CrossEntropyLoss()(logits, target), atol=1e-6)
    m2 = MemFTLoss(policy="sigmoid", label_smoothing=0.1)
    assert torch.equal(m2(logits, target), memft_loss(logits, target, policy="sigmoid", label_smoothing=0.1))
    assert "sigmoid" in repr(m2)
    with pytest.raises(ValueError, match="policy"):
        MemFTLoss(policy="soft")
    with pytest.raises(TypeError, match="unknown"):
        MemFTLoss(polcy="hard")


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, strides
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", [1, 3, 32003])
def test_odd_vocab_sizes(v):
    n = 6 if v > 1000 else 24
    logits, target = make(n=n, v=v)
    for policy in ("hard", "sigmoid"):
        loss, grad = run(logits, target, policy=policy, label_smoothing=0.1)
        ref_loss, ref_grad, _ = expected(logits, target, policy=policy, label_smoothing=0.1)
        assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


def test_three_d_and_non_contiguous_inputs():
    b, t, v = 3, 5, 13
    base = torch.randn(b, t, v + 4) * 3
    logits = base[..., 2:2 + v]  # non-contiguous: row stride v + 4
    assert not logits.is_contiguous()
    target = torch.randint(0, v, (b, t))
    target[0, 1] = -100
    for red in ("mean", "none"):
        loss, grad = run(logits, target, policy="sigmoid", reduction=red)
        ref_loss, ref_grad, _ = expected(logits, target, policy="sigmoid", reduction=red)
        assert loss.shape == ref_loss.shape and grad.shape == logits.shape
        assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5
    # transposed [V, ...] views are handled too (last dim made contiguous internally)
    lt = torch.randn(v, 8).t()
    tt = torch.randint(0, v, (8,))
    assert rel(memft_loss(lt, tt, policy="none"), F.cross_entropy(lt.double(), tt)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_own_error(dtype):
    logits, target = make(n=64, v=301)
    low = logits.to(dtype)
    loss, grad = run(low, target, policy="none")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad, _ = expected(logits, target, policy="none")
    # PyTorch's own low-precision cross-entropy on the same inputs sets the bar.
    xt = low.clone().requires_grad_(True)
    torch_loss = F.cross_entropy(xt, target)
    torch_loss.backward()
    assert rel(loss, ref_loss) <= max(2 * rel(torch_loss.float(), ref_loss), 1e-4)
    assert rel(grad, ref_grad) <= max(2 * rel(xt.grad, ref_grad), 1e-2)
    # and against float64 math on the rounded inputs: only the output rounding remains
    r_loss, r_grad, _ = expected(low, target, policy="none")
    assert rel(loss, r_loss) < 1e-6
    assert rel(grad, r_grad) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_take_the_lowest_index(backend):
    logits = torch.zeros(4, 6) + torch.randn(4, 1)
    logits[0, [1, 4]] = 5.0
    logits[1, [0, 5]] = 5.0
    logits[2, :] = 1.0
    logits[3, [2, 3, 5]] = 7.0
    target = torch.tensor([4, 5, 3, 3])
    logits, target = logits.to(device_for(backend)), target.to(device_for(backend))
    _, stats = memft_loss(logits, target, return_stats=True, backend=backend)
    assert stats.pred.tolist() == [1, 0, 0, 2]
    assert torch.equal(stats.pred, torch.argmax(logits, -1))


def test_float64_stays_float64():
    logits, target = make(dtype=torch.float64)
    loss, grad = run(logits, target, policy="sigmoid")
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    ref_loss, ref_grad, _ = expected(logits, target, policy="sigmoid")
    assert rel(loss, ref_loss) < 1e-12 and rel(grad, ref_grad) < 1e-12


# ---------------------------------------------------------------------------------------------
# Gradient plumbing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    dict(policy="hard"),  # two-pass path
    dict(policy="sigmoid", normalize="valid"),  # single-pass path (scale known up front)
    dict(policy="hard", reduction="sum"),
    dict(policy="hard", denominator=5.0),
])
def test_upstream_gradient_and_inplace(opts):
    logits, target = make(seed=3)
    ref_loss, ref_grad, _ = expected(logits, target, grad_out=torch.tensor(2.5), **opts)
    loss, grad = run(logits, target, grad_out=torch.tensor(2.5), **opts)
    assert rel(grad, ref_grad) < 1e-5
    # in place: the gradient lands in the logits' own storage
    x = logits.clone().requires_grad_(True)
    storage = x.data_ptr()
    loss = memft_loss(x * 1.0, target, inplace_backward=True, **opts)  # grad flows through a non-leaf
    loss.backward(torch.tensor(2.5))
    assert x.grad.data_ptr() != storage
    assert rel(x.grad, ref_grad) < 1e-5
    # without inplace_backward the logits are never modified
    y = logits.clone().requires_grad_(True)
    before = y.detach().clone()
    memft_loss(y, target, **opts).backward()
    assert torch.equal(y.detach(), before)


def test_inplace_backward_reuses_logits_storage():
    logits, target = make()
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf: its storage may be reused by the backward
    seen = {}
    x.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    memft_loss(x, target, inplace_backward=True).backward()
    assert seen["ptr"] == x.data_ptr()
    _, ref_grad, _ = expected(logits, target)
    assert rel(leaf.grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_all_ignored(backend):
    for n in (0, 5):
        logits = torch.randn(n, 7, device=device_for(backend), requires_grad=True)
        target = torch.full((n,), -100, device=device_for(backend))
        for red in ("mean", "sum"):
            for norm in ("active", "valid"):
                loss = memft_loss(logits, target, reduction=red, normalize=norm, backend=backend)
                assert loss.item() == 0.0 and not torch.isnan(loss)
                (g,) = torch.autograd.grad(loss, logits)
                assert torch.count_nonzero(g) == 0
        assert memft_loss(logits, target, reduction="none").shape == (n,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["none", "hard", "sigmoid"])
def test_nan_in_a_valid_row_reaches_the_loss(policy, backend):
    """The NaN rule (w = 1 where ce is NaN) on every backend, the reference included."""
    logits, target = make(n=10, v=7, ignore_frac=0.0)
    logits[4, 2] = float("nan")
    logits, target = logits.to(device_for(backend)), target.to(device_for(backend))
    loss, stats = memft_loss(logits, target, policy=policy, return_stats=True, backend=backend)
    assert torch.isnan(loss)
    assert stats.weight[4].item() == 1.0
    assert torch.isnan(memft_loss(logits, target, policy=policy, reduction="sum", backend=backend))
    # a NaN in an ignored row is not a valid row's NaN
    target[4] = -100
    assert not torch.isnan(memft_loss(logits, target, policy=policy, backend=backend))


def test_out_of_range_target_without_validation_gives_nan_not_a_crash():
    logits, target = make(n=8, v=5, ignore_frac=0.0)
    target[3] = 5
    target[5] = -7
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, validate=False, reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(loss[5])
    assert not torch.isnan(loss[[0, 1, 2, 4, 6, 7]]).any()
    mean = memft_loss(x, target, validate=False)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in available_backends()])
def test_out_of_range_target_gradient_rows(backend):
    """validate=False: an out-of-range target's gradient row is NaN, unless its coefficient is 0
    (token weight 0), which gives exact zeros like every row with coefficient 0, in every backend."""
    logits, target = make(n=6, v=5, ignore_frac=0.0)
    target[1], target[4] = 5, -7
    token_weight = torch.ones(6)
    token_weight[4] = 0.0
    x = logits.clone().requires_grad_(True)
    memft_loss(x, target, validate=False, policy="none", token_weight=token_weight, reduction="none",
               backend=backend).backward(torch.ones(6))
    assert torch.isnan(x.grad[1]).all() and torch.equal(x.grad[4], torch.zeros(5))
    assert torch.isfinite(x.grad[[0, 2, 3, 5]]).all()


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def test_stats_fields():
    logits, target = make(n=60, v=19)
    tw = torch.rand(60)
    loss, stats = memft_loss(logits, target, policy="hard", token_weight=tw, return_stats=True)
    _, _, rows = expected(logits, target, policy="hard", token_weight=tw)
    assert isinstance(stats, MemFTStats)
    valid = rows["valid"]
    assert torch.equal(stats.pred, torch.argmax(logits, -1))
    assert rel(stats.ce, rows["ce"]) < 1e-6 and rel(stats.prob, rows["prob"]) < 1e-6 and rel(stats.lse, rows["lse"]) < 1e-6
    assert rel(stats.weight, rows["weight"]) < 1e-6
    assert stats.ce.dtype == torch.float32 and stats.pred.dtype == torch.int64
    assert int(stats.n_valid) == int(valid.sum())
    assert int(stats.n_active) == int((rows["weight"] > 0).sum())
    assert abs(float(stats.weight_sum) - float(rows["weight"].sum())) < 1e-4
    assert float(stats.recalled_frac) == pytest.approx(float(((rows["prob"] > 0.5) & valid).sum() / valid.sum()))
    assert float(stats.token_accuracy) == pytest.approx(float(((rows["pred"] == target) & valid).sum() / valid.sum()))
    assert 0 < float(stats.recalled_frac) < 1  # the fixture really has both kinds of rows
    assert set(stats.summary()) >= {"n_valid", "recalled_frac", "token_accuracy"}
    assert all(isinstance(t, torch.Tensor) for t in stats.as_dict().values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])  # the single-pass and two-pass paths
def test_hard_policy_gives_recalled_tokens_no_gradient(backend, reduction):
    logits, target = make(n=40, v=13, ignore_frac=0.0)
    x = logits.to(device_for(backend)).requires_grad_(True)
    target = target.to(x.device)
    loss, stats = memft_loss(x, target, return_stats=True, reduction=reduction, backend=backend)
    loss.backward()
    recalled = stats.prob >= 0.5
    assert recalled.any() and (~recalled).any()
    assert torch.count_nonzero(x.grad[recalled]) == 0
    assert (x.grad[~recalled].abs().sum(-1) > 0).all()


def test_traces_without_graph_break_or_host_sync():
    """validate=False: the whole loss (stats included) traces in one graph, so nothing reads the host."""
    logits, target = make(n=16, v=11)
    x = logits.clone().requires_grad_(True)

    def f(t, y):
        loss, stats = memft_loss(t, y, policy="sigmoid", validate=False, return_stats=True)
        return loss, stats.recalled_frac, stats.n_active

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, target)
    eager = f(logits.clone().requires_grad_(True), target)
    for a, b in zip(out, eager):
        assert torch.allclose(a.float(), b.float())
    out[0].backward()
    _, ref_grad, _ = expected(logits, target, policy="sigmoid")
    assert rel(x.grad, ref_grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@given(
    n=st.integers(0, 40), v=st.integers(1, 70), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    policy=st.sampled_from(["none", "hard", "sigmoid"]),
    mode=st.sampled_from(ALL_MODES), ignore_frac=st.floats(0.0, 1.0),
    label_smoothing=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 5.0]), threshold=st.floats(0.05, 1.0),
)
def test_property_matches_float64(n, v, seed, dtype, policy, mode, ignore_frac, label_smoothing, z_loss, softcap, threshold):
    reduction, normalize, fallback = mode
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_frac] = -100
    opts = dict(policy=policy, reduction=reduction, normalize=normalize, fallback=fallback,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, threshold=threshold)
    loss, grad = run(logits, target, **opts)
    ref_loss, ref_grad, _ = expected(logits, target, **opts)  # float64 math on the same rounded inputs
    assert not torch.isnan(loss).any()
    assert rel(loss, ref_loss) < 1e-5
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}[dtype]
    assert rel(grad, ref_grad) < grad_tol


# ---------------------------------------------------------------------------------------------
# Bad input: one test per row of SPEC.md's table
# ---------------------------------------------------------------------------------------------

def _ok():
    return torch.randn(4, 5), torch.tensor([0, 1, 2, 3])


def test_bad_target_value_names_value_and_v():
    x, y = _ok()
    y[2] = 9
    with pytest.raises(ValueError, match=r"9.*V=5"):
        memft_loss(x, y)
    y[2] = -3
    with pytest.raises(ValueError, match=r"-3"):
        memft_loss(x, y)


def test_bad_dtypes_are_type_errors():
    x, y = _ok()
    with pytest.raises(TypeError, match="logits.*int64"):
        memft_loss(x.long(), y)
    with pytest.raises(TypeError, match="target.*float32"):
        memft_loss(x, y.float())


def test_bad_shapes():
    x, y = _ok()
    with pytest.raises(ValueError, match=r"target.shape=\(3,\)"):
        memft_loss(x, y[:3])
    with pytest.raises(ValueError, match="V=0"):
        memft_loss(torch.randn(4, 0), y)


def test_bad_devices():
    x, y = _ok()
    meta_y = y.to("meta")
    with pytest.raises(ValueError, match="meta"):
        memft_loss(x, meta_y)
    with pytest.raises(ValueError, match="token_weight is on meta"):
        memft_loss(x, y, token_weight=torch.ones(4, device="meta"))


@pytest.mark.parametrize("kw,pattern", [
    ({"threshold": 0.0}, "threshold=0.0"), ({"threshold": 1.5}, "threshold=1.5"),
    ({"sharpness": 0.0}, "sharpness=0.0"), ({"sharpness": -2}, "sharpness=-2"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0"), ({"label_smoothing": -0.1}, "label_smoothing=-0.1"),
    ({"z_loss": -1e-4}, "z_loss=-0.0001"), ({"softcap": 0.0}, "softcap=0.0"),
    ({"denominator": 0}, "denominator=0"), ({"denominator": torch.tensor(-2.0)}, "denominator=-2.0"),
])
def test_bad_scalar_options(kw, pattern):
    x, y = _ok()
    with pytest.raises(ValueError, match=pattern):
        memft_loss(x, y, **kw)


@pytest.mark.parametrize("tw,pattern", [
    (torch.ones(3), r"token_weight.shape=\(3,\)"),
    (torch.tensor([1.0, -0.5, 1.0, 1.0]), "-0.5"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0]), "inf"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "nan"),
])
def test_bad_token_weight(tw, pattern):
    x, y = _ok()
    with pytest.raises(ValueError, match=pattern):
        memft_loss(x, y, token_weight=tw)


@pytest.mark.parametrize("name,value", [("policy", "soft"), ("reduction", "avg"), ("normalize", "all"),
                                        ("fallback", "skip"), ("backend", "tpu")])
def test_unknown_choices_list_the_choices(name, value):
    x, y = _ok()
    with pytest.raises(ValueError, match=rf"{name}='{value}'.*choose one of"):
        memft_loss(x, y, **{name: value})


def test_unavailable_backend_is_a_runtime_error_saying_why():
    x, y = _ok()
    backends = available_backends()
    assert backends["torch"] is True
    missing = [name for name, ok in backends.items() if not ok]
    if "cuda" not in missing and torch.cuda.is_available():
        pytest.skip("every backend is available here")
    name = "cuda" if "cuda" in missing else missing[0]
    with pytest.raises(RuntimeError, match=f"backend='{name}'"):
        memft_loss(x, y, backend=name)


def test_memft_info_runs(capsys):
    from memft_kernels.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "memft_kernels" in out and "torch" in out and "available" in out


def test_second_backward_on_the_single_pass_path_raises_instead_of_scaling_twice():
    logits, target = make()
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x * 1.0, target, normalize="valid", inplace_backward=True)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.tensor(2.0))


def test_first_call_under_torch_compile_needs_no_eager_warmup():
    """A fresh process whose first memft_loss call is compiled: the backend import must not break the graph."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from memft_kernels import memft_loss\n"
        "x = torch.randn(8, 13, requires_grad=True); y = torch.randint(0, 13, (8,))\n"
        "f = torch.compile(lambda a, b: memft_loss(a, b, validate=False), fullgraph=True, backend='aot_eager')\n"
        "f(x, y).backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_memft_version_and_closed_pipe():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "memft_kernels", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("memft_kernels ")
    piped = subprocess.run(f"'{sys.executable}' -m memft_kernels info | head -n 1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" not in piped.stderr and piped.stdout.startswith("memft_kernels")
