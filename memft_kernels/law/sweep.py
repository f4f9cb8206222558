"""Sweep the training loop over a grid of LoRA ranks x lengths (x task, replace rate, loss, seed).

Two engines run the cells (docs/LAW.md):

* ``local``: worker processes on this machine (spawned: each imports torch fresh, no forked thread
  pools), optionally one GPU each (``gpus``). Workers die with the driver (parent-death signal on
  Linux and a parent watch everywhere) and ignore Ctrl-C, which the driver handles.
* ``ray``: one Ray task per cell on a Ray cluster (or a local Ray instance), with CPUs and GPUs per
  cell as Ray resources.

Both run the same function per cell (``execute_cell``), and in both the driver -- this process --
alone appends to the results file, one JSON line per finished cell (flush + fsync), so an
interrupted sweep loses only the cells in flight and a re-run skips every cell already in the file.
The driver holds an exclusive lock on the results file (a second sweep on it is refused), and every
cell holds a lock on its run folder while it trains. A line holds the grid parameters, everything
train() returned, and the fixed settings under "sweep": a re-run with other fixed settings into the
same file is refused instead of mixing two experiments. A cell whose worker died or raised is run
again up to ``retries`` times, then written to the failures file (``<out>.failed.jsonl``) and left
for the next run.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .results import GRID_KEYS, LawInputError, LawWarning, append_line, cell_key, cut_line_offset, read_jsonl

ENGINES = ("local", "ray")
DEFAULT_RETRIES = 2
CELL_LOCK_WAIT_S = 20.0  # a cell waits this long for its run folder before it fails as busy
PARENT_POLL_S = 0.5  # how often a local worker checks that the driver is still there
# Training options a sweep sets per cell, so they cannot be fixed settings.
PER_CELL_OPTIONS = ("run_dir",)
RAY_INSTALL_HINT = 'the ray engine needs Ray: pip install "memft_kernels[cluster]" (or pip install ray)'


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
            bad = [v for v in getattr(self, name) if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)]
            if bad:
                raise LawInputError(f"{name} must be positive integers, got {bad[0]!r}")
        bad = [v for v in self.seeds if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)]
        if bad:
            raise LawInputError(f"seeds must be integers >= 0, got {bad[0]!r}")
        bad = [v for v in self.replace_rates
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1]
        if bad:
            raise LawInputError(f"replace rates must be numbers in [0, 1], got {bad[0]!r}")
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
    from ..train import TrainConfig, train_or_resume

    options = {"progress": False, **base, **cell, "run_dir": os.path.join(run_root, cell_name(cell))}
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **options}).validate()
    # a killed earlier attempt of this cell that checkpointed (--set checkpoint_every=k) continues
    return train_or_resume(config)


# --- checks before any cell runs ---------------------------------------------------------------

def _type_ok(value, annotation: str) -> bool:
    """Whether a JSON value fits a TrainConfig field annotation (int, float, str, bool,
    Optional[...], List[...]); an annotation this does not know accepts anything."""
    annotation = annotation.replace(" ", "")
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return value is None or _type_ok(value, annotation[len("Optional["):-1])
    if annotation.startswith(("List[", "list[")) and annotation.endswith("]"):
        return isinstance(value, list) and all(_type_ok(v, annotation[5:-1]) for v in value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "str":
        return isinstance(value, str)
    return True


def _model_context(model: str) -> Optional[int]:
    """The context length of a built-in model or a local model folder; LawInputError if neither."""
    try:
        from ..train.models import BUILTIN_MODELS
    except ImportError:  # pragma: no cover - the training loop is not installed
        return None
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].get("max_position_embeddings")
    if not os.path.isdir(model):
        raise LawInputError(f"model={model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a folder")
    config_path = os.path.join(model, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise LawInputError(f"model folder {model!r} has no config.json: not a transformers model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LawInputError(f"model folder {model!r}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict):
        raise LawInputError(f"model folder {model!r}: config.json is not a JSON object")
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_cells(cells: Sequence[dict], base: dict, *, run_root: Optional[str] = None, here: bool = True) -> None:
    """Refuse, before any cell runs, what would make cells fail at once: unknown or mistyped fixed
    settings, options the training loop rejects, a model that is neither built in nor a model folder,
    a length beyond the model's context, a missing data file, an unknown backend (or, with
    ``here``, one that cannot run on this machine), a run folder root that cannot be made.

    ``here``: the check runs where the cells will run (the local engine; a Ray task for the ray
    engine), so files and backends are looked at as the cells will see them.
    """
    try:
        from ..train import TrainConfig
    except ImportError:  # pragma: no cover - the training loop is not installed
        raise LawInputError("the training loop (memft_kernels.train) is not in this installation") from None
    fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(base) - set(fields))
    if unknown:
        raise LawInputError(f"--set: unknown training option {unknown[0]!r}")
    for key in PER_CELL_OPTIONS:
        if key in base:
            raise LawInputError(f"--set {key}: the sweep gives every cell its own {key} (under --run-root)")
    if "recipe" in base:  # TrainConfig.recipe only records where a config came from: it set nothing
        raise LawInputError("--set recipe: a recipe is not applied by the sweep (recipe only labels a run's config); "
                            "give its settings with --set, e.g. --set lr=0.01")
    if base.get("fsdp"):  # every cell would fail in setup, after the sweep started
        raise LawInputError("--set fsdp=true: a sweep cell is one process, --fsdp needs torchrun with 2 or more ranks")
    for key, value in base.items():
        if not _type_ok(value, str(fields[key].type)):
            raise LawInputError(f"--set {key}={json.dumps(value)}: expected {fields[key].type}")
    defaults = TrainConfig().to_dict()
    if any(c["task"] == "phonebook" for c in cells):
        # a phonebook's size is its entries (samples), not --lengths: every length would train the same
        # phonebook and the results would carry lengths it never had
        raise LawInputError("--tasks phonebook: a phonebook has no length (its size is --set samples=N entries), so "
                            "the law's length axis would be fictitious; sweep the random or text task")
    for cell in cells:
        try:
            TrainConfig.from_dict({**defaults, **base, **cell}).validate()
        except (TypeError, ValueError) as exc:
            raise LawInputError(f"cell {cell_name(cell)}: {exc}") from None
    options = {**defaults, **base}
    from .. import dispatch

    backend = options["backend"]
    names = ("auto", *dispatch.available_backends())
    if backend not in names:
        raise LawInputError(f"backend={backend!r} is not supported; choose one of {', '.join(names)}")
    if here and backend != "auto" and dispatch.availability(backend) is not None:
        raise LawInputError(f"backend={backend!r} cannot run here: {dispatch.availability(backend)}")
    context = _model_context(options["model"])
    if context is not None:
        too_long = [c for c in cells if c["task"] in ("random", "text") and c["length"] + 1 > context]
        if too_long:
            raise LawInputError(f"length {too_long[0]['length']} (+1 prompt token) is longer than the context "
                                f"of model {options['model']!r} ({context} tokens)")
    data = options.get("data")
    if data is not None and any(c["task"] == "text" for c in cells) and not os.path.isfile(data):
        raise LawInputError(f"data={data!r}: no such file")
    if run_root is not None:
        try:
            os.makedirs(run_root, exist_ok=True)
        except OSError as exc:
            raise LawInputError(f"cannot make the run folder root {run_root!r}: {exc.strerror}") from None


# --- one cell, in whatever process runs it -------------------------------------------------------

class CellBusyError(RuntimeError):
    """The cell's run folder is in use by another process (an earlier sweep's worker, still running)."""


@contextlib.contextmanager
def _cell_lock(path: str):
    """An exclusive lock on ``path`` for the duration (POSIX flock; nothing where there is none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + CELL_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CellBusyError(f"{path[:-5]} is in use by another process (a worker of an earlier "
                                        f"sweep still running?)") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def execute_cell(run_cell: Callable, cell: dict, base: dict, run_root: str) -> tuple[dict, float]:
    """Run one cell under its run folder's lock: (result, seconds). Both engines call this."""
    os.makedirs(run_root, exist_ok=True)
    with _cell_lock(os.path.join(run_root, f".{cell_name(cell)}.lock")):
        started = time.perf_counter()
        result = run_cell(cell, base, run_root)
        return result, time.perf_counter() - started


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _retryable(exc: BaseException) -> bool:
    """Bad input fails the same way every time: not worth a retry."""
    return not (isinstance(exc, LawInputError) or type(exc).__name__ == "TrainInputError")


def _init_worker(threads: int) -> None:
    # One worker should not grab every core: the workers share the machine.
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# --- the local engine ----------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` (the driver) does, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watch below still runs
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="memft-parent-watch", daemon=True).start()


