"""memft_loss on DTensor logits (tensor parallelism, torchtitan's loss_parallel layout) against
single-process memft_loss on the full logits.

Two layers:

* in this process, a one-rank gloo mesh: the routing itself with the default (native) backend,
  the returned types, and the layouts that must raise (this is where the old code failed: "does not
  have a sharding strategy registered" / "mixed torch.Tensor and DTensor");
* ONE spawn of 2 gloo ranks on CPU that runs every case of the plan in a row (normal cases, cases
  that must raise on every rank, then a normal case again) and saves its results; the tests below
  read them. The join has a timeout, so a rank that hangs fails the test instead of hanging CI.

Inputs are fresh random numbers from fixed seeds; the reference is memft_loss (backend "torch") on
the full float64 logits; float64 cases must agree to ||out - ref|| / ||ref|| < 1e-10, float32 ones
to < 2e-5 (loss, every statistic, and the gradient gathered with full_tensor()).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from memft_kernels import MemFTLoss, memft_linear_loss, memft_loss
from memft_kernels.distributed import vocab_parallel_memft_loss

from helpers import free_port, init_gloo_rank, rank_results, rel_err, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

ROOT = Path(__file__).resolve().parent.parent
STAT_FIELDS = ("ce", "prob", "lse", "weight", "pred", "n_valid", "n_active", "weight_sum", "fell_back",
               "recalled_frac", "token_accuracy")
REL = {torch.float64: 1e-10, torch.float32: 2e-5}
F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------------------------------------
# Inputs (every process builds the same tensors from the case's seed)
# ---------------------------------------------------------------------------------------------


def make_inputs(case: dict):
    """Full float64 logits [*shape, V], target, token_weight (or None), upstream gradient."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, v = case.get("shape", (3, 5)), case["v"]
    x = torch.randn(*shape, v, generator=g, dtype=torch.float64) * 2.5
    y = torch.randint(0, v, shape, generator=g)
    conf = torch.rand(shape, generator=g) < 0.4  # confident rows: p > 0.5, masked by "hard"
    x.view(-1, v)[conf.view(-1), y.view(-1)[conf.view(-1)]] += 7.0
    ignore_index = case.get("options", {}).get("ignore_index", -100)
    y.view(-1)[::4] = ignore_index
    sure = case.get("confident_rows")  # batch indices whose every token is sure (p ~ 1): no active token
    if sure is not None:
        for b in (range(shape[0]) if sure == "all" else sure):
            x[b].scatter_add_(-1, y[b].clamp_min(0)[..., None], torch.full((*y[b].shape, 1), 40.0, dtype=x.dtype))
    tw = None
    if case.get("token_weight"):
        tw = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0
        tw.view(-1)[1] = 0.0
    reduction = case.get("options", {}).get("reduction", "mean")
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(0.75)
    return x, y, tw, grad_out


def single_process(case: dict):
    """memft_loss on the full logits (the reference backend): loss, stats, logits gradient."""
    x, y, tw, grad_out = make_inputs(case)
    dtype = case.get("dtype", F64)
    x = x.to(dtype).requires_grad_(True)
    opts = dict(case.get("options", {}), backend="torch")
    loss, stats = memft_loss(x, y, token_weight=None if tw is None else tw.to(dtype), return_stats=True, **opts)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), stats.as_dict(), x.grad


