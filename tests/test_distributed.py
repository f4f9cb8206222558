"""vocab_parallel_memft_loss against single-process memft_loss on the gathered logits.

Two layers:

* in this process, the pure pieces (per-slice statistics, their combination, the slice backward)
  over many simulated vocabulary splits, with hypothesis: cheap, and where the math is checked;
* real multi-process runs (torch.multiprocessing spawn, gloo on CPU, 2, 3 and 4 ranks). Process
  start-up dominates their cost, so each world size is ONE spawn that runs every case of its plan in
  a row (normal cases, then cases that must raise on every rank, then a normal case again to show the
  group still works) and saves its results; the tests below read those results. The join has a
  timeout, so a hang fails the test instead of hanging CI. The 4-rank run ends with a failure in
  one data-parallel replica's tensor-parallel group (both nestings, both vocab-parallel functions,
  the DTensor routes with a dp_group), which must raise on every rank of both groups.

Inputs are fresh random numbers from fixed seeds; float64 cases compare tightly (the reference is
float64 there too), float32 and bfloat16 cases within their dtype's tolerance.
"""
from __future__ import annotations

import faulthandler
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from memft_kernels import dispatch, memft_loss
from memft_kernels.distributed import (
    check_layout,
    combine_slices,
    slice_options,
    slice_row_stats,
    slice_target,
    vocab_parallel_memft_loss,
)
from memft_kernels.ops import reference
from memft_kernels.spec import KernelOptions

from helpers import free_port, init_gloo_rank, rank_results, spawn_ranks

STAT_FIELDS = ("ce", "prob", "lse", "weight", "pred", "n_valid", "n_active", "weight_sum", "fell_back",
               "recalled_frac", "token_accuracy")


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-6)
    return dict(rtol=2e-2, atol=1e-4)  # bfloat16 gradients: one rounding step of the input dtype


# ---------------------------------------------------------------------------------------------
# Inputs, shared by this process and the spawned ranks (rebuilt from the case description)
# ---------------------------------------------------------------------------------------------


def make_inputs(case: dict, part: int = 0):
    """Full logits, target, token_weight, upstream gradient of one case (``part``: data-parallel
    shard, different rows). Every process builds the same tensors from the same seed."""
    g = torch.Generator().manual_seed(case["seed"] * 101 + part)
    shape = case.get("shape", (3, 5))
    widths = case["widths"]
    v = sum(widths)
    x = torch.randn(*shape, v, generator=g, dtype=torch.float64) * case.get("scale", 2.0)
    y = torch.randint(0, v, shape, generator=g)
    flat_x, flat_y = x.view(-1, v), y.view(-1)
    n = flat_y.numel()
    kind = case.get("kind", "random")
    if kind == "ties":
        # Equal maxima across every shard boundary and inside a shard; some rows aim at the tie.
        bounds = [sum(widths[:r]) for r in range(1, len(widths))]
        for i in range(n):
            b = bounds[i % len(bounds)]
            flat_x[i, b - 1] = flat_x[i, b] = flat_x[i].max() + 1.0 + (i % 3)
            if i % 4 == 0:
                flat_x[i, -1] = flat_x[i, b]  # also tied with the very last class
            if i % 2 == 0:
                flat_y[i] = b if i % 3 else b - 1
    elif kind == "confident":
        # Every target far above the rest: p > 0.5 everywhere, so "hard" weighs nothing (fallback).
        flat_x[torch.arange(n), flat_y] += 12.0
    elif kind == "nan":
        flat_x[1, v - 1] = math.nan  # a NaN in the last shard: the row's loss is NaN everywhere
    ignore_index = case.get("options", {}).get("ignore_index", -100)
    if case.get("ignore") == "all":
        flat_y[:] = ignore_index
    elif case.get("ignore"):
        flat_y[::3] = ignore_index
    if case.get("out_of_range"):
        flat_y[2] = v + 3
    token_weight = None
    if case.get("token_weight"):
        token_weight = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0
        token_weight.view(-1)[4] = 0.0
    reduction = case.get("options", {}).get("reduction", "mean")
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(0.75)
    dtype = case.get("dtype", torch.float64)
    return x.to(dtype), y, token_weight, grad_out


