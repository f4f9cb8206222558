"""Helpers shared by the test files (import as ``from helpers import ...``; tests/ is on sys.path
when pytest collects them, as conftest.py lives there).

* ``rel(a, b)``: norm-relative error ||a - b|| / ||b|| in float64 (the absolute error when b = 0);
* ``make(...)``: fresh random logits with a third of the rows confident (p > 0.5, so the hard
  policy masks) and a fraction of targets ignored;
* ``run(logits, target, backend, grad_out, **opts)``: memft_loss forward + backward on a fresh leaf;
* ``poison_(tensors)`` and ``poison_stats(monkeypatch)``: fill outputs with NaN (int64 with -1)
  before a kernel writes them, so a value a kernel forgot to write fails the comparison;
* ``BACKENDS``: every backend usable here; ``backend_params()`` the (backend, use_compile) matrix;
* ``free_port()``, ``alive(pid)``, ``wait_for(predicate)``: for tests that start processes.
"""
from __future__ import annotations

import math
import os
import socket
import time
from typing import Iterable

import pytest
import torch
import torch.utils._python_dispatch

from memft_kernels import dispatch, memft_loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float((a - b).norm())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``rel`` where NaNs are expected: the shapes and the NaN positions must agree, and the NaN
    positions are left out of ||out - ref|| / ||ref|| (||out - ref|| itself when ref is 0)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ"
    keep = ~torch.isnan(ref)
    return rel(out[keep], ref[keep])


def make(n=24, v=37, dtype=torch.float32, ignore_frac=0.2, scale=3.0, seed=0, device="cpu", confident=8.0):
    """Fresh random logits [n, v] and targets (ignore_index -100 on about ``ignore_frac`` of them)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, v, (n,), generator=g)
    conf = torch.rand(n, generator=g) < 0.35
    logits[conf, target[conf]] += confident
    target[torch.rand(n, generator=g) < ignore_frac] = -100
    return logits.to(dtype).to(device), target.to(device)


def run(logits, target, backend="auto", grad_out=None, loss_fn=memft_loss, **opts):
    """``loss_fn`` forward + backward on a fresh leaf copy of ``logits``; returns (loss, grad)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target, backend=backend, **opts)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), x.grad


def poison_(tensors: Iterable[torch.Tensor]):
    """NaN into float tensors, -1 into integer ones, in place; returns them."""
    tensors = tuple(tensors)
    for t in tensors:
        t.fill_(-1 if not t.is_floating_point() else math.nan)
    return tensors


def poison_stats(monkeypatch, module, name: str) -> None:
    """Make ``module.name`` (a function returning fresh per-row output tensors) return them poisoned."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: poison_(real(*args, **kwargs)))


# Every backend that runs on this machine, and the matrix of the behaviour tests.
# (Every backend registered in dispatch: a new one is tested here without editing this file.)
BACKENDS = [name for name in dispatch._MODULES if dispatch.availability(name) is None]


def backend_params(compile_too: bool = True):
    """pytest params (backend, use_compile): every available backend eager, and compiled
    (torch.compile(fullgraph=True, backend="aot_eager"), validate=False) where ``compile_too``."""
    params = [pytest.param(b, False, id=f"{b}-eager") for b in BACKENDS]
    if compile_too:
        params += [pytest.param(b, True, id=f"{b}-compiled") for b in BACKENDS]
    return params


def device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage (in elements) any aten op produces while active; views and 0-stride
    expands of small storages do not count, as they hold no memory of their own."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def free_port() -> int:
    """A TCP port on the loopback that is free now (for a gloo rendezvous of spawned test ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, nprocs: int, args: tuple, timeout_s: float, what: str) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes and wait for all of them. A run
    still going after ``timeout_s`` fails the test naming ``what`` (a rank hangs); no process
    outlives the call. The workers write their results to files (see ``rank_results``)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout_s:g} s: a rank hangs")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()


def rank_results(outdir, nprocs: int, name: str = "rank{}.pt") -> list:
    """Every spawned rank's results, saved by rank ``r`` with ``torch.save`` as ``outdir/name.format(r)``."""
    return [torch.load(os.path.join(str(outdir), name.format(r)), weights_only=False) for r in range(nprocs)]


def init_gloo_rank(rank: int, world: int, port: int) -> None:
    """The start of a spawned test rank: Python stacks on a crash, one thread, a gloo process group
    on the loopback whose collectives give up after 60 s instead of hanging the suite."""
    import faulthandler
    from datetime import timedelta

    import torch.distributed as dist

    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def leave_gloo_rank() -> None:
    """The end of a spawned test rank that trained through a process group the Trainer (accelerate)
    set up: tear it down together and leave without the interpreter's teardown of gloo's threads (a
    rank that exits while the other still holds gloo connections can die there: tests/test_train_fsdp.py),
    so the exit code says only whether the work before succeeded."""
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 60.0, every: float = 0.2) -> bool:
    """Poll ``predicate()`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
