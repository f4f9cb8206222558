"""`memft train`, `memft info`, `memft bench` fed a bad value for every flag: exit 2, one line on
stderr, no traceback, no run folder left behind; Ctrl-C stops a run with one line and leaves it
resumable; corrupt checkpoints and config.json fall back or fail in one line."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memft_kernels.cli import build_parser
from memft_kernels.cli import main as memft_main
from memft_kernels.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _subparser(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(name):
    """{flag: action} of a subcommand (the first long option string of each)."""
    out = {}
    for action in _subparser(name)._actions:
        longs = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
        if longs and longs[0] != "--help":
            out[longs[0]] = action
    return out


# Values that are wrong for a flag beyond its type (ranges, names, paths). FILE is a regular file,
# MISSING a path that does not exist.
SEMANTIC = {
    "--model": ["bogus-model", "MISSING", "FILE"],
    "--init-range": ["0", "-0.1"],
    "--dtype": ["float64", "int8"],
    "--device": ["bogus", "cuda:x", "gpu"],
    "--rank": ["0", "-2"],
    "--alpha": ["0", "-1"],
    "--dropout": ["1", "-0.5"],
    "--target-modules": ["nonexistent_proj", ","],
    "--layers": ["abc", "99", "-1"],
    "--task": ["bogus"],
    "--length": ["0", "-5"],
    "--samples": ["0"],
    "--data": ["MISSING", "FILE_EMPTY", "DIR", "FILE"],  # FILE: --data with the random task
    "--replace-rate": ["1.5", "-0.1"],
    "--tokenizer": ["bogus"],
    "--trained-vocab": ["10"],
    "--vocab-size": ["1", "0", "2"],  # 2: no id left after <bos> and <pad> (was a traceback from random)
    "--curriculum-epochs": ["0"],
    "--loss": ["bogus"],
    "--threshold": ["0", "1.5"],
    "--sharpness": ["0", "-1"],
    "--fallback": ["bogus"],
    "--window-span": ["0"],
    "--window-decay": ["-1"],
    "--window-floor": ["2"],
    "--window-patience": ["0"],
    "--window-growth": ["-1"],
    "--window-max": ["0.5"],
    "--backend": ["bogus", "TORCH"],
    "--steps": ["0", "-1"],
    "--lr": ["0", "-1"],
    "--batch-size": ["-1", "1000"],
    "--grad-clip": ["-1"],
    "--seed": ["x"],
    "--threads": ["-1"],
    "--eval-every": ["-1"],
    "--checkpoint-every": ["-1"],
    "--out-dir": ["FILE"],
    "--run-dir": ["FILE/sub"],
    "--autocast": ["fp8", "bogus"],
    "--attn": ["bogus"],
    "--compare": ["bogus", "ce,bogus"],
    "--resume": ["MISSING", "DIR"],
    "--recipe": ["bogus", "paper-phonebook:bogus"],
    "--window-state": ["bogus"],
    "--curriculum-style": ["bogus"],
    "--curriculum-ratios": ["abc", "0.5"],
    "--curriculum-boundaries": ["abc", "5"],
    "--grad-accum": ["0"],
    "--accum-normalize": ["bogus"],
    "--epochs": ["-1"],
}


def _bad_values(flag, action):
    """Every bad value for one flag: the semantic ones above plus ones its type rejects."""
    values = list(SEMANTIC.get(flag, []))
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return [f"{flag}=bogus"]
    if action.type is int:
        values += ["abc", "1.5", ""]
    elif action.type is float:
        values += ["abc", "nan", "inf", "-inf"]
    elif action.choices is not None:
        values += ["bogus"]
    pre = ["--task", "text"] if flag == "--data" else []
    return [pre + [flag, v] if not (flag == "--data" and v == "FILE") else [flag, v] for v in values]


def _fill(args, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "dir").mkdir(exist_ok=True)
    subs = {"MISSING": str(tmp_path / "missing"), "FILE_EMPTY": str(tmp_path / "empty.txt"),
            "FILE": str(tmp_path / "file.txt"), "DIR": str(tmp_path / "dir")}
    out = []
    for a in args:
        for key in ("MISSING", "FILE_EMPTY", "FILE", "DIR"):
            a = a.replace(key, subs[key])
        out.append(a)
    return out


def _one_line_exit_2(argv, capsys):
    try:
        code = memft_main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert err.startswith("memft") and ": error: " in err, err
    return err


def _train_cases():
    cases = []
    for flag, action in _options("train").items():
        for value in _bad_values(flag, action):
            cases.append(value if isinstance(value, list) else [value])
    # combinations that are each fine alone
    from memft_kernels import dispatch

    # explicit backends that cannot run here (conftest turns on Triton's CPU interpreter for the tests)
    cases += [["--backend", name] for name in ("cuda", "triton") if dispatch.availability(name) is not None]
    # (--backend cpu --dtype float16 was refused until the CPU kernels took float16 logits.)
    cases += [["--autocast", "bf16", "--dtype", "bfloat16"], ["--fsdp"], ["--curriculum"], ["--device", "cuda"],
              ["--task", "text", "--data", "DIR"],
              ["--loss", "ce", "--compare", "ce,memft-ot"],  # --loss used to be ignored silently
              ["--epochs", "2", "--samples", "2", "--batch-size", "1"],  # with the base's --steps: was ignored
              ["--recipe", "paper-longcontext", "--epochs", "2"]]
    return cases


def test_every_train_flag_has_bad_values():
    """A flag added to `memft train` must get its bad values here (type-only flags get them for free)."""
    missing = [f for f, a in _options("train").items()
               if not _bad_values(f, a) and f not in ("--plan",)]
    assert not missing, f"add bad values for {missing} to SEMANTIC"


@pytest.mark.parametrize("case", _train_cases(), ids=lambda c: " ".join(c)[:60])
def test_train_bad_value_is_one_line_exit_2_and_leaves_no_run_folder(case, capsys, tmp_path):
    out_dir = tmp_path / "runs"
    base = ["train", "--model", "nano", "--vocab-size", "64", "--length", "8", "--steps", "1",
            "--no-progress", "--no-plots", "--out-dir", str(out_dir)]
    flags = {a for a in case if a.startswith("--")}
    if "--out-dir" in flags:
        base = base[:-2]
    if "--resume" in flags:
        base = ["train", "--no-progress"]
    if "--model" in flags:
        i = base.index("--model")
        base = base[:i] + base[i + 2:]
    _one_line_exit_2(base + _fill(case, tmp_path), capsys)
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


@pytest.mark.parametrize("weights, says", [
    (None, "cannot load its weights (OSError: "),  # config.json alone: a transformers traceback
    (b"garbage", "cannot load its weights (SafetensorError: "),  # a cut or foreign weights file
    ("unknown-type", "cannot read its config (ValueError: "),  # transformers' message ran over 2 lines
])
def test_a_model_folder_that_cannot_load_is_one_line_exit_2(weights, says, tmp_path, capsys):
    from transformers import LlamaConfig

    folder = tmp_path / "model"
    LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    if weights == "unknown-type":
        (folder / "config.json").write_text('{"model_type": "no-such-model"}')
    elif weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    err = _one_line_exit_2(["train", "--model", str(folder), "--tokenizer", "byte", "--task", "text", "--length", "8",
                            "--steps", "1", "--no-progress", "--no-plots", "--out-dir", str(tmp_path / "runs")], capsys)
    assert says in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["info", "extra"], ["info", "--version=1"]])
def test_info_bad_values(argv, capsys):
    _one_line_exit_2(argv, capsys)


class _Parsed(Exception):
    pass


def _benchmark_parser(name):
    """The argparse parser a benchmark builds (caught at its parse_args, before anything runs)."""
    from memft_kernels.bench import entry_point

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Parsed

    argparse.ArgumentParser.parse_args = grab
    try:
        entry_point(name)([], prog=f"memft bench {name}")
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured.get("parser")


def _bench_cases():
    from memft_kernels.bench import BENCHMARKS

    cases = [["bench", "bogus"], ["bench", "--bogus"]]
    for name in BENCHMARKS:
        cases.append(["bench", name, "--bogus-flag"])
        parser = _benchmark_parser(name)
        for action in parser._actions if parser is not None else []:
            flag = next((s for s in action.option_strings if s.startswith("--")), None)
            if flag is None or flag == "--help" or action.nargs == 0:
                continue
            if action.type in (int, float):
                cases.append(["bench", name, flag, "abc"])
            elif action.choices is not None:
                cases.append(["bench", name, flag, "bogus-choice"])
    return cases


@pytest.mark.parametrize("argv", _bench_cases(), ids=lambda c: " ".join(c))
def test_bench_bad_values(argv, capsys):
    _one_line_exit_2(argv, capsys)


# Values of the right type out of their range: each used to be a traceback from torch (or, for
# linear-loss --n 0, the default size run silently); the CSV of other columns a ValueError traceback.
BENCH_RANGES = [
    (["loss", "--smoke", "--device", "cpu", "--threads", "-2", "--csv", "OUT"], "--threads must be >= 0"),
    (["loss", "--smoke", "--device", "cpu", "--budget-s", "nan", "--csv", "OUT"], "--budget-s must be > 0"),
    (["linear-loss", "--smoke", "--device", "cpu", "--d", "-1", "--out", "OUT"], "--d must be > 0"),
    (["linear-loss", "--smoke", "--device", "cpu", "--n", "0", "--out", "OUT"], "--n must be > 0"),
    (["train-step", "--smoke", "--device", "cpu", "--vocab", "0", "--csv", "OUT"], "--vocab must be > 0"),
    (["train-step", "--smoke", "--device", "cpu", "--hidden", "0", "--csv", "OUT"], "--hidden must be > 0"),
    (["train-step", "--smoke", "--device", "cpu", "--threads", "-1", "--csv", "OUT"], "--threads must be >= 0"),
    (["tune-triton", "--smoke", "--device", "cpu", "--v", "37", "-5", "--csv", "OUT"], "--v must be > 0"),
    (["train-step", "--smoke", "--device", "cpu", "--providers", "memft", "--csv", "OTHER"], "has other columns"),
    (["report", "OTHER", "--no-png"], "no benchmark rows in"),  # printed nothing, exit 0
    (["report", "BINARY", "--no-png"], "not a CSV of benchmark results"),  # UnicodeDecodeError traceback
]


@pytest.mark.parametrize("argv, says", BENCH_RANGES, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_bench_out_of_range_values_are_one_line(argv, says, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe,a\n")
    subs = {"OUT": str(tmp_path / "out.csv"), "OTHER": str(other), "BINARY": str(tmp_path / "binary.csv")}
    argv = [subs.get(a, a) for a in argv]
    err = _one_line_exit_2(["bench", *argv], capsys)
    assert says in err, err
    assert other.read_text() == "a,b\n1,2\n"


def test_top_level_bad_values(capsys):
    for argv in (["bogus"], ["--bogus"], []):
        try:
            code = memft_main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the last two, checksummed, fallback, one-line failure
# ---------------------------------------------------------------------------------------------
RUN = ["train", "--model", "nano", "--vocab-size", "64", "--length", "16", "--steps", "6",
       "--checkpoint-every", "2", "--eval-every", "0", "--threads", "1", "--backend", "torch",
       "--no-progress", "--no-plots", "--no-save-adapter"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4, and its report (the reference)."""
    run_dir = str(tmp_path_factory.mktemp("ckpt") / "run")
    assert memft_main(RUN + ["--run-dir", run_dir]) == 0
    return run_dir, json.load(open(os.path.join(run_dir, "report.json")))


