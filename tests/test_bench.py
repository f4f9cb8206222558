"""The benchmark harness (memft_kernels.bench) on CPU at smoke size: every provider runs, the outputs
parse, the byte counts match a hand count, the clocks are read only after a synchronize, the
committed results still read, `memft bench` runs the package's modules, and gpu_check.sh parses."""
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memft_kernels import dispatch
from memft_kernels.bench import linear_loss as bench_linear_loss
from memft_kernels.bench import loss as bench_loss
from memft_kernels.bench import report, timing, tune_triton
from memft_kernels.bench import train_step as bench_train_step

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

NUMERIC = ("median_ms", "p20_ms", "p80_ms", "gbps", "copy_gbps", "frac_copy", "loss", "rel_err", "bytes")


def _read(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(path.with_suffix(".jsonl"), encoding="utf-8") as fh:
        objs = [json.loads(line) for line in fh]
    return rows, objs


@pytest.fixture(scope="module")
def smoke_csv(tmp_path_factory):
    """One smoke run of every provider that is fast on CPU (the interpreted Triton ones run below)."""
    path = tmp_path_factory.mktemp("bench") / "loss.csv"
    providers = [p for p in bench_loss.PROVIDERS if not p.startswith("memft-triton") and p != "liger"]
    bench_loss.main(["--smoke", "--device", "cpu", "--csv", str(path), "--providers", *providers])
    return path


def test_every_provider_runs_and_outputs_parse(smoke_csv):
    rows, objs = _read(smoke_csv)
    assert len(rows) == len(objs) == 2 * (len(bench_loss.PROVIDERS) - 3)
    must_run = {"memft-torch", "torch-plain", "torch-compile"}
    if dispatch.availability("cpu") is None:
        must_run |= {"memft-cpu", "memft-cpu-inplace"}
    for row, obj in zip(rows, objs):
        assert row["provider"] == obj["provider"] and row["mode"] == obj["mode"]
        assert row["device"] == "cpu" and row["device_name"] and int(row["threads"]) >= 1
        if row["provider"] in must_run:
            assert row["status"] == "ok", row
        if row["status"] != "ok":
            assert row["status"].startswith("skipped: ") and len(row["status"]) > 12, row
            continue
        for key in NUMERIC:
            assert math.isfinite(float(row[key])), (key, row)
        assert 0 < float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        assert float(row["rel_err"]) < 1e-3, row  # all providers compute the same loss
        assert int(row["peak_mem_bytes"]) >= 0
        assert obj["median_ms"] == pytest.approx(float(row["median_ms"]), rel=1e-5)
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}


def test_byte_counts_match_a_hand_count(smoke_csv):
    n, v, elt = 4, 10, 2
    assert bench_loss.bytes_moved("memft-cpu", "fwd", n, v, elt) == (1, 0, 80)
    assert bench_loss.bytes_moved("memft-triton", "fwd+bwd", n, v, elt) == (2, 1, 240)  # read, re-read, write grad
    assert bench_loss.bytes_moved("torch-plain", "fwd", n, v, elt) == (1, 1, 160)  # log_softmax in, out
    assert bench_loss.bytes_moved("torch-plain", "fwd+bwd", n, v, elt) == (3, 3, 480)
    assert bench_loss.bytes_moved("liger", "fwd+bwd", n, v, elt) == (3, 2, 400)
    # memft's backward reads only the rows it gives a gradient (1 of 4 here) and writes all 4
    assert bench_loss.bytes_moved("memft-cpu", "fwd+bwd", n, v, elt, 0.25) == (1.25, 1, 180)
    assert bench_loss.bytes_moved("torch-plain", "fwd+bwd", n, v, elt, 0.25) == (3, 3, 480)  # reads every row
    assert bench_loss.bytes_moved("torch-compile", "fwd+bwd", n, v, elt, 0.25) == (2, 1, 240)
    # make_inputs: rows 0, 2, 4, ... are memorized (p ~ 1), rows 1, 17, 33, ... ignored: 7 of 16 active
    logits, target = bench_loss.make_inputs(64, 1000, torch.float32, torch.device("cpu"), seed=0)
    ce = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none", ignore_index=-100)
    active = (ce > math.log(2)) & (target != -100)
    assert int(active.sum()) == 28
    assert bench_loss.reference_loss(logits, target)[1] == pytest.approx(28 / 64)
    rows, _ = _read(smoke_csv)
    for row in rows:  # smoke: N=64, V=1000, float32
        passes = float(row["reads"]) + float(row["writes"])
        assert int(row["bytes"]) == round(passes * 64 * 1000 * 4)
        if row["provider"].startswith("memft-") and row["mode"] == "fwd+bwd":
            assert float(row["reads"]) == pytest.approx(1 + 28 / 64) and float(row["active_frac"]) == pytest.approx(28 / 64)
        if row["status"] == "ok":
            gbps = int(row["bytes"]) / (float(row["median_ms"]) * 1e-3) / 1e9
            assert float(row["gbps"]) == pytest.approx(gbps, rel=1e-4)