def _local_worker_main(conn, run_cell, threads: int, parent_pid: int, env: dict) -> None:
    """A local worker: run the cells the driver sends, one at a time, until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent(parent_pid)
    os.environ.update(env)
    _init_worker(threads)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            job = None
        if job is None:  # done: leave at once (a full interpreter shutdown with torch loaded takes seconds)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)
        cell, base, run_root = job
        try:
            result, seconds = execute_cell(run_cell, cell, base, run_root)
            reply = ("ok", result, seconds)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
            reply = ("error", _describe(exc), _retryable(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
            conn.send(("error", f"the cell's result could not be sent back ({_describe(exc)})", False))


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while a worker starts: the child inherits SIG_IGN through exec, so a Ctrl-C
    while it is still importing does not print a traceback there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _environment(env: dict):
    """``env`` set in this process while a child is started (a spawned child copies the environment)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _LocalWorker:
    def __init__(self, context, run_cell, threads: int, env: dict):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_local_worker_main, name="memft-sweep-worker", daemon=True,
                                       args=(child, run_cell, threads, os.getpid(), env))
        with _sigint_ignored(), _environment(env):  # the child starts with its device: set before python runs
            self.process.start()
        child.close()

    def stop(self, kill: bool = False) -> None:
        _stop_workers([self], kill)


