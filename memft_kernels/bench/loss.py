"""Benchmark of the MemFT loss: every memft backend next to what a user would otherwise run.

Providers (``providers.LOSS_PROVIDERS``; each computes docs/SPEC.md's default loss: policy "hard",
threshold 0.5, "mean" over the active tokens, fallback to the plain mean when none is active):

* ``memft-triton`` / ``memft-cuda`` / ``memft-cpu`` / ``memft-torch``: ``memft_loss(..., backend=...)``
  for each backend available here (``memft-torch`` is the chunked PyTorch reference);
* ``memft-triton-inplace`` / ``memft-cuda-inplace`` / ``memft-cpu-inplace``: the same with
  ``inplace_backward=True`` (the gradient overwrites the logits: no N x V buffer);
* ``torch-plain``: the loss as a user writes it in PyTorch (``F.cross_entropy(reduction="none")``,
  keep the tokens with ce > ln 2, divide by their count);
* ``torch-compile``: ``torch.compile(fullgraph=True)`` of that function;
* ``liger``: Liger-Kernel's cross-entropy (``reduction="none"``) plus the same masking, when the
  ``liger_kernel`` package is installed (GPU only).

For each provider and mode the byte count is a stated pass structure over the N x V logits (reads
and writes of N*V elements of the logits' dtype; per-row vectors are not counted): the bytes that
provider's kernels must move. GB/s = bytes / median time; ``frac_copy`` = that over the copy
bandwidth measured at the start of the same run.

``memft bench loss --help`` (or ``python benchmarks/bench_loss.py``); ``--quick`` takes about a
minute on a 2-core CPU, ``--smoke`` a few seconds (tests); ``--gpu-set`` is issue 13's side-by-side
run (bf16, N = 16384, the four vocabularies, both modes, the GPU providers).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import timing
from .providers import (  # noqa: F401 - re-exported: the names the loss benchmark's users know
    GPU_LOSS_SET, IGNORE_INDEX, LN2, LOSS_PROVIDERS, MODES, LossProvider, liger_memft_loss, masked_mean,
    plain_memft_loss,
)

PROVIDERS = LOSS_PROVIDERS
Provider = LossProvider


def bytes_moved(provider: str, mode: str, n: int, v: int, element_size: int,
                active_frac: float = 1.0) -> Tuple[float, int, int]:
    """(reads, writes, bytes) of ``provider`` in ``mode`` over an N x V logits tensor, reads and
    writes in units of N x V elements. ``active_frac``: the share of rows whose gradient
    coefficient is nonzero; a provider that skips the other rows in its backward is charged only
    for the rows it reads (counting all N would overstate its bandwidth)."""
    spec = PROVIDERS[provider]
    reads, writes = spec.passes[mode]
    if mode == "fwd+bwd" and spec.skips_inactive_rows:
        reads = reads - 1 + active_frac
    return reads, writes, int(round((reads + writes) * n * v * element_size))


def reference_loss(logits: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """(loss, active_frac) from the float32 reference: the value every provider's loss is compared
    with, and the share of rows that get a nonzero gradient under the benchmarked loss (SPEC's
    default: hard threshold 0.5, mean over the active tokens, every valid token when none is)."""
    from memft_kernels import memft_loss

    with torch.no_grad():
        loss, stats = memft_loss(logits.float(), target, backend="torch", return_stats=True)
    n_grad = int(stats.n_active) if int(stats.n_active) > 0 else int(stats.n_valid)
    return float(loss), n_grad / max(1, target.numel())


# ---------------------------------------------------------------------------------------------
# Inputs


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random logits where half the rows are already 'memorized' (their target logit is far above
    the rest, p ~ 1, so the MemFT mask drops them) and 1/16 of the rows are ignored (padding)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n, v, dtype=dtype, device=device)
    step = max(1, (1 << 24) // v)
    for a in range(0, n, step):  # float32 randn a slice at a time: bounded temporaries
        b = min(n, a + step)
        logits[a:b] = torch.randn(b - a, v, generator=gen, device=device).mul_(2.0)
    target = torch.randint(0, v, (n,), generator=gen, device=device)
    rows = torch.arange(n, device=device)
    memorized = rows % 2 == 0
    logits[rows[memorized], target[memorized]] = 30.0
    target[rows % 16 == 1] = IGNORE_INDEX
    return logits, target


# ---------------------------------------------------------------------------------------------
# Measurement


FIELDS = [
    "date", "host", "device", "device_name", "cpu_name", "cpu_count", "threads", "python", "torch", "triton", "cuda",
    "memft", "commit", "bench", "provider", "mode", "dtype", "N", "V", "status", "median_ms", "p20_ms", "p80_ms",
    "reps", "n_sets", "peak_mem_bytes", "peak_mem_vs_logits", "mem_method", "active_frac", "reads", "writes", "bytes", "gbps",
    "copy_gbps", "frac_copy", "loss", "rel_err", "pass_note", "note",
]


@dataclass
class Settings:
    warmup: int
    reps: int
    budget_s: float
    smoke: bool
    measure_memory: bool


def measure(provider: Provider, mode: str, sets: List[Tuple[torch.Tensor, torch.Tensor]], settings: Settings) -> Dict[str, object]:
    """Time (and peak memory of) one provider on the rotating input sets; returns result fields."""
    device_type = sets[0][0].device.type
    fn = provider.make()
    backward = mode == "fwd+bwd"
    inputs = [(x.detach().clone().requires_grad_(backward), y) for x, y in sets] if backward else sets
    pristine = [x.detach().clone() for x, _ in sets] if (backward and provider.overwrites_input) else None

    def prepare(i: int) -> None:  # untimed: drop the last gradient, restore overwritten logits
        x = inputs[i][0]
        if backward:
            x.grad = None
            if pristine is not None:
                with torch.no_grad():
                    x.copy_(pristine[i])

    def call(i: int):
        x, y = inputs[i]
        if backward:
            loss = fn(x, y)
            loss.backward()
            return loss
        with torch.no_grad():
            return fn(x, y)

    # The first call is a warm-up (compilation, autotuning happen here) and gives the loss value.
    prepare(0)
    timing.synchronize(device_type)
    t0 = time.perf_counter()
    loss_value = float(call(0).detach())  # float() synchronizes
    first_ms = (time.perf_counter() - t0) * 1e3  # an over-estimate (compilation) used for the budget only
    result: Dict[str, object] = {"loss": loss_value}
    t = timing.time_calls(
        call, device_type=device_type, n_sets=len(inputs), warmup=max(0, settings.warmup - 1), reps=settings.reps,
        min_reps=min(3, settings.reps), budget_s=settings.budget_s, prepare=prepare, estimate_ms=first_ms,
    )
    result.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
    if settings.measure_memory:
        prepare(0)
        peak = timing.peak_memory_bytes(lambda: call(0), device_type)
        result["peak_mem_bytes"] = peak if peak is not None else ""
    inputs = pristine = None  # free this provider's copies before the next one is measured
    return result


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        timing.tune_malloc_for_rss()
    info = timing.machine_info(device)
    if args.csv:
        csv_path = Path(args.csv)
    elif args.quick or args.smoke:
        # Quick and smoke runs are checks, not results: keep them out of the committed files.
        csv_path = Path("runs") / "bench" / timing.default_results_path("bench_loss", info).name
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    else:
        csv_path = timing.default_results_path("bench_loss", info)
    writer = timing.ResultWriter(csv_path, FIELDS, jsonl=not args.no_jsonl)
    settings = Settings(warmup=args.warmup, reps=args.reps, budget_s=args.budget_s, smoke=args.smoke, measure_memory=not args.no_memory)

    copy_gbps = timing.copy_bandwidth_gbps(device, args.copy_mib << 20)
    print(f"# bench_loss on {info['device_name']} ({info['device']}, {info['threads']} threads), "
          f"copy bandwidth {copy_gbps:.1f} GB/s (read+write), results -> {csv_path}", flush=True)
    if args.note:
        print(f"# note: {args.note}", flush=True)
    names = args.providers or list(PROVIDERS)

    started = time.monotonic()
    rows: List[Dict[str, object]] = []
    cache = timing.cache_bytes(device)
    for n in args.n:
        for v in args.v:
            for dtype_name in args.dtype:
                dtype = DTYPES[dtype_name]
                elt = torch.empty((), dtype=dtype).element_size()
                per_set = n * v * elt
                budget = int(0.25 * torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 1 << 30
                n_sets = timing.rotation_sets(per_set, cache, budget)
                over_time = args.time_cap and time.monotonic() - started > args.time_cap
                sets = [] if over_time else [make_inputs(n, v, dtype, device, args.seed + k) for k in range(n_sets)]
                ref = None
                active_frac = 1.0
                if sets:
                    ref, active_frac = reference_loss(sets[0][0], sets[0][1])
                for mode in args.mode:
                    for name in names:
                        provider = PROVIDERS[name]
                        reads, writes, nbytes = bytes_moved(name, mode, n, v, elt, active_frac)
                        row: Dict[str, object] = dict(info)
                        row.update(
                            bench="loss", provider=name, mode=mode, dtype=dtype_name, N=n, V=v, n_sets=n_sets,
                            mem_method=timing.memory_method(device.type), active_frac=active_frac,
                            reads=reads, writes=writes, bytes=nbytes,
                            copy_gbps=copy_gbps, pass_note=provider.pass_note, note=args.note,
                        )
                        if args.time_cap and time.monotonic() - started > args.time_cap:
                            row["status"] = f"skipped: time cap {args.time_cap:g} s reached"
                        else:
                            reason = provider.unavailable(sets[0][0], args.smoke)
                            if reason is not None:
                                row["status"] = f"skipped: {reason}"
                            else:
                                try:
                                    row.update(measure(provider, mode, sets, settings))
                                    row["status"] = "ok"
                                except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the run
                                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                                    if device.type == "cuda":
                                        torch.cuda.empty_cache()
                        if row["status"] == "ok":
                            gbps = nbytes / (row["median_ms"] * 1e-3) / 1e9
                            row.update(gbps=gbps, frac_copy=gbps / copy_gbps)
                            if row.get("peak_mem_bytes") not in (None, ""):
                                row["peak_mem_vs_logits"] = row["peak_mem_bytes"] / per_set
                            if ref is not None:
                                row["rel_err"] = abs(row["loss"] - ref) / max(abs(ref), 1e-30)
                        writer.write(row)
                        rows.append(row)
                        _print_row(row)
                del sets
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"# wrote {len(rows)} rows to {csv_path}", flush=True)
    return rows


def _print_row(row: Dict[str, object]) -> None:
    head = f"{row['provider']:14s} {row['mode']:8s} {row['dtype']:5s} N={row['N']:<6} V={row['V']:<7}"
    if row["status"] != "ok":
        print(f"{head} {row['status']}", flush=True)
        return
    mem = row.get("peak_mem_bytes")
    mem_txt = f"{mem / 2**20:9.1f} MiB" if isinstance(mem, int) else "        n/a"
    print(f"{head} {row['median_ms']:10.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] "
          f"{row['gbps']:8.1f} GB/s ({100 * row['frac_copy']:5.1f}% of copy) peak {mem_txt} rel_err {row.get('rel_err', float('nan')):.1e}",
          flush=True)


# ---------------------------------------------------------------------------------------------
# Command line

GPU_SIZES = dict(n=[4096, 16384], v=[32000, 128256, 151936, 262144], dtype=["bf16", "fp16", "fp32"])
CPU_SIZES = dict(n=[4096], v=[32000, 128256], dtype=["bf16", "fp16", "fp32"])
QUICK_SIZES = dict(n=[2048], v=[32000], dtype=["fp32"])
SMOKE_SIZES = dict(n=[64], v=[1000], dtype=["fp32"])
# Issue 13's matrix: bf16 logits, N = 16384, the four vocabularies, forward + backward and forward.
GPU_SET = dict(n=[16384], v=[32000, 128256, 151936, 262144], dtype=["bf16"], mode=["fwd+bwd", "fwd"],
               providers=list(GPU_LOSS_SET))


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--n", type=int, nargs="+", help="rows (tokens); default by device")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes; default by device")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="logit dtypes; default bf16 fp16 fp32")
    p.add_argument("--mode", nargs="+", choices=list(MODES), help="default: fwd fwd+bwd")
    p.add_argument("--providers", nargs="+", help=f"subset of {list(PROVIDERS)}")
    p.add_argument("--quick", action="store_true", help="N=2048, V=32000, fp32 (about a minute on a 2-core CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 reps: checks that everything runs")
    p.add_argument("--gpu-set", action="store_true",
                   help=f"issue 13's side-by-side set: N=16384, V in {GPU_SET['v']}, bf16, fwd+bwd and fwd, "
                        f"providers {GPU_SET['providers']} (each of --n/--v/--dtype/--mode/--providers overrides its part)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current setting)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls at most (default 50 GPU, 5 CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="time per measurement; fewer reps (>= 3) past it")
    p.add_argument("--time-cap", type=float, default=0.0, help="stop measuring after this many seconds (rows say so)")
    p.add_argument("--copy-mib", type=int, default=None, help="buffer size of the copy-bandwidth measurement")
    p.add_argument("--csv", help="CSV to append to (default benchmarks/results/bench_loss_<machine>.csv in a checkout, "
                   "./bench_results/ otherwise; runs/bench/ for --quick and --smoke); JSON lines next to it")
    p.add_argument("--no-jsonl", action="store_true", help="CSV only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. 'CPU shared with other jobs')")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    timing.check_ranges(args, positive=("n", "v", "reps", "budget_s", "copy_mib"),
                        nonnegative=("threads", "warmup", "time_cap"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    gpu = args.device.startswith("cuda")
    sizes = (SMOKE_SIZES if args.smoke else GPU_SET if args.gpu_set else QUICK_SIZES if args.quick
             else GPU_SIZES if gpu else CPU_SIZES)
    args.n = args.n or sizes["n"]
    args.v = args.v or sizes["v"]
    args.dtype = args.dtype or sizes["dtype"]
    # --gpu-set with --smoke: the GPU run's modes and providers at smoke size (gpu_check.sh's dry run)
    args.mode = args.mode or list(GPU_SET["mode"] if args.gpu_set else MODES)
    args.providers = args.providers or (list(GPU_SET["providers"]) if args.gpu_set else None)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else (3 if gpu else 1)
    if args.reps is None:
        args.reps = 2 if args.smoke else (50 if gpu else 5)
    if args.budget_s is None:
        args.budget_s = 1.0 if gpu else 8.0
    if args.copy_mib is None:
        args.copy_mib = 16 if args.smoke else (1024 if gpu else 256)
    unknown = [p for p in args.providers or [] if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    bad = [x for x in args.n + args.v if x <= 0]
    if bad:
        raise SystemExit(f"--n and --v must be positive, got {bad}")
    return args


def main(argv=None, prog: Optional[str] = None) -> List[Dict[str, object]]:
    return run(parse_args(argv, prog))


if __name__ == "__main__":
    main()
