"""--fsdp: two torchrun ranks (gloo on the loopback, CPU) with the base model sharded by FSDP2 compute
the single-process gradients and metrics, save the gathered adapter, and resume from a checkpoint
to the same result as never stopping."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

WORKER = r'''
import json, os, sys, torch
import torch.distributed as dist
from memft_kernels.train import TrainConfig, resume, train
from memft_kernels.train.loop import setup, train_step, trainable_parameters


def whole(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def collect(options, out):
    run = setup(TrainConfig(**options, run_dir=out))
    grads, infos = [], []
    for _ in range(options["steps"]):
        infos.append(train_step(run, on_grads=lambda r: grads.append([whole(p.grad) for p in trainable_parameters(r.model)])))
    return {"grads": grads, "infos": infos, "names": [n for n, p in run.model.named_parameters() if p.requires_grad]}


if __name__ == "__main__":
    mode, options, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    if mode == "run":
        if len(sys.argv) > 4:  # a second setting's gradients, in the same launch (torchrun starts are slow)
            extra = collect(dict(json.loads(sys.argv[4]), save_adapter=False), out + "-extra-grads")
            if dist.get_rank() == 0:
                torch.save(extra, out + "-extra.pt")
        result = collect(dict(options, save_adapter=False), out + "-grads")
        train(TrainConfig(**options, run_dir=out))
        if dist.get_rank() == 0:
            torch.save(result, out + ".pt")
    else:
        resume(out)
    # Tear down together: a rank that leaves while the other still holds gloo connections can die in
    # gloo's thread teardown ("terminate called without an active exception"), seen once in CI runs.
    dist.barrier()
    dist.destroy_process_group()
    # It was seen once more after the barrier (1 of 4 runs on torch 2.11, after every result was
    # written): in the interpreter's own teardown of gloo's threads, which this test does not
    # check. Leave without it, so that the exit code says only whether the work above succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
'''

# memft-sw with a window of 2 e tokens (e, the window's growth, is the state a checkpoint carries): the
# state is per rank (each rank's rows), so the resume checks that every rank gets its own back.
OPTIONS = dict(model="nano", vocab_size=128, length=8, samples=4, steps=5, lr=3e-2, threads=1, backend="torch",
               progress=False, plots=False, loss="memft-sw", window_span=2.0, checkpoint_every=2, eval_every=0)


def _torchrun(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --accum-normalize active: the exact active mean of the whole step (MemFTAccumulator) over 2
# micro-batches and the 2 ranks, with FSDP's gradients reduce-scattered after every micro-batch. 3
# samples in batches of 2: every step's second micro-batch has one row, so rank 1 runs it on a row
# without labels (FSDP's collectives need every rank). The low threshold makes later steps hit the
# step-level fallback: a micro-batch without an active token before one with (step 5: its plain-loss
# gradients, already reduced by FSDP, are zeroed) and whole steps without one (steps 6-8: the plain mean).
ACTIVE = dict(OPTIONS, loss="memft-ot", length=8, samples=3, steps=8, batch_size=2, grad_accum=2, accum_normalize="active",
              threshold=0.02, checkpoint_every=0)


def _single_process(options, out):
    """The reference: the worker's code in this process, no torchrun, no sharding."""
    namespace = {}
    exec(compile(WORKER, "worker", "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        return namespace["collect"](dict(options, save_adapter=False), out)
    finally:
        torch.set_num_threads(threads)


def _assert_same_steps(single, sharded):
    assert sharded["names"] == single["names"]
    for step, (ga, gb) in enumerate(zip(single["grads"], sharded["grads"])):
        for name, x, y in zip(single["names"], ga, gb):
            torch.testing.assert_close(y, x, rtol=2e-4, atol=1e-6, msg=f"step {step + 1} {name}")
    for ia, ib in zip(single["infos"], sharded["infos"]):
        assert ia["n_active"] == ib["n_active"] and ia["fell_back"] == ib["fell_back"]
        assert ia["loss"] == pytest.approx(ib["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One torchrun launch: the ACTIVE setting's gradients, then the OPTIONS run (grads + train)."""
    pytest.importorskip("torch.distributed.fsdp")
    tmp_path = tmp_path_factory.mktemp("fsdp")
    (tmp_path / "worker.py").write_text(WORKER)
    fsdp_dir = str(tmp_path / "fsdp")
    _torchrun(tmp_path, "run", json.dumps(dict(OPTIONS, fsdp=True)), fsdp_dir, json.dumps(dict(ACTIVE, fsdp=True)))
    return tmp_path, fsdp_dir


def test_fsdp_active_mean_over_micro_batches_equals_one_process(fsdp_run, tmp_path):
    _, fsdp_dir = fsdp_run
    single = _single_process(ACTIVE, str(tmp_path / "single"))
    _assert_same_steps(single, torch.load(fsdp_dir + "-extra.pt", weights_only=False))
    assert any(0 < i["n_active"] < i["n_valid"] for i in single["infos"])  # the global denominator mattered
    fell_back = [i["fell_back"] for i in single["infos"]]
    assert fell_back[-1] and not fell_back[0]


def test_fsdp_two_ranks_equal_one_process_and_resume(fsdp_run):
    tmp_path, fsdp_dir = fsdp_run
    single = _single_process(OPTIONS, str(tmp_path / "single-grads"))
    from memft_kernels.train import TrainConfig, train

    threads = torch.get_num_threads()
    try:
        single_report = train(TrainConfig(**OPTIONS, run_dir=str(tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    _assert_same_steps(single, torch.load(fsdp_dir + ".pt", weights_only=False))

    report = json.load(open(os.path.join(fsdp_dir, "report.json")))
    for key in ("base_loss", "final_loss", "token_accuracy", "recalled_frac"):
        assert report[key] == pytest.approx(single_report[key], rel=1e-4), key
    assert report["world_size"] == 2 and report["lora_params"] == single_report["lora_params"]
    from safetensors.torch import load_file

    wa = load_file(os.path.join(fsdp_dir, "adapter", "adapter_model.safetensors"))
    ws = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == ws.keys()
    for k in wa:  # gathered whole tensors, not shards; Adam magnifies summation-order noise on
        # elements with tiny gradients: compare norm-wise (as test_train_ddp)
        assert wa[k].shape == ws[k].shape and ((wa[k] - ws[k]).norm() / ws[k].norm()).item() < 1e-4, k

    # resume the sharded run from its step-4 checkpoint: the same report and adapter as never stopping
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(fsdp_dir, resumed_dir)
    os.remove(os.path.join(resumed_dir, "report.json"))
    shutil.rmtree(os.path.join(resumed_dir, "adapter"))
    _torchrun(tmp_path, "resume", "{}", resumed_dir)
    again = json.load(open(os.path.join(resumed_dir, "report.json")))
    for key in ("final_loss", "token_accuracy", "recalled_frac", "exact_recall", "first_wrong"):
        assert again[key] == report[key], key
    wr = load_file(os.path.join(resumed_dir, "adapter", "adapter_model.safetensors"))
    assert all(torch.equal(wr[k], wa[k]) for k in wa)


def test_fsdp_without_torchrun_is_one_line(tmp_path):
    from memft_kernels.train import TrainConfig, TrainInputError, train

    with pytest.raises(TrainInputError, match="--fsdp .* under torchrun"):
        train(TrainConfig(**dict(OPTIONS, fsdp=True), run_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
