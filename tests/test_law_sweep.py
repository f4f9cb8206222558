"""Sweep faults on the local engine: workers that die with the driver, the results file's lock, a
line cut by a crash, retries, GPU pinning, refusals up front, Ctrl-C; and the fit's repeated cells
and constant dL. Cells are stand-ins for train() (tests/law_cells.py) except where a refusal up
front must be shown on the real training loop (those never start a cell)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import law_cells
from helpers import alive, wait_for
from law_cells import calls
from memft_kernels.cli import main as memft_main
from memft_kernels.law import LawInputError, SweepGrid, fit_law, load_results, run_sweep
from memft_kernels.law.results import LawWarning
from memft_kernels.law.sweep import failures_path, output_lock

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def sweep_grid(ranks=(1, 2), lengths=(64,), **base):
    return SweepGrid(ranks=list(ranks), lengths=list(lengths), base={"steps": 5, **base})


def lines_of(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]  # every line whole JSON, or this raises


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]), OMP_NUM_THREADS="1")
    return env


def children_of(pid):
    """Live child processes of ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


DRIVER = """
import sys
from memft_kernels.law import SweepGrid, run_sweep
import law_cells
grid = SweepGrid(ranks=[1, 2], lengths=[64], base={{"steps": 5, "sleep": 120}})
run_sweep(grid, sys.argv[1], workers=2, run_root=sys.argv[2], run_cell=law_cells.sleepy_cell, progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_driver_and_a_rerun_is_not_blocked(tmp_path):
    """SIGKILL of the driver takes its workers with it (they were training queued cells before); the
    lock goes with it too, so a re-run right away runs every cell, once."""
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(), str(out), root], env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: len(calls(root, "started")) == 2, timeout=120), driver.stderr.read1(4000)
        workers = children_of(driver.pid)
        assert len(workers) >= 2
    finally:
        driver.kill()
        driver.wait()
    assert wait_for(lambda: not any(alive(p) for p in workers), timeout=10), "workers outlived the driver"
    summary = run_sweep(sweep_grid(sleep=120), out, workers=0, run_root=root, run_cell=law_cells.fake_cell,
                        progress=False)
    assert summary == {"ran": 2, "skipped": 0, "failed": []}
    assert sorted(r["rank"] for r in lines_of(out)) == [1, 2]


def test_second_sweep_on_the_same_file_is_refused(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    with output_lock(out):  # what a running sweep holds
        with pytest.raises(LawInputError, match="being written by another sweep .pid"):
            run_sweep(sweep_grid(), out, workers=0, run_root=root, run_cell=law_cells.fake_cell, progress=False)
    assert calls(root) == []
    assert run_sweep(sweep_grid(), out, workers=0, run_root=root, run_cell=law_cells.fake_cell,
                     progress=False)["ran"] == 2


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_cell_busy_in_another_process_is_not_trained_twice(tmp_path, monkeypatch):
    """A cell holds its run folder's lock while it trains: a second process on the same folder
    waits and then fails that cell instead of training into the folder."""
    from memft_kernels.law import sweep

    root = str(tmp_path / "runs")
    os.makedirs(root)
    cell = sweep_grid(ranks=[1]).cells()[0]
    monkeypatch.setattr(sweep, "CELL_LOCK_WAIT_S", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, os.path.join(root, f".{sweep.cell_name(cell)}.lock")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(sweep.CellBusyError, match="in use by another process"):
            sweep.execute_cell(law_cells.fake_cell, cell, {"steps": 5}, root)
    finally:
        holder.kill()
        holder.wait()
    assert calls(root) == []
    assert sweep.execute_cell(law_cells.fake_cell, cell, {"steps": 5}, root)[0]["rank"] == 1


def test_a_line_cut_by_a_crash_is_read_up_to_it_and_replaced(tmp_path, capsys):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    run_sweep(sweep_grid(ranks=[1, 2]), out, workers=0, run_root=root, run_cell=law_cells.fake_cell, progress=False)
    whole = out.read_bytes()
    cut = lines_of(out)[0]
    cut["rank"] = 4
    with open(out, "ab") as fh:  # a crash in the middle of writing the rank-4 line
        fh.write(json.dumps(cut).encode()[:40])
    with pytest.warns(LawWarning, match="line 3 is cut short .* read up to line 2"):
        records = load_results(out)
    assert sorted(r["rank"] for r in records) == [1, 2]
    with pytest.warns(LawWarning, match="line 3 is cut short.*its cell runs again"):
        summary = run_sweep(sweep_grid(ranks=[1, 2, 4]), out, workers=0, run_root=root,
                            run_cell=law_cells.fake_cell, progress=False)
    assert summary == {"ran": 1, "skipped": 2, "failed": []}
    assert out.read_bytes().startswith(whole)
    assert [r["rank"] for r in lines_of(out)] == [*(r["rank"] for r in records), 4]
    # the fit's command line: one warning line, the fit from the whole lines
    rows = write_rows(tmp_path / "rows.jsonl", law_rows())
    with open(rows, "ab") as fh:
        fh.write(b'{"rank": 8, "len')
    capsys.readouterr()
    assert memft_main(["law", "fit", str(rows), "--bootstrap", "0", "--png", "none"]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "memft law fit: warning: " in err[0] and "line 13 is cut short" in err[0], err
    assert f"({len(law_rows())} cells" in captured.out
    # a bad line with its newline is still an error
    with open(rows, "ab") as fh:
        fh.write(b"\n")
    with pytest.raises(LawInputError, match="line 13: not valid JSON"):
        load_results(rows)


def test_retries_then_recorded_as_failed(tmp_path):
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    summary = run_sweep(sweep_grid(), out, workers=0, run_root=root, run_cell=law_cells.always_failing_cell,
                        retries=2, progress=False)
    assert summary["ran"] == 1
    assert summary["failed"] == [{"cell": sweep_grid(ranks=[2]).cells()[0], "attempts": 3,
                                  "error": "RuntimeError: CUDA out of memory (simulated)"}]
    assert len(calls(root)) == 1 + 3  # rank 1 once, rank 2 three times
    failed = lines_of(failures_path(out))
    assert [(f["rank"], f["attempts"]) for f in failed] == [(2, 3)]
    assert [r["rank"] for r in lines_of(out)] == [1]
    # bad input is not retried
    out2, root2 = tmp_path / "s2.jsonl", str(tmp_path / "runs2")
    summary = run_sweep(sweep_grid(), out2, workers=0, run_root=root2, run_cell=law_cells.bad_input_cell,
                        retries=2, progress=False)
    assert summary["failed"][0]["attempts"] == 1 and len(calls(root2)) == 2
    # the next run tries the failed cell again
    assert run_sweep(sweep_grid(), out, workers=0, run_root=root, run_cell=law_cells.fake_cell,
                     progress=False) == {"ran": 1, "skipped": 1, "failed": []}


def test_a_killed_worker_loses_nothing_and_workers_are_pinned_to_gpus(tmp_path):
    """SIGKILL of a worker mid-cell: that cell runs again in a new worker, no line is duplicated or
    half-written; --gpus 3,5 pins each of the two workers to one device."""
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    grid = sweep_grid(ranks=[1, 2, 4])
    summary = run_sweep(grid, out, gpus="3,5", run_root=root, run_cell=law_cells.killed_once_cell, progress=False)
    assert summary == {"ran": 3, "skipped": 0, "failed": []}
    records = lines_of(out)
    assert sorted(r["rank"] for r in records) == [1, 2, 4]
    marks = [json.loads(c) for c in calls(root)]  # every attempt, the killed one too
    assert {m["device"] for m in marks} == {"3", "5"}  # the first cell of each worker: its own device
    assert {r["device"] for r in records} <= {"3", "5"}
    if sys.platform.startswith("linux"):  # set before the worker's python started, not only later
        assert all(m["device_at_exec"] == m["device"] for m in marks + records)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] not in ("3", "5")
    assert sorted(json.loads(c)["rank"] for c in calls(root)) == [1, 2, 2, 4]


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "100000"], "longer than the context of model 'nano' (1024 tokens)"),
    (["--model", "/nonexistent"], "model='/nonexistent' is neither a built-in model"),
    (["--set", "backend=bogus"], "backend='bogus' is not supported"),
    (["--set", "lr=abc"], '--set lr="abc": expected float'),
    (["--set", "run_dir=x"], "every cell its own run_dir"),
    (["--set", "steps=0"], "steps=0 must be > 0"),
])
def test_settings_every_cell_rejects_are_refused_up_front(tmp_path, capsys, argv, message):
    """The real training loop: refused before any cell starts (no results, no run folder), exit 2."""
    out = tmp_path / "sweep.jsonl"
    argv = ["law", "sweep", "--out", str(out), "--ranks", "1,2", "--lengths", "64", "--model", "nano"] + argv
    started = time.perf_counter()
    assert memft_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists() or out.read_text() == ""
    assert not any(p.is_dir() for p in tmp_path.glob("sweep_runs/*"))
    assert time.perf_counter() - started < 60  # nothing trained (a cell would take longer)


def test_ctrl_c_stops_the_sweep_without_a_traceback(tmp_path):
    """SIGINT to the process group (what a terminal sends): exit 130, one line, the workers gone,
    and the re-run does only the rest."""
    out, root = tmp_path / "sweep.jsonl", str(tmp_path / "runs")
    script = ("import sys, law_cells\n"
              "import memft_kernels.law.sweep as s\n"
              "s.train_cell = law_cells.sleepy_cell\n"  # the CLI's cell function, a long one here
              "s.check_cells = lambda *args, **kwargs: None\n"
              "from memft_kernels.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv = [sys.executable, "-c", script, "law", "sweep", "--out", str(out), "--run-root", root, "--ranks", "1,2",
            "--lengths", "64", "--workers", "1", "--set", "sleep=120"]
    proc = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert wait_for(lambda: len(calls(root, "started")) == 1, timeout=120), proc.stderr.read1(4000)
        workers = children_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = [line for line in err.decode().splitlines() if line.strip() and "cell/s" not in line]
    assert proc.returncode == 130
    assert len(err) == 1 and "interrupted" in err[0] and "re-run the same command" in err[0], err
    assert wait_for(lambda: not any(alive(p) for p in workers), timeout=10)


# --- fit: repeated cells, constant dL -----------------------------------------------------------

def law_rows():
    rows = []
    for r in (1, 2, 4, 8):
        for length in (64, 128, 256):
            cell = {"rank": r, "length": length, "task": "random", "replace_rate": 0.0, "loss": "ce", "seed": 0}
            noise = 1 + 0.03 * np.sin(r * length)  # fixed, not random: a fit with residuals
            rows.append({**cell, "dL": 0.8 * r ** 0.5 * length ** -0.35 * noise + 0.05, "base_loss": 8.0})
    return rows


def write_rows(path, rows):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_fit_leaves_out_repeated_cells_and_says_which(tmp_path, capsys):
    rows = law_rows()
    once = fit_law(load_results(write_rows(tmp_path / "once.jsonl", rows)), n_boot=50)
    twice = fit_law(load_results(write_rows(tmp_path / "twice.jsonl", rows + rows)), n_boot=50)
    assert twice.n_cells == once.n_cells == len(rows)
    assert twice.repeated_lines == [[len(rows) + i, i] for i in range(1, len(rows) + 1)]
    assert twice.ci == once.ci  # not narrowed by the copies
    assert memft_main(["law", "fit", str(tmp_path / "twice.jsonl"), "--bootstrap", "0", "--png", "none"]) == 0
    out = capsys.readouterr().out
    assert "repeated cells left out" in out and f"line {len(rows) + 1} (= line 1)" in out
    other = [dict(r, sweep={"steps": 9}) for r in rows[:1]]  # the same cell run with other settings
    with pytest.raises(LawInputError, match="same cell run with other fixed settings"):
        fit_law(load_results(write_rows(tmp_path / "mixed.jsonl", rows + other)), n_boot=0)


def test_fit_with_every_dl_equal_is_refused_and_never_writes_nan(tmp_path, capsys):
    rows = [dict(r, dL=0.5) for r in law_rows()]
    path = write_rows(tmp_path / "flat.jsonl", rows)
    with pytest.raises(LawInputError, match="every fitted cell has the same dL"):
        fit_law(load_results(path), n_boot=0)
    fit_json = tmp_path / "fit.json"
    assert memft_main(["law", "fit", str(path), "--json", str(fit_json), "--png", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same dL" in err[0], err
    assert not fit_json.exists()
    # and what is written is strict JSON whatever the fit holds
    fit = fit_law(load_results(write_rows(tmp_path / "ok.jsonl", law_rows())), n_boot=0)
    fit.r2 = float("nan")
    json.dumps(fit.to_json(), allow_nan=False)


def test_a_cell_checkpointed_by_a_killed_attempt_resumes_from_it(tmp_path):
    """With --set checkpoint_every=k a retried cell continues from its earlier attempt's checkpoint
    (same report as one attempt); a checkpoint of other settings in its folder is refused."""
    from memft_kernels.law.sweep import cell_name, train_cell
    from memft_kernels.train import TrainInputError

    cell = dict(rank=1, length=16, task="random", replace_rate=0.0, loss="memft-ot", seed=0)
    base = dict(model="nano", vocab_size=64, steps=4, checkpoint_every=2, eval_every=0, threads=1,
                backend="torch", plots=False, save_adapter=False)
    first = train_cell(cell, base, str(tmp_path))
    folder = tmp_path / cell_name(cell)
    os.remove(folder / "report.json")  # as if killed after the step-2 checkpoint
    again = train_cell(cell, base, str(tmp_path))
    assert again["final_loss"] == first["final_loss"] and again["token_accuracy"] == first["token_accuracy"]
    with pytest.raises(TrainInputError, match="checkpoint of other settings.*lr="):
        train_cell(cell, dict(base, lr=0.5), str(tmp_path))