def _copy(run_dir, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(run_dir, dst)
    os.remove(os.path.join(dst, "report.json"))
    return dst


def test_the_last_two_checkpoints_are_kept(checkpointed):
    run_dir, _ = checkpointed
    newest = ckpt.decode(open(os.path.join(run_dir, ckpt.CHECKPOINT), "rb").read())
    older = ckpt.decode(open(os.path.join(run_dir, ckpt.PREVIOUS), "rb").read())
    assert (newest["step"], older["step"]) == (4, 2)
    assert newest["config"]["steps"] == 6


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_with_a_warning(damage, checkpointed, tmp_path, capsys):
    run_dir, report = checkpointed
    run = _copy(run_dir, tmp_path)
    path = os.path.join(run, ckpt.CHECKPOINT)
    data = open(path, "rb").read()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096),
           "flipped": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]}[damage]
    open(path, "wb").write(bad)
    with pytest.warns(UserWarning, match="resuming from the older checkpoint.prev.pt"):
        assert memft_main(["train", "--resume", run]) == 0
    resumed = json.load(open(os.path.join(run, "report.json")))
    for key in ("base_loss", "final_loss", "token_accuracy", "recalled_frac", "exact_recall"):
        assert resumed[key] == report[key], key


def test_no_usable_checkpoint_is_one_line_exit_2(checkpointed, tmp_path, capsys):
    run = _copy(checkpointed[0], tmp_path)
    open(os.path.join(run, ckpt.CHECKPOINT), "wb").write(b"")
    open(os.path.join(run, ckpt.PREVIOUS), "wb").write(b"PK\x03\x04 not a checkpoint")
    err = _one_line_exit_2(["train", "--resume", run], capsys)
    assert "no usable checkpoint" in err and "checkpoint.prev.pt" in err


