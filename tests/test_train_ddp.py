"""Two-process torchrun (gloo, CPU) computes the same gradients as one process on the whole batch:
the active denominator is the global sum of weights and gradients are summed over ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch

# Run as a torchrun script (2 ranks) and, in this process, as the single-process reference.
WORKER = r'''
import json, os, shutil, sys, torch
import torch.distributed as dist
from memft_kernels.train import TrainConfig, resume, train
from memft_kernels.train.loop import setup, train_step, trainable_parameters


# memft-ot and memft-sw on full batches, and --accum-normalize active over micro-batches of 2 and 1
# rows (3 samples in batches of 2: rank 1 has no row in every step's second micro-batch) with a low
# threshold: later steps have a micro-batch, and then whole steps, without an active token on either
# rank (the step-level fallback). memft-sw with the same short batches.
SHORT = {"length": 8, "samples": 3, "batch_size": 2, "grad_accum": 2}
SETTINGS = {"memft-ot": {"loss": "memft-ot"}, "memft-sw": {"loss": "memft-sw"},
            "active": {"loss": "memft-ot", **SHORT, "steps": 8, "accum_normalize": "active", "threshold": 0.02},
            # a window of 2 e tokens: the state matters, and rank 1 (idle in the 1-row micro-batches)
            # must still start its rows' state over there, as one process does when the batch size changes
            "memft-sw-short": {"loss": "memft-sw", **SHORT, "steps": 6, "window_span": 2.0},
            # state per sample; the full batch is reshuffled every step, so samples change ranks, and a
            # window of 2 e tokens makes the state (e grows from the 4th sighting of an anchor) matter
            "memft-sw-sample": {"loss": "memft-sw", "length": 8, "steps": 6, "window_state": "sample",
                                "window_span": 2.0},
            # one sample on 2 ranks (plain DDP, allowed with a warning): rank 1 holds no row in any step
            "one-sample": {"loss": "memft-sw", "samples": 1, "steps": 6, "window_span": 2.0}}


def collect(options, out):
    result = {}
    for name, setting in SETTINGS.items():
        run = setup(TrainConfig(**dict(options, **setting), run_dir=out + "-" + name))
        grads, infos = [], []
        names = [n for n, p in run.model.named_parameters() if p.requires_grad]
        for _ in range(run.config.steps):
            infos.append(train_step(run, on_grads=lambda r: grads.append(
                [p.grad.detach().clone() for p in trainable_parameters(r.model)])))
        result[name] = {"grads": grads, "infos": infos, "names": names,
                        "params": [p.detach().clone() for p in trainable_parameters(run.model)]}
    return result


def train_and_resume(options, out):
    """A whole run with checkpoints, then a copy of it cut back to its last checkpoint (no report, no
    adapter, as if killed after it) resumed in the same launch."""
    train(TrainConfig(**options, run_dir=out))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copytree(out, out + "-resumed")
        os.remove(os.path.join(out + "-resumed", "report.json"))
        shutil.rmtree(os.path.join(out + "-resumed", "adapter"))
    dist.barrier()
    resume(out + "-resumed")


if __name__ == "__main__":
    result = collect(json.loads(sys.argv[1]), sys.argv[2])
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[2] + ".pt")
    if len(sys.argv) > 3:
        train_and_resume(json.loads(sys.argv[3]), sys.argv[2] + "-trained")
    dist.barrier()
    dist.destroy_process_group()
'''

OPTIONS = dict(model="nano", vocab_size=128, length=16, samples=4, steps=5, lr=3e-2, threads=1,
               backend="torch", progress=False, plots=False, save_adapter=False)

# One sample on 2 plain-DDP ranks (rank 1 idle in every step), memft-sw with a window of 2 e tokens and
# a low lr so that e grows from step 4 on: the window state crosses the step-4 checkpoint.
ONE_TRAINED = dict(OPTIONS, loss="memft-sw", samples=1, length=12, steps=8, lr=3e-3, window_span=2.0,
                   checkpoint_every=4, eval_every=0, save_adapter=True)


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_rank_torchrun_matches_single_process_gradients(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), json.dumps(OPTIONS), str(tmp_path / "ddp"), json.dumps(ONE_TRAINED)], tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    namespace = {}
    exec(compile(WORKER, str(script), "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        single = namespace["collect"](OPTIONS, str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    for loss in namespace["SETTINGS"]:
        a, b = single[loss], ddp[loss]
        assert len(a["grads"]) == namespace["SETTINGS"][loss].get("steps", OPTIONS["steps"])
        for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
            for name, x, y in zip(a["names"], ga, gb):
                torch.testing.assert_close(y, x, rtol=2e-4, atol=1e-6, msg=f"{loss} step {step + 1} {name}")
        for x, y in zip(a["params"], b["params"]):
            # Adam magnifies summation-order noise on elements with tiny gradients: compare norm-wise.
            assert ((y - x).norm() / x.norm()).item() < 1e-4
        for ia, ib in zip(a["infos"], b["infos"]):
            assert ia["n_active"] == ib["n_active"] and ia["n_valid"] == ib["n_valid"]
            assert ia["fell_back"] == ib["fell_back"]
            assert ia["loss"] == pytest.approx(ib["loss"], rel=1e-5)
    assert all(i["n_valid"] == 4 * 16 for i in single["memft-ot"]["infos"])
    assert single["active"]["infos"][-1]["fell_back"] and not single["active"]["infos"][0]["fell_back"]
    # The hard gate really removed tokens at some step (so the global denominator mattered).
    assert any(0 < i["n_active"] < i["n_valid"] for i in single["memft-ot"]["infos"])

    # One sample, plain DDP, --resume: the run resumed from its step-4 checkpoint ends exactly where the
    # uninterrupted one did (report and adapter), and both equal one process's training.
    from safetensors.torch import load_file
    from memft_kernels.train import TrainConfig, train

    trained, resumed = tmp_path / "ddp-trained", tmp_path / "ddp-trained-resumed"
    report, again = (json.load(open(d / "report.json")) for d in (trained, resumed))
    assert report["world_size"] == 2 and report["samples"] == 1
    from memft_kernels.train.checkpoint import load_checkpoint

    assert load_checkpoint(str(trained))["step"] == 4  # the resume really started mid-run
    for key in ("final_loss", "token_accuracy", "recalled_frac", "exact_recall", "first_wrong", "steps_to_full_recall"):
        assert again[key] == report[key], key
    wa, wr = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (trained, resumed))
    assert wa.keys() == wr.keys() and all(torch.equal(wr[k], wa[k]) for k in wa)
    try:
        single = train(TrainConfig(**ONE_TRAINED, run_dir=str(tmp_path / "one-single")))
    finally:
        torch.set_num_threads(threads)
    for key in ("base_loss", "final_loss", "token_accuracy", "recalled_frac"):
        assert report[key] == pytest.approx(single[key], rel=1e-4), key
    ws = load_file(tmp_path / "one-single" / "adapter" / "adapter_model.safetensors")
    assert all(((wa[k] - ws[k]).norm() / ws[k].norm()).item() < 1e-4 for k in ws)
