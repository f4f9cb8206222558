"""MemFTAccumulator: K micro-batches (and 2 gloo ranks) give the gradient of ONE memft_loss call
over the whole batch (normalize="active", its fallback included), to float32 rounding.

The "model" is one linear map W (logits = X W^T), so the reference gradient is exact and cheap;
the accumulator only ever sees the parameters' .grad, so the model's size does not matter here.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from memft_kernels import memft_loss
from memft_kernels.accumulate import MemFTAccumulator

from helpers import free_port, init_gloo_rank, rank_results, spawn_ranks

N, D, V = 48, 24, 40
REL = 2e-6  # float32 rounding of sums over <= 48 rows


def make_case(seed, recalled="mixed", ignore=True, dtype=torch.float32):
    """(X, W, target, token_weight): recalled="all" makes every valid row's p > 0.5 (argmax target
    of a sharp head), "none" makes every row active, "mixed" about half and half, "head" the first
    half recalled and the second half active."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    sharp = x @ (w * 6.0).T
    argmax = sharp.argmax(-1)
    other = (argmax + 1 + torch.randint(0, V - 1, (N,), generator=g)) % V
    pick = {
        "all": torch.ones(N, dtype=torch.bool),
        "none": torch.zeros(N, dtype=torch.bool),
        "mixed": torch.rand(N, generator=g) < 0.5,
        "head": torch.arange(N) < N // 2,
    }[recalled]
    target = torch.where(pick, argmax, other)
    if ignore:
        target[torch.randperm(N, generator=g)[:5]] = -100
    token_weight = torch.rand(N, generator=g, dtype=torch.float64) + 0.25
    return x.to(dtype), (w * 6.0).to(dtype), target, token_weight.to(dtype)


def reference_grad(x, w, target, **options):
    w = w.clone().requires_grad_(True)
    loss, stats = memft_loss(x @ w.T, target, return_stats=True, **options)
    loss.backward()
    return loss.detach(), w.grad, stats


def accumulated_grad(x, w, target, splits, *, last=False, fallback="mean", token_weight=None, **options):
    w = w.clone().requires_grad_(True)
    acc = MemFTAccumulator([w], fallback=fallback)
    start = 0
    for k, size in enumerate(splits):
        rows = slice(start, start + size)
        start += size
        extra = {} if token_weight is None else {"token_weight": token_weight[rows]}
        out = acc.loss(x[rows] @ w.T, target[rows], last=last and k == len(splits) - 1, **options, **extra)
        out.backward()
    assert start == x.shape[0]
    info = acc.finish_step()
    return info, w.grad


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SPLITS = [(48,), (16, 16, 16), (5, 30, 13), (1, 46, 1)]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("last", [False, True], ids=["finish", "last"])
@pytest.mark.parametrize("recalled,fallback,policy", [
    ("mixed", "mean", "hard"),
    ("head", "mean", "hard"),  # the first micro-batches fall back locally, the step does not
    ("all", "mean", "hard"),   # the whole step falls back to the plain mean
    ("all", "zero", "hard"),   # ... or to zero
    ("mixed", "mean", "sigmoid"),
])
def test_micro_batches_equal_one_call(splits, last, recalled, fallback, policy):
    x, w, target, _ = make_case(1, recalled)
    ref_loss, ref_grad, ref_stats = reference_grad(x, w, target, policy=policy, fallback=fallback)
    if recalled == "all":
        assert bool(ref_stats.fell_back) and int(ref_stats.n_active) == 0
    else:  # some rows recalled, some not (sigmoid weights are never exactly 0)
        assert 0 < float(ref_stats.recalled_frac) < 1 and not bool(ref_stats.fell_back)
    info, grad = accumulated_grad(x, w, target, splits, last=last, fallback=fallback, policy=policy)
    if recalled == "all" and fallback == "zero":
        assert torch.count_nonzero(grad) == 0 and float(ref_grad.abs().max()) == 0.0
    else:
        assert rel_err(grad, ref_grad) < REL
    assert info["loss"] == pytest.approx(float(ref_loss), rel=REL, abs=1e-12)
    assert info["fell_back"] == bool(ref_stats.fell_back)
    assert info["n_active"] == int(ref_stats.n_active) and info["n_valid"] == int(ref_stats.n_valid)
    assert info["recalled_frac"] == pytest.approx(float(ref_stats.recalled_frac), abs=1e-6)
    assert info["token_accuracy"] == pytest.approx(float(ref_stats.token_accuracy), abs=1e-6)
    assert info["micro_batches"] == len(splits)