def test_a_pickle_without_the_resume_keys_is_not_usable(tmp_path):
    open(tmp_path / ckpt.CHECKPOINT, "wb").write(ckpt.encode({"step": 3}))
    with pytest.raises(ckpt.TrainInputError, match="lacks trainable"):
        ckpt.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"steps": "many"}', '{"bogus_option": 1}'])
def test_a_corrupt_config_json_uses_the_checkpoint_copy(text, checkpointed, tmp_path):
    run_dir, report = checkpointed
    run = _copy(run_dir, tmp_path)
    open(os.path.join(run, "config.json"), "w").write(text)
    with pytest.warns(UserWarning, match="config.json.*is unusable"):
        assert memft_main(["train", "--resume", run]) == 0
    assert json.load(open(os.path.join(run, "report.json")))["final_loss"] == report["final_loss"]
    assert json.load(open(os.path.join(run, "config.json")))["steps"] == 6  # rewritten from the checkpoint


def test_a_corrupt_config_json_without_a_stored_copy_is_one_line_exit_2(checkpointed, tmp_path, capsys):
    run = _copy(checkpointed[0], tmp_path)
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):  # checkpoints from before the config was stored in them
        path = os.path.join(run, name)
        state = ckpt.decode(open(path, "rb").read())
        state.pop("config")
        open(path, "wb").write(ckpt.encode(state))
    open(os.path.join(run, "config.json"), "w").write("{not json")
    err = _one_line_exit_2(["train", "--resume", run], capsys)
    assert "config.json" in err and "JSONDecodeError" in err


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line, no traceback, a checkpoint to resume from, the same result as never stopping
# ---------------------------------------------------------------------------------------------
SIGINT_RUN = ["train", "--model", "nano", "--vocab-size", "64", "--length", "16", "--steps", "30",
              "--eval-every", "0", "--threads", "1", "--backend", "torch", "--no-progress", "--no-plots",
              "--no-save-adapter"]


