"""vocab_parallel_memft_linear_loss (and memft_linear_loss with a DTensor weight) against
single-process memft_linear_loss on the full weight.

ONE spawn of 4 gloo ranks (CPU) runs every case of the plan in a row and saves its results; the
tests read them (process start-up dominates the cost). Process groups used:
  "pair": {0, 1} and {2, 3} (two 2-rank groups running the same cases at the same time),
  "trio": {0, 1, 2} (rank 3 sits out),
  "mesh": tensor-parallel {0, 1}, {2, 3} x data-parallel {0, 2}, {1, 3} (different rows per dp rank),
  "dtensor": a (2, 2) DeviceMesh ("dp", "tp"), the weight a DTensor sharded Shard(0) on "tp".
Inputs are fresh random numbers from fixed seeds; the reference is memft_linear_loss in this
process on the full weight (backend "torch"). Compared: loss and statistics (the same bits on every
rank of a group), hidden's gradient (every rank), the weight / bias gradient slices concatenated in
rank order. Norm-relative errors: float64 < 1e-10, float32 < 2e-5.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from memft_kernels import memft_linear_loss
from memft_kernels.vocab_parallel_linear import vocab_parallel_memft_linear_loss

from helpers import LargestTensor, free_port, init_gloo_rank, rank_results, rel_err, spawn_ranks

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
WORLD = 4
D = 16
REL = {F64: 1e-10, F32: 2e-5, BF16: 2e-2, F16: 2e-2}  # half precision: the chunk logits' own rounding
STAT_FIELDS = ("ce", "prob", "lse", "weight", "pred", "n_valid", "n_active", "weight_sum", "fell_back",
               "recalled_frac", "token_accuracy")


def _gate(target, stats):
    """A weight_fn of the global statistics: wrong greedy predictions count 4x."""
    return torch.where(stats.pred == target, 0.5, 2.0) * (1.5 - stats.prob)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values bit for bit (NaN equal to NaN)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


# ---------------------------------------------------------------------------------------------
# Inputs (every process builds the same tensors from the same seed)
# ---------------------------------------------------------------------------------------------


def make_inputs(case: dict, part: int = 0):
    """hidden, full weight, full bias (or None), target, token_weight, upstream gradient. The head
    (weight, bias) depends on the seed only; ``part`` (a data-parallel shard) changes the rows."""
    g = torch.Generator().manual_seed(case["seed"])
    v = sum(case["widths"])
    weight = torch.randn(v, D, generator=g, dtype=F64) * 0.5
    bias = torch.randn(v, generator=g, dtype=F64) * 0.3 if case.get("bias", True) else None
    g = torch.Generator().manual_seed(case["seed"] * 101 + part)
    shape = case.get("shape", (3, 5))
    target = torch.randint(0, v, shape, generator=g)
    hidden = torch.randn(*shape, D, generator=g, dtype=F64) * case.get("scale", 1.0)
    if case.get("kind") == "confident":  # every target far ahead: "hard" weighs nothing (the fallback)
        hidden = hidden * 0.1 + 8.0 * weight[target]
    ignore_index = case.get("options", {}).get("ignore_index", -100)
    if case.get("ignore"):
        target.view(-1)[::3] = ignore_index
    if case.get("out_of_range"):  # validate=False: a NaN row, as memft_linear_loss gives
        target.view(-1)[2] = v + 3
    token_weight = None
    if case.get("token_weight"):
        token_weight = torch.rand(shape, generator=g, dtype=F64) * 2.0
        token_weight.view(-1)[4] = 0.0
    reduction = case.get("options", {}).get("reduction", "mean")
    grad_out = torch.randn(shape, generator=g, dtype=F64) if reduction == "none" else torch.tensor(0.75, dtype=F64)
    grad_out = grad_out * case.get("grad_scale", 1.0)
    dtype = case.get("dtype", F64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias), target, cast(token_weight), grad_out


def _options(case):
    return dict(case.get("options", {}), backend="torch", chunk_size=case.get("chunk", 4))


def single_process(case: dict, parts: int = 1):
    """memft_linear_loss on the full weight (rows of ``parts`` dp shards concatenated)."""
    inputs = [make_inputs(case, p) for p in range(parts)]
    hidden = torch.cat([i[0] for i in inputs]).requires_grad_(True)
    weight = inputs[0][1].clone().requires_grad_(case.get("weight_grad", True))
    bias = None if inputs[0][2] is None else inputs[0][2].clone().requires_grad_(True)
    target = torch.cat([i[3] for i in inputs])
    tw = None if inputs[0][4] is None else torch.cat([i[4] for i in inputs])
    loss, stats = memft_linear_loss(hidden, weight, target, bias, token_weight=tw, return_stats=True,
                                    **_options(case))
    grad_out = torch.cat([i[5].reshape(-1) for i in inputs]).reshape(loss.shape) if loss.dim() else inputs[0][5]
    loss.backward(grad_out.to(loss.dtype))
    return dict(loss=loss.detach(), stats=stats.as_dict(), grad_h=hidden.grad,
                grad_w=weight.grad, grad_b=None if bias is None else bias.grad)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

WIDTHS = {"pair": [7, 12], "trio": [5, 11, 4], "mesh": [9, 3], "dtensor": [10, 9]}


def _cases(layout):
    w = WIDTHS[layout]
    cases = [
        dict(name="none", seed=1, options=dict(policy="none")),
        dict(name="hard_active", seed=2, ignore=True, options=dict(policy="hard")),
        dict(name="hard_threshold", seed=3, scale=2.0, chunk=6, options=dict(policy="hard", threshold=0.25)),
        dict(name="sigmoid_sum", seed=4, ignore=True, options=dict(policy="sigmoid", reduction="sum")),
        dict(name="sigmoid_none_rows", seed=5, shape=(2, 3, 4), ignore=True,
             options=dict(policy="sigmoid", sharpness=4.0, reduction="none")),
        dict(name="valid_smooth_z_cap", seed=6, ignore=True, token_weight=True,
             options=dict(policy="hard", normalize="valid", label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
        dict(name="denominator", seed=7, options=dict(policy="sigmoid", denominator=37.0, label_smoothing=0.2)),
        dict(name="ignore_index_0", seed=8, ignore=True, options=dict(policy="hard", ignore_index=0)),
        dict(name="fallback_mean", seed=11, kind="confident", ignore=True, options=dict(policy="hard")),
        dict(name="fallback_zero", seed=12, kind="confident", options=dict(policy="hard", fallback="zero")),
        dict(name="frozen_weight", seed=13, weight_grad=False, token_weight=True, options=dict(policy="sigmoid")),
        dict(name="no_bias", seed=14, bias=False, chunk=64, options=dict(policy="hard", threshold=0.3)),
        dict(name="weight_fn", seed=15, ignore=True, token_weight=True,
             options=dict(policy="sigmoid", normalize="valid", weight_fn=_gate)),
        dict(name="float32", seed=16, dtype=F32, shape=(4, 8), ignore=True, token_weight=True,
             options=dict(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
        dict(name="explicit_vocab_start", seed=17, explicit_start=True, options=dict(policy="hard")),
        dict(name="zero_rows", seed=18, shape=(0, 3), options=dict(policy="hard")),
        dict(name="denominator_tensor", seed=33, ignore=True, options=dict(policy="hard", denominator=torch.tensor(9.0))),
        dict(name="out_of_range_unvalidated", seed=34, out_of_range=True, options=dict(policy="none", validate=False)),
        dict(name="bfloat16", seed=35, dtype=BF16, shape=(4, 8), ignore=True,
             options=dict(policy="sigmoid", z_loss=1e-3, label_smoothing=0.1)),
        # float16 chunk gradients scaled as memft_linear_loss scales them (was: coef = grad_out * w / D
        # inside the float16 chunk gradient, which went subnormal for a small upstream gradient)
        dict(name="float16_small_upstream", seed=36, dtype=F16, shape=(64,), grad_scale=1e-4,
             options=dict(policy="sigmoid")),
    ]
    if layout in ("pair", "trio"):
        even = [9, 9] if layout == "pair" else [6, 6, 6]
        cases.append(dict(name="even_split", seed=19, widths=even, ignore=True, token_weight=True,
                          options=dict(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3)))
    if layout == "mesh":
        cases = [c for c in cases if c["name"] in ("hard_active", "fallback_mean", "sigmoid_sum")]
        cases.append(dict(name="valid_smooth", seed=32, ignore=True,
                          options=dict(policy="sigmoid", normalize="valid", label_smoothing=0.1)))
    if layout == "dtensor":
        cases = [
            dict(name="shard0", seed=40, ignore=True, options=dict(policy="hard")),
            dict(name="shard0_dtensor_hidden_smooth", seed=41, hidden_dtensor=True, token_weight=True,
                 options=dict(policy="sigmoid", label_smoothing=0.1, softcap=4.0)),
            dict(name="shard0_frozen_rows", seed=42, weight_grad=False, bias=False, shape=(2, 3, 4),
                 options=dict(policy="sigmoid", reduction="none")),
            dict(name="replicated_weight", seed=43, replicate=True, options=dict(policy="hard")),
            dict(name="colwise_lm_head", seed=46, colwise=True, options=dict(policy="sigmoid", z_loss=1e-3)),
        ]
    return [dict({"widths": w}, **c, layout=layout) for c in cases]


def _error_cases(layout):
    """Cases that must raise on every rank of the group (ValueError unless the rank had a local error)."""
    w = WIDTHS[layout]
    last = len(w) - 1
    gap = [sum(w[:r]) + (1 if r else 0) for r in range(len(w))]
    cases = [
        dict(name="err_gap", seed=20, starts=gap, raises="do not tile [0, V)"),
        dict(name="err_target_value", seed=22, perturb="target_value", raises="target differs"),
        dict(name="err_options", seed=24, perturb="options", raises="options differ"),
        dict(name="err_hidden_dim", seed=25, perturb="hidden_dim", raises="options differ"),
        dict(name="err_grad_mismatch", seed=26, perturb="no_hidden_grad", raises="options differ"),
        dict(name="err_local_type", seed=27, perturb="int_hidden", raises="rejected their inputs",
             local_error=(last, "TypeError")),
        dict(name="err_empty_slice", seed=28, perturb="empty_slice", raises="rejected their inputs",
             local_error=(last, "ValueError")),
        dict(name="err_target_range", seed=29, perturb="target_range", raises="outside [0, V)"),
        # a denominator tensor's value is part of the options (was: each rank divided by its own)
        dict(name="err_denominator_value", seed=30, perturb="denominator_value", raises="options differ",
             options=dict(policy="hard", denominator=torch.tensor(4.0))),
    ]
    return [dict(c, layout=layout, widths=w) for c in cases]


def _plan():
    plan = []
    for layout in ("pair", "trio"):
        plan += _cases(layout) + _error_cases(layout)
        plan.append(dict(_cases(layout)[1], name="after_errors"))  # the groups still work
    plan += _cases("mesh") + _cases("dtensor")
    plan.append(dict(name="dtensor_shard1", seed=44, layout="dtensor", widths=WIDTHS["dtensor"], shard_dim=1,
                     raises="Shard(0)"))
    plan.append(dict(name="double_backward", seed=47, layout="pair", widths=WIDTHS["pair"], double_backward=True,
                     options=dict(policy="sigmoid", reduction="none")))
    plan.append(dict(name="memory", seed=45, layout="pair", widths=[97, 96], shape=(512,), chunk=32,
                     options=dict(policy="sigmoid", threshold=0.05)))
    return plan


def _case(layout, name):
    return next(c for c in _plan() if c["layout"] == layout and c["name"] == name)


# ---------------------------------------------------------------------------------------------
# The worker (runs in each rank's process)
# ---------------------------------------------------------------------------------------------


def _placement(layout, rank, groups):
    """(group, rank in the group, data-parallel part, dp_group), or None when the rank sits out."""
    if layout == "pair":
        return groups["pair"][rank // 2], rank % 2, 0, None
    if layout == "trio":
        return None if rank == 3 else (groups["trio"], rank, 0, None)
    return groups["pair"][rank // 2], rank % 2, rank // 2, groups["dp"][rank % 2]  # mesh


def _run_dtensor(case, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    h, w, b, y, tw, grad_out = make_inputs(case)
    rep = [Replicate(), Replicate()]
    if case.get("colwise"):  # the docs' example: an nn.Linear lm_head under ColwiseParallel on mesh["tp"]
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        head = torch.nn.Linear(D, w.shape[0], dtype=w.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        parallelize_module(head, mesh["tp"], ColwiseParallel())
        hidden = h.requires_grad_(True)
        loss, stats = memft_linear_loss(hidden, head.weight, y, head.bias, return_stats=True, **_options(case))
        loss.backward(DTensor.from_local(grad_out.to(loss.dtype), mesh["tp"], [Replicate()], run_check=False))
        return dict(loss_type=type(loss).__name__, loss=loss.to_local().detach(), stats=stats.as_dict(),
                    grad_h=hidden.grad, grad_w_placements=(Replicate(),) + tuple(head.weight.grad.placements),
                    grad_w=head.weight.grad.full_tensor(), grad_b=head.bias.grad.full_tensor())
    placements = rep if case.get("replicate") else [Replicate(), Shard(case.get("shard_dim", 0))]
    dw = distribute_tensor(w, mesh, placements).detach().requires_grad_(case.get("weight_grad", True))
    bias_placements = rep if case.get("replicate") else [Replicate(), Shard(0)]
    db = None if b is None else distribute_tensor(b, mesh, bias_placements).detach().requires_grad_(True)
    hidden = h.requires_grad_(True)
    dh = distribute_tensor(h.detach(), mesh, rep).requires_grad_(True) if case.get("hidden_dtensor") else hidden
    try:
        loss, stats = memft_linear_loss(dh, dw, y, db, token_weight=tw, return_stats=True, **_options(case))
    except Exception as exc:  # noqa: BLE001
        return dict(error=(type(exc).__name__, str(exc)))
    loss.backward(DTensor.from_local(grad_out.to(loss.dtype), mesh, rep, run_check=False))
    grad_h = dh.grad.full_tensor() if case.get("hidden_dtensor") else dh.grad
    return dict(loss_type=type(loss).__name__, loss=loss.to_local().detach(), stats=stats.as_dict(), grad_h=grad_h,
                grad_w_placements=None if dw.grad is None else tuple(dw.grad.placements),
                grad_w=None if dw.grad is None else dw.grad.full_tensor(),
                grad_b=None if db is None else db.grad.full_tensor())


def _run_case(case, rank, groups, mesh):
    if case["layout"] == "dtensor":
        return _run_dtensor(case, mesh)
    placement = _placement(case["layout"], rank, groups)
    if placement is None:
        return None
    group, tp_rank, part, dp_group = placement
    widths = case["widths"]
    h, w, b, y, tw, grad_out = make_inputs(case, part)
    start = sum(widths[:tp_rank])
    lw = w[start:start + widths[tp_rank]].clone()
    lb = None if b is None else b[start:start + widths[tp_rank]].clone()
    opts = _options(case)
    if case.get("explicit_start"):
        opts["vocab_start"] = start
    if "starts" in case:
        opts["vocab_start"] = case["starts"][tp_rank]
    perturb = case.get("perturb") if tp_rank == len(widths) - 1 else None
    hidden_grad = True
    if perturb == "target_value":
        y = y.clone()
        y.view(-1)[3] = (y.view(-1)[3] + 1) % sum(widths)
    elif perturb == "options":
        opts["policy"] = "sigmoid"
    elif perturb == "hidden_dim":
        h, lw = h[..., :-1].contiguous(), lw[:, :-1].contiguous()
    elif perturb == "no_hidden_grad":
        hidden_grad = False
    elif perturb == "int_hidden":
        h = h.long()
    elif perturb == "empty_slice":
        lw, lb = lw[:0], lb[:0]
    elif perturb == "denominator_value":
        opts["denominator"] = torch.tensor(5.0)
    if case.get("perturb") == "target_range":  # on every rank
        y = y.clone()
        y.view(-1)[0] = sum(widths)
    h = h.requires_grad_(hidden_grad and h.is_floating_point())
    lw = lw.requires_grad_(case.get("weight_grad", True) and lw.is_floating_point())
    lb = None if lb is None else lb.requires_grad_(True)
    mode = LargestTensor() if case["name"] == "memory" else None
    if case.get("double_backward"):  # the first derivative, then a penalty through it
        loss = vocab_parallel_memft_linear_loss(h, lw, y, lb, group=group, token_weight=tw, **opts)
        gh = None
        try:
            (gh,) = torch.autograd.grad(loss, h, grad_out.to(loss.dtype), create_graph=True)
            (gh.pow(2).sum() + h.pow(2).sum()).backward()
        except Exception as exc:  # noqa: BLE001
            return dict(grad_h=None if gh is None else gh.detach(), error=(type(exc).__name__, str(exc)))
        return dict(grad_h=gh.detach())
    try:
        if mode is not None:
            with mode:
                loss, stats = vocab_parallel_memft_linear_loss(h, lw, y, lb, group=group, dp_group=dp_group,
                                                               token_weight=tw, return_stats=True, **opts)
                loss.backward(grad_out.to(loss.dtype))
        else:
            loss, stats = vocab_parallel_memft_linear_loss(h, lw, y, lb, group=group, dp_group=dp_group,
                                                           token_weight=tw, return_stats=True, **opts)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return dict(error=(type(exc).__name__, str(exc)))
    if mode is None:
        loss.backward(grad_out.to(loss.dtype))
    return dict(loss=loss.detach(), stats=stats.as_dict(), grad_h=h.grad, grad_w=lw.grad,
                grad_b=None if lb is None else lb.grad, part=part, largest=None if mode is None else mode.largest)


def _worker(rank, world, port, outdir):
    init_gloo_rank(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        groups = dict(
            pair=[dist.new_group([0, 1]), dist.new_group([2, 3])],
            trio=dist.new_group([0, 1, 2]),
            dp=[dist.new_group([0, 2]), dist.new_group([1, 3])],
        )
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        results = {(c["layout"], c["name"]): _run_case(c, rank, groups, mesh) for c in _plan()}
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("vocab_parallel_linear")
    spawn_ranks(_worker, WORLD, (WORLD, free_port(), str(outdir)), 180.0, f"the {WORLD}-rank run")
    return rank_results(outdir, WORLD)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _close(got, want, dtype, what):
    assert got is not None and got.dtype == want.dtype, what
    assert got.shape == want.shape, what
    assert rel_err(got, want) < REL[dtype], f"{what}: rel err {rel_err(got, want):.3g}"


def _check(case, rank_results, parts=1):
    """Every rank's loss, stats and hidden gradient equal memft_linear_loss on the full weight; the
    weight / bias gradient slices, concatenated in rank order, equal its weight / bias gradient."""
    dtype = case.get("dtype", F64)
    ref = single_process(case, parts)
    if parts > 1:  # data parallel: the global loss is the sum over the dp ranks' losses
        by_part = [[r for r in rank_results if r["part"] == p] for p in range(parts)]
        _close(sum(grp[0]["loss"] for grp in by_part), ref["loss"], dtype, "loss")
        _close(torch.cat([grp[0]["grad_h"] for grp in by_part]), ref["grad_h"], dtype, "grad hidden")
        grad_w = sum(torch.cat([r["grad_w"] for r in grp]) for grp in by_part)  # DDP sums over dp ranks
        _close(grad_w, ref["grad_w"], dtype, "grad weight")
        for res in rank_results:
            assert torch.equal(res["stats"]["fell_back"], ref["stats"]["fell_back"])
        return
    first = rank_results[0]
    for res in rank_results:
        assert same(res["loss"], first["loss"]), "ranks disagree on the loss"
        assert same(res["grad_h"], first["grad_h"]), "ranks disagree on hidden's gradient"
        _close(res["loss"], ref["loss"], dtype, "loss")
        _close(res["grad_h"], ref["grad_h"], dtype, "grad hidden")
        for name in STAT_FIELDS:
            got, want = res["stats"][name], ref["stats"][name]
            assert same(got, first["stats"][name]), f"ranks disagree on {name}"
            if want.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, want), name
            else:
                _close(got, want, dtype, name)
    if case.get("weight_grad", True):
        _close(torch.cat([r["grad_w"] for r in rank_results]), ref["grad_w"], dtype, "grad weight")
    else:
        assert all(r["grad_w"] is None for r in rank_results) and ref["grad_w"] is None
    if ref["grad_b"] is not None:
        _close(torch.cat([r["grad_b"] for r in rank_results]), ref["grad_b"], dtype, "grad bias")
    else:
        assert all(r["grad_b"] is None for r in rank_results)


def _members(layout):
    return {"pair": [[0, 1], [2, 3]], "trio": [[0, 1, 2]]}[layout]


@pytest.mark.parametrize("layout,case_name", [
    (layout, c["name"]) for layout in ("pair", "trio") for c in _cases(layout)
] + [(layout, "after_errors") for layout in ("pair", "trio")])
def test_spawned_equals_single_process(spawned, layout, case_name):
    case = _case(layout, case_name)
    for ranks in _members(layout):
        _check(case, [spawned[r][(layout, case_name)] for r in ranks])
    if layout == "trio":
        assert spawned[3][(layout, case_name)] is None
    if case_name.startswith("fallback"):  # the case does exercise the fallback
        assert bool(single_process(case)["stats"]["fell_back"])


@pytest.mark.parametrize("layout,case_name", [
    (layout, c["name"]) for layout in ("pair", "trio") for c in _error_cases(layout)
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
    _check(case, rank_results, parts=2)


@pytest.mark.parametrize("case_name", [c["name"] for c in _cases("dtensor")])
def test_dtensor_weight_routes_to_vocab_parallel(spawned, case_name):
    """memft_linear_loss with a DTensor weight (Shard(0) on the "tp" mesh dimension, or replicated):
    the loss is a Replicate DTensor, the weight's gradient a DTensor with the weight's placements."""
    from torch.distributed.tensor import Replicate, Shard

    case = _case("dtensor", case_name)
    results = [spawned[r][("dtensor", case_name)] for r in range(WORLD)]
    for res in results:
        assert "error" not in res, res.get("error")
        assert res["loss_type"] == "DTensor"
        if case.get("weight_grad", True):
            want = (Replicate(), Replicate()) if case.get("replicate") else (Replicate(), Shard(0))
            assert res["grad_w_placements"] == want
    ref = single_process(case)
    for res in results:
        assert torch.equal(res["loss"], results[0]["loss"])
        _close(res["loss"], ref["loss"], F64, "loss")
        _close(res["grad_h"], ref["grad_h"], F64, "grad hidden")
        for name in STAT_FIELDS:
            assert torch.equal(res["stats"][name], results[0]["stats"][name]), name
        if case.get("weight_grad", True):
            _close(res["grad_w"], ref["grad_w"], F64, "grad weight")
        else:
            assert res["grad_w"] is None
        if ref["grad_b"] is not None:
            _close(res["grad_b"], ref["grad_b"], F64, "grad bias")


def test_dtensor_weight_other_layouts_raise_on_every_rank(spawned):
    for r in range(WORLD):
        res = spawned[r][("dtensor", "dtensor_shard1")]
        assert "error" in res and res["error"][0] == "ValueError" and "Shard(0)" in res["error"][1], res


def test_double_backward_refuses_on_every_rank(spawned):
    """create_graph=True gives the right first derivative; a backward through it raises "no second
    derivative", as memft_linear_loss does (was: the out= matmuls of the gradient sweep raised
    "functions with out=... arguments don't support automatic differentiation" already in the
    first derivative)."""
    ref = single_process(_case("pair", "double_backward"))
    for r in range(WORLD):
        res = spawned[r][("pair", "double_backward")]
        assert res.get("error", ("", ""))[0] == "RuntimeError" and "no second derivative" in res["error"][1], res
        _close(res["grad_h"], ref["grad_h"], F64, "grad hidden")


def test_never_materializes_the_local_logits(spawned):
    """Nothing as large as N x V_local / 4 elements is created on any rank, forward and backward."""
    case = _case("pair", "memory")
    n, rows = 512, 32
    for ranks in _members("pair"):
        _check(case, [spawned[r][("pair", "memory")] for r in ranks])
        for tp_rank, r in enumerate(ranks):
            v_local = case["widths"][tp_rank]
            largest = spawned[r][("pair", "memory")]["largest"]
            assert 0 < largest <= max(n * D, rows * v_local, 2 * 5 * n) < n * v_local // 4


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        vocab_parallel_memft_linear_loss(torch.randn(3, D), torch.randn(5, D), torch.randint(0, 5, (3,)))


# ---------------------------------------------------------------------------------------------
# In this process: the per-rank work of the module on simulated slices, for every backend
# (the spawned ranks use the reference backend: the compiled backends' custom ops import
# torch._dynamo on first use, seconds of start-up in every rank)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("opts", [
    dict(policy="sigmoid", z_loss=1e-2, softcap=6.0),
    dict(policy="hard", threshold=0.25, label_smoothing=0.1),
], ids=["z_cap", "smoothing"])
def test_backend_on_simulated_slices(name, dtype, opts):
    """What each rank runs (the chunked slice statistics, their combination, the chunked slice
    gradient sweep), one slice after the other, with a backend's row kernels: the rows and the
    hidden / weight / bias gradients equal the reference backend's on the full logits."""
    from memft_kernels import dispatch
    from memft_kernels.distributed import combine_slices, slice_options, slice_target
    from memft_kernels.linear_loss import _gradient_sweep, _Grads
    from memft_kernels.ops import reference
    from memft_kernels.spec import KernelOptions
    from memft_kernels.vocab_parallel_linear import _stats_sweep

    from helpers import device_for

    reason = dispatch.availability(name)
    if reason is not None:
        pytest.skip(reason)
    device = device_for(name)
    module = dispatch.resolve(name, torch.empty(1, 1, dtype=dtype, device=device))
    kopts = KernelOptions(**opts)
    widths, n, rows = [17, 4, 19], 23, 5
    v = sum(widths)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(n, D, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, D, generator=g) * 0.6).to(device=device, dtype=dtype)
    bias = (torch.randn(v, generator=g) * 0.3).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::4] = -100
    coef = torch.rand(n, generator=g).to(device)
    coef[target == -100] = 0.0
    starts = [sum(widths[:r]) for r in range(len(widths))]
    parts = torch.stack([_stats_sweep(hidden, weight[s:s + w], bias[s:s + w], target, s, module, kopts, rows)
                         for s, w in zip(starts, widths)])
    stats = combine_slices(parts, target, None, kopts, v, torch.float32)
    logits = torch.addmm(bias, hidden, weight.T).float()  # rounded once to dtype, as the chunks are
    ref = reference.row_forward(logits.cpu(), target.cpu(), None, kopts)
    for field in ("lse", "ce", "prob", "weight", "loss"):
        assert rel_err(getattr(stats, field).cpu(), getattr(ref, field)) < 2e-5, field
    assert torch.equal(stats.pred.cpu(), ref.pred)
    grad_h = torch.zeros(n, D, dtype=torch.float64, device=device)
    grad_w, grad_b = [], []
    for s, w in zip(starts, widths):
        grads = _Grads(hidden, weight[s:s + w], bias[s:s + w], (True, True, True), rows)
        _gradient_sweep(hidden, weight[s:s + w], bias[s:s + w], slice_target(target, s, w, v, -100), stats.lse,
                        coef, module, slice_options(kopts, v), rows, grads)
        grad_h += grads.hidden.double()
        grad_w.append(grads.weight)
        grad_b.append(grads.bias)
    g_ref = reference.row_backward(logits.cpu().double(), target.cpu(), ref.lse.double(), coef.cpu().double(),
                                   kopts)
    tol = 2e-5 if dtype == F32 else 2e-2
    assert rel_err(grad_h.cpu(), g_ref @ weight.cpu().double()) < tol
    assert rel_err(torch.cat(grad_w).cpu(), g_ref.T @ hidden.cpu().double()) < tol
    assert rel_err(torch.cat(grad_b).cpu(), g_ref.sum(0)) < tol