def test_report_table_and_png(smoke_csv, tmp_path):
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(smoke_csv), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "| provider | V = 1000 |" in text and "| torch-plain |" in text and "fwd+bwd, fp32, N = 64" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interpreted_triton_and_liger_run(tmp_path, monkeypatch):
    """The GPU providers at a tiny size in Triton's CPU interpreter (conftest sets it)."""
    if dispatch.availability("triton") is not None:
        pytest.skip(dispatch.availability("triton"))
    path = tmp_path / "tri.csv"
    bench_loss.main(["--smoke", "--device", "cpu", "--n", "4", "--v", "64", "--reps", "1", "--no-memory",
                     "--csv", str(path), "--providers", "memft-triton", "memft-triton-inplace", "liger"])
    rows, _ = _read(path)
    tri = [r for r in rows if r["provider"].startswith("memft-triton")]
    assert [r["status"] for r in tri] == ["ok"] * 4 and all(float(r["rel_err"]) < 1e-5 for r in tri)
    for r in rows:
        if r["provider"] == "liger":
            assert r["status"] == "ok" or r["status"].startswith("skipped: liger_kernel not importable")
            if r["status"] == "ok":
                assert float(r["rel_err"]) < 1e-5
    # Liger's fused linear cross-entropy, in the interpreter at the linear benchmark's smoke size
    rows = bench_linear_loss.main(["--smoke", "--device", "cpu", "--weight", "frozen", "--only", "memft-materialized",
                                   "liger-flce", "--out", str(tmp_path / "lin.csv")])
    (liger,) = [r for r in rows if r["provider"] == "liger-flce"]
    assert liger["status"] == "ok" or liger["status"].startswith("skipped: liger_kernel not importable"), liger
    if liger["status"] == "ok":
        assert liger["loss_rel_err"] < 1e-5  # random head: every token active, so MemFT's loss is the CE mean


def test_tune_triton_checks_then_times_every_config(tmp_path, monkeypatch):
    """The launch-configuration sweep in Triton's interpreter: the heuristic first (speedup 1), every
    other configuration compared with its outputs before it is timed, and one that computes a wrong
    result reported as such instead of timed."""
    if dispatch.availability("triton") is not None:
        pytest.skip(dispatch.availability("triton"))
    wrong_block = tune_triton.SMOKE_CONFIGS[0][0]
    check = tune_triton.Case.check

    def planted(self, kernel):  # the smallest block "computes" a wrong gradient
        err = check(self, kernel)
        from memft_kernels.ops import triton_ce

        return 0.5 if kernel == "backward" and triton_ce.launch_config(37)[0] == wrong_block else err

    monkeypatch.setattr(tune_triton.Case, "check", planted)
    path = tmp_path / "tune.csv"
    rows = tune_triton.main(["--smoke", "--device", "cpu", "--n", "4", "--kernels", "forward", "backward",
                             "--csv", str(path)])
    parsed = timing.read_rows(path)
    assert len(parsed) == len(rows) == 2 * (1 + len(tune_triton.SMOKE_CONFIGS))
    for kernel in ("forward", "backward"):
        mine = [r for r in parsed if r["kernel"] == kernel]
        assert mine[0]["heuristic"] == "True" and float(mine[0]["speedup"]) == 1.0
        for r in mine:
            if kernel == "backward" and int(r["block_v"]) == wrong_block:
                assert r["status"].startswith("wrong: rel_err 0.5") and r["median_ms"] == ""
            else:
                assert r["status"] == "ok" and float(r["rel_err"]) < 1e-2 and float(r["median_ms"]) > 0, r
    back = [r for r in parsed if r["kernel"] == "backward"][0]
    n_v_bytes = 4 * 37 * 2  # bf16
    assert int(back["bytes"]) == round((1 + float(back["active_frac"])) * n_v_bytes)