def _memft(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "memft_kernels", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigint_prints_one_line_and_leaves_a_resumable_run(tmp_path):
    full_dir, stopped_dir = str(tmp_path / "full"), str(tmp_path / "stopped")
    full = _memft(SIGINT_RUN + ["--run-dir", full_dir], tmp_path)
    stopped = _memft(SIGINT_RUN + ["--run-dir", stopped_dir], tmp_path)
    metrics = os.path.join(stopped_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):  # base row + 2 steps
        assert stopped.poll() is None, stopped.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "memft train --resume" in lines[0], err
    assert not os.path.exists(os.path.join(stopped_dir, "report.json")), "finished before the signal"
    assert ckpt.load_checkpoint(stopped_dir)["step"] >= 2

    resumed = _memft(["train", "--resume", stopped_dir], tmp_path)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert full.wait(timeout=240) == 0, full.communicate()
    a = json.load(open(os.path.join(full_dir, "report.json")))
    b = json.load(open(os.path.join(stopped_dir, "report.json")))
    for key in ("base_loss", "final_loss", "token_accuracy", "recalled_frac", "exact_recall", "first_wrong"):
        assert a[key] == b[key], key


def test_a_plot_that_fails_leaves_the_report_and_warns(monkeypatch, tmp_path, capsys):
    """A matplotlib failure (a bad MPLBACKEND, ...) used to be a traceback after training, before
    report.json was written: the run's result was lost."""
    from memft_kernels.train import report as report_module

    def broken(*args, **kwargs):
        raise ValueError("Key backend: 'bogus' is not a valid value for backend")

    monkeypatch.setattr(report_module, "write_plots", broken)
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"loss.png and recall.png not written \(ValueError: Key backend"):
        assert memft_main(["train", "--model", "nano", "--vocab-size", "64", "--length", "8", "--steps", "1",
                           "--eval-every", "0", "--no-progress", "--no-save-adapter", "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 1
    assert (run_dir / "report.md").is_file()


def test_a_recipe_with_steps_runs_that_many_steps():
    """`--recipe NAME --steps N` used to keep the recipe's epochs, which decide the steps: N was ignored
    (paper-phonebook ran its 2600 steps)."""
    from memft_kernels.train import recipe_config
    from memft_kernels.train.recipes import describe

    config = recipe_config("paper-phonebook", steps=3, model="nano")
    assert (config.steps, config.epochs) == (3, 0)
    assert "flag --steps" in describe(config, {"steps", "model"}).split("epochs", 1)[1].splitlines()[0]
    assert recipe_config("paper-phonebook", steps=3, epochs=2, model="nano").epochs == 2  # API: epochs decide


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_one_line(tmp_path):
    """SIGTERM (`kill`, a scheduler's stop or preemption) is handled as the first Ctrl-C: it used to end
    the process at once, losing every step since the last checkpoint (all of them without
    --checkpoint-every), with no word on stderr."""
    run_dir = str(tmp_path / "run")
    stopped = _memft(SIGINT_RUN + ["--run-dir", run_dir], tmp_path)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and len(Path(metrics).read_text().splitlines()) >= 3):  # base + 2 steps
        assert stopped.poll() is None, stopped.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, (stopped.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"memft train --resume {run_dir}" in lines[0], err
    assert not os.path.exists(os.path.join(run_dir, "report.json")), "finished before the signal"
    assert ckpt.load_checkpoint(run_dir)["step"] >= 2  # what --resume loads (the resume itself: the SIGINT test)


FINISH_SIGINT = """
import os, signal, sys
from memft_kernels.train import loop
finish = loop._finish
def ctrl_c_while_the_run_folder_is_written(run, wall_s):
    os.kill(os.getpid(), signal.SIGINT)
    return finish(run, wall_s)
loop._finish = ctrl_c_while_the_run_folder_is_written
from memft_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_after_the_last_step_still_writes_the_finished_run(tmp_path):
    """After the last step the run writes its folder (adapter, tokens, report, plots) outside the
    loop's Ctrl-C handling: a Ctrl-C there used to end it with exit 130 and no report.json (and,
    without --checkpoint-every, nothing to resume). Now it finishes, saying so in one line."""
    run_dir = tmp_path / "run"
    argv = ["train", "--model", "nano", "--vocab-size", "64", "--length", "8", "--steps", "2", "--eval-every", "0",
            "--no-progress", "--no-plots", "--no-save-adapter", "--run-dir", str(run_dir)]
    proc = subprocess.run([sys.executable, "-c", FINISH_SIGINT, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "the training is done; finishing its final evaluation" in proc.stderr, proc.stderr
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 2


def test_a_plain_ctrl_c_says_interrupted(monkeypatch, capsys):
    """A Ctrl-C outside the loop's handling (e.g. during the base evaluation) printed "memft train: "
    and nothing after it (a KeyboardInterrupt's text is empty, and the exception itself is truthy)."""
    from memft_kernels.train import cli as train_cli

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_run", ctrl_c)
    assert memft_main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "memft train: interrupted"


def test_plan_with_resume_is_refused_instead_of_training(checkpointed, tmp_path, capsys):
    """`--resume RUN --plan` used to ignore --plan and train the run on."""
    run = _copy(checkpointed[0], tmp_path)
    metrics = Path(run) / "metrics.jsonl"
    before = metrics.read_text()
    err = _one_line_exit_2(["train", "--resume", run, "--plan"], capsys)
    assert "--plan" in err and "--resume" in err and "plan.json" in err
    assert metrics.read_text() == before
    assert not os.path.exists(os.path.join(run, "report.json"))


def test_a_warning_of_memft_train_is_one_line_on_stderr(checkpointed, tmp_path):
    """The fallback to the older checkpoint used to print Python's file:line form and the source line."""
    run = _copy(checkpointed[0], tmp_path)
    (Path(run) / ckpt.CHECKPOINT).write_bytes(b"")
    proc = _memft(["train", "--resume", run], tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if "checkpoint.pt" in ln or "warn" in ln.lower()]
    expected = "memft train: warning: checkpoint.pt: empty file; resuming from the older checkpoint.prev.pt (step 2)"
    assert lines == [expected], err


@pytest.mark.parametrize("every, says", [(100, "stopped before its first checkpoint (--checkpoint-every 100)"),
                                         (0, "started without --checkpoint-every")])
def test_resume_without_a_checkpoint_says_why(every, says, tmp_path, capsys):
    from memft_kernels.train import TrainConfig

    run = tmp_path / "run"  # what a run killed before its first checkpoint leaves
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(TrainConfig(checkpoint_every=every).to_dict(), run_dir=str(run))))
    (run / "metrics.jsonl").write_text('{"kind": "base", "step": 0, "loss": 9.0}\n')
    err = _one_line_exit_2(["train", "--resume", str(run)], capsys)
    assert says in err