def test_options_token_weight_label_smoothing_z_loss():
    x, w, target, tw = make_case(2, "mixed")
    opts = dict(policy="sigmoid", label_smoothing=0.1, z_loss=1e-3)
    _, ref_grad, _ = reference_grad(x, w, target, token_weight=tw, **opts)
    _, grad = accumulated_grad(x, w, target, (7, 20, 21), token_weight=tw, **opts)
    assert rel_err(grad, ref_grad) < REL


def test_fallback_ignores_token_weight_and_keeps_label_smoothing():
    """The fallback is the plain mean of l_i over valid rows (w_i = 1: token_weight dropped)."""
    x, w, target, tw = make_case(3, "all")
    _, ref_grad, stats = reference_grad(x, w, target, token_weight=tw, label_smoothing=0.05)
    assert bool(stats.fell_back)
    _, grad = accumulated_grad(x, w, target, (10, 38), token_weight=tw, label_smoothing=0.05)
    assert rel_err(grad, ref_grad) < REL


def test_micro_batch_without_valid_rows_and_bf16_logits():
    x, w, target, _ = make_case(4, "mixed")
    target[:8] = -100  # the first micro-batch has nothing to train
    _, ref_grad, _ = reference_grad(x.bfloat16(), w.bfloat16(), target)
    _, grad = accumulated_grad(x.bfloat16(), w.bfloat16(), target, (8, 40))
    assert rel_err(grad.float(), ref_grad.float()) < 1e-2  # bf16 gradients: rounding of each element


def test_steps_are_independent_and_grads_scaled_once():
    x, w, target, _ = make_case(5, "mixed")
    _, ref_grad, _ = reference_grad(x, w, target)
    p = w.clone().requires_grad_(True)
    acc = MemFTAccumulator([p])
    for _ in range(2):  # two steps with zero_grad in between: identical results
        for rows in (slice(0, 20), slice(20, 48)):
            acc.loss(x[rows] @ p.T, target[rows]).backward()
        acc.finish_step()
        assert rel_err(p.grad, ref_grad) < REL
        p.grad = None


def test_refusals():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="fallback"):
        MemFTAccumulator([p], fallback="valid")
    with pytest.raises(ValueError, match="grad_reduction"):
        MemFTAccumulator([p], grad_reduction="avg")
    with pytest.raises(ValueError, match="no parameter"):
        MemFTAccumulator([torch.zeros(3)])
    acc = MemFTAccumulator([p])
    with pytest.raises(TypeError, match="reduction"):
        acc.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="mean")
    with pytest.raises(RuntimeError, match="no micro-batch"):
        acc.finish_step()
    acc.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), last=True)
    with pytest.raises(RuntimeError, match="last=True"):
        acc.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks (loopback only): one spawn runs every case; rank r takes rows r::2 of each split.
# ---------------------------------------------------------------------------------------------
WORLD = 2
RANK_CASES = [
    # (name, recalled, fallback, splits per rank, mode)
    ("mixed_sum", "mixed", "mean", (6, 12, 6), "sum"),
    ("mixed_ddp_last", "mixed", "mean", (10, 14), "ddp"),
    ("all_mean", "all", "mean", (8, 16), "sum"),
    ("all_mean_ddp_last", "all", "mean", (12, 12), "ddp"),
    ("all_zero", "all", "zero", (24,), "sum"),
    ("rank0_recalled", "rank0", "mean", (4, 20), "sum"),  # rank 0 only falls back; rank 1 has active rows
    ("rank0_recalled_ddp", "rank0", "mean", (4, 20), "ddp"),
]


