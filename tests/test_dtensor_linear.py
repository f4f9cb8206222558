"""memft_linear_loss with a row-sharded DTensor ``hidden`` (route_linear -> _route_linear_rows)
against single-process memft_linear_loss on the full float64 tensors.

Layouts (a letter per mesh dimension): hidden "b" Shard(0) (batch), "t" Shard(1) (sequence),
"r" Replicate(), "p" Partial() (a RowwiseParallel output), "d" Shard(-1) (the features: a
ColwiseParallel output); weight "v" Shard(0) (the vocabulary, ColwiseParallel), "r" Replicate().
  * Partial / feature-sharded hidden: redistributed to Replicate() on those mesh dimensions, then the
    routes below (before this change: a ValueError, "a pending reduction" / "the hidden features");
  * sequence parallelism: hidden sharded on the mesh dimension that shards the weight (torchtitan's
    Shard(1) norm output into the lm_head): gathered, then the vocab-parallel loss;
  * data / context parallelism: hidden sharded on a mesh dimension where the weight is replicated:
    each rank its rows, the global mean denominator and fallback, an exact local gradient;
  * both on a 2 x 2 (dp, tp) mesh.
ONE spawn of 2 gloo ranks (1-D mesh) and ONE of 4 (2 x 2 mesh) run every case and save the results;
the tests compare them: loss (the same bits on every rank), every statistic (per-row ones gathered),
hidden's and the weight's / bias's gradients gathered with full_tensor(). Before this change a
row-sharded hidden raised ("hidden ... must be the whole tensor on every rank"). The 4-rank run also
runs sequence parallelism over a 1-D mesh of all 4 ranks; every case records the all_reduce /
reduce_scatter calls of its backward: the sequence-parallel ones send ONE reduce-scatter of hidden's
gradient (before: an all-reduce of the gathered [N, D] gradient, twice the bytes).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from memft_kernels import memft_linear_loss

from helpers import free_port, init_gloo_rank, rank_results, rel_err, spawn_ranks

F64 = torch.float64
D, V = 8, 13  # V = 13 over 2 ranks: 7 + 6 (torch.chunk), uneven
TOL = 1e-10
STAT_FIELDS = ("ce", "prob", "lse", "weight", "pred", "n_valid", "n_active", "weight_sum", "fell_back",
               "recalled_frac", "token_accuracy")
REDUCTIONS = {"sum": dict(reduction="sum"), "mean_active": dict(reduction="mean"),
              "mean_valid": dict(reduction="mean", normalize="valid")}


def _gate(target, stats):
    """A weight_fn of the statistics (this rank's rows)."""
    return torch.where(stats.pred == target, 0.5, 2.0) * (1.5 - stats.prob)


def _gate_fails_on_rank_1(target, stats):
    if dist.get_rank() == 1:
        raise RuntimeError("weight_fn broke on rank 1")
    return torch.ones_like(stats.prob)


def make_inputs(case):
    """hidden [*shape, D], weight [V, D], bias [V] (or None), target, token_weight (or None), grad_out."""
    g = torch.Generator().manual_seed(case["seed"])
    shape = case.get("shape", (3, 5))
    weight = torch.randn(V, D, generator=g, dtype=F64) * 0.5
    bias = torch.randn(V, generator=g, dtype=F64) * 0.3 if case.get("bias", True) else None
    target = torch.randint(0, V, shape, generator=g)
    hidden = torch.randn(*shape, D, generator=g, dtype=F64)
    sure = case.get("confident_batches")  # those batch rows far ahead: "hard" weighs them 0
    if sure is not None:
        idx = slice(None) if sure == "all" else list(sure)
        hidden[idx] = hidden[idx] * 0.1 + 10.0 * weight[target[idx]]
        target[idx] = (hidden[idx] @ weight.T).argmax(-1)  # far ahead of every other class
    target.view(-1)[::4] = -100
    token_weight = None
    if case.get("token_weight"):
        token_weight = torch.rand(shape, generator=g, dtype=F64) * 2.0
        token_weight.view(-1)[1] = 0.0
    none = case.get("options", {}).get("reduction") == "none"
    grad_out = torch.randn(shape, generator=g, dtype=F64) if none else torch.tensor(0.75, dtype=F64)
    return hidden, weight, bias, target, token_weight, grad_out


def _options(case):
    return dict(case.get("options", {}), backend=case.get("backend", "torch"), chunk_size=4)


def single_process(case):
    """memft_linear_loss on the full float64 tensors: loss, statistics, gradients."""
    h, w, b, y, tw, grad_out = make_inputs(case)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    b = None if b is None else b.requires_grad_(True)
    opts = dict(_options(case), backend="torch")
    if opts.get("weight_fn") is _gate_fails_on_rank_1:
        opts["weight_fn"] = None
    loss, stats = memft_linear_loss(h, w, y, b, token_weight=tw, return_stats=True, **opts)
    loss.backward(grad_out)
    return dict(loss=loss.detach(), stats=stats.as_dict(), grad_h=h.grad, grad_w=w.grad,
                grad_b=None if b is None else b.grad)


# ---------------------------------------------------------------------------------------------
# The plans
# ---------------------------------------------------------------------------------------------


def _with_reductions(base: dict, policy="hard"):
    return [dict(base, name=f"{base['name']}_{r}", options=dict(opts, policy=policy, **base.get("options", {})))
            for r, opts in REDUCTIONS.items()]


PLAN_1D = (
    # sequence parallel: the weight's vocabulary and hidden's sequence on the same mesh dimension
    _with_reductions(dict(name="sp_seq", seed=1, hidden="t", weight="v", target="rows"))
    + [
        dict(name="sp_seq_dtensor_target_none", seed=2, hidden="t", weight="v", target="dtensor", token_weight=True,
             options=dict(policy="sigmoid", reduction="none", label_smoothing=0.1)),
        dict(name="sp_batch_no_bias_weight_fn", seed=3, hidden="b", weight="v", target="rows", bias=False,
             token_weight=True, options=dict(policy="sigmoid", normalize="valid", weight_fn=_gate, z_loss=1e-3)),
        dict(name="sp_colwise_lm_head", seed=12, hidden="t", weight="v", target="rows", colwise=True,
             options=dict(policy="hard")),
        # float32 through the default backend (native on this CPU), against the float64 reference
        dict(name="sp_seq_float32_auto", seed=13, hidden="t", weight="v", target="rows", dtype=torch.float32,
             backend="auto", token_weight=True, options=dict(policy="sigmoid", label_smoothing=0.1)),
        dict(name="sp_seq_fallback", seed=4, hidden="t", weight="v", target="rows", confident_batches="all",
             options=dict(policy="hard")),
        # one position over 2 ranks: rank 1's shard is empty (its reduce-scatter chunk all padding)
        dict(name="sp_seq_empty_shard", seed=14, hidden="t", weight="v", target="rows", shape=(3, 1),
             token_weight=True, options=dict(policy="sigmoid")),
        # bfloat16: float32 on the reduce-scatter's wire, rounded once (as the all-reduce did)
        dict(name="sp_seq_bfloat16", seed=15, hidden="t", weight="v", target="rows", dtype=torch.bfloat16,
             options=dict(policy="sigmoid", reduction="sum")),
    ]
    # data parallel: a replicated weight, hidden's batch sharded (3 rows over 2 ranks: 2 + 1)
    + _with_reductions(dict(name="dp_batch", seed=5, hidden="b", weight="r", target="rows"))
    + [
        dict(name="dp_seq_dtensor_target_smooth", seed=6, hidden="t", weight="r", target="dtensor",
             token_weight=True, options=dict(policy="sigmoid", label_smoothing=0.1, softcap=4.0)),
        dict(name="dp_batch_none", seed=7, hidden="b", weight="r", target="rows", options=dict(policy="hard",
                                                                                              reduction="none")),
        dict(name="dp_batch_weight_fn_denominator", seed=8, hidden="b", weight="r", target="rows",
             options=dict(policy="sigmoid", weight_fn=_gate, denominator=11.0)),
        # rank 0's rows (batches 0, 1) all sure: a local decision would fall back there; the global one not
        dict(name="dp_fallback_local_only", seed=9, hidden="b", weight="r", target="rows", confident_batches=(0, 1),
             options=dict(policy="hard")),
        dict(name="dp_fallback_global", seed=10, hidden="b", weight="r", target="rows", confident_batches="all",
             options=dict(policy="hard")),
        dict(name="dp_empty_shard", seed=11, hidden="b", weight="r", target="rows", shape=(1, 4),
             options=dict(policy="hard")),
    ]
)
ERRORS_1D = [
    # a plain target must hold the gathered rows (here: the whole sequence), not this rank's shard
    dict(name="err_sp_local_target", seed=20, hidden="t", weight="v", target="shard_plain",
         raises=("plain target holds the rows this rank computes",) * 2),
    dict(name="err_replicated_dtensor_target", seed=21, hidden="t", weight="v", target="replicated",
         raises=("must be laid out like it",) * 2),
    dict(name="err_dp_group_given", seed=23, hidden="b", weight="r", target="rows", dp_group=True,
         raises=("pass dp_group=None",) * 2),
    dict(name="err_target_range_one_rank", seed=24, hidden="b", weight="r", target="rows", bad_rank=1,
         raises=("another rank of hidden's mesh failed its input checks", "outside [0, V)")),
    dict(name="err_options_differ", seed=25, hidden="t", weight="v", target="rows",
         rank_options={1: dict(threshold=0.25)}, raises=("options",) * 2),
    dict(name="err_weight_fn_one_rank", seed=26, hidden="b", weight="r", target="rows",
         options=dict(policy="hard", weight_fn=_gate_fails_on_rank_1),
         raises=("weight_fn failed on another rank of hidden's", "weight_fn broke on rank 1")),
]
AFTER_1D = dict(PLAN_1D[1], name="after_errors")  # the groups still work

# hidden Partial() ("p": a RowwiseParallel output; each rank a random part, the parts summing to hidden) or
# sharded on its features ("d", Shard(-1): a ColwiseParallel output): redistributed to Replicate() on those mesh
# dimensions, then the routes above. Before this change each raised ("a pending reduction" / "the hidden features").
PLAN_1D += [
    dict(name="partial_hidden_vocab_parallel", seed=16, hidden="p", weight="v", target="rows", token_weight=True,
         options=dict(policy="sigmoid")),
    dict(name="partial_hidden_replicated_weight_sum", seed=17, hidden="p", weight="r", target="dtensor",
         options=dict(policy="hard", reduction="sum", label_smoothing=0.1)),
    dict(name="feature_shard_vocab_parallel_valid", seed=18, hidden="d", weight="v", target="dtensor",
         token_weight=True, options=dict(policy="hard", normalize="valid")),
    dict(name="feature_shard_replicated_weight_none", seed=19, hidden="d", weight="r", target="rows",
         options=dict(policy="sigmoid", reduction="none")),
    dict(name="feature_shard_float32_auto", seed=22, hidden="d", weight="v", target="rows", dtype=torch.float32,
         backend="auto", options=dict(policy="hard", z_loss=1e-3)),
    # the caller reduce-scatters the Partial hidden to the sequence-parallel layout first ("first": hidden.redistribute
    # to those placements before the call), the detour docs/DISTRIBUTED.md said was cheaper in the backward
    dict(name="partial_hidden_reduce_scattered_first", seed=45, hidden="p", weight="v", target="rows", first="t",
         token_weight=True, options=dict(policy="sigmoid")),
]

# 2 x 2 mesh ("dp", "tp"): the weight Shard(0) on "tp" (or replicated)
PLAN_2D = (
    _with_reductions(dict(name="dp_sp", seed=30, hidden="bt", weight="rv", target="rows", token_weight=True))
    + [
        dict(name="dp_sp_none_dtensor_target", seed=31, hidden="bt", weight="rv", target="dtensor",
             options=dict(policy="sigmoid", reduction="none")),
        dict(name="sp_only_on_2d_mesh", seed=36, hidden="rt", weight="rv", target="dtensor", token_weight=True,
             options=dict(policy="hard", normalize="valid")),
        dict(name="dp_sp_float32_auto", seed=37, hidden="bt", weight="rv", target="rows", dtype=torch.float32,
             backend="auto", options=dict(policy="hard", z_loss=1e-3)),
        dict(name="cp_tp_replicated_hidden_on_tp", seed=32, hidden="tr", weight="rv", target="rows",
             options=dict(policy="hard", label_smoothing=0.1)),
        dict(name="nested_rows_weight_fn", seed=33, hidden="bb", weight="rv", target="rows", shape=(3, 2),
             options=dict(policy="sigmoid", weight_fn=_gate)),
        dict(name="dp_x_dp_replicated_weight", seed=34, hidden="bt", weight="rr", target="dtensor",
             options=dict(policy="hard", normalize="valid")),
        dict(name="dp_sp_fallback_local_only", seed=35, hidden="bt", weight="rv", target="rows",
             confident_batches=(0, 1), options=dict(policy="hard")),
        # the TP dimension (0) shards the rows BEFORE the dp one re-splits them: the gather's backward is
        # the redistribute's (all-reduce path), not the reduce-scatter pair
        dict(name="nested_rows_tp_first", seed=38, hidden="bb", weight="vr", target="rows", shape=(5, 2),
             options=dict(policy="sigmoid")),
        # Partial / feature-sharded hidden next to data or sequence parallel mesh dimensions
        dict(name="dp_rows_partial_on_tp", seed=39, hidden="bp", weight="rv", target="rows", token_weight=True,
             options=dict(policy="hard")),
        dict(name="features_on_dp_sequence_on_tp", seed=43, hidden="dt", weight="rv", target="dtensor",
             options=dict(policy="sigmoid", reduction="sum")),
        dict(name="partial_on_dp_features_on_tp", seed=44, hidden="pd", weight="rv", target="rows",
             options=dict(policy="hard", normalize="valid")),
    ]
)

ERRORS_2D = [
    # one TP group's ranks pass different targets: the vocab-parallel loss would raise in that group only,
    # leaving the other group's ranks in the data-parallel all-reduce; now every rank raises at once
    dict(name="err_target_differs_on_tp", seed=40, hidden="bt", weight="rv", target="rows", perturb_rank=1,
         options=dict(policy="hard"), raises=("target (or token_weight) differs",) * 4),
    dict(name="err_target_range_rank_3", seed=41, hidden="bt", weight="rv", target="rows", bad_rank=3,
         options=dict(policy="hard"), raises=("another rank of hidden's mesh failed",) * 3 + ("outside [0, V)",)),
]
AFTER_2D = dict(PLAN_2D[1], name="after_errors_2d")

EXTERNAL_DP = dict(name="external_dp_sp", seed=42, shape=(4, 5), options=dict(policy="hard"))

# a 1-D mesh of all 4 ranks (in the 4-rank run): sequence parallel over 4 TP ranks, V = 13 split 4 + 4 + 4 + 1,
# 5 positions split 2 + 2 + 1 + 0 (the reduce-scatter pads chunks 3 and 4), 3 batch rows 1 + 1 + 1 + 0
PLAN_4 = [
    dict(name="sp4_seq", seed=50, hidden="t", weight="v", target="rows", token_weight=True,
         options=dict(policy="sigmoid", label_smoothing=0.1)),
    dict(name="sp4_batch_none", seed=51, hidden="b", weight="v", target="dtensor",
         options=dict(policy="hard", reduction="none")),
]


def _placements(codes: str, ndim: int):
    from torch.distributed.tensor import Partial, Replicate, Shard

    table = {"b": Shard(0), "t": Shard(1), "d": Shard(ndim - 1), "r": Replicate(), "v": Shard(0)}
    return [Partial() if c == "p" else table[c] for c in codes]


def _rows_codes(case):
    """hidden's codes with Partial / the features ("p", "d") replicated: the layout the rows have."""
    return case["hidden"].replace("p", "r").replace("d", "r")


def _gathered(case, ndim):
    """hidden's placements after the sequence-parallel gather: Replicate() where both shard."""
    from torch.distributed.tensor import Replicate

    return [Replicate() if w == "v" and h in "bt" else p
            for h, w, p in zip(case["hidden"], case["weight"], _placements(_rows_codes(case), ndim))]


def _distribute_hidden(h, mesh, codes):
    """hidden as a DTensor with the placements ``codes``; on a "p" (Partial()) mesh dimension each rank holds a
    part (fresh random numbers on all but the first, the first the rest), the parts summing to hidden's values."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    placements = _placements(codes, h.ndim)
    if "p" not in codes:
        return distribute_tensor(h, mesh, placements)
    values = [Replicate() if c == "p" else p for c, p in zip(codes, placements)]
    local = distribute_tensor(h, mesh, values).to_local()
    g = torch.Generator().manual_seed(4321)
    for i, c in enumerate(codes):
        if c == "p":  # every rank draws the same parts; rank k > 0 of this dimension keeps part k
            parts = [distribute_tensor(torch.randn(h.shape, generator=g, dtype=h.dtype), mesh, values).to_local()
                     for _ in range(mesh.size(i) - 1)]
            k = mesh.get_local_rank(i)
            local = parts[k - 1] if k > 0 else local - sum(parts)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=h.shape, stride=h.stride())


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


_COUNTED = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter")


def _counting_collectives(log):
    """Wrap torch.distributed's all_reduce / reduce_scatter functions (what the library calls; DTensor's
    own redistributions use functional collectives, not these): each call appends (name, numel of the
    tensor sent). Returns the function that undoes it."""
    saved = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            sent = args[0] if name == "all_reduce" else args[1]
            log.append((name, sum(t.numel() for t in sent) if isinstance(sent, (list, tuple)) else sent.numel()))
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    return lambda: [setattr(dist, name, fn) for name, fn in saved.items()]


def _run_case(case, mesh):
    """The case's results, with "backward_collectives": the all_reduce / reduce_scatter calls of its
    backward, (name, numel sent)."""
    log = []
    undo = _counting_collectives(log)
    try:
        res = _run_case_counted(case, mesh, log)
    finally:
        undo()
    return res


def _run_case_counted(case, mesh, log):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    h, w, b, y, tw, grad_out = make_inputs(case)
    dtype = case.get("dtype", F64)
    h, w, b, tw = (None if t is None else t.to(dtype) for t in (h, w, b, tw))
    rank, rep = dist.get_rank(), [Replicate()] * mesh.ndim
    wp = _placements(case["weight"], 2)
    dh = _distribute_hidden(h, mesh, case["hidden"]).requires_grad_(True)
    dw = distribute_tensor(w, mesh, wp).requires_grad_(True)
    db = None if b is None else distribute_tensor(b, mesh, wp).requires_grad_(True)
    if case.get("colwise"):  # docs/DISTRIBUTED.md's example: an nn.Linear lm_head under ColwiseParallel
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        head = torch.nn.Linear(D, V, dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        parallelize_module(head, mesh, ColwiseParallel())
        dw, db = head.weight, head.bias

    def arg(t):
        if t is None:
            return None
        how = case["target"]
        if how == "rows":  # the rows this rank computes: hidden's after the gather
            return distribute_tensor(t, mesh, _gathered(case, h.ndim)).to_local().clone()
        rows = _placements(_rows_codes(case), h.ndim)  # hidden's layout, Replicate() where Partial / features
        if how == "shard_plain":
            return distribute_tensor(t, mesh, rows).to_local().clone()
        if how == "replicated":
            return distribute_tensor(t, mesh, rep)
        return distribute_tensor(t, mesh, rows)  # "dtensor"

    y_arg, tw_arg = arg(y), arg(tw)
    if case.get("bad_rank") == rank:
        y_arg.view(-1)[-1] = V + 3
    if case.get("perturb_rank") == rank:
        y_arg.view(-1)[1] = (y_arg.view(-1)[1] + 1) % V
    opts = dict(_options(case), **case.get("rank_options", {}).get(rank, {}))
    if case.get("dp_group"):
        opts["dp_group"] = dist.group.WORLD
    from torch.distributed.tensor.debug import CommDebugMode  # every collective, DTensor's functional ones too

    try:
        with CommDebugMode() as comm_fwd:
            x = dh.redistribute(mesh, _placements(case["first"], h.ndim)) if case.get("first") else dh
            loss, stats = memft_linear_loss(x, dw, y_arg, db, token_weight=tw_arg, return_stats=True, **opts)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return dict(error=(type(exc).__name__, str(exc)))
    up = (distribute_tensor(grad_out.to(loss.dtype), mesh, list(loss.placements))
          if case.get("options", {}).get("reduction") == "none" else
          DTensor.from_local(grad_out.to(loss.dtype), mesh, rep, run_check=False))
    del log[:]
    with CommDebugMode() as comm_bwd:
        loss.backward(up)
    return dict(backward_collectives=list(log), loss_type=type(loss).__name__, loss_placements=tuple(loss.placements),
                loss_local=loss.to_local().detach(), loss=loss.full_tensor().detach(),
                stats={k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in stats.as_dict().items()},
                grad_h_placements=tuple(dh.grad.placements), grad_h=dh.grad.full_tensor(),
                grad_w_placements=tuple(dw.grad.placements), grad_w=dw.grad.full_tensor(),
                grad_b=None if db is None else db.grad.full_tensor(),
                comm={"forward": {str(k): n for k, n in comm_fwd.get_comm_counts().items()},
                      "backward": {str(k): n for k, n in comm_bwd.get_comm_counts().items()}})


def _run_external_dp(case, mesh):
    """Sequence parallelism on the 1-D "tp" mesh, data parallelism outside it (each "dp" rank its own
    batch rows as plain data, dp_group given): the loss is this dp rank's share of the global mean."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    h, w, b, y, tw, grad_out = make_inputs(case)
    part = mesh.get_local_rank("dp")
    h, y = h.chunk(2)[part].contiguous(), y.chunk(2)[part].contiguous()
    tp = mesh["tp"]
    dh = distribute_tensor(h, tp, [Shard(1)]).requires_grad_(True)
    dw = distribute_tensor(w, tp, [Shard(0)]).requires_grad_(True)
    db = distribute_tensor(b, tp, [Shard(0)]).requires_grad_(True)
    loss = memft_linear_loss(dh, dw, y, db, dp_group=mesh.get_group("dp"), **_options(case))
    loss.backward(DTensor.from_local(grad_out.to(loss.dtype), tp, [Replicate()], run_check=False))
    return dict(loss=loss.to_local().detach(), grad_h=dh.grad.full_tensor(), grad_w=dw.grad.full_tensor(),
                grad_b=db.grad.full_tensor())