class TinyLM(torch.nn.Module):
    """Embedding -> tanh -> lm_head named "output" (torchtitan's name), float32."""

    def __init__(self, vocab: int = 13, dim: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.output = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        return self.output(torch.tanh(self.embed(tokens) * 2.0))


def snippet_inputs():
    """The docs snippet's model (V = 13: split 7 + 6 over 2 ranks), tokens and labels."""
    torch.manual_seed(50)
    model = TinyLM()
    g = torch.Generator().manual_seed(51)
    tokens = torch.randint(0, 13, (2, 5), generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[:, -1] = -100
    return model, tokens, labels


def snippet_code() -> str:
    """The DTensor example of docs/DISTRIBUTED.md, as written (on CPU devices instead of CUDA)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/DISTRIBUTED.md").read_text(), re.S)
    (code,) = [b for b in blocks if "memft_loss(logits" in b and "dp_mesh" not in b]
    return code.replace('init_device_mesh("cuda"', 'init_device_mesh("cpu"')


# ---------------------------------------------------------------------------------------------
# The plan of the spawned run (2 ranks). mesh: (2,) = the tensor-parallel group; (1, 2) and (2, 1)
# are 2-D meshes ("dp", "tp") whose size-2 dimension shards the classes.
# ---------------------------------------------------------------------------------------------

WORLD = 2

CASES = [
    dict(name="shard_even_hard_stats", seed=1, v=12, mesh=(2,), layout="shard",
         options=dict(policy="hard")),
    dict(name="shard_uneven_sigmoid_sum_tw", seed=2, v=13, mesh=(2,), layout="shard", token_weight="dtensor",
         options=dict(policy="sigmoid", reduction="sum")),
    dict(name="shard_uneven_none_f32", seed=3, v=13, mesh=(2,), layout="shard", dtype=F32, shape=(2, 3, 4),
         options=dict(policy="hard", reduction="none", ignore_index=0)),
    dict(name="shard_uneven_mean_f32_module", seed=4, v=13, mesh=(2,), layout="shard", dtype=F32, module=True,
         token_weight="plain", options=dict(policy="sigmoid", threshold=0.3)),
    dict(name="shard_smoothing_zloss_cap", seed=5, v=11, mesh=(2,), layout="shard",
         options=dict(policy="hard", label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    dict(name="shard_inplace_f32", seed=6, v=13, mesh=(2,), layout="shard", dtype=F32,
         options=dict(policy="hard", inplace_backward=True)),
    dict(name="shard_uneven_denominator_dtensor", seed=11, v=13, mesh=(2,), layout="shard", denominator="dtensor",
         options=dict(policy="sigmoid", denominator=7.0)),
    dict(name="shard_uneven_weight_fn", seed=12, v=13, mesh=(2,), layout="shard",
         options=dict(policy="hard", weight_fn=lambda target, stats: 0.5 + (stats.ce > 1.5).double())),
    dict(name="replicate_hard", seed=7, v=10, mesh=(2,), layout="replicate", target="dtensor",
         options=dict(policy="hard")),
    dict(name="replicate_sigmoid_none_f32", seed=8, v=9, mesh=(2,), layout="replicate", dtype=F32,
         token_weight="dtensor", options=dict(policy="sigmoid", reduction="none")),
    dict(name="mesh_1x2_tp_last", seed=9, v=13, mesh=(1, 2), layout="shard", token_weight="plain",
         options=dict(policy="hard", reduction="sum")),
    dict(name="mesh_2x1_tp_first", seed=10, v=12, mesh=(2, 1), layout="shard", target="dtensor",
         options=dict(policy="sigmoid")),
]

ERROR_CASES = [
    # Partial logits are refused, not reduced here (a collective over the whole N x V logits): the message
    # names the cost and the explicit redistribute (before: "Pass Shard(2) ... or logits.full_tensor()")
    dict(name="partial", seed=21, v=8, mesh=(2,), layout="partial",
         raises="logits.redistribute(logits.device_mesh, [Shard(2)]) (a reduce-scatter of N x V)"),
    dict(name="classes_on_two_mesh_dims", seed=22, v=8, mesh=(1, 2), layout="shard_twice",
         raises="over 2 mesh dimensions"),
    dict(name="empty_shard", seed=26, v=1, mesh=(2,), layout="shard", raises="without a class"),
    dict(name="target_sharded", seed=23, v=8, mesh=(2,), layout="shard", target="sharded",
         raises="target is a DTensor"),
    dict(name="linear_dtensor_weight_shard1", seed=24, v=8, mesh=(2,), layout="linear",
         raises="only the vocabulary (rows, Shard(0)) may be sharded"),
    dict(name="vocab_parallel_dtensor", seed=25, v=8, mesh=(2,), layout="vocab_parallel", raises="is a DTensor"),
]

AFTER = dict(CASES[1], name="after_errors")


def _plan():
    return CASES + ERROR_CASES + [AFTER]


# ---------------------------------------------------------------------------------------------
# The worker (runs in each rank's process)
# ---------------------------------------------------------------------------------------------


def _placements(case, mesh):
    from torch.distributed.tensor import Partial, Replicate, Shard

    n, cls = mesh.ndim, len(case.get("shape", (3, 5)))
    rep = [Replicate()] * n
    tp = next(i for i, s in enumerate(case["mesh"]) if s == 2)
    layout = case["layout"]
    if layout in ("shard", "linear", "vocab_parallel"):
        rep[tp] = Shard(cls)
    elif layout == "partial":
        rep[tp] = Partial()
    elif layout == "shard_twice":
        rep = [Shard(cls)] * n
    return rep


def _run_case(case, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    x, y, tw, grad_out = make_inputs(case)
    dtype = case.get("dtype", F64)
    x = x.to(dtype)
    placements = _placements(case, mesh)
    rep = [Replicate()] * mesh.ndim
    if case["layout"] == "partial":
        dx = DTensor.from_local(x / WORLD, mesh, placements)
    else:
        dx = distribute_tensor(x, mesh, placements)
    dx = dx.detach().requires_grad_(True)
    if case.get("target") == "dtensor":
        y = distribute_tensor(y, mesh, rep)
    elif case.get("target") == "sharded":
        y = distribute_tensor(y, mesh, [Shard(0)] + rep[1:])
    if tw is not None:
        tw = tw.to(dtype)
        if case["token_weight"] == "dtensor":
            tw = distribute_tensor(tw, mesh, rep)
    opts = dict(case.get("options", {}), backend="torch")
    if case.get("denominator") == "dtensor":
        opts["denominator"] = distribute_tensor(torch.tensor(opts["denominator"], dtype=torch.float64), mesh, rep)
    try:
        if case["layout"] == "linear":
            hidden = torch.randn(*case.get("shape", (3, 5)), 4, dtype=dtype)
            w = distribute_tensor(torch.randn(case["v"], 4, dtype=dtype), mesh, [Shard(1)])  # Shard(0): tested in test_vocab_parallel_linear.py
            memft_linear_loss(hidden, w, y, **opts)
            return dict(error=None)
        if case["layout"] == "vocab_parallel":
            vocab_parallel_memft_loss(dx, y, group=mesh.get_group(0), **opts)
            return dict(error=None)
        if case.get("module"):
            loss, stats = MemFTLoss(return_stats=True, **opts)(dx, y, tw)
        else:
            loss, stats = memft_loss(dx, y, token_weight=tw, return_stats=True, **opts)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return dict(error=(type(exc).__name__, str(exc)))
    g = DTensor.from_local(grad_out.to(loss.dtype), mesh, rep, run_check=False)
    loss.backward(g)
    return dict(loss_type=type(loss).__name__, loss_placements=tuple(loss.placements), loss=loss.to_local().detach(),
                stats=stats.as_dict(), stats_types={type(v).__name__ for v in stats.as_dict().values()},
                grad_type=type(dx.grad).__name__, grad_placements=tuple(dx.grad.placements),
                grad_local=dx.grad.to_local(), grad=dx.grad.full_tensor())


def _run_compiled(mesh):
    """torch.compile (the aot_eager backend: no code generation) of calls that communicate, next to the same
    calls eagerly: {name: (compiled outputs, eager outputs)} (loss and gradients, gathered), or {name: error}."""
    import torch._dynamo
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    rank = dist.get_rank()
    x, y, _, _ = make_inputs(dict(seed=60, v=13))
    g = torch.Generator().manual_seed(61)
    h, w = torch.randn(3, 5, 4, generator=g, dtype=F64), torch.randn(13, 4, generator=g, dtype=F64)
    part = torch.randn(3, 5, 4, generator=g, dtype=F64)  # hidden Partial(): rank 0 holds h - part, rank 1 part
    rows = slice(0, 2) if rank == 0 else slice(2, 3)
    world = dist.group.WORLD

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    cases = {  # name: (function of the inputs, inputs maker, fullgraph)
        "dtensor_logits": (lambda a: memft_loss(a[0], y, policy="sigmoid", backend="torch"),
                           lambda: [distribute_tensor(x, mesh, [Shard(2)])], False),
        "dtensor_partial_hidden": (
            lambda a: memft_linear_loss(a[0], a[1], y, policy="hard", backend="torch"),
            lambda: [DTensor.from_local(h - part if rank == 0 else part, mesh, [Partial()], run_check=False),
                     distribute_tensor(w, mesh, [Shard(0)])], False),
        "dp_group_fullgraph": (lambda a: memft_loss(a[0], y[rows], dp_group=world, validate=False, backend="torch"),
                               lambda: [x[rows].clone()], True),
        "dp_group_linear_fullgraph": (
            lambda a: memft_linear_loss(a[0], a[1], y[rows], normalize="valid", dp_group=world, validate=False,
                                        backend="torch"), lambda: [h[rows].clone(), w.clone()], True),
        "dtensor_fullgraph": (lambda a: memft_loss(a[0], y, validate=False, backend="torch"),
                              lambda: [distribute_tensor(x, mesh, [Shard(2)])], True),
    }
    out = {}
    for name, (fn, make, fullgraph) in cases.items():
        torch._dynamo.reset()
        runs = []
        try:
            for f in (torch.compile(fn, backend="aot_eager", fullgraph=fullgraph), fn):
                args = [t.requires_grad_(True) for t in make()]
                loss = f(args)
                loss.backward()
                runs.append([full(loss).detach()] + [full(t.grad) for t in args])
            out[name] = tuple(runs)
        except Exception as exc:  # noqa: BLE001 - the test checks the message
            out[name] = dict(error=(type(exc).__name__, str(exc)))
    # A check failing on rank 1 only while the call is traced (a float target: seen at trace time), without
    # fullgraph: the call runs eagerly there, so the failure still reaches rank 0 through the dp all_reduce.
    torch._dynamo.reset()
    bad = y[rows].float() if rank == 1 else y[rows]
    a = x[rows].clone().requires_grad_(True)
    try:
        loss = torch.compile(lambda t: memft_loss(t, bad, dp_group=world, validate=False, backend="torch"),
                             backend="aot_eager")(a)
        loss.backward()
        out["dp_group_failure_carried"] = dict(loss=loss.detach(), grad=a.grad)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        out["dp_group_failure_carried"] = dict(error=(type(exc).__name__, str(exc)))
    torch._dynamo.reset()
    return out


def _run_snippet():
    """docs/DISTRIBUTED.md's example with the default backend (native kernels on the slices)."""
    model, tokens, labels = snippet_inputs()
    ns = dict(model=model, tokens=tokens, labels=labels, tp_size=WORLD)
    exec(snippet_code(), ns)
    return dict(logits_placements=tuple(ns["logits"].placements), loss_type=type(ns["loss"]).__name__,
                loss=ns["loss"].to_local().detach(), embed_grad=model.embed.weight.grad,
                output_grad=model.output.weight.grad.full_tensor())


def _worker(rank, world, port, outdir):
    init_gloo_rank(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        meshes = {(2,): init_device_mesh("cpu", (2,)),
                  (1, 2): init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp")),
                  (2, 1): init_device_mesh("cpu", (2, 1), mesh_dim_names=("tp", "dp"))}
        results = {c["name"]: _run_case(c, meshes[c["mesh"]]) for c in _plan()}
        results["compiled"] = _run_compiled(meshes[(2,)])
        results["docs_snippet"] = _run_snippet()
        results.update((c["name"], _run_row_case(c, meshes[c["mesh"]])) for c in ROW_PLAN_1D)
        try:
            results["docs_snippet_rows"] = _run_rows_snippet()
        except Exception as exc:  # noqa: BLE001 - reported by its test, the other results still count
            results["docs_snippet_rows"] = dict(error=(type(exc).__name__, str(exc)))
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Both ranks' results of the one spawned run, keyed by case name."""
    outdir = tmp_path_factory.mktemp("dtensor")
    spawn_ranks(_worker, WORLD, (WORLD, free_port(), str(outdir)), 120.0, "the 2-rank DTensor run")
    return rank_results(outdir, WORLD)


# ---------------------------------------------------------------------------------------------
# The checks of the spawned run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES + [AFTER], ids=lambda c: c["name"])
def test_dtensor_logits_equal_single_process(spawned, case):
    dtype = case.get("dtype", F64)
    tol = REL[dtype]
    ref_loss, ref_stats, ref_grad = single_process(case)
    first = spawned[0][case["name"]]
    for rank in range(WORLD):
        res = spawned[rank][case["name"]]
        assert "error" not in res, res.get("error")
        # As torch's loss_parallel returns F.cross_entropy: a DTensor, Replicate on every mesh dim.
        assert res["loss_type"] == "DTensor" and all(type(p).__name__ == "Replicate" for p in res["loss_placements"])
        assert res["stats_types"] == {"Tensor"}  # the statistics are plain tensors
        assert torch.equal(res["loss"], first["loss"]), "ranks disagree on the loss"
        assert res["loss"].dtype == ref_loss.dtype
        assert rel_err(res["loss"], ref_loss) < tol
        for name in STAT_FIELDS:
            got, want = res["stats"][name], ref_stats[name]
            if want.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, want), name
            else:
                assert got.dtype == want.dtype and rel_err(got, want) < tol, name
        # The gradient is a DTensor with the logits' placements; gathered, it is the full gradient.
        assert res["grad_type"] == "DTensor" and res["grad_placements"] == tuple(_placements(case, _FakeMesh(case)))
        assert res["grad"].dtype == ref_grad.dtype
        assert rel_err(res["grad"], ref_grad) < tol
    if case["layout"] == "shard":
        v = case["v"]
        widths = [r["grad_local"].shape[-1] for r in (spawned[0][case["name"]], spawned[1][case["name"]])]
        assert widths == [-(-v // 2), v - (-(-v // 2))]  # torch.chunk's split, uneven for odd V


class _FakeMesh:
    """What _placements needs of a mesh (its number of dimensions)."""

    def __init__(self, case):
        self.ndim = len(case["mesh"])


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c["name"])
def test_bad_layouts_raise_on_every_rank(spawned, case):
    for rank in range(WORLD):
        res = spawned[rank][case["name"]]
        assert res.get("error"), f"rank {rank} did not raise"
        kind, message = res["error"]
        assert kind == "ValueError" and case["raises"] in message, f"rank {rank}: {kind}: {message}"


@pytest.mark.parametrize("name", ["dtensor_logits", "dtensor_partial_hidden", "dp_group_fullgraph",
                                  "dp_group_linear_fullgraph"])
def test_torch_compile_equals_eager_on_2_ranks(spawned, name):
    """torch.compile (aot_eager) of memft_loss / memft_linear_loss with sharded DTensor inputs (Shard(-1) logits;
    a Partial hidden) and with dp_group: the loss and every gradient equal the eager call's. The DTensor calls
    run eagerly at one graph break; with dp_group the call traces whole (fullgraph=True, validate=False; the
    linear loss with normalize="valid": its "active" fallback is a host read, see the one-rank test)."""
    for rank in range(WORLD):
        res = spawned[rank]["compiled"][name]
        assert not isinstance(res, dict), res.get("error")
        compiled, eager = res
        assert len(compiled) == len(eager) >= 2
        for got, want in zip(compiled, eager):
            assert rel_err(got, want) < 1e-12, (rank, name)


def test_torch_compile_fullgraph_with_dtensor_names_the_alternative(spawned):
    """fullgraph=True with sharded DTensor logits: one error naming what to do (before: Dynamo's "Attempted to
    call function marked as skipped ... zlib.crc32", from the layout check deep inside)."""
    for rank in range(WORLD):
        kind, message = spawned[rank]["compiled"]["dtensor_fullgraph"]["error"]
        assert "with sharded (or Partial) DTensor inputs run eagerly" in message, message
        assert "Compile without fullgraph=True" in message and "crc32" not in message


def test_torch_compile_carries_a_trace_time_failure_over_dp_group(spawned):
    """torch.compile (no fullgraph) of memft_loss with dp_group, rank 1's target a float tensor (a check that fails
    while tracing): as eagerly, rank 1 raises its TypeError and rank 0, which passed its checks, gets a NaN loss and
    gradient (validate=False) from the dp all_reduce instead of waiting in it (docs/SPEC.md, dp_group; under
    fullgraph=True that rank stops before its graph runs: not run here, it would leave rank 0 waiting)."""
    kind, message = spawned[1]["compiled"]["dp_group_failure_carried"]["error"]
    assert kind == "TypeError" and "target must be an integer tensor" in message, message
    got = spawned[0]["compiled"]["dp_group_failure_carried"]
    assert "error" not in got, got
    assert torch.isnan(got["loss"]) and bool(torch.isnan(got["grad"]).all())


def test_docs_example_colwise_lm_head(spawned):
    """docs/DISTRIBUTED.md's torchtitan-style example runs as written on 2 ranks: a ColwiseParallel
    lm_head (use_local_output=False) feeding memft_loss with the default backend; the loss, the
    embedding gradient and the gathered lm_head gradient equal the single process's (float32)."""
    model, tokens, labels = snippet_inputs()
    ref_loss = memft_loss(model(tokens), labels, policy="hard")
    ref_loss.backward()
    for rank in range(WORLD):
        res = spawned[rank]["docs_snippet"]
        assert [type(p).__name__ for p in res["logits_placements"]] == ["Shard"] and res["loss_type"] == "DTensor"
        assert rel_err(res["loss"], ref_loss) < 2e-5
        assert rel_err(res["embed_grad"], model.embed.weight.grad) < 2e-5
        assert rel_err(res["output_grad"], model.output.weight.grad) < 2e-5


# ---------------------------------------------------------------------------------------------
# Row-sharded logits (data / context parallel mesh dimensions): the 1-D cases run in the 2-rank
# spawn above, the 2-D ones in one spawn of 4 ranks below. Placements are written per mesh
# dimension: "b" = Shard(0) (batch), "t" = Shard(1) (sequence), "c" = Shard(2) (classes), "r" =
# Replicate(). target / token_weight: "dtensor" (sharded like the rows) or "local" (a plain tensor
# holding this rank's rows). The old code raised "a row dimension" for every one of these.
# ---------------------------------------------------------------------------------------------

ROW_CASES_1D = [
    dict(name="rows_b_mean_hard", seed=60, v=9, mesh=(2,), rows="b", target="dtensor", token_weight="dtensor",
         options=dict(policy="hard")),
    dict(name="rows_b_sum_sigmoid_local", seed=61, v=9, mesh=(2,), rows="b", target="local", token_weight="local",
         options=dict(policy="sigmoid", reduction="sum")),
    dict(name="rows_t_valid_f32_native", seed=62, v=11, mesh=(2,), rows="t", dtype=F32, backend="auto",
         target="local", options=dict(policy="hard", normalize="valid")),
    dict(name="rows_b_none", seed=63, v=9, mesh=(2,), rows="b", target="dtensor", shape=(5, 3),
         options=dict(policy="sigmoid", reduction="none")),
    dict(name="rows_b_empty_shard", seed=64, v=9, mesh=(2,), rows="b", target="local", shape=(1, 4),
         options=dict(policy="hard")),
    dict(name="rows_b_fallback_local_only", seed=65, v=9, mesh=(2,), rows="b", target="local",
         confident_rows=(0, 1), options=dict(policy="hard")),
    dict(name="rows_b_fallback_global_mean", seed=66, v=9, mesh=(2,), rows="b", target="local",
         confident_rows="all", options=dict(policy="hard")),
    dict(name="rows_b_fallback_global_zero", seed=66, v=9, mesh=(2,), rows="b", target="dtensor",
         confident_rows="all", options=dict(policy="hard", fallback="zero")),
    dict(name="rows_b_denominator_number", seed=67, v=9, mesh=(2,), rows="b", target="local", token_weight="local",
         options=dict(policy="sigmoid", denominator=6.5)),
    dict(name="rows_b_denominator_dtensor", seed=68, v=9, mesh=(2,), rows="b", target="local", denominator="dtensor",
         options=dict(policy="hard", denominator=4.0)),
    dict(name="rows_t_weight_fn_smooth_z_cap", seed=69, v=10, mesh=(2,), rows="t", target="dtensor",
         options=dict(policy="hard", label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                      weight_fn=lambda target, stats: 0.5 + (stats.ce > 1.5).double())),
    dict(name="rows_b_inplace_f32_module", seed=70, v=9, mesh=(2,), rows="b", dtype=F32, target="local",
         module=True, options=dict(policy="sigmoid", inplace_backward=True)),
]

ROW_ERRORS_1D = [
    dict(name="rows_err_target_whole", seed=80, v=9, mesh=(2,), rows="b", target="whole",
         raises=["holds this rank's rows"] * 2),
    dict(name="rows_err_target_replicated", seed=81, v=9, mesh=(2,), rows="b", target="replicated",
         raises=["must be sharded the same way"] * 2),
    dict(name="rows_err_bad_target_one_rank", seed=82, v=9, mesh=(2,), rows="b", target="local", bad_rank=1,
         raises=["another rank", "outside [0, V)"]),
    dict(name="rows_err_options_differ", seed=83, v=9, mesh=(2,), rows="b", target="local",
         rank_options={0: dict(reduction="sum")}, raises=["options"] * 2),
]



def _weight_fn_fails_on_rank1(target, stats):
    if dist.get_rank() == 1:
        raise ValueError("weight_fn failed here on rank 1")
    return 1.0 + stats.prob


def _weight_fn_nan_on_rank0(target, stats):
    return 1.0 + stats.prob * (float("nan") if dist.get_rank() == 0 else 1.0)


# Regression: a weight_fn failing on one rank only (the ranks hold different rows) raised there, while
# the other rank waited in the global mean's all-reduce ("active") or the loss gather ("valid", "none"):
# a hang. Now the error is carried by the loss gather and raised on every rank.
ROW_ERRORS_1D += [
    dict(name="rows_err_weight_fn_raises_rank1_active", seed=84, v=9, mesh=(2,), rows="b", target="local",
         options=dict(policy="sigmoid", weight_fn=_weight_fn_fails_on_rank1),
         raises=["weight_fn failed on another rank", "weight_fn failed here on rank 1"]),
    dict(name="rows_err_weight_fn_nan_rank0_valid_none", seed=85, v=9, mesh=(2,), rows="t", target="dtensor",
         options=dict(policy="hard", normalize="valid", reduction="none", weight_fn=_weight_fn_nan_on_rank0),
         raises=["returned nan", "weight_fn failed on another rank"]),
]

ROW_AFTER_1D = dict(ROW_CASES_1D[0], name="rows_after_errors")
ROW_PLAN_1D = ROW_CASES_1D + ROW_ERRORS_1D + [ROW_AFTER_1D]

ROW_WORLD = 4
ROW_CASES_2D = [
    dict(name="rows2d_b_c_mean_uneven", seed=90, v=13, mesh=(2, 2), rows="bc", target="dtensor",
         token_weight="dtensor", options=dict(policy="hard")),
    dict(name="rows2d_b_c_sum_local", seed=91, v=12, mesh=(2, 2), rows="bc", target="local", token_weight="local",
         options=dict(policy="sigmoid", reduction="sum")),
    dict(name="rows2d_b_c_valid_smooth_z_cap", seed=92, v=11, mesh=(2, 2), rows="bc", target="local",
         options=dict(policy="hard", normalize="valid", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
    dict(name="rows2d_b_c_none_f32", seed=93, v=13, mesh=(2, 2), rows="bc", dtype=F32, target="dtensor",
         options=dict(policy="hard", reduction="none")),
    dict(name="rows2d_c_t_mean_sigmoid", seed=94, v=13, mesh=(2, 2), rows="ct", target="local", token_weight="local",
         options=dict(policy="sigmoid", threshold=0.3)),
    dict(name="rows2d_b_c_fallback_local_only", seed=100, v=13, mesh=(2, 2), rows="bc", target="dtensor",
         shape=(2, 5), confident_rows=(0,), options=dict(policy="hard")),
    dict(name="rows2d_b_c_fallback_global", seed=95, v=13, mesh=(2, 2), rows="bc", target="local",
         confident_rows="all", options=dict(policy="hard")),
    dict(name="rows2d_b_t_two_row_dims", seed=96, v=9, mesh=(2, 2), rows="bt", target="dtensor",
         token_weight="dtensor", options=dict(policy="sigmoid")),
    dict(name="rows2d_b_b_nested_empty", seed=97, v=9, mesh=(2, 2), rows="bb", target="local",
         options=dict(policy="hard", normalize="valid")),
    dict(name="rows2d_b_r_mean", seed=98, v=9, mesh=(2, 2), rows="br", target="local", token_weight="local",
         options=dict(policy="hard")),
]
ROW_ERRORS_2D = [
    dict(name="rows2d_err_bad_target_rank3", seed=99, v=13, mesh=(2, 2), rows="bc", target="local", bad_rank=3,
         raises=["another rank"] * 3 + ["outside [0, V)"]),
    # Regression: rank 1's (in-range) target differs from rank 0's, which shares its rows (the classes are
    # sharded over ranks 0 and 1): the vocab-parallel loss raised on ranks 0 and 1 only, while ranks 2 and
    # 3 waited for them in the data-parallel collective (a hang until the process group's timeout).
    dict(name="rows2d_err_target_differs_in_class_group", seed=101, v=13, mesh=(2, 2), rows="bc", target="local",
         differ_rank=1, raises=["target (or token_weight) differs"] * 4),
]
ROW_AFTER_2D = dict(ROW_CASES_2D[0], name="rows2d_after_errors")
ROW_PLAN_2D = ROW_CASES_2D + ROW_ERRORS_2D + [ROW_AFTER_2D]


def _row_case_placements(case):
    """(the logits' placements, the per-row placements) of a row case."""
    from torch.distributed.tensor import Replicate, Shard

    cls = len(case.get("shape", (3, 5)))
    code = {"b": Shard(0), "t": Shard(1), "c": Shard(cls), "r": Replicate()}
    logits = [code[k] for k in case["rows"]]
    rows = [code[k] if k in "bt" else Replicate() for k in case["rows"]]
    return logits, rows


def _run_row_case(case, mesh):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    x, y, tw, grad_out = make_inputs(case)
    dtype = case.get("dtype", F64)
    placements, rows = _row_case_placements(case)
    dx = distribute_tensor(x.to(dtype), mesh, placements).detach().requires_grad_(True)
    rank, rep = dist.get_rank(), [Replicate()] * mesh.ndim

    def arg(t, how):
        if t is None:
            return None
        if how == "whole":
            return t
        if how == "replicated":
            return distribute_tensor(t, mesh, rep)
        d = distribute_tensor(t, mesh, rows)
        return d if how == "dtensor" else d.to_local().clone()

    y_arg = arg(y, case["target"])
    if case.get("bad_rank") == rank:
        y_arg.view(-1)[-1] = case["v"] + 3
    if case.get("differ_rank") == rank:
        y_arg.view(-1)[0] = (y_arg.view(-1)[0] + 1) % case["v"]
    tw_arg = arg(None if tw is None else tw.to(dtype), case.get("token_weight"))
    opts = dict(case.get("options", {}), backend=case.get("backend", "torch"))
    opts.update(case.get("rank_options", {}).get(rank, {}))
    if case.get("denominator") == "dtensor":
        opts["denominator"] = distribute_tensor(torch.tensor(opts["denominator"], dtype=torch.float64), mesh, rep)
    try:
        if case.get("module"):
            loss, stats = MemFTLoss(return_stats=True, **opts)(dx, y_arg, tw_arg)
        else:
            loss, stats = memft_loss(dx, y_arg, token_weight=tw_arg, return_stats=True, **opts)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message per rank
        return dict(error=(type(exc).__name__, str(exc)))
    if opts.get("reduction") == "none":
        loss.backward(distribute_tensor(grad_out.to(loss.dtype), mesh, rows))
    else:
        loss.backward(DTensor.from_local(grad_out.to(loss.dtype), mesh, rep, run_check=False))
    per_row = {k: getattr(stats, k) for k in ("ce", "prob", "lse", "weight", "pred")}
    return dict(loss_type=type(loss).__name__, loss_placements=tuple(loss.placements),
                loss_local=loss.to_local().detach(), loss=loss.full_tensor().detach(),
                stats={k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in stats.as_dict().items()},
                per_row_placements={k: tuple(v.placements) if isinstance(v, DTensor) else None
                                    for k, v in per_row.items()},
                summary_types={type(getattr(stats, k)).__name__ for k in STAT_FIELDS if k not in per_row},
                grad_type=type(dx.grad).__name__, grad_placements=tuple(dx.grad.placements),
                grad=dx.grad.full_tensor(), local_rows=tuple(dx.to_local().shape[:-1]))


def _row_worker(rank, world, port, outdir):
    init_gloo_rank(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        results = {c["name"]: _run_row_case(c, mesh) for c in ROW_PLAN_2D}
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned_rows_2d(tmp_path_factory):
    """The 4 ranks' results of the one spawned run of the 2-D (2 x 2) row cases."""
    outdir = tmp_path_factory.mktemp("dtensor_rows")
    spawn_ranks(_row_worker, ROW_WORLD, (ROW_WORLD, free_port(), str(outdir)), 180.0, "the 4-rank row-sharded run")
    return rank_results(outdir, ROW_WORLD)


def _check_row_case(results, case):
    """Every rank's result of a row case against memft_loss on the full float64 logits."""
    dtype = case.get("dtype", F64)
    tol = REL[dtype]
    ref_loss, ref_stats, ref_grad = single_process(case)
    _, rows = _row_case_placements(case)
    first = results[0][case["name"]]
    for rank, res in enumerate(results):
        res = res[case["name"]]
        assert "error" not in res, (rank, res.get("error"))
        assert res["loss_type"] == "DTensor" and res["loss"].dtype == ref_loss.dtype
        if case["options"].get("reduction") == "none":
            # The per-row losses, sharded like the logits' rows.
            assert res["loss_placements"] == tuple(rows)
            assert res["loss_local"].shape == res["local_rows"]
        else:
            # The whole loss on every rank, the same bits everywhere.
            assert all(type(p).__name__ == "Replicate" for p in res["loss_placements"])
            assert torch.equal(res["loss_local"], first["loss_local"]), "ranks disagree on the loss"
        assert rel_err(res["loss"], ref_loss) < tol
        assert set(res["per_row_placements"].values()) == {tuple(rows)}  # per-row statistics: DTensors like the rows
        assert res["summary_types"] == {"Tensor"}  # 0-d statistics: plain, global
        for name in STAT_FIELDS:
            got, want = res["stats"][name], ref_stats[name]
            if want.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, want), (rank, name, got, want)
            else:
                assert got.dtype == want.dtype and rel_err(got, want) < tol, (rank, name)
        assert res["grad_type"] == "DTensor" and res["grad"].dtype == ref_grad.dtype
        assert rel_err(res["grad"], ref_grad) < tol, rank


def _check_row_error(results, case):
    for rank, res in enumerate(results):
        res = res[case["name"]]
        assert res.get("error"), f"rank {rank} did not raise"
        kind, message = res["error"]
        assert kind == "ValueError" and case["raises"][rank] in message, f"rank {rank}: {kind}: {message}"


@pytest.mark.parametrize("case", ROW_CASES_1D + [ROW_AFTER_1D], ids=lambda c: c["name"])
def test_row_sharded_logits_1d_mesh(spawned, case):
    """Rows sharded over a 1-D mesh of 2 ranks (batch or sequence; uneven, and an empty shard):
    loss, statistics and gradient equal memft_loss on the full logits; was a ValueError."""
    _check_row_case(spawned, case)


@pytest.mark.parametrize("case", ROW_CASES_2D + [ROW_AFTER_2D], ids=lambda c: c["name"])
def test_row_sharded_logits_2d_mesh(spawned_rows_2d, case):
    """Rows x classes on a 2 x 2 mesh (vocab-parallel with the rows' dp_group), two row-sharding mesh
    dimensions, nested Shard(0) with an empty shard, rows x replicate; was a ValueError."""
    _check_row_case(spawned_rows_2d, case)


@pytest.mark.parametrize("case", ROW_ERRORS_1D, ids=lambda c: c["name"])
def test_row_sharded_bad_inputs_raise_on_every_rank_1d(spawned, case):
    _check_row_error(spawned, case)


@pytest.mark.parametrize("case", ROW_ERRORS_2D, ids=lambda c: c["name"])
def test_row_sharded_bad_inputs_raise_on_every_rank_2d(spawned_rows_2d, case):
    _check_row_error(spawned_rows_2d, case)


def test_row_fallback_cases_mean_what_they_say():
    """The fallback cases test the global rule: with rows 0-1 sure, rank 0 holds no active token
    (a local decision would fall back there) while the whole batch has some; with every row sure
    the whole batch falls back."""
    for name, fell in (("rows_b_fallback_local_only", False), ("rows_b_fallback_global_mean", True),
                       ("rows2d_b_c_fallback_local_only", False), ("rows2d_b_c_fallback_global", True)):
        case = next(c for c in ROW_CASES_1D + ROW_CASES_2D if c["name"] == name)
        _, stats, _ = single_process(case)
        assert bool(stats["fell_back"]) is fell and (int(stats["n_active"]) > 0) is not fell, name
        sure = case["confident_rows"]
        assert float(stats["weight"][list(sure) if sure != "all" else slice(None)].sum()) == 0.0, name


def test_docs_example_row_sharded(spawned):
    """docs/DISTRIBUTED.md's data-parallel DTensor example as written, on 2 ranks: each rank's batch
    (plain local labels) through a replicated lm_head; the loss is the global batch's and the
    lm_head gradient (a Replicate DTensor) the full one (float32)."""
    model, tokens, labels = rows_snippet_inputs()
    ref_loss = memft_loss(model(tokens), labels, policy="hard")
    ref_loss.backward()
    for rank in range(WORLD):
        res = spawned[rank]["docs_snippet_rows"]
        assert "error" not in res, res.get("error")
        assert res["loss_type"] == "DTensor" and rel_err(res["loss"], ref_loss) < 2e-5
        assert rel_err(res["output_grad"], model.output.weight.grad) < 2e-5


def rows_snippet_inputs():
    """The row-sharded docs snippet's model, the global batch (2 ranks x 2 sequences) and labels."""
    torch.manual_seed(52)
    model = TinyLM()
    g = torch.Generator().manual_seed(53)
    tokens = torch.randint(0, 13, (4, 5), generator=g)
    labels = torch.randint(0, 13, (4, 5), generator=g)
    labels[:, -1] = -100
    return model, tokens, labels


def _run_rows_snippet():
    """docs/DISTRIBUTED.md's row-sharded example (default backend): rank r holds sequences 2r, 2r+1."""
    model, tokens, labels = rows_snippet_inputs()
    r = dist.get_rank()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/DISTRIBUTED.md").read_text(), re.S)
    (code,) = [b for b in blocks if "dp_mesh" in b]
    code = code.replace('init_device_mesh("cuda"', 'init_device_mesh("cpu"')
    ns = dict(model=model, local_tokens=tokens[2 * r:2 * r + 2], local_labels=labels[2 * r:2 * r + 2], dp_size=WORLD)
    exec(code, ns)
    return dict(loss_type=type(ns["loss"]).__name__, loss=ns["loss"].to_local().detach(),
                output_grad=model.output.weight.grad.full_tensor())


# ---------------------------------------------------------------------------------------------
# In this process: a one-rank mesh, the default backend
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_mesh():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_one_rank_mesh_default_backend(one_rank_mesh):
    """Was: RuntimeError "memft.cpu_row_forward.default ... mixed torch.Tensor and DTensor" (no
    sharding strategy) for every placement."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    case = dict(seed=40, v=17, shape=(4, 6), options=dict(policy="hard"))
    x, y, _, _ = make_inputs(case)
    x = x.float()
    ref_loss, ref_stats = memft_loss(x, y, return_stats=True)
    ref_x = x.clone().requires_grad_(True)
    memft_loss(ref_x, y).backward()
    for placement in (Shard(2), Shard(-1), Replicate()):
        dx = distribute_tensor(x, one_rank_mesh, [placement]).requires_grad_(True)
        loss, stats = memft_loss(dx, y, return_stats=True)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        assert rel_err(loss.to_local(), ref_loss) < 2e-5 and torch.equal(stats.pred, ref_stats.pred)
        loss.backward()
        assert isinstance(dx.grad, DTensor) and dx.grad.placements == dx.placements
        assert rel_err(dx.grad.full_tensor(), ref_x.grad) < 2e-5
    # Rows sharded (was: ValueError "a row dimension"): a one-rank data-parallel group, the default
    # (native) backend, through the global-denominator path ("mean") and the plain one ("sum").
    for placement in (Shard(0), Shard(1)):
        for reduction in ("mean", "sum"):
            ref_x = x.clone().requires_grad_(True)
            ref_loss, ref_stats = memft_loss(ref_x, y, reduction=reduction, return_stats=True)
            ref_loss.backward()
            dx = distribute_tensor(x, one_rank_mesh, [placement]).requires_grad_(True)
            loss, stats = memft_loss(dx, y, reduction=reduction, return_stats=True)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
            assert isinstance(stats.ce, DTensor) and stats.ce.placements == (placement,)
            assert rel_err(loss.to_local(), ref_loss) < 2e-5 and torch.equal(stats.pred.full_tensor(), ref_stats.pred)
            assert torch.equal(stats.n_active, ref_stats.n_active) and torch.equal(stats.fell_back, ref_stats.fell_back)
            loss.backward()
            assert dx.grad.placements == (placement,) and rel_err(dx.grad.full_tensor(), ref_x.grad) < 2e-5
    with pytest.raises(ValueError, match=r"rows are sharded.*pass dp_group=None"):  # the mesh gives the group
        memft_loss(distribute_tensor(x, one_rank_mesh, [Shard(0)]), y, dp_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="Partial"):
        from torch.distributed.tensor import Partial

        memft_loss(DTensor.from_local(x, one_rank_mesh, [Partial()]), y)
    with pytest.raises(ValueError, match=r"only the vocabulary \(rows, Shard\(0\)\) may be sharded"):
        memft_linear_loss(torch.randn(4, 3), distribute_tensor(torch.randn(5, 3), one_rank_mesh, [Shard(1)]),
                          torch.randint(0, 5, (4,)))
    # A Shard(0) weight on a one-rank mesh: plain memft_linear_loss on the local tensor.
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    y5 = torch.randint(0, 5, (4,))
    dw = distribute_tensor(weight, one_rank_mesh, [Shard(0)]).requires_grad_(True)
    loss = memft_linear_loss(hidden, dw, y5)
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
    loss.backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = memft_linear_loss(ref_h, ref_w, y5)
    ref.backward()
    assert rel_err(loss.to_local(), ref) < 2e-5 and isinstance(dw.grad, DTensor) and dw.grad.placements == (Shard(0),)
    assert rel_err(dw.grad.full_tensor(), ref_w.grad) < 2e-5 and rel_err(hidden.grad, ref_h.grad) < 2e-5


def test_torch_compile_fullgraph_one_rank_mesh(one_rank_mesh):
    """fullgraph=True: a DTensor call that communicates (rows sharded: the check exchange; a Partial hidden: its
    redistribute) stops with one error naming the alternatives (before: "zlib.crc32" from inside the check);
    one that does not (replicated logits, a class shard on a one-rank mesh) still traces, equal to eager.
    memft_linear_loss with dp_group and the "active" fallback read: an error naming fallback="zero" /
    normalize="valid" (before: "is_fake ... should not be traced"); with normalize="valid" it traces."""
    import torch._dynamo
    from torch._dynamo.exc import Unsupported
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    x, y, _, _ = make_inputs(dict(seed=62, v=9, shape=(4, 3)))
    h, w = torch.randn(4, 3, 5, dtype=F64), torch.randn(9, 5, dtype=F64)
    world = dist.group.WORLD

    def compiled(fn, *args):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)

    def loss(a):
        return memft_loss(a, y, validate=False, backend="torch")

    for placement in (Replicate(), Shard(2)):
        dx = distribute_tensor(x, one_rank_mesh, [placement])
        assert torch.equal(compiled(loss, dx).to_local(), loss(dx).to_local())
    with pytest.raises(Unsupported, match=r"sharded \(or Partial\) DTensor inputs run eagerly.*Compile without "
                                          r"fullgraph=True"):
        compiled(loss, distribute_tensor(x, one_rank_mesh, [Shard(0)]))
    dw = distribute_tensor(w, one_rank_mesh, [Shard(0)])
    with pytest.raises(Unsupported, match="Compile without fullgraph=True"):
        compiled(lambda a, b: memft_linear_loss(a, b, y, validate=False, backend="torch"),
                 DTensor.from_local(h, one_rank_mesh, [Partial()]), dw)

    def linear(normalize):
        return lambda a, b: memft_linear_loss(a, b, y, normalize=normalize, dp_group=world, validate=False,
                                              backend="torch")
    hh = h.clone().requires_grad_(True)
    with pytest.raises(Unsupported, match=r"pass fallback='zero', normalize='valid' or a denominator"):
        compiled(linear("active"), hh, w)
    assert torch.equal(compiled(linear("valid"), hh, w), linear("valid")(hh, w))
    torch._dynamo.reset()


def test_vocab_parallel_torch_compile_one_rank_group(one_rank_mesh):
    """The vocab-parallel functions called directly (plain local tensors, a group) under torch.compile: with
    fullgraph=True one error naming the alternatives, as the DTensor calls give (before: Dynamo's "Attempted to
    call function marked as skipped ... zlib.crc32" from the layout check's option checksum, naming nothing to
    do); without fullgraph the layout check runs eagerly at a graph break (was 7 breaks) and the loss and
    gradients equal the eager call's."""
    import torch._dynamo
    from torch._dynamo.exc import Unsupported

    from memft_kernels.distributed import vocab_parallel_memft_loss
    from memft_kernels.vocab_parallel_linear import vocab_parallel_memft_linear_loss

    x, y, _, _ = make_inputs(dict(seed=64, v=9, shape=(4, 3)))
    g = torch.Generator().manual_seed(65)
    h, w = torch.randn(4, 3, 5, generator=g, dtype=F64), torch.randn(9, 5, generator=g, dtype=F64)
    calls = {"loss": (lambda a: vocab_parallel_memft_loss(a[0] * 2, y, policy="sigmoid", validate=False,
                                                          backend="torch"), [x]),
             "linear": (lambda a: vocab_parallel_memft_linear_loss(a[0], a[1], y, policy="sigmoid", validate=False,
                                                                   backend="torch"), [h, w])}
    for fn, inputs in calls.values():
        torch._dynamo.reset()
        with pytest.raises(Unsupported, match=r"exchange a layout check.*Compile without fullgraph=True"):
            torch.compile(fn, backend="aot_eager", fullgraph=True)([t.clone() for t in inputs])
    fn, inputs = calls["loss"]
    runs = []
    for f in (torch.compile(fn, backend="aot_eager"), fn):
        torch._dynamo.reset()
        args = [t.clone().requires_grad_(True) for t in inputs]
        loss = f(args)
        loss.backward()
        runs.append([loss.detach()] + [t.grad for t in args])
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(*runs)), runs


class _ModelWithLoss(torch.nn.Module):
    """A model holding its loss module (what torch.save(model) pickles)."""

    def __init__(self, group):
        super().__init__()
        self.head = torch.nn.Linear(5, 9, dtype=F64)
        self.loss_fn = MemFTLoss(dp_group=group, policy="sigmoid", backend="torch")


def test_pickling_memft_loss_with_dp_group(one_rank_mesh):
    """torch.save(model) / pickle of a module holding MemFTLoss(dp_group=...): was pickle's TypeError "cannot
    pickle 'ProcessGroup' object" (no fix named). Now the group is left out of the pickle (a communicator
    handle is not data, as copy.deepcopy already shares it); the loaded loss refuses to run until
    set_dp_group re-attaches one, so it never silently computes a local mean; copies keep the group."""
    import copy
    import io
    import pickle

    world = dist.group.WORLD
    torch.manual_seed(63)
    model = _ModelWithLoss(world)
    h, y = torch.randn(6, 5, dtype=F64), torch.randint(0, 9, (6,))
    want = model.loss_fn(model.head(h), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    assert model.loss_fn.loss_options.dp_group is world  # the original keeps its group
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert loaded.loss_fn.loss_options.dp_group is None and "detached by pickling" in repr(loaded.loss_fn)
    with pytest.raises(RuntimeError, match=r"without its dp_group.*set_dp_group\(group\)"):
        loaded.loss_fn(loaded.head(h), y)
    loaded.loss_fn.set_dp_group(world)
    assert loaded.loss_fn.loss_options.dp_group is world and "detached" not in repr(loaded.loss_fn)
    assert torch.equal(loaded.loss_fn(loaded.head(h), y), want)
    # pickle itself; set_dp_group(None): the plain local mean
    plain = pickle.loads(pickle.dumps(model.loss_fn))
    plain.set_dp_group(None)
    assert "dp_group" not in plain.options
    assert torch.equal(plain(model.head(h), y), memft_loss(model.head(h), y, policy="sigmoid", backend="torch"))
    # copies share the group and run at once; a loss without dp_group round-trips unchanged
    for clone in (copy.copy(model.loss_fn), copy.deepcopy(model).loss_fn):
        assert clone.loss_options.dp_group is world and torch.equal(clone(model.head(h), y), want)
    assert torch.equal(pickle.loads(pickle.dumps(MemFTLoss(policy="sigmoid", backend="torch")))(model.head(h), y),
                       memft_loss(model.head(h), y, policy="sigmoid", backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_rank_nccl_mesh(backend):
    """DTensor logits on the GPU (nccl, one rank): bf16 through the Triton and CUDA backends, equal
    to the plain call on the same tensors (run by benchmarks/gpu_check.sh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from memft_kernels import dispatch

    reason = dispatch.availability(backend)
    if reason is not None:
        pytest.skip(reason)
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        g = torch.Generator().manual_seed(7)
        x = (3 * torch.randn(64, 4099, generator=g)).to("cuda", torch.bfloat16)
        y = torch.randint(0, 4099, (64,), generator=g).to("cuda")
        y[::9] = -100
        ref_x = x.clone().requires_grad_(True)
        ref = memft_loss(ref_x, y, backend=backend, policy="sigmoid")
        ref.backward()
        for placement in (Shard(-1), Replicate()):
            dx = distribute_tensor(x, mesh, [placement]).requires_grad_(True)
            loss = memft_loss(dx, y, backend=backend, policy="sigmoid")
            assert isinstance(loss, DTensor)
            loss.backward()
            assert rel_err(loss.to_local(), ref) < 1e-6
            assert rel_err(dx.grad.full_tensor().float(), ref_x.grad.float()) < 1e-6
    finally:
        dist.destroy_process_group()
