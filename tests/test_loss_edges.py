"""memft_loss at its edges, on every available backend: torch.compile(fullgraph=True, dynamic=True),
repeated backward through a retained graph, torch.func.grad, +inf logits, refused option types,
a hypothesis fuzz over the whole option space with odd shapes, strides and dtypes against the
float64 reference, and dp_group (memft_loss, MemFTLoss, memft_linear_loss) in one spawn of 2 gloo
ranks against the float64 reference over both ranks' rows."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memft_kernels import dispatch, memft_linear_loss, memft_loss

from helpers import BACKENDS, device_for, make, rel, run


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_dynamic_traces_symbolic_float_options(backend):
    logits, target = make(n=10, v=13, device=device_for(backend))
    torch._dynamo.reset()
    f = torch.compile(memft_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    opts = dict(policy="sigmoid", threshold=0.3, sharpness=5.0, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    loss, grad = run(logits, target, backend, loss_fn=f, validate=False, **opts)
    ref_loss, ref_grad = run(logits.double(), target, "torch", **opts)
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


def test_validate_true_under_fullgraph_says_to_pass_validate_false():
    logits, target = make(n=6, v=7)
    torch._dynamo.reset()
    f = torch.compile(memft_loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="validate=False"):
        f(logits, target)
    torch._dynamo.reset()
    eager_ok = torch.compile(memft_loss, backend="aot_eager")(logits, target)  # a graph break, not an error
    assert rel(eager_ok, memft_loss(logits, target)) < 1e-6


# ------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(reduction="sum"), dict(normalize="valid"), dict(denominator=11.0), dict()],
                         ids=["sum", "valid", "denominator", "active"])
def test_repeated_backward_through_a_retained_graph_accumulates(backend, opts):
    logits, target = make(n=9, v=11, device=device_for(backend))
    x = logits.clone().requires_grad_(True)
    loss = memft_loss(x, target, backend=backend, **opts)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward(torch.tensor(2.0, device=x.device), retain_graph=True)
    loss.backward(torch.tensor(0.5, device=x.device))
    assert rel(x.grad, 3.5 * once) < 1e-6
    _, ref = run(logits.double(), target, "torch", **opts)
    assert rel(once, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(reduction="sum"), dict(policy="sigmoid")], ids=["single_pass", "two_pass"])
def test_torch_func_grad(backend, opts):
    logits, target = make(n=8, v=9, device=device_for(backend))
    grad = torch.func.grad(lambda x: memft_loss(x, target, backend=backend, validate=False, **opts))(logits)
    _, want = run(logits, target, backend, **opts)
    assert rel(grad, want) < 1e-6


# ---------------------------------------------------------------------------- values and types
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["other", "target"])
def test_positive_inf_logit_gives_nan_like_cross_entropy(backend, where):
    logits, target = make(n=5, v=7, ignore_frac=0.0, device=device_for(backend))
    col = (int(target[2]) + 1) % 7 if where == "other" else int(target[2])
    logits[2, col] = math.inf
    assert torch.isnan(F.cross_entropy(logits.float(), target))
    loss, stats = memft_loss(logits, target, policy="none", reduction="none", backend=backend, return_stats=True)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert float(stats.weight[2]) == 1.0  # the NaN rule: the row reaches the loss
    assert torch.isnan(memft_loss(logits, target, backend=backend))


@pytest.mark.parametrize("kw", [dict(threshold=True), dict(threshold="0.5"), dict(denominator="3"),
                                dict(sharpness=True), dict(denominator=torch.tensor(True)), dict(z_loss="0")])
def test_bools_and_strings_are_not_numbers(kw):
    logits, target = make(n=4, v=5)
    (name,) = kw
    with pytest.raises(ValueError, match=name):
        memft_loss(logits, target, **kw)


# ----------------------------------------------------------------------------------- the fuzz
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-2),
       torch.float16: (2e-5, 3e-3)}  # (loss and statistics, gradient): one rounding of the gradient


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    if draw(st.integers(0, 9)) == 0:  # now and then no rows at all
        lead = lead[:-1] + (0,)
    v = draw(st.integers(1, 70))
    layout = draw(st.sampled_from(["contiguous", "transposed", "column_stride", "row_gap"]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    opts = dict(
        policy=draw(st.sampled_from(["none", "hard", "sigmoid"])),
        threshold=draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0])),
        sharpness=draw(st.sampled_from([0.5, 4.0, 20.0])),
        reduction=reduction,
        normalize=draw(st.sampled_from(["active", "valid"])),
        fallback=draw(st.sampled_from(["mean", "zero"])),
        ignore_index=draw(st.sampled_from([-100, 0, 3])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
    )
    denominator = draw(st.sampled_from([None, None, 7.0, "tensor"]))
    opts["denominator"] = torch.tensor(7.0) if denominator == "tensor" else denominator
    return dict(backend=backend, dtype=dtype, lead=lead, v=v, layout=layout, opts=opts,
                token_weight=draw(st.booleans()), inplace=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 6.0])),
                seed=draw(st.integers(0, 2**16)))


def _logits(case, device):
    """Logits of the case's shape in the case's memory layout (values identical whatever the layout)."""
    g = torch.Generator().manual_seed(case["seed"])
    lead, v = case["lead"], case["v"]
    dense = (torch.randn(*lead, v, generator=g, dtype=torch.float64) * case["scale"]).to(case["dtype"])
    layout = case["layout"]
    if layout == "transposed" and len(lead) >= 2:
        base = dense.transpose(0, 1).contiguous().to(device)
        x = base.transpose(0, 1)
    elif layout == "column_stride":
        base = torch.zeros(*lead, 2 * v, dtype=dense.dtype, device=device)
        x = base[..., ::2]
        x.copy_(dense)
    elif layout == "row_gap":
        base = torch.zeros(*lead, v + 3, dtype=dense.dtype, device=device)
        x = base[..., :v]
        x.copy_(dense)
    else:
        x = dense.to(device)
    assert torch.equal(x.cpu(), dense)
    return x, g


@settings(max_examples=30)
@given(cases())
def test_fuzz_every_option_shape_stride_and_dtype_against_float64(case):
    backend, dtype, opts = case["backend"], case["dtype"], dict(case["opts"])
    device = device_for(backend)
    x, g = _logits(case, device)
    module = dispatch.resolve(backend, torch.empty(1, 1, device=device))  # available (helpers.BACKENDS)
    if module.supports(x.reshape(-1, case["v"]).contiguous()) is not None:
        with pytest.raises(RuntimeError, match="cannot run"):
            memft_loss(x, torch.zeros(case["lead"], dtype=torch.long, device=device), backend=backend)
        return
    target = torch.randint(0, case["v"], case["lead"], generator=g)
    target[torch.rand(case["lead"], generator=g) < 0.2] = opts["ignore_index"]
    target = target.to(device)
    tw = (torch.rand(case["lead"], generator=g) * 2).to(device) if case["token_weight"] else None
    if tw is not None and tw.numel():
        tw.view(-1)[0] = 0.0
    if isinstance(opts["denominator"], torch.Tensor):
        opts["denominator"] = opts["denominator"].to(device)
    grad_out = torch.rand(case["lead"], dtype=torch.float64).to(device) if opts["reduction"] == "none" else None

    leaf = x.detach().clone().requires_grad_(True) if not case["inplace"] else None
    inp = leaf if leaf is not None else x.detach().requires_grad_(True)
    loss, stats = memft_loss(inp * 1.0 if case["inplace"] else inp, target, backend=backend, token_weight=tw,
                             inplace_backward=case["inplace"], return_stats=True, **opts)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    grad = inp.grad

    x64 = x.detach().double().cpu().requires_grad_(True)
    ref_opts = dict(opts, denominator=opts["denominator"].cpu() if isinstance(opts["denominator"], torch.Tensor)
                    else opts["denominator"])
    ref_loss, ref_stats = memft_loss(x64, target.cpu(), backend="torch", return_stats=True,
                                     token_weight=None if tw is None else tw.double().cpu(), **ref_opts)
    ref_loss.backward(torch.ones_like(ref_loss) if grad_out is None else grad_out.cpu())
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape and grad.shape == x.shape and grad.dtype == dtype
    assert rel(loss.cpu(), ref_loss) < loss_tol, (loss, ref_loss)
    assert rel(grad.cpu(), x64.grad) < grad_tol
    for name in ("ce", "prob", "lse", "weight"):
        assert rel(getattr(stats, name).cpu(), getattr(ref_stats, name)) < loss_tol, name
    assert torch.equal(stats.pred.cpu(), ref_stats.pred) or dtype != torch.float64
    for name in ("n_valid", "n_active", "fell_back"):
        assert torch.equal(getattr(stats, name).cpu(), getattr(ref_stats, name)), name


# ------------------------------------------------------------------ the audit's regressions
# (each failed on the code before the fix: a silent wrong number, or an unclear error)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum")], ids=["two_pass", "single_pass"])
def test_double_backward_refuses_instead_of_dropping_the_term(backend, opts):
    logits, target = make(n=6, v=9, device=device_for(backend))
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(memft_loss(x, target, backend=backend, **opts), x, create_graph=True)
    _, want = run(logits, target, backend, **opts)
    assert g.requires_grad and rel(g, want) < 1e-6  # the first derivative is still right
    with pytest.raises(RuntimeError, match="no second derivative"):  # was: a penalty silently without this term
        (g.pow(2).sum() + x.pow(2).sum()).backward()
    inner = torch.func.grad(lambda t: memft_loss(t, target, backend=backend, validate=False, **opts))
    with pytest.raises(RuntimeError, match="no second derivative"):  # was: a zero second derivative
        torch.func.grad(lambda t: inner(t).pow(2).sum())(logits)


def test_linear_loss_double_backward_refuses():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    gh, gw = torch.autograd.grad(memft_linear_loss(h, w, torch.randint(0, 7, (5,))), (h, w), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (gh.sum() + gw.sum() + h.sum()).backward()


def test_token_weight_that_requires_grad_is_refused_not_silently_constant():
    logits, target = make(n=5, v=7)
    tw = torch.rand(5, requires_grad=True)
    for call in (lambda: memft_loss(logits, target, token_weight=tw),
                 lambda: memft_linear_loss(torch.randn(5, 3), torch.randn(7, 3), target, token_weight=tw)):
        with pytest.raises(ValueError, match=r"token_weight.detach\(\)"):
            call()
    with torch.no_grad():  # no gradient wanted: nothing is lost
        assert torch.isfinite(memft_loss(logits, target, token_weight=tw))
    assert torch.isfinite(memft_loss(logits, target, token_weight=tw.detach()))


def test_inplace_backward_refuses_a_parameter_but_takes_a_detached_leaf():
    logits, target = make(n=5, v=7)
    param = torch.nn.Parameter(logits.clone())
    for view in (param, param[:3]):  # was: the parameter's values silently became its own .grad
        with pytest.raises(ValueError, match="nn.Parameter"):
            memft_loss(view, target[: view.shape[0]], inplace_backward=True, normalize="valid")
    assert torch.equal(param.detach(), logits)
    leaf = logits.clone().requires_grad_(True)  # e.g. out.detach().requires_grad_(), backpropagated by hand
    memft_loss(leaf, target, inplace_backward=True, normalize="valid").backward()
    _, want = run(logits, target, normalize="valid")
    assert rel(leaf.grad, want) < 1e-6 and leaf.grad.data_ptr() == leaf.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [1e6, 1e30])
def test_large_softcap_is_nearly_no_cap(backend, softcap):
    # Triton's tanh was (1 - e) / (1 + e) with e = exp(-2|u|): exactly 0 for small |u|, so a large
    # cap flattened every logit to 0 (the loss became ln V).
    logits, target = make(n=6, v=37, device=device_for(backend))
    loss, grad = run(logits, target, backend, softcap=softcap, policy="none")
    ref_loss, ref_grad = run(logits.double(), target, "torch", softcap=softcap, policy="none")
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_token_weight_without_validation_reaches_the_loss(backend):
    logits, target = make(n=6, v=9, ignore_frac=0.0, device=device_for(backend))
    tw = torch.ones(6, device=logits.device)
    tw[2] = math.nan
    for opts in (dict(), dict(normalize="valid")):  # was: 0.0 under "active" (a NaN sum of weights read as "none")
        assert torch.isnan(memft_loss(logits, target, token_weight=tw, validate=False, backend=backend, **opts))
    h = torch.randn(6, 4, device=logits.device)
    assert torch.isnan(memft_linear_loss(h, torch.randn(9, 4, device=h.device), target, token_weight=tw,
                                         validate=False, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_parity_uint8_targets_and_numpy_ignore_index(backend):
    import numpy as np

    logits, target = make(n=8, v=9, ignore_frac=0.0, device=device_for(backend))
    target[1] = 4
    want = F.cross_entropy(logits, target.to(torch.uint8), ignore_index=4)  # F.cross_entropy takes both
    got = memft_loss(logits, target.to(torch.uint8), policy="none", ignore_index=np.int64(4), backend=backend)
    assert rel(got, want) < 1e-6
    # F.cross_entropy's class weight is token_weight=weight[target] (the SPEC's recipe), every reduction
    w = torch.rand(9, device=logits.device) + 0.1
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(logits, target, weight=w, ignore_index=4, reduction=reduction)
        got = memft_loss(logits, target, policy="none", token_weight=w[target.clamp_min(0)], ignore_index=4,
                         reduction=reduction, backend=backend)
        assert rel(got, want) < 1e-6


def test_float_options_outside_float32_are_refused():
    logits, target = make(n=2, v=2, ignore_frac=0.0)
    # sharpness=1e39 is inf in float32: inf * 0 made the weight NaN and the loss 0.0
    for kw in (dict(sharpness=1e39), dict(softcap=1e-40), dict(z_loss=1e39), dict(denominator=1e-300),
               dict(denominator=torch.tensor(math.inf))):
        (name,) = kw
        with pytest.raises(ValueError, match=name):
            memft_loss(logits, target, policy="sigmoid", **kw)


def test_class_dimension_in_the_middle_names_the_fix():
    with pytest.raises(ValueError, match=r"movedim\(1, -1\)"):
        memft_loss(torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3)))


def test_numpy_ignore_index_under_fullgraph_says_pass_an_int():
    import numpy as np

    logits, target = make(n=4, v=5)
    torch._dynamo.reset()
    f = torch.compile(memft_loss, fullgraph=True, backend="aot_eager")
    # eager takes a numpy integer; traced it would reach a compiled kernel as a SymInt
    with pytest.raises(Exception, match=r"pass int\(ignore_index\)"):
        f(logits, target, ignore_index=np.int64(3), validate=False)


# ------------------------------------------------------------------------------ tensors without values
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(token_weight="w"), dict(denominator="d"), dict(weight_fn="f"),
                                dict(policy="sigmoid", return_stats=True)],
                         ids=["plain", "token_weight", "denominator", "weight_fn", "stats"])
def test_meta_tensors_give_shapes_with_validate_on(validate, kw):
    """A meta tensor has no values: the value checks (which read the host) are skipped and the call
    computes shapes, as with validate=False; it failed inside .item() before."""
    meta = torch.device("meta")
    x = torch.randn(6, 5, 11, device=meta, requires_grad=True)
    t = torch.randint(0, 11, (6, 5)).to(meta)
    extra = {"w": torch.rand(6, 5).to(meta), "d": torch.tensor(4.0, device=meta),
             "f": lambda target, stats: torch.ones(target.shape, device=target.device)}
    kw = {k: extra.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    out = memft_loss(x, t, validate=validate, **{"policy": "hard", **kw})
    loss = out[0] if isinstance(out, tuple) else out
    assert loss.device == meta and loss.shape == ()
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.device == meta
    if isinstance(out, tuple):
        assert out[1].prob.shape == t.shape


def test_meta_tensors_through_the_linear_loss():
    meta = torch.device("meta")
    h = torch.randn(7, 9, device=meta, requires_grad=True)
    w = torch.randn(13, 9, device=meta, requires_grad=True)
    t = torch.randint(0, 13, (7,)).to(meta)
    for reduction in ("mean", "sum", "none"):
        loss = memft_linear_loss(h, w, t, reduction=reduction)  # validate=True, fallback="mean"
        loss.sum().backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
        h.grad = w.grad = None


def test_fake_tensor_mode_with_validate_on():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(8, 17, requires_grad=True)
        t = torch.randint(0, 17, (8,))
        loss = memft_loss(x, t, policy="hard", token_weight=torch.rand(8), denominator=torch.tensor(3.0))
        loss.backward()
        assert x.grad.shape == x.shape


def test_denominator_value_check_reads_the_tensor():
    """The check prepare_call runs on a device denominator with validate=True (a CUDA tensor in
    practice; the same function checks CPU tensors when the options are checked)."""
    from memft_kernels.spec import check_denominator_value

    check_denominator_value(torch.tensor(2.5))
    for bad in (0.0, -1.0, math.nan, math.inf, 1e-300):
        with pytest.raises(ValueError, match="denominator"):
            check_denominator_value(torch.tensor(bad, dtype=torch.float64))


def test_wrong_argument_kinds_are_named():
    from memft_kernels import MemFTLoss

    logits, target = make(n=4, v=5)
    cases = [
        (TypeError, "logits must be a torch.Tensor", lambda: memft_loss(logits.tolist(), target)),
        (TypeError, "target must be a torch.Tensor", lambda: memft_loss(logits, target.tolist())),
        (ValueError, "at least one dimension", lambda: memft_loss(torch.tensor(1.0), torch.tensor(0))),
        (ValueError, "token_weight must be a tensor", lambda: memft_loss(logits, target, token_weight=[1.0] * 4)),
        (ValueError, "0-d tensor", lambda: memft_loss(logits, target, denominator=torch.ones(2))),
        (ValueError, "token_weight is per call", lambda: MemFTLoss(token_weight=torch.ones(4))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_compiled_bad_weight_fn_is_named_in_the_error():
    """Under torch.compile (not fullgraph) the value checks run at a graph break; the error named the
    function as "<attribute '__qualname__' of 'function' objects>" because the name was read while traced."""
    logits, target = make(n=6, v=7)

    def my_window(target, stats):
        return -torch.ones(target.shape)

    torch._dynamo.reset()
    f = torch.compile(memft_loss, backend="aot_eager")
    with pytest.raises(ValueError, match=r"weight_fn .*my_window returned -1.0"):
        f(logits, target, weight_fn=my_window)
    with pytest.raises(ValueError, match="token_weight must be finite"):
        f(logits, target, token_weight=torch.full((6,), -1.0))


# --------------------------------------------------------------------------- dp_group (2 ranks)
# memft_loss / MemFTLoss / memft_linear_loss with dp_group, in ONE spawn of 2 gloo ranks that runs
# every case and saves its results: the sum of the ranks' losses and their gradients (concatenated
# rows; the weight gradient summed over ranks) must equal the single-process float64 reference over
# the concatenated rows. Regression: dp_group was vocab_parallel_memft_loss's only (memft_loss and
# memft_linear_loss refused the keyword, and a rank's local "active" mean is not its share of the
# global one). Each rank holds different rows, and a different number of them.
DP_WORLD, DP_V, DP_D = 2, 11, 16
DP_ROWS = (7, 5)
DP_CASES = {
    "hard": dict(opts=dict(policy="hard")),
    "sigmoid": dict(opts=dict(policy="sigmoid", threshold=0.3, sharpness=5.0, label_smoothing=0.1), token_weight=True),
    "valid": dict(opts=dict(policy="hard", normalize="valid")),  # the single-pass path (1/D before the rows)
    "valid_inplace": dict(opts=dict(policy="sigmoid", normalize="valid", inplace_backward=True), loss_only=True),
    "rank1_no_active": dict(opts=dict(policy="hard"), confident=(False, True)),
    "rank1_no_active_soft": dict(opts=dict(policy="sigmoid", threshold=0.05, sharpness=50.0), confident=(False, True)),
    "rank1_no_valid": dict(opts=dict(policy="hard"), ignore_all=(False, True)),
    "fallback_mean": dict(opts=dict(policy="hard"), confident=(True, True)),
    "fallback_zero": dict(opts=dict(policy="hard", fallback="zero"), confident=(True, True)),
    "fallback_soft": dict(opts=dict(policy="sigmoid", threshold=0.05, sharpness=50.0, token_weight_zero=True),
                          confident=(True, True)),
    "weight_fn": dict(opts=dict(policy="sigmoid", threshold=0.3), weight_fn=True),
    "sum_unaffected": dict(opts=dict(policy="hard", reduction="sum")),
    "denominator_unaffected": dict(opts=dict(policy="sigmoid", denominator=9.0)),
    "none_unaffected": dict(opts=dict(policy="hard", reduction="none")),
    "module": dict(opts=dict(policy="hard"), module=True, loss_only=True),
}
DP_LINEAR_CASES = [name for name in DP_CASES if name not in ("valid_inplace", "module", "fallback_soft")]


def _dp_inputs(name, part):
    """Rank ``part``'s rows of case ``name``: logits (and hidden for the linear loss, whose weight is
    the same on every rank), target, token_weight, upstream gradient. Built identically in every process."""
    case = DP_CASES[name]
    g = torch.Generator().manual_seed(1000 + 17 * list(DP_CASES).index(name) + part)
    n = DP_ROWS[part]
    # Orthonormal weight rows: hidden = c * weight[t] gives logit c at t and 0 elsewhere.
    q, _ = torch.linalg.qr(torch.randn(DP_D, DP_D, generator=torch.Generator().manual_seed(77), dtype=torch.float64))
    weight = q[:DP_V].contiguous()
    bias = 0.1 * torch.randn(DP_V, generator=torch.Generator().manual_seed(78), dtype=torch.float64)
    target = torch.randint(0, DP_V, (n,), generator=g)
    hidden = torch.randn(n, DP_D, generator=g, dtype=torch.float64)
    if case.get("confident", (False, False))[part]:
        hidden = 9.0 * weight[target] + 0.01 * hidden  # p > 0.5 for every target: nothing active
    target[n // 2] = -100
    if case.get("ignore_all", (False, False))[part]:
        target[:] = -100
    tw = (0.2 + torch.rand(n, generator=g, dtype=torch.float64)) if case.get("token_weight") else None
    if case["opts"].get("token_weight_zero"):
        tw = torch.zeros(n, dtype=torch.float64)
    reduction = case["opts"].get("reduction", "mean")
    grad_out = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5) if reduction == "none" else torch.tensor(
        0.75, dtype=torch.float64)
    return hidden, weight, bias, target, tw, grad_out


def _dp_opts(name):
    opts = {k: v for k, v in DP_CASES[name]["opts"].items() if k != "token_weight_zero"}
    if DP_CASES[name].get("weight_fn"):
        opts["weight_fn"] = lambda target, stats: 0.5 + stats.prob
    return opts


def _dp_case(name, linear, rank, dp_group):
    from memft_kernels import MemFTLoss

    hidden, weight, bias, target, tw, grad_out = _dp_inputs(name, rank)
    opts = _dp_opts(name)
    if linear:
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss, stats = memft_linear_loss(h, w, target, b, token_weight=tw, chunk_size=3, dp_group=dp_group,
                                        return_stats=True, **opts)
        loss.backward(grad_out)
        return dict(loss=loss.detach(), fell_back=stats.fell_back, grads=(h.grad, w.grad, b.grad))
    x = (hidden @ weight.T + bias).requires_grad_()
    if DP_CASES[name].get("module"):
        # A deep copy (a model holding the loss copied, e.g. for an EMA): it shares the process group.
        # Regression: copy.deepcopy raised "cannot pickle ... ProcessGroup".
        loss = copy.deepcopy(MemFTLoss(dp_group=dp_group, **opts))(x, target, tw)
        fell_back = None
    else:
        inp = x * 1.0 if opts.get("inplace_backward") else x  # a non-leaf: the in-place gradient is allowed
        loss, stats = memft_loss(inp, target, token_weight=tw, dp_group=dp_group, return_stats=True, **opts)
        fell_back = stats.fell_back
    loss.backward(grad_out)
    return dict(loss=loss.detach(), fell_back=fell_back, grads=(x.grad,))


# A failure on ONE rank before the dp all_reduce (its input checks, its weight_fn) raises on EVERY rank:
# the failure rides in the all_reduce the call makes anyway (regression: the failed rank raised, the
# others waited in the collective until the process group's timeout). Each case: (function, normalize,
# failing rank (None: both, each raising its own error), what breaks there, validate). On the old code the first case left rank 0 in the
# all_reduce and the next collectives mismatched; the cases run on a group whose collectives give up
# after DP_FAIL_TIMEOUT_S, so such a regression fails fast instead of hanging.
DP_FAIL_TIMEOUT_S = 15
DP_FAIL_CASES = {
    "target_range_active": ("loss", "active", 1, "target", True),
    "target_range_valid": ("loss", "valid", 1, "target", True),  # the all_reduce before the row pass
    "token_weight_nan_active": ("loss", "active", 0, "token_weight", True),
    "weight_fn_raises_active": ("loss", "active", 1, "weight_fn_raises", True),
    "weight_fn_nan_valid": ("loss", "valid", 0, "weight_fn_nan", True),  # the all_reduce after weight_fn
    "module_target_range": ("module", "active", 1, "target", True),
    "shape_valid_no_validate": ("loss", "valid", 1, "token_weight_shape", False),  # the others: NaN, no sync
    "linear_target_range_active": ("linear", "active", 1, "target", True),
    "linear_token_weight_nan_valid": ("linear", "valid", 0, "token_weight", True),
    "linear_weight_fn_raises_active": ("linear", "active", 1, "weight_fn_raises", True),
    "linear_weight_fn_nan_valid": ("linear", "valid", 1, "weight_fn_nan", True),
    "linear_weight_fn_raises_no_validate": ("linear", "active", 0, "weight_fn_raises", False),
    # vocab-parallel (each rank its own one-rank tensor-parallel group): weight_fn after the all_gather
    "vocab_parallel_weight_fn_raises_active": ("vocab_parallel", "active", 1, "weight_fn_raises", True),
    "vocab_parallel_linear_weight_fn_nan_valid": ("vocab_parallel_linear", "valid", 0, "weight_fn_nan", True),
    "both_ranks_weight_fn_raises": ("loss", "active", None, "weight_fn_raises", True),  # each its own error
}
DP_FAIL_OWN = {  # what the failing rank raises: its own error
    "target": (ValueError, "target contains 11, outside"),
    "token_weight": (ValueError, "token_weight must be finite and >= 0; found nan"),
    "weight_fn_raises": (RuntimeError, "weight_fn broke on this rank"),
    "weight_fn_nan": (ValueError, "returned nan; weights must be finite"),
    "token_weight_shape": (ValueError, "token_weight.shape=(3,) must equal target.shape"),
}


def _dp_fail_case(name, rank, dp_group, tp_group):
    """One DP_FAIL_CASES case on this rank: ("ok", loss, grads) or ("error", type, message)."""
    from memft_kernels import MemFTLoss
    from memft_kernels.distributed import vocab_parallel_memft_loss
    from memft_kernels.vocab_parallel_linear import vocab_parallel_memft_linear_loss

    kind, normalize, failing, what, validate = DP_FAIL_CASES[name]
    hidden, weight, bias, target, _, _ = _dp_inputs("hard", rank)
    tw = torch.rand(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    bad = failing is None or rank == failing

    def weight_fn(target, stats):
        if bad and what == "weight_fn_raises":
            raise RuntimeError("weight_fn broke on this rank")
        return torch.full_like(stats.prob, math.nan) if bad and what == "weight_fn_nan" else 0.5 + stats.prob

    if bad and what == "target":
        target[1] = DP_V
    if bad and what == "token_weight":
        tw[2] = math.nan
    if bad and what == "token_weight_shape":
        tw = tw[:3]
    opts = dict(policy="sigmoid", threshold=0.4, normalize=normalize, validate=validate, dp_group=dp_group,
                weight_fn=weight_fn if what.startswith("weight_fn") else None)
    try:
        if kind in ("linear", "vocab_parallel_linear"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            if kind == "linear":
                loss = memft_linear_loss(h, w, target, bias, token_weight=tw, chunk_size=3, **opts)
            else:
                loss = vocab_parallel_memft_linear_loss(h, w, target, bias, group=tp_group, token_weight=tw,
                                                        chunk_size=3, **opts)
            loss.backward()
            return ("ok", loss.detach(), (h.grad, w.grad))
        x = (hidden @ weight.T + bias).requires_grad_()
        if kind == "module":
            loss = MemFTLoss(**opts)(x, target, tw)
        elif kind == "vocab_parallel":
            loss = vocab_parallel_memft_loss(x, target, group=tp_group, token_weight=tw, **opts)
        else:
            loss = memft_loss(x, target, token_weight=tw, **opts)
        loss.backward()
        return ("ok", loss.detach(), (x.grad,))
    except Exception as exc:  # noqa: BLE001 - recorded for the test to check, per rank
        return ("error", type(exc), str(exc))


def _dp_worker(rank, world, port, outdir):
    from helpers import init_gloo_rank
    import torch.distributed as dist

    from memft_kernels.distributed import vocab_parallel_memft_loss
    from memft_kernels.vocab_parallel_linear import vocab_parallel_memft_linear_loss

    init_gloo_rank(rank, world, port)
    try:
        dp_group = dist.new_group(list(range(world)))
        only_rank0 = dist.new_group([0])
        results = {}
        for name in DP_CASES:
            results[("loss", name)] = _dp_case(name, False, rank, dp_group)
        for name in DP_LINEAR_CASES:
            results[("linear", name)] = _dp_case(name, True, rank, dp_group)
        if rank == 1:  # not a member: refused, never a silent no-op collective
            try:
                memft_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), dp_group=only_rank0)
            except ValueError as exc:
                results["not_member"] = str(exc)
        # torch.func.grad over vocab_parallel_memft_linear_loss (the world splits V = 5 + 6).
        hidden, weight, bias, target, _, _ = _dp_inputs("hard", 0)
        rows = slice(0, 5) if rank == 0 else slice(5, DP_V)
        f = lambda h, w, b: vocab_parallel_memft_linear_loss(h, w, target, b, policy="sigmoid", chunk_size=3,  # noqa: E731
                                                               validate=False)
        results["func_vocab_parallel"] = torch.func.grad(f, argnums=(0, 1, 2))(hidden, weight[rows], bias[rows])
        logits = (hidden @ weight.T + bias)[:, rows].contiguous()
        loss, vjp_fn = torch.func.vjp(lambda x: vocab_parallel_memft_loss(x, target, policy="sigmoid", validate=False),
                                      logits)
        results["func_vocab_parallel_logits"] = vjp_fn(torch.tensor(0.75, dtype=torch.float64))[0]
        # The gradient's dependence on an nn.Parameter outside the transform: a backward through it
        # must raise (regression: it silently missed the loss's second-order term).
        p = torch.nn.Parameter(torch.tensor(1.25, dtype=torch.float64))
        w = torch.nn.Parameter(weight[rows].clone())
        outer = {}
        for what, grad_of in (
                ("logits", lambda: torch.func.grad(lambda x: vocab_parallel_memft_loss(
                    x * p, target, policy="sigmoid", validate=False))(logits)),
                ("linear", lambda: torch.func.grad(lambda h: vocab_parallel_memft_linear_loss(
                    h, w, target, bias[rows], policy="sigmoid", chunk_size=3, validate=False))(hidden))):
            try:
                (grad_of().pow(2).sum() + p * w.sum()).backward()
                outer[what] = "no error"
            except RuntimeError as exc:
                outer[what] = str(exc)
        results["func_outer"] = outer
        # One rank fails: every rank raises (and then the group still works).
        from datetime import timedelta

        fail_group = dist.new_group(list(range(world)), timeout=timedelta(seconds=DP_FAIL_TIMEOUT_S))
        own_group = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
        for name in DP_FAIL_CASES:
            results[("fail", name)] = _dp_fail_case(name, rank, fail_group, own_group)
        # The group still works, with one all_reduce per call: the failure flag costs no collective.
        all_reduce, counted = dist.all_reduce, []

        def counting_all_reduce(*args, **kwargs):
            counted.append(1)
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            for name, linear in (("sigmoid", False), ("valid", True), ("valid", False), ("weight_fn", True)):
                del counted[:]
                try:
                    results[("after_fail", name, linear)] = _dp_case(name, linear, rank, fail_group)
                except Exception as exc:  # noqa: BLE001 - e.g. the group broken by a timeout (the old code)
                    results[("after_fail", name, linear)] = repr(exc)
                results[("all_reduces", name, linear)] = len(counted)
        finally:
            dist.all_reduce = all_reduce
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp_spawned(tmp_path_factory):
    from helpers import free_port, rank_results, spawn_ranks

    outdir = tmp_path_factory.mktemp("dp_group")
    spawn_ranks(_dp_worker, DP_WORLD, (DP_WORLD, free_port(), str(outdir)), 60.0, "the dp_group run")
    return rank_results(outdir, DP_WORLD)


def _dp_reference(name, linear):
    """Single process, float64 reference backend, over the concatenated rows of both ranks."""
    parts = [_dp_inputs(name, p) for p in range(DP_WORLD)]
    hidden = torch.cat([p[0] for p in parts])
    _, weight, bias = parts[0][:3]
    target = torch.cat([p[3] for p in parts])
    tw = None if parts[0][4] is None else torch.cat([p[4] for p in parts])
    opts = dict(_dp_opts(name), backend="torch")
    opts.pop("inplace_backward", None)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    x = h @ w.T + b
    if not linear:
        x = x.detach().requires_grad_()
    loss, stats = memft_loss(x, target, token_weight=tw, return_stats=True, **opts)
    grad_out = torch.cat([p[5] for p in parts]) if loss.dim() else parts[0][5]
    loss.backward(grad_out)
    grads = (h.grad, w.grad, b.grad) if linear else (x.grad,)
    return loss.detach(), stats.fell_back, grads


@pytest.mark.parametrize("kind,name", [("loss", n) for n in DP_CASES] + [("linear", n) for n in DP_LINEAR_CASES])
def test_dp_group_rank_shares_sum_to_the_global_mean(dp_spawned, kind, name):
    linear = kind == "linear"
    ranks = [r[(kind, name)] for r in dp_spawned]
    ref_loss, ref_fell_back, ref_grads = _dp_reference(name, linear)
    if ref_loss.dim():  # reduction="none": the rows of the ranks
        total = torch.cat([r["loss"] for r in ranks])
    else:
        total = sum(r["loss"] for r in ranks)
        assert float(ref_loss) != 0.0 or DP_CASES[name]["opts"].get("fallback") == "zero"
    assert rel(total, ref_loss) < 1e-12, (total, ref_loss)
    if linear:
        got = (torch.cat([r["grads"][0] for r in ranks]), sum(r["grads"][1] for r in ranks),
               sum(r["grads"][2] for r in ranks))
    else:
        got = (torch.cat([r["grads"][0] for r in ranks]),)
    for g, want in zip(got, ref_grads):
        assert rel(g, want) < 1e-12
    if not DP_CASES[name].get("module"):
        for r in ranks:  # the fallback decision is global: the same on every rank as in the reference
            assert bool(r["fell_back"]) == bool(ref_fell_back)
    if name.startswith("fallback"):
        assert bool(ref_fell_back)
    if name.startswith("rank1_no"):  # rank 1 holds no active token, but rank 0 does: its share is 0
        # (the sigmoid gate is never exactly 0: there, negligible next to rank 0's)
        tiny = 0.0 if DP_CASES[name]["opts"]["policy"] == "hard" else 1e-12
        assert not bool(ref_fell_back)
        assert abs(float(ranks[1]["loss"])) <= tiny * float(ranks[0]["loss"])
        assert float(ranks[1]["grads"][0].abs().max()) <= tiny * float(ranks[0]["grads"][0].abs().max())


@pytest.mark.parametrize("name", list(DP_FAIL_CASES))
def test_dp_group_failure_on_one_rank_raises_on_every_rank(dp_spawned, name):
    kind, normalize, failing, what, validate = DP_FAIL_CASES[name]
    own_type, own_message = DP_FAIL_OWN[what]
    got = [r[("fail", name)] for r in dp_spawned]
    for r in range(DP_WORLD) if failing is None else (failing,):
        assert got[r][0] == "error", got[r]
        assert got[r][1] is own_type and own_message in got[r][2], got[r]
    if failing is None:
        return
    other = got[1 - failing]
    if validate:
        assert other[0] == "error", other
        where = {"linear": "memft_linear_loss", "loss": "memft_loss", "module": "memft_loss"}.get(
            kind, "the vocab-parallel MemFT loss")
        assert other[1] is ValueError and other[2].startswith(f"{where}: 1 other rank(s) of dp_group failed"), other
        assert "target in [0, V), token_weight finite" in other[2] and "weight_fn" in other[2]
    else:  # validate=False reads no value on the host: the other rank's loss and gradients are NaN instead
        assert other[0] == "ok", other
        assert math.isnan(float(other[1]))
        assert all(bool(torch.isnan(g).all()) for g in other[2])


def test_dp_group_works_after_failures_on_one_rank_with_one_all_reduce_per_call(dp_spawned):
    for name, linear in (("sigmoid", False), ("valid", True), ("valid", False), ("weight_fn", True)):
        ranks = [r[("after_fail", name, linear)] for r in dp_spawned]
        assert all(isinstance(r, dict) for r in ranks), ranks
        assert [r[("all_reduces", name, linear)] for r in dp_spawned] == [1] * DP_WORLD
        ref_loss, _, ref_grads = _dp_reference(name, linear)
        assert rel(sum(r["loss"] for r in ranks), ref_loss) < 1e-12
        assert rel(torch.cat([r["grads"][0] for r in ranks]), ref_grads[0]) < 1e-12


def test_dp_group_not_a_member_and_vocab_parallel_torch_func(dp_spawned):
    assert "not a member of dp_group" in dp_spawned[1]["not_member"]
    for r in dp_spawned:
        assert all("no second derivative" in message for message in r["func_outer"].values()), r["func_outer"]
    hidden, weight, bias, target, _, _ = _dp_inputs("hard", 0)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logits = (h @ w.T + b).detach().requires_grad_()
    (want_logits,) = torch.autograd.grad(memft_loss(logits, target, policy="sigmoid"), logits,
                                         torch.tensor(0.75, dtype=torch.float64))
    got_logits = torch.cat([r["func_vocab_parallel_logits"] for r in dp_spawned], dim=-1)
    assert rel(got_logits, want_logits) < 1e-12  # torch.func.vjp over vocab_parallel_memft_loss
    want = torch.autograd.grad(memft_loss(h @ w.T + b, target, policy="sigmoid"), (h, w, b))
    got = [r["func_vocab_parallel"] for r in dp_spawned]
    for r in got:
        assert rel(r[0], want[0]) < 1e-12  # every rank gets the whole hidden gradient
    assert rel(torch.cat([r[1] for r in got]), want[1]) < 1e-12
    assert rel(torch.cat([r[2] for r in got]), want[2]) < 1e-12


def test_dp_group_without_a_process_group_says_so():
    import torch.distributed as dist

    assert not dist.is_initialized()
    logits, target = make(n=4, v=5)
    with pytest.raises(RuntimeError, match="dp_group needs an initialized"):
        memft_loss(logits, target, dp_group=object())
    with pytest.raises(RuntimeError, match="dp_group needs an initialized"):
        memft_linear_loss(torch.randn(4, 3), torch.randn(5, 3), target, dp_group=object())
    # dp_group has no effect on "sum" (nothing to sum over the group): no process group needed.
    assert rel(memft_loss(logits, target, reduction="sum", dp_group=object()),
               memft_loss(logits, target, reduction="sum")) == 0.0