def single_process(case: dict, parts: int = 1, device: str = "cpu"):
    """memft_loss on the gathered logits (rows of ``parts`` data-parallel shards concatenated),
    results on the CPU. On the CPU it runs the reference backend, the source of truth; on a GPU the
    default backend (Triton)."""
    inputs = [make_inputs(case, p) for p in range(parts)]
    x = torch.cat([i[0] for i in inputs]).to(device).requires_grad_(True)
    y = torch.cat([i[1] for i in inputs]).to(device)
    tw = None if inputs[0][2] is None else torch.cat([i[2] for i in inputs]).to(device)
    opts = dict(case.get("options", {}), backend="torch" if device == "cpu" else "auto")
    loss, stats = memft_loss(x, y, token_weight=tw, return_stats=True, **opts)
    grad_out = torch.cat([i[3].reshape(-1) for i in inputs]).reshape(loss.shape) if loss.dim() else inputs[0][3]
    loss.backward(grad_out.to(device=device, dtype=loss.dtype))
    return loss.detach().cpu(), {k: v.cpu() for k, v in stats.as_dict().items()}, x.grad.cpu()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN positions must agree and are left out)."""
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ"
    keep = ~torch.isnan(ref)
    return float((out[keep] - ref[keep]).norm() / ref[keep].norm().clamp_min(1e-300))


# Norm-relative gradient error allowed per dtype. float64: memft_loss's fused path forms its 1/D
# scale in float32, so its float64 gradient carries one float32 rounding (about 6e-8 relative).
GRAD_REL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------
# In-process: the pure pieces over simulated splits
# ---------------------------------------------------------------------------------------------


def simulate(x, y, widths, opts: KernelOptions, token_weight=None, coef=None, module=reference):
    """What the ranks compute, one slice after the other in this process: (RowStats, grad).
    ``module``: the backend whose row kernels serve the slices."""
    v = x.shape[-1]
    starts = [sum(widths[:r]) for r in range(len(widths))]
    parts = torch.stack([slice_row_stats(x[:, s:s + w], y, s, opts, module) for s, w in zip(starts, widths)])
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = combine_slices(parts, y, token_weight, opts, v, dt)
    if coef is None:
        return stats, None
    local_opts = slice_options(opts, v)
    grads = []
    for s, w in zip(starts, widths):
        local_y = slice_target(y, s, w, v, opts.ignore_index)
        grads.append(module.row_backward(x[:, s:s + w].contiguous(), local_y, stats.lse, coef, local_opts))
    return stats, torch.cat(grads, dim=1)


@st.composite
def split_cases(draw):
    widths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    n = draw(st.integers(1, 12))
    opts = KernelOptions(
        policy=draw(st.sampled_from(["none", "hard", "sigmoid"])),
        threshold=draw(st.sampled_from([0.5, 0.25])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, 3.0])),
    )
    return widths, n, opts, draw(st.integers(0, 2**16)), draw(st.booleans())


@given(split_cases())
def test_simulated_slices_equal_reference(case):
    widths, n, opts, seed, tie = case
    g = torch.Generator().manual_seed(seed)
    v = sum(widths)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3.0
    if tie:  # a shared maximum at the first and last class (different slices when there are several)
        x[:, 0] = x[:, -1] = x.max() + 1.0
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = opts.ignore_index
    tw = torch.rand(n, generator=g, dtype=torch.float64)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    coef[::5] = 0.0
    coef[y == opts.ignore_index] = 0.0  # as the reduction makes it
    ref = reference.row_forward(x, y, tw, opts)
    stats, grad = simulate(x, y, widths, opts, tw, coef)
    for name in ("lse", "ce", "prob", "weight", "loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(stats.pred, ref.pred)
    ref_grad = reference.row_backward(x, y, ref.lse, coef, opts)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_simulated_nan_and_out_of_range_rows_follow_the_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64)
    x[1, 9] = math.nan
    x[2, 4] = x[2, 7] = math.nan  # two NaNs in different slices: pred is the first one
    y = torch.randint(0, 11, (6,), generator=g)
    y[3] = 14  # out of range (validate=False): NaN loss and NaN gradient row
    opts = KernelOptions(policy="hard", label_smoothing=0.1)
    coef = torch.ones(6, dtype=torch.float64)
    stats, grad = simulate(x, y, [5, 6], opts, None, coef)
    ref = reference.row_forward(x, y, None, opts)
    for name in ("lse", "ce", "prob", "weight", "loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name), equal_nan=True, msg=name)
    assert torch.equal(stats.pred, ref.pred) and stats.pred[2] == 4
    torch.testing.assert_close(grad, reference.row_backward(x, y, ref.lse, coef, opts), equal_nan=True)
    assert torch.isnan(grad[3]).all() and torch.isnan(grad[1]).all()


def test_float32_slices_stay_within_float32_rounding():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 300, generator=g) * 4).to(torch.float32)
    y = torch.randint(0, 300, (64,), generator=g)
    opts = KernelOptions(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    coef = torch.rand(64, generator=g)
    stats, grad = simulate(x, y, [100, 77, 123], opts, None, coef)
    ref = reference.row_forward(x, y, None, opts)
    for name in ("lse", "ce", "prob", "weight", "loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name), **_tol(torch.float32), msg=name)
    torch.testing.assert_close(grad, reference.row_backward(x, y, ref.lse, coef, opts), **_tol(torch.float32))


@pytest.mark.parametrize("name", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [
    KernelOptions(policy="sigmoid", z_loss=1e-2, softcap=6.0),
    KernelOptions(policy="hard", threshold=0.25, label_smoothing=0.1),
], ids=["backend_backward", "smoothing"])
def test_backend_kernels_on_slices(name, dtype, opts):
    """A compiled backend's row kernels serve the slices: row_forward with every row made valid
    (slice lse and pred), row_backward with the slice target codes (not owned: no target term;
    outside [0, V): NaN row). Together they give memft_loss's rows and gradient."""
    reason = dispatch.availability(name)
    if reason is not None:
        pytest.skip(reason)
    module = dispatch.resolve(name, torch.empty(1, 1, dtype=dtype))
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(9, 40, generator=g) * 3).to(dtype)
    x[:, 16] = x[:, 17] = x.max() + 1  # a tie across the first boundary
    x[5, 30] = math.nan  # a NaN in the last slice
    y = torch.randint(0, 40, (9,), generator=g)
    y[0], y[4] = -100, 43  # ignored; out of range (validate=False)
    coef = torch.rand(9, generator=g)
    coef[0] = coef[6] = 0.0  # an ignored row always has coef 0; so may a valid one
    stats, grad = simulate(x, y, [17, 4, 19], opts, None, coef, module=module)
    ref = reference.row_forward(x, y, None, opts)
    for field in ("lse", "ce", "prob", "weight", "loss"):
        torch.testing.assert_close(getattr(stats, field), getattr(ref, field), equal_nan=True,
                                   **_tol(torch.float32), msg=field)
    assert torch.equal(stats.pred, ref.pred)
    want = reference.row_backward(x, y, ref.lse, coef, opts)
    torch.testing.assert_close(grad.float(), want.float(), equal_nan=True, **_tol(dtype))
    assert torch.isnan(grad[4]).all() and torch.isnan(grad[5]).all()
    assert (grad[6] == 0).all() and (grad[0] == 0).all()


def _record(v_local=4, start=None, numel=6, target=11, weight=None, options=7, error=0):
    return [error, v_local, int(start is not None), start or 0, numel, 99, target, int(weight is not None),
            weight or 0, options]