def _stop_workers(workers, kill: bool, grace: float = 2.0) -> None:
    """Ask the workers to exit (None), give them ``grace`` seconds together, then kill the rest
    (a worker past its last cell holds nothing: its results are already with the driver)."""
    if not kill:
        for worker in workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        deadline = time.monotonic() + grace
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.process.is_alive():
            worker.process.kill()
    for worker in workers:
        worker.process.join(5)
        worker.conn.close()


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _run_local(todo, driver, *, run_cell, base, run_root, workers, threads, gpus) -> None:
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    queue = deque(todo)
    slots: list = [None] * workers
    envs = [{"CUDA_VISIBLE_DEVICES": str(gpus[i % len(gpus)])} if gpus else {} for i in range(workers)]
    busy: dict = {}  # slot -> cell
    clean = False
    try:
        while queue or busy:
            for i in range(workers):
                if i in busy or not queue:
                    continue
                cell = queue.popleft()
                for _ in range(2):  # a worker that died while idle is replaced once
                    if slots[i] is not None and not slots[i].process.is_alive():
                        slots[i].stop(kill=True)
                        slots[i] = None
                    if slots[i] is None:
                        slots[i] = _LocalWorker(context, run_cell, threads, envs[i])
                    try:
                        slots[i].conn.send((cell, base, run_root))
                        break
                    except OSError:
                        slots[i].stop(kill=True)
                        slots[i] = None
                else:
                    raise RuntimeError("cannot start a sweep worker process")
                busy[i] = cell
            owner = {}
            for i in busy:
                owner[slots[i].conn] = i
                owner[slots[i].process.sentinel] = i
            for i in sorted({owner[r] for r in wait(list(owner))}):
                worker, cell = slots[i], busy.pop(i)
                reply = None
                try:
                    if worker.conn.poll():
                        reply = worker.conn.recv()
                except (EOFError, OSError):
                    reply = None
                if reply is None:  # the process is gone (or going): its cell is lost
                    worker.process.join(5)
                    error = f"worker process died ({_exit_text(worker.process.exitcode)})"
                    worker.stop(kill=True)
                    slots[i] = None
                    if driver.failed(cell, error, retryable=True):
                        queue.append(cell)
                elif reply[0] == "ok":
                    driver.finished(cell, reply[1], reply[2])
                elif driver.failed(cell, reply[1], retryable=reply[2]):
                    queue.append(cell)
        clean = True
    finally:
        _stop_workers([w for w in slots if w is not None], kill=not clean)


def _run_in_process(todo, driver, *, run_cell, base, run_root) -> None:
    queue = deque(todo)
    while queue:
        cell = queue.popleft()
        try:
            result, seconds = execute_cell(run_cell, cell, base, run_root)
        except Exception as exc:  # noqa: BLE001 - one bad cell must not lose the others
            if driver.failed(cell, _describe(exc), retryable=_retryable(exc)):
                queue.append(cell)
        else:
            driver.finished(cell, result, seconds)


# --- the ray engine ------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise LawInputError(RAY_INSTALL_HINT) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line error for a host:port (or ray://host:port) that does not answer."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LawInputError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise LawInputError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def _ray_cell(run_cell, cell, base, run_root, threads):
    """One Ray task: the same cell function as the local engine."""
    _init_worker(threads)
    try:
        return execute_cell(run_cell, cell, base, run_root)
    except Exception as exc:  # noqa: BLE001 - sent back as text: the driver decides about retries
        return ("error", _describe(exc), _retryable(exc))


