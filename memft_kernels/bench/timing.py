"""Shared helpers of the benchmarks: clocks, memory peaks, copy bandwidth, machine facts and the
result files.

Timing rules (the same for every script):

* GPU: one pair of CUDA events around each call, all recorded first, then one synchronize, then
  read; the median and the 20th / 80th percentiles of the per-call times.
* CPU: ``time.perf_counter`` around each call, with a device synchronize before every clock read
  (a no-op for CPU tensors, needed if a caller times GPU work with the wall clock).
* Warm-up calls first (compilation, autotuning, allocator growth stay out of the numbers).
* Inputs rotate over several sets so that, on a GPU, repeated calls are not served from L2.

Memory: GPU ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; CPU the
rise of the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) over the resident set before the call, with glibc told to serve every
allocation of 64 KiB or more by ``mmap`` so freed buffers really leave the process.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

# ---------------------------------------------------------------------------------------------
# Clocks


def synchronize(device_type: str) -> None:
    """Wait for queued device work; every clock read in this module comes after one of these."""
    if device_type == "cuda":
        torch.cuda.synchronize()


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1] (same rule as numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    min_ms: float

    @classmethod
    def from_samples(cls, samples_ms: List[float]) -> "Timing":
        return cls(percentile(samples_ms, 0.5), percentile(samples_ms, 0.2), percentile(samples_ms, 0.8), len(samples_ms),
                   min(samples_ms))


def _timed_calls_cuda(fn: Callable[[int], object], indices: List[int], prepare: Optional[Callable[[int], object]]) -> List[float]:
    pairs = []
    for i in indices:
        if prepare is not None:
            prepare(i)  # queued before the start event: not timed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        pairs.append((start, end))
    synchronize("cuda")  # before any elapsed_time read
    return [s.elapsed_time(e) for s, e in pairs]


def _timed_calls_wall(fn: Callable[[int], object], indices: List[int], prepare: Optional[Callable[[int], object]], device_type: str) -> List[float]:
    samples = []
    for i in indices:
        if prepare is not None:
            prepare(i)
        synchronize(device_type)
        t0 = time.perf_counter()
        fn(i)
        synchronize(device_type)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_calls(
    fn: Callable[[int], object],
    *,
    device_type: str,
    n_sets: int = 1,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    budget_s: Optional[float] = None,
    prepare: Optional[Callable[[int], object]] = None,
    use_events: Optional[bool] = None,
    estimate_ms: Optional[float] = None,
) -> Timing:
    """Time ``fn(i)`` (i = the input set to use, rotating over ``n_sets``).

    ``warmup`` untimed calls first (0 when the caller has warmed up already); then up to ``reps``
    timed calls, fewer when ``budget_s`` would be exceeded at the speed of the warm-up (or of
    ``estimate_ms``, the caller's own measurement of one call), but never fewer than ``min_reps``.
    ``prepare(i)``, if given, runs before each call outside the timed region (e.g. to restore an
    input that the provider overwrites). CUDA tensors are timed with events, others with the wall
    clock.
    """
    if use_events is None:
        use_events = device_type == "cuda"
    counter = 0
    warm_ms: List[float] = []
    for _ in range(warmup):
        warm_ms += _timed_calls_wall(fn, [counter % n_sets], prepare, device_type)
        counter += 1
    if estimate_ms is not None:
        warm_ms.append(estimate_ms)
    n = max(1, reps)
    if budget_s is not None and warm_ms:
        per_call_s = max(min(warm_ms[-2:]) / 1e3, 1e-6)
        n = int(min(n, max(min_reps, budget_s // per_call_s)))
    indices = [(counter + k) % n_sets for k in range(n)]
    if use_events:
        samples = _timed_calls_cuda(fn, indices, prepare)
    else:
        samples = _timed_calls_wall(fn, indices, prepare, device_type)
    return Timing.from_samples(samples)


# ---------------------------------------------------------------------------------------------
# Memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 64 * 1024
_malloc_tuned = False


def tune_malloc_for_rss() -> bool:
    """Make glibc return freed buffers >= 64 KiB to the OS, so that RSS tracks live memory.

    Returns False where that is not possible (not glibc); RSS deltas are then upper bounds of
    nothing in particular and the caller should say so.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1
    except OSError:
        ok = False
    _malloc_tuned = ok
    return ok


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_tracking_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated - allocated before the call"
RSS_MEMORY_METHOD = "peak RSS (VmHWM after clear_refs) - RSS before the call; glibc mmap threshold 64 KiB"


def peak_memory_bytes(fn: Callable[[], object], device_type: str) -> Optional[int]:
    """Extra bytes at the peak of one call of ``fn`` beyond what was already allocated.

    None when this process cannot measure it (CPU without /proc or glibc).
    """
    if device_type == "cuda":
        synchronize("cuda")
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize("cuda")
        return int(torch.cuda.max_memory_allocated() - before)
    if not (tune_malloc_for_rss() and rss_tracking_available()):
        return None
    before_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM := current RSS
    fn()
    return max(0, (_status_kib("VmHWM") - before_kib) * 1024)


def memory_method(device_type: str) -> str:
    return CUDA_MEMORY_METHOD if device_type == "cuda" else RSS_MEMORY_METHOD


# ---------------------------------------------------------------------------------------------
# Copy bandwidth (the ceiling that a memory-bound op is compared with)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, *, reps: int = 20) -> float:
    """GB/s of ``dst.copy_(src)`` over ``nbytes`` buffers, counting bytes read plus bytes written:
    the ceiling that every ``frac_copy`` divides by.

    On GPU the device-to-device copy; on CPU torch's (threaded) memcpy, with the current torch
    thread count. The fastest of ``reps`` copies, not the median: on a shared machine a median
    catches other jobs' traffic and lowers the ceiling, which would overstate every fraction.
    """
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_calls(lambda i: dst.copy_(src), device_type=device.type, warmup=2, reps=reps)
    return 2 * n * 4 / (timing.min_ms * 1e-3) / 1e9


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that rotating inputs must defeat (GPU L2; a CPU's L3 or a 64 MiB guess)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 64 << 20)
    # The L3 that this CPU's cores share, as the kernel sees it (a VM's getconf may report the
    # host's total: 320 MiB on this project's 2-core VM, whose one L3 instance is 32 MiB).
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            break
    try:
        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=5).stdout.strip()
        if out and int(out) > 0:
            return int(out)
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return 64 << 20


def rotation_sets(bytes_per_set: int, cache: int, budget_bytes: int, *, max_sets: int = 8) -> int:
    """Input sets to rotate over: together at least 4x the cache, within ``budget_bytes``."""
    want = -(-4 * cache // max(1, bytes_per_set))  # ceil
    fit = max(1, budget_bytes // max(1, bytes_per_set))
    return int(max(1, min(want, fit, max_sets)))


# ---------------------------------------------------------------------------------------------
# Machine facts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checkout_root() -> Optional[Path]:
    """The source checkout this package runs from (the folder holding ``benchmarks/gpu_check.sh``
    next to ``memft_kernels/``), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "benchmarks" / "gpu_check.sh").is_file() else None


def results_dir() -> Path:
    """Where results go by default: the checkout's ``benchmarks/results/`` (the committed files),
    else ``./bench_results/`` in the working directory (an installed wheel)."""
    root = checkout_root()
    return root / "benchmarks" / "results" if root is not None else Path.cwd() / "bench_results"


def git_commit() -> str:
    root = checkout_root()
    if root is None or not (root / ".git").exists():
        return "unknown"  # a wheel: no repository to ask (and never an unrelated enclosing one)
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> Dict[str, object]:
    """Facts that go on every result row: where, when, with what."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        import memft_kernels

        memft_version = memft_kernels.__version__
    except ImportError:
        memft_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "device": device.type,
        "device_name": gpu or cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "memft": memft_version,
        "commit": git_commit(),
    }


def slug(text: str) -> str:
    """A file-name-safe short form: 'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13-64-core-processor'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unknown"


def machine_slug(info: Dict[str, object]) -> str:
    """'gpu-nvidia-h200' or 'cpu-amd-epyc-7b13-64-core-processor': the machine part of a result file's name."""
    kind = "gpu" if info["device"] == "cuda" else "cpu"
    return f"{kind}-{slug(str(info['device_name']))}"


def default_results_path(script: str, info: Dict[str, object]) -> Path:
    """<results_dir()>/<script>_<cpu|gpu>-<device name>.csv (benchmarks/results/ in a checkout)."""
    return results_dir() / f"{script}_{machine_slug(info)}.csv"


# ---------------------------------------------------------------------------------------------
# Result files


def check_ranges(args, *, positive: Iterable[str] = (), nonnegative: Iterable[str] = ()) -> None:
    """Refuse a numeric option out of its range before anything runs (a benchmark's SystemExit, which
    `memft bench` prints as its one-line error), instead of a traceback from deep inside torch or a
    value silently replaced by the default. ``None`` (the option not given) passes; a list option is
    checked item by item."""
    for names, ok, what in ((positive, lambda x: x > 0, "> 0"), (nonnegative, lambda x: x >= 0, ">= 0")):
        for name in names:
            value = getattr(args, name, None)
            for x in value if isinstance(value, (list, tuple)) else [value]:
                if x is not None and not (math.isfinite(x) and ok(x)):
                    raise SystemExit(f"--{name.replace('_', '-')} must be {what}, got {x}")


class ResultFileError(ValueError):
    """A results file that cannot take this benchmark's rows (`memft bench` prints it in one line)."""


class ResultWriter:
    """Appends rows to ``path`` (CSV) and ``path.with_suffix('.jsonl')`` (one JSON object a row).

    The CSV header is written when the file is new. A file written before columns were added (its
    header is a subset of ``fields``, in the same order) is rewritten once with the new header, its
    old rows blank in the new columns; any other header is an error (the caller should pick
    another file) rather than silently misaligned rows.
    """

    def __init__(self, path: Path, fields: Iterable[str], *, jsonl: bool = True):
        self.path = Path(path)
        self.fields = list(fields)
        self.jsonl_path = self.path.with_suffix(".jsonl") if jsonl else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if header != self.fields:
                if not _is_ordered_subset(header, self.fields):
                    raise ResultFileError(f"{self.path} has other columns ({len(header)} vs {len(self.fields)}); "
                                     "write to a new file with --csv")
                old = read_rows(self.path)
                tmp = self.path.with_name(self.path.name + ".tmp")  # renamed over it: never half a file
                with open(tmp, "w", newline="", encoding="utf-8") as fh:
                    out = csv.DictWriter(fh, self.fields, restval="")
                    out.writeheader()
                    out.writerows(old)
                os.replace(tmp, self.path)
        else:
            with open(self.path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(self.fields)

    def write(self, row: Dict[str, object]) -> None:
        unknown = set(row) - set(self.fields)
        if unknown:
            raise KeyError(f"row has fields not in the header: {sorted(unknown)}")
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, self.fields).writerow({k: _fmt(row.get(k, "")) for k in self.fields})
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: row.get(k, None) for k in self.fields}) + "\n")


def _is_ordered_subset(old: List[str], new: List[str]) -> bool:
    it = iter(new)
    return bool(old) and all(name in it for name in old)


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
