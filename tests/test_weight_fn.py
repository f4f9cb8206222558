"""``weight_fn``: weights from the same forward (docs/SPEC.md, "weight_fn").

The ground truth: the float64 reference with the same final weights given as ``token_weight`` (which
multiplies the policy weight exactly as weight_fn's result does), on every available backend,
eagerly and under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math

import pytest
import torch

from memft_kernels import MemFTLoss, memft_loss
from memft_kernels.linear_loss import memft_linear_loss
from memft_kernels.ops import reference

from helpers import BACKENDS, backend_params, device_for, make, rel, run


def gate(target, stats):
    """A weight of this forward's statistics: wrong greedy predictions count 3x, sure tokens less."""
    return torch.where(stats.pred == target, 0.5, 1.5) * (2.0 - stats.prob)


MODES = [dict(), dict(reduction="sum"), dict(normalize="valid", policy="sigmoid"), dict(reduction="none")]


# Compiled: the default two-pass path (0) and the path that is single-pass without weight_fn (2).
MATRIX = [(b, c, m) for (b, c) in [p.values for p in backend_params()] for m in range(len(MODES)) if not c or m in (0, 2)]


@pytest.mark.parametrize("backend,use_compile,mode", MATRIX)
def test_gradient_equals_reference_with_the_same_final_weights(backend, use_compile, mode):
    opts = dict(MODES[mode])
    dev = device_for(backend)
    logits, target = make(n=14, v=17, seed=mode, device=dev)
    grad_out = torch.rand(14, device=dev) if opts.get("reduction") == "none" else None
    fn = memft_loss
    if use_compile:
        torch._dynamo.reset()
        fn = torch.compile(memft_loss, fullgraph=True, backend="aot_eager", dynamic=False)
    loss, grad = run(logits, target, backend, grad_out, loss_fn=fn, weight_fn=gate, validate=not use_compile, **opts)
    x64 = logits.double()
    _, seen = memft_loss(x64, target, backend="torch", return_stats=True, **opts)
    final = gate(target, seen)
    ref_loss, ref_grad = run(x64, target, "torch", grad_out, token_weight=final, **opts)
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5, (backend, use_compile, opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_and_fallback_use_the_final_weight(backend):
    logits, target = make(n=10, v=13, ignore_frac=0.0, device=device_for(backend))
    calls = []

    def nothing(t, stats):
        calls.append((t, stats))
        return torch.zeros_like(stats.prob)

    loss, stats = memft_loss(logits, target, policy="none", weight_fn=nothing, return_stats=True, backend=backend)
    assert len(calls) == 1 and calls[0][0] is target
    assert torch.equal(stats.weight, torch.zeros_like(stats.weight)) and float(stats.weight_sum) == 0.0
    assert bool(stats.fell_back)  # every final weight 0: the "mean" fallback, plain CE
    ce = torch.nn.functional.cross_entropy(logits.double(), target)
    assert abs(float(loss) - float(ce)) < 1e-5
    zero = memft_loss(logits, target, policy="none", weight_fn=nothing, fallback="zero", backend=backend)
    assert float(zero) == 0.0


def test_weight_fn_sees_this_forwards_statistics_in_targets_shape():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    seen = []

    def record(t, stats):
        seen.append(stats)
        for name in ("ce", "prob", "pred", "lse", "weight"):
            assert getattr(stats, name).shape == t.shape, name
        return torch.ones(())  # broadcasts to target's shape

    for step in range(2):  # the argmax moves between the two forwards
        x[..., step + 1] += 20.0
        memft_loss(x, y, weight_fn=record)
        assert torch.equal(seen[-1].pred, x.argmax(-1))
    assert not torch.equal(seen[0].pred, seen[1].pred)


def test_logits_are_read_no_more_often(monkeypatch):
    """Default (two-pass) path: one row_forward and one row_backward, with or without weight_fn."""
    counts = {}
    backend = reference.BACKEND
    for name in ("row_forward", "row_backward", "row_forward_backward"):
        real = getattr(backend, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, name, counted)
    logits, target = make(n=8, v=9)
    for weight_fn in (None, gate):
        counts.clear()
        run(logits, target, "torch", weight_fn=weight_fn)
        assert counts == {"row_forward": 1, "row_backward": 1}, (weight_fn, counts)


@pytest.mark.parametrize("result,error,pattern", [
    (lambda t, s: torch.ones(3), ValueError, "broadcast"),
    (lambda t, s: torch.ones(t.shape, dtype=torch.int64), TypeError, "floating"),
    (lambda t, s: torch.ones(t.shape, device="meta"), ValueError, "meta"),
    (lambda t, s: s.prob * math.nan, ValueError, "nan"),
    (lambda t, s: -s.prob, ValueError, "-"),
    (lambda t, s: 2.0, TypeError, "tensor"),
])
def test_bad_results_are_refused(result, error, pattern):
    logits, target = make(n=6, v=5, ignore_frac=0.0)
    with pytest.raises(error, match=pattern):
        memft_loss(logits, target, weight_fn=result)


def test_validate_false_skips_the_value_check_only():
    logits, target = make(n=6, v=5, ignore_frac=0.0)
    loss = memft_loss(logits, target, policy="none", weight_fn=lambda t, s: s.prob * math.nan, validate=False)
    assert loss.shape == ()  # computed (garbage in, garbage out), without the synchronizing check
    with pytest.raises(ValueError, match="broadcast"):
        memft_loss(logits, target, weight_fn=lambda t, s: torch.ones(2), validate=False)
    with pytest.raises(TypeError, match="callable"):
        memft_loss(logits, target, weight_fn="gate")


def test_module_and_fused_linear_loss_take_it():
    logits, target = make(n=12, v=11, seed=5)
    a = MemFTLoss(weight_fn=gate, policy="sigmoid")(logits, target)
    b = memft_loss(logits, target, weight_fn=gate, policy="sigmoid")
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for opts in (dict(), dict(reduction="sum"), dict(reduction="none")):
        loss = memft_linear_loss(hidden, weight, target, weight_fn=gate, chunk_size=5, **opts)
        gh, gw = torch.autograd.grad(loss.sum(), (hidden, weight))
        logits64 = hidden @ weight.T
        want = memft_loss(logits64, target, weight_fn=gate, **opts)
        wh, ww = torch.autograd.grad(want.sum(), (hidden, weight))
        assert rel(loss, want) < 1e-12 and rel(gh, wh) < 1e-12 and rel(gw, ww) < 1e-12, opts