def test_tune_rel_err_sees_unwritten_elements():
    ref = torch.randn(5, 7)
    out = ref.clone()
    assert tune_triton.rel_err(out, ref, rows_per_chunk=2) == 0.0
    out[3, 4] = float("nan")
    assert math.isnan(tune_triton.rel_err(out, ref, rows_per_chunk=2))
    out[3, 4] = ref[3, 4] + 1.0
    expected = 1.0 / float(torch.linalg.vector_norm(ref.double()))
    assert tune_triton.rel_err(out, ref, rows_per_chunk=2) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Clocks and memory: reads come after a synchronize


class _Log:
    def __init__(self):
        self.events = []


def _fake_cuda(monkeypatch, log):
    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.events.append("record")

        def elapsed_time(self, other):
            log.events.append("read")
            return 1.5

    monkeypatch.setattr(timing.torch.cuda, "Event", Event)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda *a: log.events.append("sync"))


def test_event_timing_synchronizes_before_reading(monkeypatch):
    log = _Log()
    _fake_cuda(monkeypatch, log)
    t = timing.time_calls(lambda i: log.events.append("call"), device_type="cuda", warmup=0, reps=4, n_sets=2)
    assert t.reps == 4 and t.median_ms == 1.5
    first_read = log.events.index("read")
    assert log.events.count("call") == 4 and log.events.count("record") == 8
    assert "sync" in log.events[:first_read]
    assert log.events.index("sync") > max(i for i, e in enumerate(log.events) if e == "record")


def test_wall_clock_synchronizes_before_every_read(monkeypatch):
    log = _Log()
    _fake_cuda(monkeypatch, log)
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: log.events.append("clock") or next(clock) * 1e-3)
    timing.time_calls(lambda i: log.events.append("call"), device_type="cuda", warmup=1, reps=3, use_events=False,
                      prepare=lambda i: log.events.append("prepare"))
    reads = [i for i, e in enumerate(log.events) if e == "clock"]
    assert len(reads) == 8  # (1 warm-up + 3 timed) x 2
    assert all(log.events[i - 1] == "sync" for i in reads)
    # prepare() runs outside the timed region: never between a start read and its stop read
    for start, stop in zip(reads[::2], reads[1::2]):
        assert "prepare" not in log.events[start:stop]


def test_cuda_peak_memory_synchronizes(monkeypatch):
    log = _Log()
    _fake_cuda(monkeypatch, log)
    monkeypatch.setattr(timing.torch.cuda, "reset_peak_memory_stats", lambda *a: log.events.append("reset"))
    monkeypatch.setattr(timing.torch.cuda, "memory_allocated", lambda *a: log.events.append("before") or 100)
    monkeypatch.setattr(timing.torch.cuda, "max_memory_allocated", lambda *a: log.events.append("peak") or 612)
    assert timing.peak_memory_bytes(lambda: log.events.append("call"), "cuda") == 512
    assert log.events == ["sync", "reset", "before", "call", "sync", "peak"]