def test_check_layout_accepts_tilings_and_names_every_problem():
    assert check_layout([_record(3), _record(5), _record(2)], 1) == (3, 10, [0, 3, 8])
    assert check_layout([_record(3, 0), _record(5, 3)], 1).vocab_start == 3
    cases = [
        ([_record(3, 0), _record(5, 4)], "do not tile [0, V) in rank order: rank 1 starts at 4"),
        ([_record(3, 1), _record(5, 4)], "rank 0 starts at 1"),
        ([_record(3, 0), _record(5, 2)], "rank 1 starts at 2 but the slices before it end at 3"),
        ([_record(3, 0), _record(5)], "vocab_start must be given on every rank or on none"),
        ([_record(3), _record(5, numel=7)], "same shape on every rank"),
        ([_record(3), _record(5, target=12)], "target differs across ranks"),
        ([_record(3), _record(5, weight=4)], "token_weight differs"),
        ([_record(3, weight=4), _record(5, weight=5)], "token_weight differs"),
        ([_record(3), _record(5, options=8)], "options differ"),
        ([_record(3), _record(error=1)], "rank(s) [1] of the group rejected their inputs"),
    ]
    for records, message in cases:
        for rank in range(len(records)):
            with pytest.raises(ValueError) as info:
                check_layout(records, rank)
            assert message in str(info.value)
    with pytest.raises(TypeError, match="own"):
        check_layout([_record(3), _record(error=1)], 1, TypeError("own"))


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_memft_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_one_rank_group_audit_regressions():
    """In this process, a one-rank gloo group: no double backward (was: a gradient penalty silently
    without this term), an nn.Parameter refused for inplace_backward (was: overwritten by its own
    gradient), uint8 targets as memft_loss takes them."""
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x = torch.randn(5, 9, requires_grad=True)
        y = torch.randint(0, 9, (5,))
        (g,) = torch.autograd.grad(vocab_parallel_memft_loss(x, y, policy="none"), x, create_graph=True)
        assert rel_err(g, torch.autograd.grad(memft_loss(x, y, policy="none"), x)[0]) < 1e-6
        with pytest.raises(RuntimeError, match="no second derivative"):
            (g.pow(2).sum() + x.sum()).backward()
        with pytest.raises(ValueError, match="nn.Parameter"):
            vocab_parallel_memft_loss(torch.nn.Parameter(x.detach().clone()), y, inplace_backward=True)
        got = vocab_parallel_memft_loss(x, y.to(torch.uint8))
        assert rel_err(got, memft_loss(x, y)) < 1e-6
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Spawned run: the plan. ONE spawn of 4 gloo ranks runs every case; the process groups used:
#   "pair": {0, 1} and {2, 3} (two 2-rank groups running the same cases at the same time),
#   "trio": {0, 1, 2} (a 3-rank group; rank 3 sits out),
#   "world": all 4 ranks with group=None,
#   "mesh": tensor-parallel {0, 1}, {2, 3} x data-parallel {0, 2}, {1, 3} (different rows per dp rank).
# ---------------------------------------------------------------------------------------------

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
WORLD = 4
WIDTHS = {"pair": [7, 12], "trio": [5, 11, 4], "world": [3, 6, 1, 5], "mesh": [9, 3]}


def _gate(target, stats):
    """A weight_fn of the global statistics: wrong greedy predictions count 4x."""
    return torch.where(stats.pred == target, 0.5, 2.0) * (1.5 - stats.prob)