def test_fewer_samples_than_ranks_runs_idle_ranks_and_says_so(monkeypatch, tmp_path, capsys):
    """One sample on 2 ranks used to be refused ("every rank needs a row"). It is allowed now (rank 1
    runs the idle path; tests/test_train_fsdp.py and test_train_ddp.py check the numbers): without
    --fsdp with a warning naming the fix, with --fsdp a note that the idle rank only shards the model.
    The memory plan counts the one row a rank runs, --plan prints the line too."""
    from memft_kernels.train import TrainConfig, loop

    monkeypatch.setattr(loop, "_init_distributed", lambda device: (0, 2))  # as under torchrun with 2 ranks
    config = TrainConfig(model="nano", length=8, steps=1, threads=1, progress=False, run_dir=str(tmp_path / "r"))
    run = loop.setup(config, make_dir=False)
    assert run.idle_ranks == 1 and run.plan.tokens == run.task.max_len  # one row per rank
    note = loop.idle_note(run)
    assert "warning: 1 of the 2 ranks holds no row of a micro-batch of 1 row" in note
    assert "--nproc_per_node 1" in note and "add --fsdp" in note
    run.config = config.replace(fsdp=True)
    assert "under --fsdp it only shards the model" in loop.idle_note(run)
    assert memft_main(["train", "--model", "nano", "--length", "8", "--plan"]) == 0
    assert "warning: 1 of the 2 ranks holds no row" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()
    # enough rows for every rank: no line
    run = loop.setup(config.replace(samples=4, batch_size=2, grad_accum=2), make_dir=False)
    assert run.idle_ranks == 0 and loop.idle_note(run) is None and run.plan.tokens == run.task.max_len
    # the plan's rows are a micro-batch's share of one rank, whatever --grad-accum (it was divided by it)
    monkeypatch.setattr(loop, "_init_distributed", lambda device: (0, 1))
    run = loop.setup(config.replace(samples=4, batch_size=4, grad_accum=2), make_dir=False)
    assert run.plan.tokens == 4 * run.task.max_len