def _ray_check(cells, base, run_root):
    try:
        check_cells(cells, base, run_root=run_root, here=True)
    except LawInputError as exc:
        return str(exc)
    return None


def _start_ray(ray, address: Optional[str]) -> bool:
    """Connect to (or start) Ray; True if this call started it (and so should shut it down)."""
    if ray.is_initialized():
        if address is not None:
            raise LawInputError(f"Ray is already initialized in this process; leave the address unset to use "
                                f"that connection (got {address!r})")
        return False
    if address is not None:
        _check_reachable(address)
    import logging

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is one line for the user
        where = f"at {address}" if address else "(a local instance)"
        raise LawInputError(f"cannot reach the Ray cluster {where}: {_describe(exc)}") from None
    return True


@dataclass
class _RaySession:
    ray: object
    task: object
    gpus_per_cell: float


@contextlib.contextmanager
def _ray_session(todo, *, base, run_root, address, gpus_per_cell, cpus_per_cell, check):
    """Connect to (or start) Ray, check the cluster can run a cell and (``check``) the cells' options
    as a worker sees them; yields a _RaySession; shuts down a Ray instance it started."""
    ray = import_ray()
    started = _start_ray(ray, address)
    try:
        resources = ray.cluster_resources()
        if gpus_per_cell is None:
            gpus_per_cell = 1 if resources.get("GPU", 0) > 0 else 0
        for name, need in (("CPU", cpus_per_cell), ("GPU", gpus_per_cell)):
            if need and resources.get(name, 0) < need:
                raise LawInputError(f"a cell needs {need:g} {name}s but the Ray cluster has "
                                    f"{resources.get(name, 0):g}; lower --{name.lower()}s-per-cell")
        if check:
            problem = ray.get(ray.remote(_ray_check).options(num_cpus=0, num_gpus=gpus_per_cell, max_retries=0)
                              .remote(todo, base, run_root))
            if problem:
                raise LawInputError(problem)
        task = ray.remote(_ray_cell).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)
        yield _RaySession(ray, task, gpus_per_cell)
    finally:
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()


def _run_ray(todo, driver, session: _RaySession, *, run_cell, base, run_root, max_in_flight, threads) -> None:
    ray = session.ray
    refs: dict = {}
    run_cell_ref = ray.put(run_cell)
    queue = deque(todo)
    limit = max_in_flight or len(todo)
    try:
        while queue or refs:
            while queue and len(refs) < limit:
                cell = queue.popleft()
                refs[session.task.remote(run_cell_ref, cell, base, run_root, threads)] = cell
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                cell = refs.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker (or its node) died, or the task was lost
                    first = str(exc).strip().splitlines()
                    what = "task failed" if isinstance(exc, ray.exceptions.RayTaskError) else "worker died"
                    error = f"{what} ({type(exc).__name__}{': ' + first[0] if first else ''})"
                    if driver.failed(cell, error, retryable=True):
                        queue.append(cell)
                    continue
                if isinstance(reply, tuple) and len(reply) == 3 and reply[0] == "error":
                    if driver.failed(cell, reply[1], retryable=reply[2]):
                        queue.append(cell)
                else:
                    result, seconds = reply
                    driver.finished(cell, result, seconds)
    except BaseException:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise


# --- the driver ----------------------------------------------------------------------------------

