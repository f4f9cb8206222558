"""Block / warps sweep of the Triton kernels, kernel by kernel: the data for the launch heuristic.

``memft_kernels/ops/triton_ce.py`` picks one (BLOCK_V, num_warps) per vocabulary size with a fixed
rule (``launch_config``), no autotuning. This script measures that rule against a grid of
alternatives on the GPU, for each kernel separately:

* ``forward``:  the statistics pass (reads N x V once);
* ``backward``: the gradient pass of the two-pass path (re-reads the rows with a nonzero gradient
  coefficient, writes every row);
* ``fused``:    the single-pass forward + gradient (``normalize="valid"`` and friends; reads once,
  writes once when its second sweep over a row hits L2).

Every configuration is first checked against the heuristic's own outputs (outputs poisoned with NaN
before the call; statistics and gradient compared by ||out - ref|| / ||ref||), then timed with CUDA
events (median, p20, p80). A row's ``speedup`` is the heuristic's median over its median; the
summary printed last names the fastest correct configuration per kernel and V.

    memft bench tune-triton                          # GPU: N = 16384, bf16, V = 128256 32000 262144
    memft bench tune-triton --v 151936 --n 4096
    TRITON_INTERPRET=1 memft bench tune-triton --smoke --device cpu   # tiny, in the interpreter

(``python benchmarks/tune_triton.py`` is the same.) Results are appended to a CSV (``--csv``; default
benchmarks/results/tune_triton_<machine>.csv in a checkout, ./bench_results/ otherwise).

Unlike the other benchmarks this one reaches into the Triton backend (``ops/triton_ce``: its row
kernels, ``launch_config`` and ``forced_block``): tuning a launch heuristic is about that backend's
internals, so it moves with them.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import timing
from .loss import DTYPES, make_inputs

KERNELS = ("forward", "backward", "fused")
# (BLOCK_V, num_warps): 8 to 32 elements per thread, 4 to 32 warps; the heuristic's choice is
# always measured too, whether or not it is in this list. Eight per kernel: each new one is a
# compile (about a second) on the GPU host, where gpu_check.sh gives this script 50 s.
GPU_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16), (16384, 32)]
SMOKE_CONFIGS = [(16, 1), (32, 1), (64, 2)]

FIELDS = [
    "date", "host", "device", "device_name", "cpu_name", "cpu_count", "threads", "python", "torch", "triton", "cuda",
    "memft", "commit", "bench", "kernel", "dtype", "N", "V", "block_v", "num_warps", "heuristic", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "speedup", "active_frac", "bytes", "gbps", "copy_gbps", "frac_copy",
    "rel_err", "note",
]


def rel_err(out: torch.Tensor, ref: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """||out - ref|| / ||ref|| in float64, a slice of rows at a time (no N x V float64 copy); NaN
    anywhere in ``out`` (an element the kernel did not write) gives NaN."""
    num = den = 0.0
    for a in range(0, out.shape[0], rows_per_chunk):
        o = out[a:a + rows_per_chunk].double()
        r = ref[a:a + rows_per_chunk].double()
        num += float(torch.linalg.vector_norm(o - r)) ** 2
        den += float(torch.linalg.vector_norm(r)) ** 2
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


class Case:
    """One (V, dtype) problem: inputs, the heuristic's outputs, and a call per kernel."""

    def __init__(self, n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
        from memft_kernels.ops import triton_ce
        from memft_kernels.spec import KernelOptions

        self.tc, self.opts = triton_ce, KernelOptions()
        self.logits, self.target = make_inputs(n, v, dtype, device, seed)
        stats = triton_ce.row_forward(self.logits, self.target, None, self.opts)
        valid = self.target != self.opts.ignore_index
        n_active = int((stats.weight > 0).sum())
        # the two-pass path's coefficients for the paper's "active" mean (fallback: every valid row)
        self.coef = (stats.weight / max(n_active, 1)) if n_active else valid.float() / max(int(valid.sum()), 1)
        self.active_frac = float((self.coef != 0).sum()) / n
        self.scale = torch.tensor(1.0 / max(int(valid.sum()), 1), device=device)  # normalize="valid"
        self.grad = torch.empty_like(self.logits)  # every configuration's gradient goes here
        fused_grad = torch.empty_like(self.logits)
        fused_stats = triton_ce.row_forward_backward(self.logits, self.target, None, self.opts, self.scale, fused_grad)
        self.ref = {
            "forward": stats,
            "backward": triton_ce.row_backward(self.logits, self.target, stats.lse, self.coef, self.opts),
            "fused": (fused_stats, fused_grad),
        }

    def call(self, kernel: str) -> Callable[[int], object]:
        tc, x, y, o = self.tc, self.logits, self.target, self.opts
        if kernel == "forward":
            return lambda i: tc.row_forward(x, y, None, o)
        if kernel == "backward":
            lse = self.ref["forward"].lse
            return lambda i: tc.row_backward(x, y, lse, self.coef, o, out=self.grad)
        return lambda i: tc.row_forward_backward(x, y, None, o, self.scale, self.grad)

    def bytes(self, kernel: str) -> int:
        nv = self.logits.numel() * self.logits.element_size()
        return int(round({"forward": 1.0, "backward": self.active_frac + 1.0, "fused": 2.0}[kernel] * nv))

    def check(self, kernel: str) -> float:
        """Worst relative error of this configuration's outputs against the heuristic's."""
        self.grad.fill_(float("nan"))
        out = self.call(kernel)(0)
        if kernel == "forward":
            ref = self.ref["forward"]
            errs = [rel_err(out.lse, ref.lse), rel_err(out.ce, ref.ce), rel_err(out.weight, ref.weight)]
            if not torch.equal(out.pred, ref.pred):
                errs.append(float("inf"))
            return max(errs)
        if kernel == "backward":
            return rel_err(self.grad, self.ref["backward"])
        stats, grad = self.ref["fused"]
        return max(rel_err(out.lse, stats.lse), rel_err(self.grad, grad))


def tolerance(dtype: torch.dtype) -> float:
    # Another block size sums a row in another order: float32 statistics move by ~1e-7; a gradient
    # element can round to the neighbouring value of its dtype.
    return {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def candidates(v: int, configs: List[Tuple[int, int]], heuristic: Tuple[int, int]) -> List[Tuple[int, int]]:
    """The grid, without blocks far wider than the row, the heuristic first."""
    import triton

    top = triton.next_power_of_2(v)
    grid = [c for c in configs if c[0] <= max(top, configs[0][0]) and c != heuristic]
    return [heuristic] + grid


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    from memft_kernels import dispatch
    from memft_kernels.ops import triton_ce

    reason = dispatch.availability("triton")
    if reason is not None:
        raise SystemExit(f"tune_triton: the triton backend is not available here: {reason}")
    device = torch.device(args.device)
    info = timing.machine_info(device)
    csv_path = Path(args.csv) if args.csv else timing.default_results_path("tune_triton", info)
    writer = timing.ResultWriter(csv_path, FIELDS, jsonl=False)
    copy_gbps = timing.copy_bandwidth_gbps(device, args.copy_mib << 20)
    print(f"# tune_triton on {info['device_name']}, copy bandwidth {copy_gbps:.1f} GB/s (read+write), "
          f"results -> {csv_path}", flush=True)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    started = time.monotonic()
    rows: List[Dict[str, object]] = []
    best: Dict[Tuple[str, int], Dict[str, object]] = {}
    for v in args.v:
        if args.time_cap and time.monotonic() - started > args.time_cap:
            print(f"# time cap {args.time_cap:g} s reached: V = {v} not measured", flush=True)
            break
        dtype = DTYPES[args.dtype]
        case = Case(args.n, v, dtype, device, args.seed)
        heuristic = triton_ce.launch_config(v)
        for kernel in args.kernels:
            base_ms: Optional[float] = None
            for block, warps in candidates(v, configs, heuristic):
                row: Dict[str, object] = dict(info)
                row.update(bench="tune_triton", kernel=kernel, dtype=args.dtype, N=args.n, V=v, block_v=block,
                           num_warps=warps, heuristic=(block, warps) == heuristic, active_frac=case.active_frac,
                           bytes=case.bytes(kernel), copy_gbps=copy_gbps, note=args.note)
                if args.time_cap and time.monotonic() - started > args.time_cap:
                    row["status"] = f"skipped: time cap {args.time_cap:g} s reached"
                else:
                    try:
                        with triton_ce.forced_block(block, warps):
                            err = case.check(kernel)
                            row["rel_err"] = err
                            if not err <= tolerance(dtype):
                                row["status"] = f"wrong: rel_err {err:.3g} > {tolerance(dtype):g}"
                            else:
                                t = timing.time_calls(case.call(kernel), device_type=device.type, warmup=args.warmup,
                                                      reps=args.reps, budget_s=args.budget_s)
                                row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                                           status="ok")
                    except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is a result
                        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                if row["status"] == "ok":
                    if base_ms is None:  # the heuristic is measured first
                        base_ms = float(row["median_ms"])
                    gbps = case.bytes(kernel) / (float(row["median_ms"]) * 1e-3) / 1e9
                    row.update(gbps=gbps, frac_copy=gbps / copy_gbps, speedup=base_ms / float(row["median_ms"]))
                    key = (kernel, v)
                    if key not in best or float(row["median_ms"]) < float(best[key]["median_ms"]):
                        best[key] = row
                writer.write(row)
                rows.append(row)
                _print_row(row)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n# fastest correct configuration per kernel and V ({args.dtype}, N = {args.n}):", flush=True)
    print("| kernel | V | heuristic | fastest | its median | speedup over heuristic | % of copy bandwidth |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (kernel, v), row in best.items():
        h = triton_ce.launch_config(v)
        print(f"| {kernel} | {v} | {h[0]}/{h[1]} | {row['block_v']}/{row['num_warps']} | {float(row['median_ms']):.3f} ms "
              f"| {float(row['speedup']):.2f}x | {100 * float(row['frac_copy']):.0f}% |", flush=True)
    return rows


def _print_row(row: Dict[str, object]) -> None:
    mark = "*" if row["heuristic"] else " "
    head = f"{row['kernel']:>8} V={row['V']:<7} {mark}BLOCK_V={row['block_v']:<6} warps={row['num_warps']:<3}"
    if row["status"] != "ok":
        print(f"{head} {row['status']}", flush=True)
        return
    print(f"{head} {float(row['median_ms']):9.3f} ms (p20 {float(row['p20_ms']):.3f}, p80 {float(row['p80_ms']):.3f})"
          f" {float(row['gbps']):8.1f} GB/s = {100 * float(row['frac_copy']):3.0f}% copy, x{float(row['speedup']):.2f},"
          f" rel_err {float(row['rel_err']):.1e}", flush=True)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (correctness only)")
    p.add_argument("--n", type=int, help="rows (default 16384; 8 with --smoke)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes (default 128256 32000 262144; 37 with --smoke)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes and blocks (tests; Triton's interpreter)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=0.2, help="time per configuration; fewer reps (>= 3) past it")
    p.add_argument("--time-cap", type=float, default=0.0, help="stop measuring after this many seconds")
    p.add_argument("--copy-mib", type=int, default=None, help="buffer of the copy-bandwidth measurement")
    p.add_argument("--csv", help="CSV to append to (default benchmarks/results/tune_triton_<machine>.csv)")
    p.add_argument("--note", default="")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None, prog: Optional[str] = None) -> List[Dict[str, object]]:
    args = build_parser(prog).parse_args(argv)
    timing.check_ranges(args, positive=("n", "v", "reps", "budget_s", "copy_mib"), nonnegative=("warmup", "time_cap"))
    if args.smoke:
        args.n = args.n or 8
        args.v = args.v or [37]
        args.reps, args.warmup = min(args.reps, 2), 0
    args.n = args.n or 16384
    args.v = args.v or [128256, 32000, 262144]
    if args.copy_mib is None:
        args.copy_mib = 1024 if args.device == "cuda" else 16
    return run(args)


if __name__ == "__main__":
    main()