def _cases(layout):
    """Cases compared against single-process memft_loss, for one layout."""
    w = WIDTHS[layout]
    cases = [
        dict(name="none", seed=1, options=dict(policy="none")),
        dict(name="hard_active", seed=2, ignore=True, options=dict(policy="hard")),
        dict(name="hard_threshold", seed=3, scale=4.0, options=dict(policy="hard", threshold=0.25)),
        dict(name="sigmoid_sum", seed=4, ignore=True, options=dict(policy="sigmoid", reduction="sum")),
        dict(name="sigmoid_none_rows", seed=5, shape=(2, 3, 4), ignore=True,
             options=dict(policy="sigmoid", sharpness=4.0, reduction="none")),
        dict(name="valid_smooth_z_cap", seed=6, ignore=True, token_weight=True,
             options=dict(policy="hard", normalize="valid", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
        dict(name="denominator", seed=7, options=dict(policy="sigmoid", denominator=37.0, label_smoothing=0.2)),
        dict(name="denominator_tensor", seed=29, ignore=True,
             options=dict(policy="hard", denominator=torch.tensor(9.0))),
        dict(name="ignore_index_0", seed=8, ignore=True, options=dict(policy="hard", ignore_index=0)),
        dict(name="ties", seed=9, kind="ties", shape=(4, 4), options=dict(policy="sigmoid")),
        dict(name="ties_softcap", seed=10, kind="ties", shape=(4, 4),
             options=dict(policy="none", softcap=2.5, label_smoothing=0.1)),
        dict(name="fallback_mean", seed=11, kind="confident", ignore=True, options=dict(policy="hard")),
        dict(name="fallback_zero", seed=12, kind="confident", options=dict(policy="hard", fallback="zero")),
        dict(name="all_ignored", seed=13, shape=(2,), ignore="all", options=dict(policy="hard")),
        dict(name="zero_rows", seed=27, shape=(0, 3), options=dict(policy="hard")),
        dict(name="nan_row", seed=14, kind="nan", options=dict(policy="hard")),
        dict(name="out_of_range_unvalidated", seed=15, out_of_range=True, options=dict(policy="none", validate=False)),
        dict(name="float32", seed=16, dtype=F32, shape=(4, 8), ignore=True, token_weight=True,
             options=dict(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
        dict(name="bfloat16", seed=17, dtype=BF16, shape=(4, 8), options=dict(policy="none", z_loss=1e-3)),
        dict(name="inplace_backward", seed=18, options=dict(policy="sigmoid", inplace_backward=True)),
        dict(name="explicit_vocab_start", seed=19, explicit_start=True, options=dict(policy="hard")),
        dict(name="strided_view", seed=28, view=True, options=dict(policy="sigmoid", z_loss=1e-2)),
        dict(name="weight_fn", seed=30, ignore=True, token_weight=True,
             options=dict(policy="sigmoid", normalize="valid", weight_fn=_gate)),
    ]
    if layout == "world":
        cases = [c for c in cases if c["name"] in ("none", "ties", "valid_smooth_z_cap", "explicit_vocab_start")]
    if layout == "mesh":
        cases = [c for c in cases if c["name"] in ("hard_active", "fallback_mean", "fallback_zero", "sigmoid_sum")]
        cases.append(dict(name="valid_smooth", seed=32, ignore=True,
                          options=dict(policy="sigmoid", normalize="valid", label_smoothing=0.1)))
    return [dict(c, layout=layout, widths=w) for c in cases]


def _error_cases(layout):
    """Cases that must raise on every rank of the group (ValueError unless the rank had a local error)."""
    w = WIDTHS[layout]
    last = len(w) - 1
    gap = [sum(w[:r]) + (1 if r else 0) for r in range(len(w))]
    cases = [
        dict(name="err_gap", seed=20, starts=gap, raises="do not tile [0, V)"),
        dict(name="err_start_some_ranks", seed=21, starts_on=[0], raises="on every rank or on none"),
        dict(name="err_target_value", seed=22, perturb="target_value", raises="target differs"),
        dict(name="err_target_shape", seed=23, perturb="target_shape", raises="same shape"),
        dict(name="err_options", seed=24, perturb="options", raises="options differ"),
        dict(name="err_local_type", seed=25, perturb="int_logits", raises="rejected their inputs",
             local_error=(last, "TypeError")),
        dict(name="err_target_range", seed=26, perturb="target_range", raises="outside [0, V)"),
    ]
    if layout == "world":
        cases = cases[:1] + cases[3:4]
    return [dict(c, layout=layout, widths=w) for c in cases]


def _plan():
    plan = []
    for layout in ("pair", "trio", "world"):
        plan += _cases(layout) + _error_cases(layout)
        # Once a case raised on every rank, the groups must still work.
        plan.append(dict(_cases(layout)[1], name="after_errors"))
    plan += _cases("mesh")
    return plan


def _case(layout, name):
    return next(c for c in _plan() if c["layout"] == layout and c["name"] == name)


# ---------------------------------------------------------------------------------------------
# Spawned run: the worker (runs in each rank's process)
# ---------------------------------------------------------------------------------------------


def _placement(layout, rank, groups):
    """(group, rank in the group, data-parallel part, dp_group), or None when the rank sits out."""
    if layout == "pair":
        return groups["pair"][rank // 2], rank % 2, 0, None
    if layout == "trio":
        return None if rank == 3 else (groups["trio"], rank, 0, None)
    if layout == "world":
        return None, rank, 0, None
    return groups["pair"][rank // 2], rank % 2, rank // 2, groups["dp"][rank % 2]  # mesh


def _run_case(case, rank, groups):
    placement = _placement(case["layout"], rank, groups)
    if placement is None:
        return None
    group, tp_rank, part, dp_group = placement
    widths = case["widths"]
    x, y, tw, grad_out = make_inputs(case, part)
    start = sum(widths[:tp_rank])
    local = x[..., start:start + widths[tp_rank]]  # a view with the full row stride
    local = local if case.get("view") else local.clone()
    # The reference backend for the slice work: the compiled backends' custom ops import
    # torch._dynamo on first use, seconds of start-up in every rank (and the one crash seen in these
    # runs, a segfault during that import on an overloaded machine). Their row kernels on slices are
    # tested in this process (test_backend_kernels_on_slices) and on the GPU below.
    opts = dict(case.get("options", {}), backend="torch")
    if case.get("explicit_start") or tp_rank in case.get("starts_on", []):
        opts["vocab_start"] = start
    if "starts" in case:
        opts["vocab_start"] = case["starts"][tp_rank]
    perturb = case.get("perturb") if tp_rank == len(widths) - 1 else None
    if perturb == "target_value":
        y = y.clone()
        y.view(-1)[3] = (y.view(-1)[3] + 1) % sum(widths)
    elif perturb == "target_shape":
        y, local = y[:-1], local[:-1]
    elif perturb == "options":
        opts["policy"] = "sigmoid"
    elif perturb == "int_logits":
        local = local.long()
    if case.get("perturb") == "target_range":  # on every rank
        y = y.clone()
        y.view(-1)[0] = sum(widths)
    local = local.requires_grad_(local.is_floating_point())
    try:
        loss, stats = vocab_parallel_memft_loss(local, y, group=group, dp_group=dp_group, token_weight=tw,
                                                return_stats=True, **opts)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return dict(error=(type(exc).__name__, str(exc)))
    loss.backward(grad_out.to(loss.dtype))
    return dict(loss=loss.detach(), stats=stats.as_dict(), grad=local.grad, part=part)


def _worker(rank, world, port, outdir):
    init_gloo_rank(rank, world, port)
    try:
        # Every rank creates every group, in the same order.
        groups = dict(
            pair=[dist.new_group([0, 1]), dist.new_group([2, 3])],
            trio=dist.new_group([0, 1, 2]),
            dp=[dist.new_group([0, 2]), dist.new_group([1, 3])],
        )
        made = _dpf_groups(rank, world)
        results = {(c["layout"], c["name"]): _run_case(c, rank, groups) for c in _plan()}
        results["dp_failures"] = _dpf_phase(rank, made)
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(outdir, timeout_s=150.0):
    spawn_ranks(_worker, WORLD, (WORLD, free_port(), str(outdir)), timeout_s, f"the {WORLD}-rank run")
    return rank_results(outdir, WORLD)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Every rank's results of the one spawned run, keyed by (layout, case name)."""
    return _spawn(tmp_path_factory.mktemp("vocab_parallel"))


# ---------------------------------------------------------------------------------------------
# Spawned run: the checks
# ---------------------------------------------------------------------------------------------


def _check_against_single_process(case, rank_results, parts=1):
    """Every rank's loss and stats equal memft_loss on the gathered logits; the gradient slices,
    concatenated in rank order, equal its gradient."""
    dtype = case.get("dtype", torch.float64)
    tol = _tol(dtype)
    grad_tol = dict(rtol=GRAD_REL[dtype], atol=1e-12) if dtype == torch.float64 else tol
    ref_loss, ref_stats, ref_grad = single_process(case, parts)
    if parts > 1:  # data parallel: the global loss is the sum over the dp ranks' losses
        by_part = [[r for r in rank_results if r["part"] == p] for p in range(parts)]
        total = sum(group[0]["loss"] for group in by_part)
        torch.testing.assert_close(total, ref_loss, **tol)
        grads = [torch.cat([r["grad"] for r in group], dim=-1) for group in by_part]
        torch.testing.assert_close(torch.cat(grads), ref_grad, **grad_tol)
        assert rel_err(torch.cat(grads), ref_grad) < GRAD_REL[dtype]
        for res in rank_results:
            assert torch.equal(res["stats"]["fell_back"], ref_stats["fell_back"])
        return
    first = rank_results[0]
    for res in rank_results:
        assert torch.equal(res["loss"], first["loss"]) or torch.isnan(first["loss"]).any(), "ranks disagree"
        assert res["loss"].dtype == ref_loss.dtype
        torch.testing.assert_close(res["loss"], ref_loss, equal_nan=True, **tol)
        for name in STAT_FIELDS:
            got, want = res["stats"][name], ref_stats[name]
            if want.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, want), name
            else:
                torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=name)
    grad = torch.cat([r["grad"] for r in rank_results], dim=-1)
    assert grad.dtype == ref_grad.dtype
    torch.testing.assert_close(grad, ref_grad, equal_nan=True, **grad_tol)
    if ref_grad.numel() and ref_grad.abs().nan_to_num().sum() > 0:
        assert rel_err(grad, ref_grad) < GRAD_REL[dtype]


def _members(layout):
    return {"pair": [[0, 1], [2, 3]], "trio": [[0, 1, 2]], "world": [[0, 1, 2, 3]]}[layout]


@pytest.mark.parametrize("layout,case_name", [
    (layout, c["name"]) for layout in ("pair", "trio", "world") for c in _cases(layout)
] + [(layout, "after_errors") for layout in ("pair", "trio", "world")])
def test_spawned_equals_single_process(spawned, layout, case_name):
    case = _case(layout, case_name)
    for ranks in _members(layout):
        _check_against_single_process(case, [spawned[r][(layout, case_name)] for r in ranks])
    if layout == "trio":
        assert spawned[3][(layout, case_name)] is None


@pytest.mark.parametrize("layout,case_name", [
    (layout, c["name"]) for layout in ("pair", "trio", "world") for c in _error_cases(layout)
])
def test_spawned_bad_input_raises_on_every_rank(spawned, layout, case_name):
    case = _case(layout, case_name)
    last = len(case["widths"]) - 1
    for ranks in _members(layout):
        for tp_rank, rank in enumerate(ranks):
            res = spawned[rank][(layout, case_name)]
            assert res is not None and "error" in res, f"rank {rank} did not raise"
            kind, message = res["error"]
            if "local_error" in case and tp_rank == last:
                assert kind == case["local_error"][1], message
            else:
                assert kind == "ValueError" and case["raises"] in message, f"rank {rank}: {kind}: {message}"


@pytest.mark.parametrize("case_name", [c["name"] for c in _cases("mesh")])
def test_spawned_tensor_and_data_parallel_mesh(spawned, case_name):
    case = _case("mesh", case_name)
    rank_results = [spawned[r][("mesh", case_name)] for r in range(WORLD)]
    for a, b in ((0, 1), (2, 3)):  # inside a tensor-parallel group the ranks agree exactly
        assert torch.equal(rank_results[a]["loss"], rank_results[b]["loss"])
    _check_against_single_process(case, rank_results, parts=2)


# ---------------------------------------------------------------------------------------------
# The spawned run's last phase: a failure inside ONE data-parallel replica's tensor-parallel group.
# 4 ranks = 2 dp replicas x 2 TP ranks, both nestings ("dp_outer": TP {0, 1}, {2, 3}, dp {0, 2}, {1, 3}; "tp_outer":
# TP {0, 2}, {1, 3}, dp {0, 1}, {2, 3}); replica 0's inputs are bad, replica 1's fine. Called
# directly with group and dp_group (both functions), and through the DTensor routes with a dp_group
# of one's own (logits / weight sharded on the "tp" mesh dimension; sequence-parallel hidden). Every
# case has fresh dp groups with a short timeout: on the old code replica 1 waited in the dp
# all_reduce until that timeout (a gloo error there; the run then overran its join timeout).
# ---------------------------------------------------------------------------------------------

DPF_TIMEOUT_S = 20.0
DPF_V, DPF_WIDTHS, DPF_D = 11, [5, 6], 8
DPF_LAYOUTS = {"dp_outer": ([[0, 1], [2, 3]], [[0, 2], [1, 3]]), "tp_outer": ([[0, 2], [1, 3]], [[0, 1], [2, 3]])}
# (function, what is bad on replica 0, validate); "range": an out-of-range target (both TP ranks);
# "local": a bad tensor on TP rank 0 only (integer logits / hidden; next to a sequence-parallel
# DTensor hidden a token_weight of the wrong shape); "layout": the target differs on TP rank 1 only.
DPF_CASES = {
    "loss_range": ("loss", "range", True),
    "loss_local": ("loss", "local", True),
    "loss_layout": ("loss", "layout", True),
    "loss_local_no_validate": ("loss", "local", False),
    "linear_range": ("linear", "range", True),
    "linear_local": ("linear", "local", True),
    "linear_layout_no_validate": ("linear", "layout", False),
    "dtensor_logits_range": ("dtensor_logits", "range", True),
    "dtensor_weight_range": ("dtensor_weight", "range", True),
    "dtensor_sequence_parallel_range": ("dtensor_sp", "range", True),
    "dtensor_sequence_parallel_local_no_validate": ("dtensor_sp", "local", False),
}
DPF_BOTH = ("linear_local",)  # run again with both replicas bad: each rank raises its own error
DPF_GOOD = ("loss", "linear")  # then a good call of each function with the same dp groups


def _dpf_inputs(replica: int):
    """hidden [2, 3, D], weight [V, D], target [2, 3] of one replica (the head is shared)."""
    g = torch.Generator().manual_seed(61)
    weight = torch.randn(DPF_V, DPF_D, generator=g, dtype=torch.float64) * 0.7
    g = torch.Generator().manual_seed(62 + replica)
    hidden = torch.randn(2, 3, DPF_D, generator=g, dtype=torch.float64)
    target = torch.randint(0, DPF_V, (2, 3), generator=g)
    return hidden, weight, target


def _dpf_call(kind, bad, validate, tp_rank, group, dp_group, mesh, replica, widths=DPF_WIDTHS):
    """One call on this rank: ("ok", loss, (gradients)) or ("error", type name, message)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from memft_kernels import memft_linear_loss
    from memft_kernels.vocab_parallel_linear import vocab_parallel_memft_linear_loss

    hidden, weight, target = _dpf_inputs(replica)
    lo = sum(widths[:tp_rank])
    rows = slice(lo, lo + widths[tp_rank])
    if bad == "range":
        target[0, 1] = DPF_V
    elif bad == "layout" and tp_rank == 1:
        target[1, 2] = (target[1, 2] + 1) % DPF_V
    local_bad = bad == "local" and tp_rank == 0
    opts = dict(policy="sigmoid", threshold=0.4, validate=validate, dp_group=dp_group, backend="torch")
    try:
        if kind in ("loss", "linear"):
            h = (hidden.long() if local_bad and kind == "linear" else hidden).clone()
            h.requires_grad_(h.is_floating_point())
            w = weight[rows].clone().requires_grad_()
            if kind == "loss":
                x = (hidden @ weight[rows].T).detach()
                x = (x.long() if local_bad else x).requires_grad_(not local_bad)
                loss = vocab_parallel_memft_loss(x, target, group=group, **opts)
                loss.backward()
                return ("ok", loss.detach(), (x.grad,))
            loss = vocab_parallel_memft_linear_loss(h, w, target, group=group, chunk_size=4, **opts)
            loss.backward()
            return ("ok", loss.detach(), (h.grad, w.grad))
        tp = mesh["tp"]
        dw = distribute_tensor(weight, tp, [Shard(0)]).requires_grad_()
        if kind == "dtensor_logits":
            dx = distribute_tensor((hidden @ weight.T).detach(), tp, [Shard(-1)]).requires_grad_()
            loss = memft_loss(dx, target, **opts)
            loss.backward(DTensor.from_local(torch.tensor(1.0, dtype=torch.float64), tp, [Replicate()],
                                             run_check=False))
            return ("ok", loss.to_local().detach(), (dx.grad.to_local(),))
        dh = distribute_tensor(hidden, tp, [Shard(1)]) if kind == "dtensor_sp" else hidden.clone()
        dh = dh.requires_grad_()
        tw = None
        if local_bad:  # a token_weight of the wrong shape on TP rank 0 only (the TP checks carry it)
            tw = torch.ones(5, dtype=torch.float64)
        loss = memft_linear_loss(dh, dw, target, token_weight=tw, chunk_size=4, **opts)
        loss.backward(DTensor.from_local(torch.tensor(1.0, dtype=torch.float64), tp, [Replicate()], run_check=False))
        gh = dh.grad.to_local() if kind == "dtensor_sp" else dh.grad
        return ("ok", loss.to_local().detach(), (gh, dw.grad.to_local()))
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return ("error", type(exc).__name__, str(exc))


def _dpf_groups(rank: int, world: int) -> dict:
    """Every mesh and group of the dp-failure phase, made at the start of the run, while the ranks are
    together (a group with a short timeout also gives up its creation after it); every rank makes
    every group, in the same order. Fresh dp groups per case: on the old code a timed-out case left
    its group broken."""
    from torch.distributed.device_mesh import init_device_mesh

    made, short = {}, timedelta(seconds=DPF_TIMEOUT_S)
    for layout, (tps, dps) in DPF_LAYOUTS.items():
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp") if layout == "dp_outer" else ("tp", "dp"))
        tp_groups = [dist.new_group(r) for r in tps]
        replica = next(i for i, r in enumerate(tps) if rank in r)
        tp_rank = tps[replica].index(rank)
        assert mesh.get_local_rank("tp") == tp_rank and mesh.get_local_rank("dp") == replica
        mine = next(i for i, r in enumerate(dps) if rank in r)
        names = list(DPF_CASES) + [name + "_both_replicas" for name in DPF_BOTH] + ["good"]
        dp = {name: [dist.new_group(r, timeout=short) for r in dps][mine] for name in names}
        made[layout] = dict(mesh=mesh, group=tp_groups[replica], replica=replica, tp_rank=tp_rank, dp=dp)
    made["own"] = [dist.new_group([r]) for r in range(world)][rank]
    made["only01"] = dist.new_group([0, 1], timeout=short)
    return made


def _dpf_phase(rank: int, made: dict) -> dict:
    """The dp-failure cases on this rank, then a good call of each function with collectives counted.
    A collective that timed out (a RuntimeError: what the old code gave, its replica 1 waiting in the
    dp all_reduce) stops the phase on this rank; the others then stop at their next collective with
    it, so the old code fails these tests within about two dp timeouts instead of hanging the run."""
    results, stopped = {}, []

    def record(key, call):
        if stopped:
            results[key] = ("error", "Stopped", stopped[0])
            return
        results[key] = got = call()
        if got[0] == "error" and got[1] == "RuntimeError":
            stopped.append(f"the phase stopped on this rank after {key}: {got[2][:300]}")

    for layout in DPF_LAYOUTS:
        m = made[layout]
        replica, tp_rank, group, mesh = m["replica"], m["tp_rank"], m["group"], m["mesh"]
        results[(layout, "where")] = (replica, tp_rank)
        for name, (kind, bad, validate) in DPF_CASES.items():
            record((layout, name), lambda: _dpf_call(kind, bad if replica == 0 else None, validate, tp_rank, group,
                                                     m["dp"][name], mesh, replica))
        for name in DPF_BOTH:
            kind, bad, validate = DPF_CASES[name]
            record((layout, name + "_both_replicas"), lambda: _dpf_call(
                kind, bad, validate, tp_rank, group, m["dp"][name + "_both_replicas"], mesh, replica))
        # The groups afterwards: a good call; collectives counted (nothing added by the fix).
        counted = {"all_reduce": 0, "all_gather": 0}
        real = {op: getattr(dist, op) for op in counted}

        def counting(op):
            def call(*args, **kwargs):
                counted[op] += 1
                return real[op](*args, **kwargs)
            return call

        for kind in DPF_GOOD:
            for op in counted:
                counted[op] = 0
                setattr(dist, op, counting(op))
            try:
                record((layout, "good_" + kind), lambda: _dpf_call(kind, None, True, tp_rank, group, m["dp"]["good"],
                                                                   mesh, replica))
            finally:
                for op in counted:
                    setattr(dist, op, real[op])
            results[(layout, "collectives_" + kind)] = dict(counted)
    # A dp_group this process is not a member of: refused by name, as memft_loss refuses it (was:
    # torch's bare "Invalid process group specified" from inside the all_reduce). One-rank TP groups
    # (the whole V); dp_group {0, 1}.
    record("not_member", lambda: _dpf_call("loss", None, True, 0, made["own"], made["only01"], None, rank,
                                           widths=[DPF_V]))
    return results


@pytest.fixture(scope="module")
def dp_failures(spawned):
    """Every rank's results of the dp-failure phase (run at the end of the one spawned run)."""
    return [r["dp_failures"] for r in spawned]


def _dpf_own_error(kind, bad, tp_rank):
    """(type, message part) the failing replica's rank raises."""
    if bad == "range":
        return "ValueError", f"target contains {DPF_V}, outside [0, V)"
    if bad == "layout":
        return "ValueError", "target differs across ranks of the group"
    if tp_rank == 0:  # the bad tensor is this rank's own
        if kind == "dtensor_sp":
            return "ValueError", "token_weight"
        return "TypeError", "must be floating point"
    if kind == "dtensor_sp":
        return "ValueError", "another rank of hidden's mesh failed its input checks"
    return "ValueError", "rank(s) [0] of the group rejected their inputs"


@pytest.mark.parametrize("layout", list(DPF_LAYOUTS))
@pytest.mark.parametrize("name", list(DPF_CASES))
def test_failure_in_one_dp_replicas_tp_group_raises_on_every_rank(dp_failures, layout, name):
    kind, bad, validate = DPF_CASES[name]
    for rank, res in enumerate(dp_failures):
        replica, tp_rank = res[(layout, "where")]
        got = res[(layout, name)]
        if replica == 0:  # its own error (or its TP group's), never a result
            want_type, want_part = _dpf_own_error(kind, bad, tp_rank)
            assert got[0] == "error" and got[1] == want_type and want_part in got[2], (rank, got)
        elif validate:  # the failure came through the dp all_reduce: never a hang, never a number
            assert got[0] == "error" and got[1] == "ValueError", (rank, got)
            assert "1 other rank(s) of dp_group failed before the loss's all_reduce" in got[2], (rank, got)
        else:  # validate=False reads nothing on the host: a NaN loss and NaN gradients
            assert got[0] == "ok", (rank, got)
            assert math.isnan(float(got[1])) and all(bool(torch.isnan(g).all()) for g in got[2]), (rank, got)


@pytest.mark.parametrize("layout", list(DPF_LAYOUTS))
@pytest.mark.parametrize("name", DPF_BOTH)
def test_failure_in_both_dp_replicas_raises_each_ranks_own_error(dp_failures, layout, name):
    kind, bad, _ = DPF_CASES[name]
    for rank, res in enumerate(dp_failures):
        _, tp_rank = res[(layout, "where")]
        got = res[(layout, name + "_both_replicas")]
        want_type, want_part = _dpf_own_error(kind, bad, tp_rank)
        assert got[0] == "error" and got[1] == want_type and want_part in got[2], (rank, got)


def _dpf_reference(kind):
    """memft_loss over both replicas' rows on the full float64 logits: loss and gradients."""
    parts = [_dpf_inputs(p) for p in range(2)]
    hidden = torch.cat([p[0] for p in parts]).requires_grad_()
    weight = parts[0][1].clone().requires_grad_()
    x = hidden @ weight.T
    if kind == "loss":
        x = x.detach().requires_grad_()
    loss = memft_loss(x, torch.cat([p[2] for p in parts]), policy="sigmoid", threshold=0.4, backend="torch")
    loss.backward()
    return loss.detach(), (x.grad,) if kind == "loss" else (hidden.grad, weight.grad)


@pytest.mark.parametrize("layout", list(DPF_LAYOUTS))
@pytest.mark.parametrize("kind", DPF_GOOD)
def test_groups_work_after_the_failures_with_no_added_collective(dp_failures, layout, kind):
    ref_loss, ref_grads = _dpf_reference(kind)
    by = {res[(layout, "where")]: res[(layout, "good_" + kind)] for res in dp_failures}
    assert all(r[0] == "ok" for r in by.values()), by
    for rep in range(2):
        assert torch.equal(by[(rep, 0)][1], by[(rep, 1)][1])  # the TP ranks agree exactly
    assert rel_err(by[(0, 0)][1] + by[(1, 0)][1], ref_loss) < 1e-12  # the dp shares sum to the global mean
    if kind == "loss":  # logits gradient: slices over TP, rows over dp
        got = torch.cat([torch.cat([by[(rep, t)][2][0] for t in range(2)], dim=-1) for rep in range(2)])
        assert rel_err(got, ref_grads[0]) < GRAD_REL[torch.float64]
    else:  # hidden's gradient whole on each TP rank; the weight's: slices over TP, summed over dp
        assert rel_err(torch.cat([by[(rep, 1)][2][0] for rep in range(2)]), ref_grads[0]) < 1e-10
        got_w = torch.cat([by[(0, t)][2][1] + by[(1, t)][2][1] for t in range(2)])
        assert rel_err(got_w, ref_grads[1]) < 1e-10
    for res in dp_failures:  # layout exchange + statistics over TP, ONE all_reduce over dp (+ hidden's in backward)
        assert res[(layout, "collectives_" + kind)] == {"all_reduce": 1 if kind == "loss" else 2, "all_gather": 2}


def test_dp_group_this_process_is_not_a_member_of_is_refused(dp_failures):
    for rank, res in enumerate(dp_failures):
        got = res["not_member"]
        if rank < 2:
            assert got[0] == "ok" and math.isfinite(float(got[1])), got
        else:
            assert got[0] == "error" and "not a member of dp_group" in got[2], got
    # ranks 0 and 1 summed their denominator over {0, 1}: their losses add up to the mean over both
    ref = memft_loss(torch.cat([_dpf_inputs(p)[0] @ _dpf_inputs(p)[1].T for p in range(2)]),
                     torch.cat([_dpf_inputs(p)[2] for p in range(2)]), policy="sigmoid", threshold=0.4,
                     backend="torch")
    assert rel_err(dp_failures[0]["not_member"][1] + dp_failures[1]["not_member"][1], ref) < 1e-12


# ---------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh): CUDA tensors, the Triton kernels on the slices, an nccl group.
# One spawn of 2 ranks sharing the GPU: a 2-rank gloo split (CUDA tensors, communicated through
# the CPU) and, on rank 0, a 1-rank nccl group holding the whole vocabulary.
# ---------------------------------------------------------------------------------------------

GPU_CASES = [
    dict(name="bf16_hard", seed=50, shape=(4, 64), widths=[16001, 16002], dtype=BF16, ignore=True,
         options=dict(policy="hard")),
    dict(name="f32_smooth_cap", seed=51, shape=(4, 64), widths=[16001, 16002], dtype=F32, token_weight=True,
         options=dict(policy="sigmoid", label_smoothing=0.1, softcap=30.0, z_loss=1e-4)),
    dict(name="bf16_rows", seed=52, shape=(4, 64), widths=[16001, 16002], dtype=BF16,
         options=dict(policy="sigmoid", reduction="none")),
]


def _gpu_case(case, tp_rank, group, device):
    x, y, tw, grad_out = make_inputs(case)
    widths = case["widths"]
    start = sum(widths[:tp_rank])
    local = x[..., start:start + widths[tp_rank]].to(device).requires_grad_(True)
    tw = None if tw is None else tw.to(device)
    loss, stats = vocab_parallel_memft_loss(local, y.to(device), group=group, token_weight=tw, return_stats=True,
                                            **case["options"])
    loss.backward(grad_out.to(device=device, dtype=loss.dtype))
    return dict(loss=loss.detach().cpu(), stats={k: v.cpu() for k, v in stats.as_dict().items()},
                grad=local.grad.cpu())


def _gpu_worker(rank, world, port, outdir, device, cases):
    faulthandler.enable()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        single = dist.new_group([0], backend="nccl" if device.startswith("cuda") else "gloo")
        results = {}
        for case in cases:
            results[("split", case["name"])] = _gpu_case(case, rank, None, device)
            if rank == 0:
                results[("single", case["name"])] = _gpu_case(dict(case, widths=[sum(case["widths"])]), 0, single,
                                                              device)
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gpu_run(outdir, cases, device="cuda:0", timeout_s=240.0):
    """Spawn the GPU plan; returns every rank's results (``device="cpu"`` dry-runs the plumbing)."""
    spawn_ranks(_gpu_worker, 2, (2, free_port(), str(outdir), device, cases), timeout_s, "the GPU run")
    return rank_results(outdir, 2)


def check_gpu_results(results, cases, device="cuda:0"):
    for case in cases:
        dtype = case["dtype"]
        ref_loss, ref_stats, ref_grad = single_process(case, device=device)
        runs = {"split": [results[0][("split", case["name"])], results[1][("split", case["name"])]],
                "single": [results[0][("single", case["name"])]]}
        for kind, per_rank in runs.items():
            where = f"{case['name']} ({kind})"
            for res in per_rank:
                assert rel_err(res["loss"], ref_loss) < 1e-5, where
                for name in ("ce", "prob", "lse", "weight"):
                    assert rel_err(res["stats"][name], ref_stats[name]) < 1e-5, f"{where}: {name}"
                for name in ("pred", "n_valid", "n_active", "fell_back"):
                    assert torch.equal(res["stats"][name], ref_stats[name]), f"{where}: {name}"
            grad = torch.cat([r["grad"] for r in per_rank], dim=-1)
            assert grad.dtype == ref_grad.dtype
            assert rel_err(grad, ref_grad) < GRAD_REL[dtype], where


@pytest.mark.gpu
def test_gpu_vocab_parallel_with_triton_slices(tmp_path):
    check_gpu_results(gpu_run(tmp_path, GPU_CASES), GPU_CASES)