class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; ``summary`` counts what was written before it."""

    def __init__(self, summary: dict):
        super().__init__("sweep interrupted")
        self.summary = summary


def failures_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".failed.jsonl")


@contextlib.contextmanager
def output_lock(out_path):
    """An exclusive lock on the results file for one sweep (a ``<out>.lock`` file next to it; the
    lock itself is the kernel's, so it goes away with the process, whatever kills it)."""
    out_path = Path(out_path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = out_path.with_name(out_path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LawInputError(f"cannot make the lock file {lock_path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise LawInputError(f"{out_path} is being written by another sweep ({holder}); wait for it to "
                                f"finish or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def finished_cells(out_path, base: dict) -> dict:
    """key -> record of the cells already in the results file; refuses one written with other settings.

    A last line cut short by a crash is left out with a LawWarning (``run_sweep`` then cuts it off)."""
    out_path = Path(out_path)
    if not out_path.exists():
        return {}
    done = {}
    for lineno, record in read_jsonl(out_path, allow_cut_last=True):
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


def _repair_tail(out_path: Path) -> None:
    """Under the lock: cut off a last line cut short by a crash, or end a whole last line that lacks
    its newline, so that the next appended line starts on a line of its own."""
    if not out_path.is_file():
        return
    cut = cut_line_offset(out_path)
    if cut is not None:
        os.truncate(out_path, cut)
    elif out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
        with open(out_path, "ab") as fh:
            fh.write(b"\n")


class _Driver:
    """Writes results (the only writer), counts attempts, keeps the summary and the progress bar."""

    def __init__(self, out_path: Path, base: dict, retries: int, bar, summary: dict):
        self.out_path, self.base, self.retries, self.bar, self.summary = out_path, base, retries, bar, summary
        self.attempts: dict = {}

    def finished(self, cell, result, seconds) -> None:
        if not isinstance(result, dict):
            self.failed(cell, f"the cell function returned {type(result).__name__}, not a dict", retryable=False)
            return
        record = {**result, **cell, "sweep": self.base, "wall_s": round(seconds, 2)}
        append_line(self.out_path, record)
        self.summary["ran"] += 1
        if isinstance(record.get("dL"), (int, float)):
            self.bar.set_postfix_str(f"{cell_name(cell)} dL={record['dL']:.3f}")
        self.bar.update(1)

    def failed(self, cell, error: str, retryable: bool) -> bool:
        """Record a failed attempt; True if the cell should run again."""
        key = cell_key(cell)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        tries = self.attempts[key]
        if retryable and tries <= self.retries:
            self.bar.write(f"cell {cell_name(cell)}: {error}; running it again (retry {tries} of {self.retries})")
            return True
        self.summary["failed"].append({"cell": cell, "error": error, "attempts": tries})
        append_line(failures_path(self.out_path), {**cell, "error": error, "attempts": tries,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.bar.write(f"cell {cell_name(cell)} failed after {tries} attempt{'s' * (tries > 1)}: {error}")
        self.bar.update(1)
        return False


def _parse_gpus(gpus) -> list:
    if gpus is None:
        return []
    if isinstance(gpus, str):
        gpus = [g.strip() for g in gpus.split(",") if g.strip()]
    out = []
    for g in gpus:
        text = str(g).strip()
        if not text.isdigit():
            raise LawInputError(f"--gpus: expected device numbers like 0,1,2, got {g!r}")
        out.append(int(text))
    if not out:
        raise LawInputError("--gpus: no device given")
    if len(set(out)) != len(out):
        raise LawInputError(f"--gpus: a device is listed twice in {','.join(map(str, out))}")
    return out


def run_sweep(grid: SweepGrid, out_path, *, workers: Optional[int] = None, threads_per_worker: int = 1,
              run_root: Optional[str] = None, run_cell: Optional[Callable[[dict, dict, str], dict]] = None,
              progress: bool = True, engine: str = "local", gpus=None, address: Optional[str] = None,
              gpus_per_cell: Optional[float] = None, cpus_per_cell: Optional[float] = None,
              retries: int = DEFAULT_RETRIES, max_in_flight: Optional[int] = None,
              check: Optional[bool] = None) -> dict:
    """Run every cell of ``grid`` not yet in ``out_path``; returns {"ran", "skipped", "failed"}.

    ``engine="local"``: ``workers`` >= 1 runs the cells in that many spawned processes (default 1,
    or one per device of ``gpus``, e.g. "0,1": worker i sees only device gpus[i % len(gpus)]);
    0 runs them in this process (for debugging). ``engine="ray"``: one Ray task per cell on the
    cluster at ``address`` (None: a local Ray instance, unless Ray is already initialized in this
    process; "auto"; "HOST:PORT"; "ray://HOST:PORT"), each with ``cpus_per_cell`` CPUs (default
    ``threads_per_worker``) and ``gpus_per_cell`` GPUs (default 1 when the cluster has GPUs, else 0),
    at most ``max_in_flight`` submitted at a time (default all).
    ``run_cell(cell, base, run_root) -> dict`` is the work per cell (a top-level function, so that it
    pickles; default ``train_cell``, the training loop); its result is written with the cell's grid parameters. A cell that raised or whose
    worker died runs again up to ``retries`` times (bad input, never), then is reported and written to
    the failures file, not the results, so the next run tries it again. ``check`` (default: when
    ``run_cell`` is the training loop) refuses bad options before any cell runs (``check_cells``).
    Ctrl-C raises SweepInterrupted (a KeyboardInterrupt) after stopping the workers.
    """
    if engine not in ENGINES:
        raise LawInputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not (isinstance(retries, int) and retries >= 0):
        raise LawInputError(f"--retries must be an integer >= 0, got {retries!r}")
    if threads_per_worker < 0:
        raise LawInputError(f"--threads-per-worker must be >= 0, got {threads_per_worker}")
    if max_in_flight is not None and not (isinstance(max_in_flight, int) and max_in_flight >= 1):
        raise LawInputError(f"--max-in-flight must be an integer >= 1, got {max_in_flight!r}")
    for name, value in (("--gpus-per-cell", gpus_per_cell), ("--cpus-per-cell", cpus_per_cell)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise LawInputError(f"{name} must be a number >= 0, got {value!r}")
    gpu_list = _parse_gpus(gpus)
    if engine == "local":
        given = [name for name, value in (("--address", address), ("--gpus-per-cell", gpus_per_cell),
                                          ("--cpus-per-cell", cpus_per_cell), ("--max-in-flight", max_in_flight))
                 if value is not None]
        if given:
            raise LawInputError(f"{given[0]} is an option of the ray engine; add --engine ray")
        if workers is None:
            workers = len(gpu_list) or 1
        if not isinstance(workers, int) or workers < 0:
            raise LawInputError(f"--workers must be an integer >= 0, got {workers!r}")
        if gpu_list and workers == 0:
            raise LawInputError("--gpus pins worker processes; it needs --workers >= 1")
    else:
        if workers is not None or gpu_list:
            raise LawInputError(f"{'--workers' if workers is not None else '--gpus'} is an option of the local "
                                f"engine; with --engine ray use --cpus-per-cell / --gpus-per-cell")
        import_ray()  # says how to install it before anything else happens
    if cpus_per_cell is None:
        cpus_per_cell = max(threads_per_worker, 1)

    out_path = Path(out_path)
    if out_path.exists() and not out_path.is_file():
        raise LawInputError(f"--out {out_path}: not a file")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LawInputError(f"--out {out_path}: cannot make its folder ({exc.strerror})") from None
    run_root = os.path.abspath(run_root or out_path.with_suffix("").as_posix() + "_runs")
    base = dict(grid.base)
    cells = grid.cells()
    if run_cell is None:
        run_cell = train_cell
    if check is None:
        check = run_cell is train_cell
    if check and engine == "local":
        check_cells(cells, base, run_root=run_root, here=True)

    with output_lock(out_path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LawWarning)
            done = finished_cells(out_path, base)
        for w in caught:
            if issubclass(w.category, LawWarning):
                warnings.warn(f"{w.message}; it is cut off the file and its cell runs again", LawWarning, stacklevel=2)
            else:
                warnings.warn(w.message, w.category, stacklevel=2)
        _repair_tail(out_path)
        todo = [c for c in cells if cell_key(c) not in done]
        summary = {"ran": 0, "skipped": len(cells) - len(todo), "failed": []}
        if not todo:
            return summary

        from tqdm import tqdm

        with contextlib.ExitStack() as stack:
            session = None
            if engine == "ray":  # connected and checked before the progress bar starts
                session = stack.enter_context(_ray_session(
                    todo, base=base, run_root=run_root, address=address, gpus_per_cell=gpus_per_cell,
                    cpus_per_cell=cpus_per_cell, check=check))
            bar = tqdm(total=len(cells), initial=summary["skipped"], unit="cell", desc="sweep", disable=not progress)
            stack.callback(bar.close)
            driver = _Driver(out_path, base, retries, bar, summary)
            _run_engine(todo, driver, session, run_cell=run_cell, base=base, run_root=run_root, workers=workers,
                        threads=threads_per_worker, gpus=gpu_list, max_in_flight=max_in_flight)
    return summary


def _run_engine(todo, driver, session, *, run_cell, base, run_root, workers, threads, gpus, max_in_flight) -> None:
    try:
        if session is not None:
            _run_ray(todo, driver, session, run_cell=run_cell, base=base, run_root=run_root,
                     max_in_flight=max_in_flight, threads=threads)
        elif workers == 0:
            _run_in_process(todo, driver, run_cell=run_cell, base=base, run_root=run_root)
        else:
            _run_local(todo, driver, run_cell=run_cell, base=base, run_root=run_root, workers=workers,
                       threads=threads, gpus=gpus)
    except KeyboardInterrupt:
        raise SweepInterrupted(driver.summary) from None