def test_a_new_run_into_a_folder_with_a_checkpoint_is_refused(checkpointed, tmp_path, capsys):
    """Re-running the command instead of --resume: refused before anything is written (it used to
    replace config.json and metrics.jsonl, and a later --resume continued the old run's weights under
    the new run's log)."""
    run = _copy(checkpointed[0], tmp_path)
    before = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)}
    err = _one_line_exit_2(RUN + ["--run-dir", run], capsys)
    assert "holds the checkpoint of an earlier run" in err and f"--resume {run}" in err
    assert {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)} == before


def test_a_new_run_into_a_folder_with_a_finished_run_is_refused(tmp_path, capsys):
    """A finished run without checkpoints: a new run into its folder is refused before anything is
    written (it used to overwrite the report, metrics and adapter); train_or_resume (a law sweep
    cell) with the very same settings returns the finished run's report instead of training again."""
    from memft_kernels.train import TrainConfig, train_or_resume

    run = str(tmp_path / "done")
    argv = [a for a in RUN if a not in ("--checkpoint-every", "2")]
    argv[argv.index("--steps") + 1] = "2"
    assert memft_main(argv + ["--run-dir", run]) == 0
    capsys.readouterr()
    assert not any(n.startswith("checkpoint") for n in os.listdir(run))
    before = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run) if os.path.isfile(os.path.join(run, n))}
    for again in (argv, [a if a != "2" else "3" for a in argv]):  # the same command, and other settings
        err = _one_line_exit_2(again + ["--run-dir", run], capsys)
        assert "holds a finished run (report.json)" in err and "another --run-dir" in err, err
    after = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run) if os.path.isfile(os.path.join(run, n))}
    assert after == before
    report = json.load(open(os.path.join(run, "report.json")))
    config = TrainConfig.load(os.path.join(run, "config.json"))
    assert train_or_resume(config.replace(run_dir=run)) == report
    assert {n: open(os.path.join(run, n), "rb").read() for n in before} == before  # not trained again
    with pytest.raises(ckpt.TrainInputError, match="holds a finished run"):  # other settings: refused, not its report
        train_or_resume(config.replace(run_dir=run, steps=3))