def test_cpu_peak_memory_sees_a_buffer():
    if not timing.rss_tracking_available():
        pytest.skip("no /proc/self/clear_refs here")
    size = 64 << 20
    peak = timing.peak_memory_bytes(lambda: torch.ones(size // 4), "cpu")
    assert 0.9 * size <= peak <= 3 * size


def test_percentile_and_rotation():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.percentile(vals, 0.5) == 3.0
    assert timing.percentile(vals, 0.2) == pytest.approx(1.8)
    assert timing.percentile(vals, 0.8) == pytest.approx(4.2)
    assert timing.rotation_sets(10 << 20, 50 << 20, 1 << 30) == 8  # capped at 8 sets
    assert timing.rotation_sets(100 << 20, 50 << 20, 1 << 30) == 2  # 200 MiB >= 4 x 50 MiB
    assert timing.rotation_sets(100 << 20, 50 << 20, 150 << 20) == 1  # what fits
    assert timing.rotation_sets(8 << 30, 60 << 20, 1 << 40) == 1


def test_result_writer_refuses_other_columns(tmp_path):
    path = tmp_path / "x.csv"
    w = timing.ResultWriter(path, ["a", "b"])
    w.write({"a": 1, "b": 2.5})
    with pytest.raises(ValueError, match="other columns"):
        timing.ResultWriter(path, ["a", "c"])
    with pytest.raises(KeyError):
        w.write({"z": 1})
    assert timing.read_rows(path) == [{"a": "1", "b": "2.5"}]


# ---------------------------------------------------------------------------------------------
# The training step, the command and the GPU script


def test_train_step_smoke(tmp_path):
    path = tmp_path / "train.csv"
    rows = bench_train_step.main(["--smoke", "--device", "cpu", "--csv", str(path)])
    ok = [r for r in rows if r["status"] == "ok"]
    assert {"hf-default", "memft"} <= {r["provider"] for r in ok}
    # random init: nothing memorized, every token active, so MemFT's loss is the plain CE mean
    losses = [r["loss"] for r in ok]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
    parsed, _ = _read(path)
    assert [r["provider"] for r in parsed] == [r["provider"] for r in rows]


def test_memft_bench_runs_the_package(tmp_path, monkeypatch, capsys):
    """`memft bench NAME` runs the package's module in process (no checkout needed); only gpu-check
    needs the checkout's script, and says so without one."""
    from memft_kernels import bench, cli

    assert set(bench.BENCHMARKS) | set(bench.CHECKOUT_ONLY) == set(bench.NAMES)
    for name in bench.BENCHMARKS:
        assert callable(bench.entry_point(name)), name
    args = cli.build_parser().parse_args(["bench", "report", "x.csv", "--no-png"])
    assert args.script == "report" and args.script_args == ["x.csv", "--no-png"]
    assert bench.command_for("gpu-check", ["-x"]) == ["bash", str(BENCH / "gpu_check.sh"), "-x"]
    assert cli.main(["bench", "loss", "--help"]) == 0
    assert "usage: memft bench loss" in capsys.readouterr().out
    assert cli.main(["bench", "loss", "--smoke", "--providers", "nope"]) == 2  # the module's refusal, one line
    assert "unknown provider" in capsys.readouterr().err
    # as from an installed wheel: no checkout, so results go to ./bench_results and gpu-check refuses
    monkeypatch.setattr(timing, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.CLIError, match="source checkout"):
        bench.command_for("gpu-check", [])
    info = timing.machine_info(torch.device("cpu"))
    assert info["commit"] == "unknown"
    assert timing.default_results_path("bench_loss", info) == tmp_path / "bench_results" / f"bench_loss_cpu-{timing.slug(str(info['device_name']))}.csv"
    assert cli.main(["bench", "train-step", "--smoke", "--device", "cpu", "--providers", "memft", "--reps", "1"]) == 0
    (written,) = (tmp_path / "bench_results").glob("bench_train_step_cpu-*.csv")
    assert [r["status"] for r in timing.read_rows(written)] == ["ok"]


def test_thin_entry_points_call_the_package():
    """benchmarks/*.py stay as entry points (the docs run them) and hold no code: each is `memft bench NAME`."""
    import ast

    from memft_kernels import bench

    for script, name in [("bench_loss", "loss"), ("bench_linear_loss", "linear-loss"), ("bench_train_step", "train-step"),
                         ("tune_triton", "tune-triton"), ("report", "report"), ("make_results_report", "results-report")]:
        text = (BENCH / f"{script}.py").read_text()
        tree = ast.parse(text)
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body), script
        assert f'main(["bench", "{name}", *sys.argv[1:]])' in text and name in bench.BENCHMARKS, script
    out = subprocess.run([sys.executable, str(BENCH / "bench_loss.py"), "--providers", "nope"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "memft bench: error: unknown provider" in out.stderr, out.stderr


def test_a_failing_provider_fails_the_command(monkeypatch, tmp_path, capsys):
    """Rows are written for every provider, but `memft bench loss` exits 1 when one failed, so that
    gpu_check.sh's summary shows it at a glance."""
    from memft_kernels import bench

    def broken():
        def fn(x, y):
            raise RuntimeError("planted")
        return fn

    monkeypatch.setitem(bench_loss.PROVIDERS, "torch-plain", dataclasses.replace(bench_loss.PROVIDERS["torch-plain"], make=broken))
    rc = bench.run("loss", ["--smoke", "--device", "cpu", "--mode", "fwd", "--providers", "torch-plain", "memft-torch",
                            "--no-memory", "--csv", str(tmp_path / "x.csv")])
    rows = timing.read_rows(tmp_path / "x.csv")
    assert rc == 1 and [r["status"] for r in rows] == ["error: RuntimeError: planted", "ok"]
    assert "1 provider(s) failed: torch-plain" in capsys.readouterr().err


def test_committed_results_still_read(tmp_path):
    """Every CSV under benchmarks/results/ goes through the moved report code (tables, the PNG)."""
    csvs = sorted((BENCH / "results").glob("*.csv"))
    assert any(p.name.startswith("bench_loss_") for p in csvs)
    rows = report.load(csvs)
    text = report.loss_tables(rows) + report.train_table(rows) + report.linear_table(rows)
    assert "| memft-cpu |" in text and "LoRA train step" in text and "| memft-fused |" in text
    assert report.main([str(p) for p in csvs] + ["--md", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_result_writer_adds_new_columns_to_an_old_file(tmp_path):
    path = tmp_path / "old.csv"
    timing.ResultWriter(path, ["a", "b"], jsonl=False).write({"a": 1, "b": 2})
    w = timing.ResultWriter(path, ["a", "b", "status"], jsonl=False)  # a column added since
    w.write({"a": 3, "b": 4, "status": "ok"})
    assert timing.read_rows(path) == [{"a": "1", "b": "2", "status": ""}, {"a": "3", "b": "4", "status": "ok"}]
    with pytest.raises(ValueError, match="other columns"):
        timing.ResultWriter(path, ["b", "a", "status"])  # reordered: not the same file


def test_linear_loss_smoke_and_skipped_providers(tmp_path, capsys):
    """bench linear-loss end to end at a toy size; a provider that cannot run here is a row saying why."""
    out = tmp_path / "rows.csv"
    rows = bench_linear_loss.main(["--device", "cpu", "--n", "64", "--v", "97", "--d", "16", "--reps", "1", "--warmup", "0",
                                   "--only", "memft-materialized", "memft-fused", "liger-flce", "--out", str(out)])
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["provider"], r["weight"]) for r in ok} == {
        (p, w) for p in ("memft-materialized", "memft-fused") for w in ("frozen", "trainable")
    }
    assert all(r["loss_rel_err"] < 1e-5 for r in ok)
    liger = [r for r in rows if r["provider"] == "liger-flce"]
    assert len(liger) == 2 and all(r["status"].startswith("skipped: ") for r in liger)  # GPU only
    assert len(timing.read_rows(out)) == 6 and "| memft-fused |" in capsys.readouterr().out
    text = report.linear_table(report.load([out]))
    assert "| memft-fused | frozen |" in text and "skipped" in text


def test_gpu_sets_are_issue_13s_matrix():
    """The GPU run's arguments, checked here because no GPU runs in the test suite."""
    args = bench_loss.parse_args(["--gpu-set", "--device", "cpu"])
    assert args.n == [16384] and args.v == [32000, 128256, 151936, 262144] and args.dtype == ["bf16"]
    assert set(args.mode) == {"fwd", "fwd+bwd"}
    assert set(args.providers) == {"memft-triton", "memft-cuda", "memft-triton-inplace", "memft-cuda-inplace",
                                   "torch-plain", "torch-compile", "liger"}
    assert bench_linear_loss.SIZES[("cuda", False)] == dict(n=8192, v=128256, d=4096, dtype="bfloat16")
    assert set(bench_linear_loss.providers("cuda")) == {"memft-materialized", "memft-fused", "torch-linear-ce", "liger-flce"}


def test_gpu_check_script_parses():
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_gpu_check_ends_on_budget_when_python_hangs(tmp_path):
    """gpu_check.sh on a host whose python hangs (a wedged driver at `import torch`, say): every call
    of the interpreter is time-boxed and none starts after the total budget, so the script ends, exit
    0, its closing table naming every stage. Regression: the scripts-path lookup had no timeout (the
    script hung for good) and the machine-name lookup ran up to 60 s after the budget was used up."""
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec sleep 600\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFT_")}
    env.update(MEMFT_PYTHON=str(python), MEMFT_GPU_CHECK_TOTAL_S="6", MEMFT_SITE=str(tmp_path / "site"), OUT=str(out))
    # the old script hung here until the stub's sleep ended (600 s)
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr
    table = res.stdout[res.stdout.index("# stage"):]
    assert "env             TIMEOUT (6s)" in table, table
    for stage in ("wheels", "build", "t-triton", "t-cuda", "memcheck-cuda", "loss-16k", "linear", "tune", "train"):
        assert f"{stage:<15} not run (budget)" in table, table
    # the scripts-path lookup, then the env stage's; nothing once the budget was used up
    assert calls.read_text().split() == ["-c", "-"]
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.log"]


def test_targets_table_marks_misses():
    """Speedups are the peer's median over the kernel's, checked against issue 13's targets; a peer
    that did not run leaves "-"."""
    base = dict(bench="loss", device="cuda", device_name="GPU", threads="1", N="16384", dtype="bf16", mode="fwd+bwd",
                V="128256", status="ok", date="2026-12-01T00:00:00Z")
    rows = [dict(base, provider="memft-triton", median_ms="1.0", gbps="4000", frac_copy="0.9"),
            dict(base, provider="memft-cuda", median_ms="2.0", gbps="2000", frac_copy="0.45"),
            dict(base, provider="torch-plain", median_ms="5.0", frac_copy="0.5"),
            dict(base, provider="torch-compile", median_ms="1.2", frac_copy="0.8"),
            dict(base, provider="liger", status="skipped: liger_kernel not importable")]
    lines = {line.split(" | ")[1]: line for line in report.targets_tables(rows).splitlines() if line.startswith("| 128256")}
    assert lines["memft-triton"] == "| 128256 | memft-triton | 1 | 4,000 | 90% | 5.00x | 1.20x (miss) | - |"
    assert lines["memft-cuda"] == "| 128256 | memft-cuda | 2 | 2,000 | 45% (miss) | 2.50x (miss) | 0.60x (miss) | - |"


def test_train_step_provider_list_is_extensible(tmp_path, monkeypatch):
    """A row is one more TrainProvider: its prepare() sees the fresh model, unavailable() skips it."""
    seen = []
    extra = [
        bench_train_step.TrainProvider("memft-prepared", bench_train_step.PROVIDERS[1].loss, "test",
                                       prepare=lambda model: seen.append(type(model).__name__)),
        bench_train_step.TrainProvider("never", bench_train_step.PROVIDERS[1].loss, "test", unavailable=lambda: "not here"),
    ]
    monkeypatch.setattr(bench_train_step, "PROVIDERS", bench_train_step.PROVIDERS + extra)
    rows = bench_train_step.main(["--smoke", "--device", "cpu", "--reps", "1", "--providers", "memft-prepared", "never",
                                  "--csv", str(tmp_path / "t.csv")])
    assert [r["status"] for r in rows] == ["ok", "skipped: not here"] and seen == ["PeftModel"]


def test_results_report_keeps_hand_written_sections(tmp_path):
    """Regenerating docs/RESULTS.md must not drop the sections written by hand between the markers."""
    from memft_kernels.bench.results_report import KEEP_BEGIN, KEEP_END, kept_sections

    report = tmp_path / "RESULTS.md"
    assert kept_sections(report) == ""
    section = f"{KEEP_BEGIN}\n## 4. Measured by hand\n\nsome numbers\n{KEEP_END}"
    report.write_text(f"# generated\n\n{section}\n\n## Appendix: every cell\n", encoding="utf-8")
    assert kept_sections(report) == section + "\n\n"
    report.write_text(f"{KEEP_BEGIN}\nno end marker\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="without a matching"):
        kept_sections(report)
