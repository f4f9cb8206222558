"""Sweep the training loop over a grid of LoRA ranks x lengths (x task, replace rate, loss, seed).

Cells run in worker processes (spawn: each worker imports torch fresh, no forked thread pools);
the parent appends one JSON line per finished cell (flush + fsync), so an interrupted sweep loses
only the cells in flight and a re-run skips every cell already in the file. A line holds the grid
parameters, everything train() returned, and the fixed settings under "sweep": a re-run with other
fixed settings into the same file is refused instead of mixing two experiments.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .results import GRID_KEYS, LawInputError, append_line, cell_key, read_jsonl


@dataclass
class SweepGrid:
    ranks: Sequence[int]
    lengths: Sequence[int]
    tasks: Sequence[str] = ("random",)
    replace_rates: Sequence[float] = (0.0,)
    losses: Sequence[str] = ("ce",)
    seeds: Sequence[int] = (0,)
    base: dict = field(default_factory=dict)  # TrainConfig options fixed for every cell

    def cells(self) -> list[dict]:
        """Every cell, the costliest (longest text, highest rank) first so the workers finish together."""
        for name in ("ranks", "lengths", "tasks", "replace_rates", "losses", "seeds"):
            if not getattr(self, name):
                raise LawInputError(f"the sweep grid has no {name}")
        for name in ("ranks", "lengths"):
            bad = [v for v in getattr(self, name) if not (isinstance(v, int) and v > 0)]
            if bad:
                raise LawInputError(f"{name} must be positive integers, got {bad[0]!r}")
        clash = sorted(set(self.base) & set(GRID_KEYS))
        if clash:
            raise LawInputError(f"{clash[0]!r} is a grid parameter; set it with its own option, not as a fixed setting")
        rates = [float(r) for r in self.replace_rates]  # 0 and 0.0 are one value
        grid = itertools.product(self.ranks, self.lengths, self.tasks, rates, self.losses, self.seeds)
        cells = [dict(zip(GRID_KEYS, values)) for values in grid]
        unique = {cell_key(c): c for c in cells}
        return sorted(unique.values(), key=lambda c: (-c["length"], -c["rank"]))


def cell_name(cell: dict) -> str:
    """A folder name for the cell's run."""
    return (f"r{cell['rank']}_len{cell['length']}_{cell['task']}_rr{cell['replace_rate']:g}"
            f"_{cell['loss']}_s{cell['seed']}")


def train_cell(cell: dict, base: dict, run_root: str) -> dict:
    """Run one cell with the training loop (the default worker function)."""
    from ..train import TrainConfig, train

    options = {"progress": False, **base, **cell, "run_dir": os.path.join(run_root, cell_name(cell))}
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **options}).validate()
    return train(config)


def _timed(run_cell, cell: dict, base: dict, run_root: str) -> tuple[dict, float]:
    started = time.time()
    return run_cell(cell, base, run_root), time.time() - started


def _init_worker(threads: int) -> None:
    # One worker should not grab every core: the pool's workers share the machine.
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def finished_cells(out_path, base: dict) -> dict:
    """key -> record of the cells already in the results file; refuses one written with other settings."""
    out_path = Path(out_path)
    if not out_path.exists():
        return {}
    done = {}
    for lineno, record in read_jsonl(out_path):
        missing = [k for k in GRID_KEYS if k not in record]
        if missing:
            raise LawInputError(f"{out_path} line {lineno}: missing grid field {missing[0]!r}; "
                                f"not a sweep results file?")
        previous = record.get("sweep", {})
        if previous != base:
            diff = sorted(k for k in set(previous) | set(base) if previous.get(k) != base.get(k))
            k = diff[0]
            raise LawInputError(
                f"{out_path} line {lineno} was run with other fixed settings ({k}: {previous.get(k)!r} "
                f"there, {base.get(k)!r} now); write this sweep to another --out file")
        done[cell_key(record)] = record
    return done


MAX_POOL_RESTARTS = 2


def _run_pool(todo, run_cell, base, run_root, workers, threads, finish, last_try) -> list:
    """Run ``todo`` in one spawned pool; returns the cells lost to a broken pool (to retry)."""
    context = multiprocessing.get_context("spawn")
    broken = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(_timed, run_cell, cell, base, run_root): cell for cell in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = pending.pop(future)
                    try:
                        result, seconds = future.result()
                    except BrokenProcessPool as exc:
                        if last_try:
                            finish(cell, 0.0, error=f"worker process died ({exc})")
                        else:
                            broken.append(cell)
                    except Exception as exc:  # noqa: BLE001 - report, keep the other cells
                        finish(cell, 0.0, error=f"{type(exc).__name__}: {exc}")
                    else:
                        finish(cell, seconds, result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return broken


def run_sweep(grid: SweepGrid, out_path, *, workers: int = 1, threads_per_worker: int = 1,
              run_root: Optional[str] = None, run_cell: Callable[[dict, dict, str], dict] = train_cell,
              progress: bool = True) -> dict:
    """Run every cell of ``grid`` not yet in ``out_path``; returns {"ran", "skipped", "failed"}.

    ``workers`` >= 1 runs the cells in that many spawned processes; 0 runs them in this process
    (for debugging). ``run_cell(cell, base, run_root) -> dict`` is the work per cell (a top-level
    function, so that it pickles); its result is written with the cell's grid parameters.
    Failed cells are reported and not written, so the next run retries them.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    run_root = str(run_root or out_path.with_suffix("").as_posix() + "_runs")
    base = dict(grid.base)
    cells = grid.cells()
    done = finished_cells(out_path, base)
    todo = [c for c in cells if cell_key(c) not in done]
    summary = {"ran": 0, "skipped": len(cells) - len(todo), "failed": []}
    if not todo:
        return summary

    from tqdm import tqdm

    bar = tqdm(total=len(cells), initial=summary["skipped"], unit="cell", desc="sweep", disable=not progress)

    def finish(cell, seconds, result=None, error=None):
        if error is not None:
            summary["failed"].append({"cell": cell, "error": error})
            bar.write(f"cell {cell_name(cell)} failed: {error}")
        else:
            record = {**result, **cell, "sweep": base, "wall_s": round(seconds, 2)}
            append_line(out_path, record)
            summary["ran"] += 1
            if isinstance(record.get("dL"), (int, float)):
                bar.set_postfix_str(f"{cell_name(cell)} dL={record['dL']:.3f}")
        bar.update(1)

    try:
        if workers <= 0:
            for cell in todo:
                try:
                    result, seconds = _timed(run_cell, cell, base, run_root)
                except Exception as exc:  # noqa: BLE001 - one bad cell must not lose the others
                    finish(cell, 0.0, error=f"{type(exc).__name__}: {exc}")
                else:
                    finish(cell, seconds, result)
        else:
            # A worker that dies (segfault, out of memory) breaks the whole pool and every cell in
            # flight with it; those cells get a fresh pool, up to MAX_POOL_RESTARTS times.
            for attempt in range(MAX_POOL_RESTARTS + 1):
                broken = _run_pool(todo, run_cell, base, run_root, workers, threads_per_worker, finish,
                                   last_try=attempt == MAX_POOL_RESTARTS)
                if not broken:
                    break
                bar.write(f"a worker process died; retrying {len(broken)} unfinished cells in a new pool")
                todo = broken
    finally:
        bar.close()
    return summary