def test_compare_again_continues_a_stopped_comparison(tmp_path, capsys):
    """The same --compare command after a kill: finished runs are kept (not trained again), a
    checkpointed one resumes (the same report as never stopping), the table is written."""
    base = str(tmp_path / "cmp")
    argv = RUN[:1] + ["--compare", "ce,memft-ot"] + RUN[1:] + ["--run-dir", base]
    argv[argv.index("--steps") + 1] = "4"
    assert memft_main(argv) == 0
    first = {loss: json.load(open(os.path.join(base, loss, "report.json"))) for loss in ("ce", "memft-ot")}
    os.remove(os.path.join(base, "memft-ot", "report.json"))  # killed after its step-2 checkpoint
    os.remove(os.path.join(base, "compare.md"))
    assert memft_main(argv) == 0
    again = {loss: json.load(open(os.path.join(base, loss, "report.json"))) for loss in ("ce", "memft-ot")}
    assert again["ce"] == first["ce"]  # kept as it was, wall time included: not trained again
    for key in ("final_loss", "token_accuracy", "recalled_frac", "first_wrong"):
        assert again["memft-ot"][key] == first["memft-ot"][key], key
    assert os.path.isfile(os.path.join(base, "compare.md"))
    capsys.readouterr()
    err = _one_line_exit_2(["train", "--compare", "ce,memft-ot,ce", "--run-dir", str(tmp_path / "dup")], capsys)
    assert "'ce' is listed twice" in err and not (tmp_path / "dup").exists()


