"""Checkpoints: SIGKILL mid-run then --resume gives the uninterrupted result; a crash while saving
leaves the previous checkpoint intact."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from memft_kernels.train import checkpoint as ckpt

# Dropout, minibatches and the memft-sw window: every piece of state a resume must restore.
ARGS = ["train", "--model", "nano", "--vocab-size", "256", "--length", "24", "--samples", "4",
        "--batch-size", "2", "--steps", "40", "--loss", "memft-sw", "--dropout", "0.1", "--lr", "0.01",
        "--eval-every", "10", "--threads", "1", "--backend", "torch", "--no-progress", "--no-plots"]


def _memft(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "memft_kernels", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if r["kind"] == "train"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    full = _memft(ARGS + ["--run-dir", full_dir], tmp_path)
    killed = _memft(ARGS + ["--run-dir", killed_dir, "--checkpoint-every", "5"], tmp_path)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed_dir, ckpt.CHECKPOINT)):
        assert killed.poll() is None, killed.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed_dir, "report.json")), "the run finished before the kill"
    assert full.wait(timeout=240) == 0, full.communicate()[1]

    resumed = _memft(["train", "--resume", killed_dir], tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err

    a = json.load(open(os.path.join(full_dir, "report.json")))
    b = json.load(open(os.path.join(killed_dir, "report.json")))
    for key in ("base_loss", "final_loss", "dL", "token_accuracy", "recalled_frac", "exact_recall",
                "steps_to_full_recall", "first_wrong"):
        assert a[key] == b[key], key
    assert _train_rows(full_dir) == [dict(r) for r in _train_rows(killed_dir)]
    from safetensors.torch import load_file

    wa = load_file(os.path.join(full_dir, "adapter", "adapter_model.safetensors"))
    wb = load_file(os.path.join(killed_dir, "adapter", "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_crash_while_saving_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    old = {"step": 5, "weights": torch.arange(1000.0)}
    ckpt.save_checkpoint(str(tmp_path), old)

    def torn_save(obj, f):  # writes part of the file, then the process "dies"
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(str(tmp_path), {"step": 10, "weights": torch.zeros(1000)})
    monkeypatch.undo()
    loaded = ckpt.decode(open(tmp_path / ckpt.CHECKPOINT, "rb").read(), required=("step", "weights"))
    assert loaded["step"] == 5 and torch.equal(loaded["weights"], old["weights"])
    assert sorted(os.listdir(tmp_path)) == [ckpt.CHECKPOINT]  # no temp file left behind


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from memft_kernels.train import TrainInputError, resume

    with pytest.raises(TrainInputError, match="not a run folder"):
        resume(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TrainInputError, match="no checkpoint"):
        resume(str(tmp_path))


def test_row_window_state_is_checkpointed_per_rank(monkeypatch, tmp_path):
    """memft-sw's row-keyed window state is each rank's own (its rows of the batch): a checkpoint
    keeps every rank's, and a resume gives each rank its own (it gave every rank rank 0's)."""
    from memft_kernels.train import TrainConfig, loop

    run = loop.setup(TrainConfig(model="nano", vocab_size=64, length=8, samples=2, steps=3, loss="memft-sw",
                                 threads=1, backend="torch", progress=False, plots=False, run_dir=str(tmp_path / "r")))
    loop.train_step(run)
    own = run.window.state_dict()
    other = {"keyed": "row", "repeats": torch.tensor([5, 0]), "expand": torch.tensor([2.5, 1.0]),
             "anchor": torch.tensor([3, 1])}  # what rank 1 would hold
    monkeypatch.setattr(loop, "_gather_objects", lambda obj, world: [obj, other][:world])
    run.world = 2
    state = loop._checkpoint_state(run)
    for rank, expected in ((1, other), (0, own)):
        run.window.reset()
        run.rank = rank
        loop._restore(run, state)
        for key in ("repeats", "expand", "anchor"):
            assert torch.equal(run.window.state_dict()[key], expected[key]), (rank, key)
    run.world = 3  # resumed on another number of ranks: the rows differ, the window starts over
    loop._restore(run, state)
    assert run.window.keyed is None and run.window.repeats.numel() == 0
