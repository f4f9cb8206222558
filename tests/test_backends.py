"""The backend contract (memft_kernels/ops/base.py) and the behaviour every backend shares.

Every available backend runs each test, eagerly and (the ``use_compile`` axis) under
``torch.compile(fullgraph=True)`` with ``validate=False``; the ground truth is the PyTorch reference
on the same values in float64. Per-backend kernel details (block sizes, ISAs, strides) stay in the
per-backend files; this file is what a new backend must pass.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from memft_kernels import dispatch, memft_loss
from memft_kernels.ops import native, triton_ce
from memft_kernels.ops.base import Backend
from memft_kernels.spec import KernelOptions

from helpers import BACKENDS, backend_params, device_for, make, poison_stats, rel, run

GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Per-row outputs of the compiled backends start as NaN / -1."""
    poison_stats(monkeypatch, native, "new_row_stats")
    poison_stats(monkeypatch, triton_ce, "_empty_stats")


def loss_fn(use_compile: bool):
    if not use_compile:
        return memft_loss
    torch._dynamo.reset()  # each case compiles afresh (the recompile limit counts per function)
    return torch.compile(memft_loss, fullgraph=True, backend="aot_eager", dynamic=False)


# ------------------------------------------------------------------------------ the contract
def test_every_backend_module_exports_a_whole_backend():
    for name, module_name in dispatch._MODULES.items():
        module = importlib.import_module(module_name)
        backend = module.BACKEND
        assert isinstance(backend, Backend) and backend.name == name
        assert not type(backend).__abstractmethods__
        for method in Backend.__abstractmethods__:
            assert getattr(module, method) == getattr(backend, method), (name, method)


def test_a_partial_backend_cannot_be_created():
    class Partial(Backend):
        name = "partial"

        def availability(self):
            return None

        def supports(self, logits):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Partial()


# ------------------------------------------------------------------------ behaviour matrix
OPTION_SETS = [
    dict(policy="hard"),
    dict(policy="sigmoid", threshold=0.3, sharpness=4.0, label_smoothing=0.1, z_loss=1e-3, softcap=6.0),
    dict(policy="none", reduction="sum"),
    dict(policy="hard", normalize="valid"),
    dict(policy="sigmoid", reduction="none"),
    dict(policy="hard", denominator=17.0, fallback="zero"),
]


# Compiled: the two-pass path (0), every kernel feature (1) and the single-pass path (3).
MATRIX = [(b, c, k) for (b, c) in [p.values for p in backend_params()] for k in range(len(OPTION_SETS))
          if not c or k in (0, 1, 3)]


