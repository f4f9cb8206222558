"""`memft law sweep --engine ray` on a local Ray instance (ray.init(num_cpus=2), CPU only): the same
lines as the local engine, a worker killed mid-cell, a failing cell retried then recorded, a
mixed-settings re-run refused, resume after a driver kill, an unreachable address."""
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

import law_cells  # noqa: E402
from helpers import alive, wait_for  # noqa: E402
from law_cells import calls  # noqa: E402
from memft_kernels.cli import main as memft_main  # noqa: E402
from memft_kernels.law import LawInputError, SweepGrid, run_sweep  # noqa: E402
from memft_kernels.law.sweep import failures_path  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def lines_of(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]  # every line whole JSON, or this raises


def grid(ranks=(1, 2), **base):
    return SweepGrid(ranks=list(ranks), lengths=[64], base={"steps": 5, **base})


# Before the local instance below starts (so that Ray is not initialized in this process yet).
def test_unreachable_address_is_one_line_exit_2(tmp_path, capsys):
    assert not ray.is_initialized()
    with pytest.raises(LawInputError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        run_sweep(grid(), tmp_path / "s.jsonl", engine="ray", address="127.0.0.1:1", run_cell=law_cells.fake_cell,
                  progress=False)
    argv = ["law", "sweep", "--out", str(tmp_path / "s.jsonl"), "--ranks", "1", "--lengths", "64", "--model", "nano",
            "--engine", "ray", "--address", "ray://127.0.0.1:1"]
    assert memft_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot reach the Ray cluster at ray://127.0.0.1:1" in err[0], err
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module; its workers import tests/law_cells.py."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_both_engines_write_the_same_lines(cluster, tmp_path):
    """The real training loop on two tiny cells: every field but the wall time and the run folder is
    the same, to the last digit."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    base = {"model": "nano", "vocab_size": 64, "steps": 3, "eval_every": 0, "plots": False, "save_adapter": False,
            "backend": "torch", "threads": 1}
    g = SweepGrid(ranks=[1, 2], lengths=[12], base=base)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run_sweep(g, local, workers=0, progress=False) == {"ran": 2, "skipped": 0, "failed": []}
    assert run_sweep(g, remote, engine="ray", progress=False) == {"ran": 2, "skipped": 0, "failed": []}
    a, b = ({r["rank"]: r for r in lines_of(p)} for p in (local, remote))
    for rank in (1, 2):
        assert os.path.dirname(b[rank]["run_dir"]) == str(tmp_path / "ray_runs")
        same = {k: v for k, v in a[rank].items() if k not in ("wall_s", "run_dir")}
        assert same == {k: v for k, v in b[rank].items() if k not in ("wall_s", "run_dir")}
        assert isinstance(same["dL"], float) and same["lora_params"] > 0
    assert run_sweep(g, remote, engine="ray", progress=False)["skipped"] == 2


def test_a_worker_killed_mid_cell_loses_nothing(cluster, tmp_path):
    out, root = tmp_path / "s.jsonl", str(tmp_path / "runs")
    summary = run_sweep(grid(ranks=[1, 2, 4]), out, engine="ray", run_root=root, run_cell=law_cells.killed_once_cell,
                        progress=False)
    assert summary == {"ran": 3, "skipped": 0, "failed": []}
    assert sorted(r["rank"] for r in lines_of(out)) == [1, 2, 4]
    assert sorted(json.loads(c)["rank"] for c in calls(root)) == [1, 2, 2, 4]  # rank 2 ran twice


def test_a_failing_cell_is_retried_then_recorded(cluster, tmp_path):
    out, root = tmp_path / "s.jsonl", str(tmp_path / "runs")
    summary = run_sweep(grid(), out, engine="ray", run_root=root, run_cell=law_cells.always_failing_cell, retries=1,
                        max_in_flight=1, progress=False)
    assert summary["ran"] == 1
    assert [(f["cell"]["rank"], f["attempts"], f["error"]) for f in summary["failed"]] == [
        (2, 2, "RuntimeError: CUDA out of memory (simulated)")]
    assert len(calls(root)) == 1 + 2
    assert [(f["rank"], f["attempts"]) for f in lines_of(failures_path(out))] == [(2, 2)]
    assert [r["rank"] for r in lines_of(out)] == [1]
    # left for the next run; a re-run with other fixed settings is refused before any task
    with pytest.raises(LawInputError, match="other fixed settings \\(steps: 5 there, 6 now\\)"):
        run_sweep(grid(steps=6), out, engine="ray", run_root=root, run_cell=law_cells.fake_cell, progress=False)
    assert len(calls(root)) == 3
    assert run_sweep(grid(), out, engine="ray", run_root=root, run_cell=law_cells.fake_cell,
                     progress=False) == {"ran": 1, "skipped": 1, "failed": []}


def test_an_address_while_ray_is_initialized_here_is_refused(cluster, tmp_path):
    with pytest.raises(LawInputError, match="Ray is already initialized in this process"):
        run_sweep(grid(), tmp_path / "s.jsonl", engine="ray", address=cluster, run_cell=law_cells.fake_cell,
                  progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_cancels_the_cells_in_flight_and_the_rerun_does_the_rest(cluster, tmp_path, monkeypatch):
    """Ctrl-C while the driver waits on Ray (a KeyboardInterrupt out of ray.wait, as the signal gives):
    SweepInterrupted with the count written, the running cell cancelled, the rest on a re-run.
    (The signal itself, sent to the process group of `memft law sweep --engine ray`, is the same
    path; tests/test_law_sweep.py sends it to the local engine.)"""
    from memft_kernels.law.sweep import SweepInterrupted

    out, root = tmp_path / "s.jsonl", str(tmp_path / "runs")
    real_wait = ray.wait

    def wait(refs, num_returns=1, timeout=None, **kwargs):
        if len(calls(root, "started")) == 1 and out.exists() and len(out.read_text().splitlines()) == 2:
            raise KeyboardInterrupt
        return real_wait(refs, num_returns=num_returns, timeout=0.5, **kwargs)

    monkeypatch.setattr(ray, "wait", wait)
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(grid(ranks=[1, 2, 4], sleep=300), out, engine="ray", run_root=root,
                  run_cell=law_cells.slow_big_cell, progress=False)
    monkeypatch.setattr(ray, "wait", real_wait)
    assert info.value.summary["ran"] == 2
    started = [name for name in os.listdir(root) if name.startswith("started-")]
    running = int(started[0].split("-")[1].split(".")[0])
    assert wait_for(lambda: not alive(running), timeout=60), "the cancelled cell kept running"
    summary = run_sweep(grid(ranks=[1, 2, 4], sleep=300), out, engine="ray", run_root=root,
                        run_cell=law_cells.fake_cell, progress=False)
    assert summary == {"ran": 1, "skipped": 2, "failed": []}
    assert sorted(r["rank"] for r in lines_of(out)) == [1, 2, 4]


DRIVER = """
import sys
import law_cells
from memft_kernels.law import SweepGrid, run_sweep
grid = SweepGrid(ranks=[1, 2, 4], lengths=[64], base={"steps": 5, "sleep": 300})
run_sweep(grid, sys.argv[1], engine="ray", address=sys.argv[2], run_root=sys.argv[3],
          run_cell=law_cells.slow_big_cell, progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resume_after_the_driver_is_killed(cluster, tmp_path):
    """SIGKILL of a driver on the cluster while a cell runs: the finished cells are on disk, Ray stops
    the orphaned cell, and the re-run does only that cell."""
    out, root = tmp_path / "s.jsonl", str(tmp_path / "runs")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), cluster, root], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        def two_done_and_big_running():
            return len(calls(root, "started")) == 1 and out.exists() and len(out.read_text().splitlines()) == 2

        assert wait_for(two_done_and_big_running, timeout=120), driver.stderr.read1(4000)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    started = [name for name in os.listdir(root) if name.startswith("started-")]
    orphan = int(started[0].split("-")[1].split(".")[0])
    assert wait_for(lambda: not alive(orphan), timeout=60), "the orphaned cell kept running"
    assert sorted(r["rank"] for r in lines_of(out)) == [1, 2]
    summary = run_sweep(grid(ranks=[1, 2, 4], sleep=300), out, engine="ray", run_root=root,
                        run_cell=law_cells.fake_cell, progress=False)
    assert summary == {"ran": 1, "skipped": 2, "failed": []}
    assert sorted(r["rank"] for r in lines_of(out)) == [1, 2, 4]
