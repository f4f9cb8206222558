"""Scheduling overhead of `memft law sweep`: the local engine vs the ray engine on the same cells.

Two kinds of cells, each run by both engines with W workers (local: W processes; ray: a local Ray
instance with W CPUs, one CPU per cell):

* ``sleep``: N cells that each sleep T seconds and return a result line: pure scheduling. From the
  cells' own start/end clocks: ``startup_s`` (run_sweep called -> first cell starts: worker
  processes / Ray workers started), ``busy_s`` (first cell starts -> last cell ends) against the
  ideal ``ceil(N/W) * T`` (``ratio``, target <= 1.2), ``dispatch_gap_s`` (the mean time a worker
  waits between the end of one cell and the start of its next: the scheduling overhead per cell,
  target < 1 s) and ``finish_s`` (last cell ends -> run_sweep returns: results written, workers
  stopped).
* ``train``: N tiny real training cells (built-in nano model, a few steps): the sweep's wall time
  for both engines side by side (dominated by each worker importing torch / transformers).

    python benchmarks/bench_sweep.py                       # N=8, W=2, T=1 s; both engines
    python benchmarks/bench_sweep.py --cells 16 --sleep 2 --out my.json

Results: benchmarks/results/bench_sweep_<machine>.json (one object per run appended as a line),
with the machine, its load average before and after, and the per-engine numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memft_kernels.law import SweepGrid, run_sweep  # noqa: E402


def sleep_cell(cell, base, run_root):
    """A cell that only sleeps: returns its own start and end clocks (time.time, same host)."""
    start = time.time()
    time.sleep(base["sleep"])
    return {"dL": 0.0, "base_loss": 1.0, "t_start": start, "t_end": time.time(), "pid": os.getpid()}


def machine() -> dict:
    try:
        import torch

        from memft_kernels.bench import timing

        info = timing.machine_info(torch.device("cpu"))
        name = timing.machine_slug(info)
    except Exception:  # noqa: BLE001 - the bench package is optional here
        info = {"cpu_name": platform.processor(), "cpu_count": os.cpu_count(), "host": socket.gethostname()}
        name = "cpu-unknown"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = "none"
    return {"machine": name, **{k: info.get(k) for k in ("cpu_name", "cpu_count", "host", "python", "torch", "ray",
                                                          "date", "commit")}}


def run_engine(engine: str, kind: str, n: int, workers: int, seconds: float, steps: int, work: Path) -> dict:
    out = work / f"{engine}_{kind}.jsonl"
    if kind == "sleep":
        grid = SweepGrid(ranks=list(range(1, n + 1)), lengths=[64], base={"sleep": seconds})
        run_cell = sleep_cell
    else:
        grid = SweepGrid(ranks=list(range(1, n + 1)), lengths=[12],
                         base={"model": "nano", "vocab_size": 64, "steps": steps, "eval_every": 0, "plots": False,
                               "save_adapter": False, "backend": "torch", "threads": 1})
        run_cell = None
    options = {"workers": workers} if engine == "local" else {"engine": "ray", "cpus_per_cell": 1}
    ray_init_s = None
    if engine == "ray":  # started here to give it W CPUs; timed apart (the CLI starts it inside the sweep)
        import ray

        t0 = time.time()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray_init_s = round(time.time() - t0, 3)
    try:
        started = time.time()
        summary = run_sweep(grid, out, run_cell=run_cell, progress=False, **options)
        ended = time.time()
    finally:
        if engine == "ray":
            import ray

            ray.shutdown()
    assert summary["ran"] == n and not summary["failed"], summary
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    row = {"engine": engine, "cells": kind, "n": n, "workers": workers, "wall_s": round(ended - started, 3),
           "ray_init_s": ray_init_s}
    if kind == "sleep":
        first = min(r["t_start"] for r in lines)
        last = max(r["t_end"] for r in lines)
        ideal = math.ceil(n / workers) * seconds
        gaps = []  # per worker process: its next cell's start - its previous cell's end
        for pid in {r["pid"] for r in lines}:
            mine = sorted((r["t_start"], r["t_end"]) for r in lines if r["pid"] == pid)
            gaps += [b[0] - a[1] for a, b in zip(mine, mine[1:])]
        row.update(cell_s=seconds, startup_s=round(first - started, 3), busy_s=round(last - first, 3),
                   ideal_s=ideal, ratio=round((last - first) / ideal, 3),
                   dispatch_gap_s=round(sum(gaps) / len(gaps), 4) if gaps else None,
                   finish_s=round(ended - last, 3), processes=len({r["pid"] for r in lines}))
    else:
        row.update(steps=steps, cell_wall_s=[r["wall_s"] for r in lines])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=8, help="N cells per sweep (default 8)")
    p.add_argument("--workers", type=int, default=2, help="W workers / Ray CPUs (default 2)")
    p.add_argument("--sleep", type=float, default=1.0, help="T, seconds per sleep cell (default 1)")
    p.add_argument("--train-cells", type=int, default=4, help="tiny training cells (0: skip; default 4)")
    p.add_argument("--steps", type=int, default=5, help="training steps per training cell")
    p.add_argument("--engines", default="local,ray")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/bench_sweep_<machine>.json)")
    args = p.parse_args(argv)
    facts = machine()
    facts["loadavg_before"] = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    rows = []
    try:
        for kind, n in (("sleep", args.cells), ("train", args.train_cells)):
            if n <= 0:
                continue
            for engine in args.engines.split(","):
                row = run_engine(engine, kind, n, args.workers, args.sleep, args.steps, work)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts["loadavg_after"] = os.getloadavg()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_sweep_{facts['machine']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**facts, "rows": rows}) + "\n")
    print(f"written to {out}")
    print("| engine | cells | N | W | ray.init s | sweep wall s | to first cell s | first start -> last end s "
          "| ceil(N/W) x T s | ratio | gap between cells s | last end -> return s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['engine']} | {r['cells']} | {r['n']} | {r['workers']} | {r['ray_init_s'] or '-'} | {r['wall_s']:.1f} | "
              f"{r.get('startup_s', '-')} | {r.get('busy_s', '-')} | {r.get('ideal_s', '-')} | "
              f"{r.get('ratio', '-')} | {r.get('dispatch_gap_s', '-')} | {r.get('finish_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