def test_ctrl_c_during_compare_says_how_to_finish_the_comparison(monkeypatch, tmp_path, capsys):
    import memft_kernels.train as train_api
    from memft_kernels.train.loop import RunInterrupted

    def interrupted(config):
        raise RunInterrupted(f"interrupted after step 3 of 6; checkpoint saved, continue with: memft train --resume "
                             f"{config.run_dir}")

    monkeypatch.setattr(train_api, "train_or_resume", interrupted)
    monkeypatch.chdir(tmp_path)
    assert memft_main(["train", "--model", "nano", "--compare", "ce,memft-ot", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the same --compare command and --run-dir runs/" in err


def test_a_run_folder_being_trained_is_refused(checkpointed, tmp_path, capsys):
    """A second `memft train --resume` of a folder another process is training (an flock held
    while it trains) is refused instead of interleaving the two runs' checkpoints and log."""
    import fcntl

    from memft_kernels.train.loop import LOCK_FILE

    run = _copy(checkpointed[0], tmp_path)
    assert not os.path.exists(os.path.join(checkpointed[0], LOCK_FILE))  # a finished run leaves none
    with open(os.path.join(run, LOCK_FILE), "w") as holder:
        holder.write("pid 4242 on elsewhere")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        err = _one_line_exit_2(["train", "--resume", run], capsys)
    assert "is being trained by another process (pid 4242 on elsewhere)" in err
    assert not os.path.exists(os.path.join(run, "report.json"))
    assert memft_main(["train", "--resume", run]) == 0  # the lock went with its holder


def test_memft_train_under_torchrun_exits_0_on_both_ranks_and_prints_once(tmp_path):
    """`torchrun -m memft_kernels train` on 2 gloo ranks: both ranks leave through the CLI's own
    teardown (barrier, then destroy_process_group) with exit 0; rank 0 alone prints the table."""
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)
    argv = [a for a in RUN if a != "--checkpoint-every" and a != "2"]
    argv[argv.index("--steps") + 1] = "2"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "memft_kernels", *argv, "--samples", "2", "--run-dir", run_dir],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"run folder: {run_dir}") == 1, proc.stdout[-3000:]
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["steps"] == 2


def test_resume_of_a_finished_run_returns_its_report_without_training(checkpointed, tmp_path):
    """--resume of a run that finished (its report.json newer than its checkpoints) trains nothing:
    the report comes back with a warning, metrics.jsonl is untouched. A report.json older than the
    newest checkpoint (an earlier run's, in a folder a new run then checkpointed) does not count."""
    import shutil

    run_dir, report = checkpointed
    run = str(tmp_path / "finished")
    shutil.copytree(run_dir, run)  # copytree keeps the files' times: the report stays the newest
    metrics = open(os.path.join(run, "metrics.jsonl")).read()
    with pytest.warns(UserWarning, match="already finished \\(6 steps\\); nothing to resume"):
        assert memft_main(["train", "--resume", run]) == 0
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics
    assert json.load(open(os.path.join(run, "report.json"))) == report

    newest = os.path.join(run, ckpt.CHECKPOINT)
    os.utime(os.path.join(run, "report.json"), (os.path.getmtime(newest) - 60,) * 2)  # now older
    assert memft_main(["train", "--resume", run]) == 0  # trained from step 4 again
    assert os.path.getmtime(os.path.join(run, "report.json")) >= os.path.getmtime(newest)
    resumed = json.load(open(os.path.join(run, "report.json")))
    assert resumed["final_loss"] == report["final_loss"]