@pytest.mark.parametrize("backend,use_compile,opt_set", MATRIX)
def test_loss_and_gradient_match_float64(backend, use_compile, opt_set):
    opts = dict(OPTION_SETS[opt_set])
    dev = device_for(backend)
    logits, target = make(n=12, v=19, seed=opt_set, device=dev)
    tw = torch.rand(12, generator=torch.Generator().manual_seed(opt_set)).to(dev) * 2
    grad_out = torch.rand(12, device=dev) if opts.get("reduction") == "none" else None
    fn = loss_fn(use_compile)
    loss, grad = run(logits, target, backend, grad_out, loss_fn=fn, token_weight=tw, validate=not use_compile,
                     **opts)
    ref_loss, ref_grad = run(logits.double(), target, "torch", grad_out, token_weight=tw.double(), **opts)
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < GRAD_TOL[logits.dtype], (backend, opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["none", "hard", "sigmoid"])
def test_nan_in_a_valid_row_reaches_the_loss(backend, policy):
    """SPEC.md's NaN rule (w = 1 where ce is NaN) on every backend, the reference included."""
    logits, target = make(n=8, v=11, ignore_frac=0.0, device=device_for(backend))
    logits[3, 2] = math.nan
    loss, stats = memft_loss(logits, target, policy=policy, backend=backend, return_stats=True)
    assert torch.isnan(loss)
    assert float(stats.weight[3]) == 1.0 and torch.isnan(stats.ce[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_variants_equal_out_of_place(backend):
    dev = device_for(backend)
    b = dispatch.resolve(backend, torch.empty(1, 1, device=dev))
    logits, target = make(n=10, v=23, seed=4, device=dev)
    opts = KernelOptions(policy="sigmoid", label_smoothing=0.1)
    scale = torch.tensor(0.25, device=dev)
    grad = torch.full_like(logits, math.nan)
    stats = b.row_forward_backward(logits, target, None, opts, scale, grad)
    inplace = logits.clone()
    stats_ = b.row_forward_backward_(inplace, target, None, opts, scale)
    assert torch.equal(inplace, grad)
    for x, y in zip(stats, stats_):
        assert torch.equal(x, y)
    coef = torch.rand(10, device=dev)
    out = b.row_backward(logits, target, stats.lse, coef, opts)
    inplace = logits.clone()
    assert b.row_backward_(inplace, target, stats.lse, coef, opts) is inplace
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_reads_the_factor_on_the_device(backend, dtype):
    dev = device_for(backend)
    b = dispatch.resolve(backend, torch.empty(1, 1, dtype=dtype, device=dev))
    g0 = torch.randn(6, 21, device=dev).to(dtype)
    for factor in (1.0, 0.37, 0.0):
        g = g0.clone()
        assert b.scale_grad_(g, torch.tensor(factor, device=dev)) is g
        want = (g0.float() * factor).to(dtype)
        if dtype == torch.float32 or factor == 1.0:
            assert torch.equal(g, want), (backend, factor)
        else:  # one rounding to bf16 (Triton's CPU interpreter truncates where a GPU rounds to nearest)
            torch.testing.assert_close(g.float(), want.float(), rtol=2**-7, atol=0.0)


def test_slice_gradient_uses_the_global_vocabulary():
    """opts.vocab_size: each backend's backward of a column slice is that slice of the full gradient."""
    logits, target = make(n=9, v=30, seed=2)
    opts = KernelOptions(policy="none", label_smoothing=0.2)
    ref = dispatch.resolve("torch", logits)
    full = ref.row_forward(logits.double(), target, None, opts)
    coef = torch.rand(9, dtype=torch.float64)
    want = ref.row_backward(logits.double(), target, full.lse, coef, opts)
    sliced = KernelOptions(policy="none", label_smoothing=0.2, ignore_index=-1, vocab_size=30)
    local = torch.where((target >= 10) & (target < 20), target - 10, torch.full_like(target, -1))
    for name in BACKENDS:
        b = dispatch.resolve(name, logits.to(device_for(name)))
        x = logits[:, 10:20].contiguous().to(device_for(name))
        got = b.row_backward(x, local.to(x.device), full.lse.float().to(x.device), coef.float().to(x.device), sliced)
        assert rel(got.cpu(), want[:, 10:20]) < 1e-5, name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_custom_ops_pass_opcheck(backend):
    dev = device_for(backend)
    logits, target = make(n=4, v=33, device=dev)
    tw = torch.rand(4, device=dev)
    scale = torch.tensor(0.5, device=dev)
    lse = torch.rand(4, device=dev) + 3
    coef = torch.rand(4, device=dev)
    tail = tuple(KernelOptions(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0).scalars(33))
    prefix = backend
    ns = torch.ops.memft
    torch.library.opcheck(getattr(ns, f"{prefix}_row_forward").default, (logits, target, tw, *tail))
    torch.library.opcheck(getattr(ns, f"{prefix}_row_forward_backward").default,
                          (logits, target, tw, scale, torch.empty_like(logits), *tail))
    torch.library.opcheck(getattr(ns, f"{prefix}_row_forward_backward_inplace").default,
                          (logits.clone(), target, tw, scale, *tail))
    torch.library.opcheck(getattr(ns, f"{prefix}_row_backward").default,
                          (logits, target, lse, coef, torch.empty_like(logits), *tail))
    torch.library.opcheck(getattr(ns, f"{prefix}_row_backward_inplace").default,
                          (logits.clone(), target, lse, coef, *tail))
    torch.library.opcheck(getattr(ns, f"{prefix}_scale_grad_").default, (logits.clone(), scale))