def _rank_case(recalled):
    if recalled != "rank0":
        return make_case(11, recalled)
    x, w, target, tw = make_case(11, "all")
    _, _, target_active, _ = make_case(11, "none")
    target[1::2] = target_active[1::2]  # rank 1's rows (r::2) active, rank 0's recalled
    return x, w, target, tw


def _rank_run(rank, name, recalled, fallback, splits, mode):
    x, w, target, _ = _rank_case(recalled)
    x, target = x[rank::WORLD], target[rank::WORLD]
    torch.manual_seed(0)
    if mode == "ddp":
        model = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            model.weight.copy_(w)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        acc = MemFTAccumulator(ddp, fallback=fallback, grad_reduction="mean")
        start = 0
        for k, size in enumerate(splits):
            rows = slice(start, start + size)
            start += size
            last = k == len(splits) - 1
            if last:
                acc.loss(ddp(x[rows]), target[rows], last=True).backward()
            else:
                with ddp.no_sync():
                    acc.loss(ddp(x[rows]), target[rows]).backward()
        info = acc.finish_step()
        return info, model.weight.grad.clone()
    p = w.clone().requires_grad_(True)
    acc = MemFTAccumulator([p], fallback=fallback)
    start = 0
    for size in splits:
        rows = slice(start, start + size)
        start += size
        acc.loss(x[rows] @ p.T, target[rows]).backward()
    info = acc.finish_step()
    return info, p.grad.clone()


def _worker(rank, port, outdir):
    init_gloo_rank(rank, WORLD, port)
    try:
        results = {case[0]: _rank_run(rank, *case) for case in RANK_CASES}
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("accumulate_ranks")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    spawn_ranks(_worker, WORLD, (free_port(), str(outdir)), 150.0, "the 2-rank accumulator run")
    return rank_results(outdir, WORLD)


@pytest.mark.parametrize("case", RANK_CASES, ids=lambda c: c[0])
def test_two_ranks_equal_one_call(spawned, case):
    name, recalled, fallback, splits, mode = case
    x, w, target, _ = _rank_case(recalled)
    ref_loss, ref_grad, ref_stats = reference_grad(x, w, target, fallback=fallback)
    if recalled == "rank0":
        assert not bool(ref_stats.fell_back) and int(ref_stats.n_active) > 0
    for rank in range(WORLD):
        info, grad = spawned[rank][name]
        if recalled == "all" and fallback == "zero":
            assert torch.count_nonzero(grad) == 0
        else:
            assert rel_err(grad, ref_grad) < REL, (rank, rel_err(grad, ref_grad))
        assert info["loss"] == pytest.approx(float(ref_loss), rel=REL, abs=1e-12)
        assert info["fell_back"] == bool(ref_stats.fell_back)
        assert info["n_active"] == int(ref_stats.n_active)
        assert info["n_valid"] == int(ref_stats.n_valid)


def test_returned_value_step_and_last_micro_batch_provider():
    """returned_value="step": values 0, ..., 0, step loss (the Trainer sums them for its log); the
    gradients are those of the plain returned sums. The provider flags the last micro-batch."""
    x, w, target, _ = make_case(6, "mixed")
    ref_loss, ref_grad, _ = reference_grad(x, w, target)
    p = w.clone().requires_grad_(True)
    flags = iter([False, False, True])
    acc = MemFTAccumulator([p], last_micro_batch=lambda: next(flags), returned_value="step", backward_multiplier=2.0)
    values = []
    for rows in (slice(0, 10), slice(10, 30), slice(30, 48)):
        out = acc.loss(x[rows] @ p.T, target[rows])
        values.append(float(out.detach()))
        (out * 2.0).backward()  # a framework multiplying every returned loss by backward_multiplier
    assert values[:2] == [0.0, 0.0] and values[2] * 2.0 == pytest.approx(float(ref_loss), rel=REL)
    assert rel_err(p.grad, ref_grad) < REL  # final before finish_step (clipping would see these)
    acc.finish_step()
    assert rel_err(p.grad, ref_grad) < REL  # not scaled twice
    never = MemFTAccumulator([p], last_micro_batch=lambda: False)
    never.loss(x @ p.T, target)
    with pytest.raises(RuntimeError, match="never said True"):
        never.finish_step()