def _worker(rank, world, port, outdir, shape):
    init_gloo_rank(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp")[-len(shape):])
        plan = PLAN_1D + ERRORS_1D + [AFTER_1D] if len(shape) == 1 else PLAN_2D + ERRORS_2D + [AFTER_2D]
        results = {c["name"]: _run_case(c, mesh) for c in plan}
        if len(shape) == 2:
            results[EXTERNAL_DP["name"]] = _run_external_dp(EXTERNAL_DP, mesh)
            mesh4 = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
            results.update({c["name"]: _run_case(c, mesh4) for c in PLAN_4})
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned_1d(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dtensor_linear_1d")
    spawn_ranks(_worker, 2, (2, free_port(), str(outdir), (2,)), 180.0, "the 2-rank DTensor linear run")
    return rank_results(outdir, 2)


@pytest.fixture(scope="module")
def spawned_2d(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dtensor_linear_2d")
    spawn_ranks(_worker, 4, (4, free_port(), str(outdir), (2, 2)), 180.0, "the 4-rank DTensor linear run")
    return rank_results(outdir, 4)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _check(results, case):
    ref = single_process(case)
    tol = {F64: TOL, torch.float32: 2e-5, torch.bfloat16: 2e-2}[case.get("dtype", F64)]
    first = results[0][case["name"]]
    dp_rows = any(h in "bt" and w != "v" for h, w in zip(case["hidden"], case["weight"]))
    for rank, res in enumerate(results):
        res = res[case["name"]]
        assert "error" not in res, (rank, res.get("error"))
        assert res["loss_type"] == "DTensor"
        if case.get("options", {}).get("reduction") != "none":
            assert all(type(p).__name__ == "Replicate" for p in res["loss_placements"])
            assert torch.equal(res["loss_local"], first["loss_local"]), "ranks disagree on the loss"
        assert rel_err(res["loss"], ref["loss"]) < tol, (rank, res["loss"], ref["loss"])
        for name in STAT_FIELDS:
            got, want = res["stats"][name], ref["stats"][name]
            if want.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, want), (rank, name, got, want)
            else:
                assert (tol != TOL or got.dtype == want.dtype) and rel_err(got, want) < tol, (rank, name)
        # hidden's gradient comes back with hidden's own placements; Replicate() where hidden was Partial()
        # (DTensor's redistribute backward: each part's gradient is the whole gradient)
        from torch.distributed.tensor import Replicate

        ndim = len(case.get("shape", (3, 5))) + 1
        assert list(res["grad_h_placements"]) == [Replicate() if c == "p" else p for c, p in
                                                  zip(case["hidden"], _placements(case["hidden"], ndim))]
        assert res["grad_h"].dtype == res["grad_w"].dtype == case.get("dtype", F64)
        assert rel_err(res["grad_h"], ref["grad_h"]) < tol, rank
        # the weight's: Partial() on the mesh dimensions where this rank's rows give a part of it
        want_w = tuple("Partial" if h in "bt" and w == "r" else "Shard" if w == "v" else "Replicate"
                       for h, w in zip(case["hidden"], case["weight"]))
        assert tuple(type(p).__name__ for p in res["grad_w_placements"]) == want_w, res["grad_w_placements"]
        assert rel_err(res["grad_w"], ref["grad_w"]) < tol, rank
        if ref["grad_b"] is not None:
            assert rel_err(res["grad_b"], ref["grad_b"]) < tol, rank
    return dp_rows


def _check_error(results, case):
    for rank, res in enumerate(results):
        res = res[case["name"]]
        assert res.get("error"), f"rank {rank} did not raise"
        kind, message = res["error"]
        assert case["raises"][rank] in message, f"rank {rank}: {kind}: {message}"
        assert kind in ("ValueError", "RuntimeError"), (rank, kind, message)


@pytest.mark.parametrize("case", PLAN_1D + [AFTER_1D], ids=lambda c: c["name"])
def test_row_sharded_hidden_1d_mesh(spawned_1d, case):
    """2 ranks: sequence parallel (hidden sharded on the weight's vocabulary mesh dimension) and data
    parallel (weight replicated) equal memft_linear_loss on the full tensors; was a ValueError."""
    _check(spawned_1d, case)


@pytest.mark.parametrize("case", PLAN_2D + [AFTER_2D], ids=lambda c: c["name"])
def test_row_sharded_hidden_2d_mesh(spawned_2d, case):
    """4 ranks, a (dp, tp) mesh: data x sequence parallel, context parallel with a replicated hidden on
    tp, nested batch sharding, a replicated weight on both dimensions."""
    _check(spawned_2d, case)


@pytest.mark.parametrize("case", PLAN_4, ids=lambda c: c["name"])
def test_sequence_parallel_over_4_tp_ranks(spawned_2d, case):
    """4 TP ranks on a 1-D mesh: uneven vocabulary and row splits with empty row shards."""
    _check(spawned_2d, case)


@pytest.mark.parametrize("case", ERRORS_1D, ids=lambda c: c["name"])
def test_row_sharded_hidden_bad_inputs_raise_on_every_rank(spawned_1d, case):
    _check_error(spawned_1d, case)


@pytest.mark.parametrize("case", ERRORS_2D, ids=lambda c: c["name"])
def test_row_sharded_hidden_bad_inputs_raise_on_every_rank_2d(spawned_2d, case):
    _check_error(spawned_2d, case)


@pytest.mark.parametrize("case", [c for c in PLAN_1D if c["hidden"] in "pd" and not c.get("first")],
                         ids=lambda c: c["name"])
def test_partial_or_feature_sharded_hidden_collectives(spawned_1d, case):
    """What docs/DISTRIBUTED.md says the redistribution costs (CommDebugMode, DTensor's functional collectives
    included): the forward adds ONE all-reduce (Partial) or all-gather (Shard(-1)) of hidden; the backward adds
    none (the vocab-parallel loss's own all-reduce of hidden's gradient, where the weight is sharded, is all)."""
    extra = "all_reduce" if case["hidden"] == "p" else "all_gather_into_tensor"
    for rank, res in enumerate(spawned_1d):
        comm = res[case["name"]]["comm"]
        functional = {k: n for k, n in comm["forward"].items() if "functional" in k}
        assert list(functional.values()) == [1] and next(iter(functional)).endswith(extra), (rank, comm)
        assert comm["backward"] == ({"c10d.allreduce_": 1} if case["weight"] == "v" else {}), (rank, comm)


def test_partial_hidden_reduce_scattered_first_moves_the_same_bytes(spawned_1d):
    """docs/DISTRIBUTED.md said reduce-scattering a Partial hidden to Shard(1) before the call made the backward ONE
    reduce-scatter instead of the all-reduce of [N, D]; DTensor's backward of that redistribute (Partial() ->
    Shard(1)) all-gathers the gradient back to Replicate(), so the backward moves the bytes of the all-reduce too
    (as the forward does: reduce-scatter, then the loss's all-gather), plus the route's small check."""
    for rank, res in enumerate(spawned_1d):
        comm = res["partial_hidden_reduce_scattered_first"]["comm"]
        functional = {k.rsplit(".", 1)[-1]: n for k, n in comm["forward"].items() if "functional" in k}
        assert functional == {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}, (rank, comm)
        assert comm["backward"] == {"c10d._reduce_scatter_base_": 1, "c10d_functional.all_gather_into_tensor": 1}, (
            rank, comm)
        assert comm["forward"].get("c10d.allreduce_") == 1, (rank, comm)  # the sequence-parallel route's check


def test_sequence_parallel_with_a_data_parallel_group_outside_the_mesh(spawned_2d):
    """hidden Shard(1) on a 1-D TP mesh, dp_group given (the data parallel ranks outside the DTensors'
    mesh; torchtitan's FSDP layout): passed on, each dp rank's loss its share of the global mean
    (their sum the global loss), hidden's gradient exact, the weight's summed over dp the full one.
    (A dp_group next to hidden sharded on a data-parallel mesh dimension is refused: the mesh gives it.)"""
    ref = single_process(EXTERNAL_DP)
    res = [r[EXTERNAL_DP["name"]] for r in spawned_2d]  # ranks 0, 1: dp part 0; ranks 2, 3: dp part 1
    for r in range(4):
        assert torch.equal(res[r]["loss"], res[r ^ 1]["loss"]), "TP ranks disagree on the loss"
    assert rel_err(res[0]["loss"] + res[2]["loss"], ref["loss"]) < TOL
    assert rel_err(torch.cat([res[0]["grad_h"], res[2]["grad_h"]]), ref["grad_h"]) < TOL
    assert rel_err(torch.cat([res[1]["grad_h"], res[3]["grad_h"]]), ref["grad_h"]) < TOL
    assert rel_err(res[0]["grad_w"] + res[2]["grad_w"], ref["grad_w"]) < TOL
    assert rel_err(res[1]["grad_b"] + res[3]["grad_b"], ref["grad_b"]) < TOL


def test_fallback_cases_mean_what_they_say():
    """The "local only" cases: rank 0's rows hold no active token while the batch has some (a local
    decision would fall back); the "global" ones: nothing active anywhere."""
    for case in PLAN_1D + PLAN_2D:
        if "fallback" not in case["name"]:
            continue
        stats = single_process(case)["stats"]
        fell = case["confident_batches"] == "all"
        assert bool(stats["fell_back"]) is fell and (int(stats["n_active"]) > 0) is not fell, case["name"]
        assert float(stats["weight"][:2].sum()) == 0.0, case["name"]


def _sp_backward_expected(case, rank: int, mesh_shape):
    """What the backward of a sequence-parallel case sends through torch.distributed on ``rank``: ONE
    reduce-scatter of the [N, D] hidden gradient (N this rank's rows after the gather), padded to
    parts * ceil(L / parts) rows of the gathered dimension (L long) -- or, when a later mesh dimension
    re-splits the gathered dimension, the all-reduce of [N, D]. None for a case without sequence parallelism."""
    sp = [i for i, (h, w) in enumerate(zip(case["hidden"], case["weight"])) if h in "bt" and w == "v"]
    if not sp:
        return None
    sp, shape = sp[0], list(case.get("shape", (3, 5)))
    coords = [int(c) for c in torch.unravel_index(torch.tensor(rank), mesh_shape)]  # this rank's mesh position
    for i, h in enumerate(case["hidden"]):  # this rank's rows on the other (data-parallel) row dimensions
        if i != sp and h in "bt":
            d = "bt".index(h)
            chunks = torch.arange(shape[d]).chunk(mesh_shape[i])
            shape[d] = len(chunks[coords[i]]) if coords[i] < len(chunks) else 0
    n, dim = shape[0] * shape[1], "bt".index(case["hidden"][sp])
    later = any("bt".index(h) == dim for h in case["hidden"][sp + 1:] if h in "bt")
    if later:
        return [("all_reduce", n * D)]
    k, length = mesh_shape[sp], shape[dim]
    return [("reduce_scatter", k * -(-length // k) * (n // length) * D)]


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2), (4,)], ids=["1d", "2d", "1d_4_ranks"])
def test_sequence_parallel_backward_reduce_scatters(spawned_1d, spawned_2d, mesh_shape):
    """The sequence-parallel gather's backward: one reduce-scatter of hidden's gradient over the TP group
    (each rank receives the sum for its own rows only), no all-reduce of the gathered [N, D] gradient
    (what the old path sent: twice the bytes). Shard(1) (uneven 3 + 2) and Shard(0) (2 + 1) of hidden,
    dp x sp on the 2 x 2 mesh, nested Shard(0); the values are checked by the tests above. A TP
    dimension whose rows a later mesh dimension re-splits keeps the all-reduce (documented)."""
    results = spawned_1d if mesh_shape == (2,) else spawned_2d
    plan = {(2,): PLAN_1D, (2, 2): PLAN_2D, (4,): PLAN_4}[mesh_shape]
    seen = 0
    for case in plan:
        for rank, res in enumerate(results):
            want = _sp_backward_expected(case, rank, mesh_shape)
            if want is None:
                continue
            got = [(name[:14] if name.startswith("reduce_scatter") else name, numel)
                   for name, numel in res[case["name"]]["backward_collectives"]]
            assert got == want, (case["name"], rank, got, want)
            seen += want[0][0] == "reduce_scatter"
    assert seen == {(2,): 20, (2, 2): 36, (4,): 8}[mesh_shape], seen  # the sequence-parallel cases x ranks
