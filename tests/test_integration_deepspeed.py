"""add_memft_to_trainer under DeepSpeed (transformers' Trainer with TrainingArguments(deepspeed={...})),
2 CPU processes on gloo: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) falls back to gloo when
oneccl_bindings_for_pytorch is not installed, so its engine (ZeRO stages 0, 1 and 2, its own
gradient averaging, clipping and optimizer step inside accelerate's backward) runs here.

With gradient_accumulation_steps=1 every run equals the same Trainer run in one process without
DeepSpeed (2 rows per micro-batch there, 1 per rank here): every parameter's update after each
step, the logged loss, grad_norm and recall metrics. gradient_accumulation_steps > 1 is refused at
add time, on a real DeepSpeed Trainer."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed): its Trainer runs are skipped")

from test_integration_trainer import (
    _ddp_lora_model,
    _fsdp_rows,
    rel,
    sgd_args,
    snapshot,
)

from memft_kernels.integrations.trainer import add_memft_to_trainer

THRESHOLD = 1.0 / 97


def _ds_config(stage):
    # "auto": the Trainer fills batch size, accumulation and clipping from its TrainingArguments. The
    # Trainer's own torch SGD goes to DeepSpeed as a client optimizer (ZeRO then wants the flag).
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        # ZeRO-3: partition every parameter (the default keeps parameters under 1e5 elements whole)
        **({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}} if stage == 3 else {}),
    }


# name: (ZeRO stage, add_memft_to_trainer options, TrainingArguments overrides). _fsdp_rows with 1 row per
# rank and micro-batch: with 2 micro-batches per step, step 1's first micro-batch has no active token
# (its plain-loss gradients must be dropped), step 2 falls back entirely, step 3 is mixed.
DS_CASES = {
    # max_grad_norm 3: some steps clipped, some not (a wrong gradient scale cannot hide behind clipping)
    "z0-logits-clip": (0, dict(policy="hard", threshold=THRESHOLD), dict(max_steps=3, max_grad_norm=3.0)),
    "z1-fused": (1, dict(policy="hard", threshold=THRESHOLD, fused=True), dict(max_steps=3)),
    "z2-logits-sigmoid-clip": (2, dict(policy="sigmoid", threshold=THRESHOLD), dict(max_steps=3, max_grad_norm=3.0)),
    "z2-fused": (2, dict(policy="hard", threshold=THRESHOLD, fused=True), dict(max_steps=3)),
    "z0-ga2-logits": (0, dict(policy="hard", threshold=THRESHOLD),
                      dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=0.1)),
    "z1-ga2-fused-clip": (1, dict(policy="hard", threshold=THRESHOLD, fused=True),
                          dict(max_steps=3, gradient_accumulation_steps=2, max_grad_norm=0.5)),
    # last: a ZeRO-3 TrainingArguments makes transformers build later models under deepspeed.zero.Init
    "z3-fused": (3, dict(policy="hard", threshold=THRESHOLD, fused=True), dict(max_steps=2)),
}


def _ds_refusals(outdir):
    """add_memft_to_trainer on real DeepSpeed Trainers (built, not trained)."""
    from memft_kernels.integrations.trainer import _is_deepspeed

    model = _ddp_lora_model()
    out = {}
    for stage in (0, 1, 2):
        args = sgd_args(outdir, gradient_accumulation_steps=2, deepspeed=_ds_config(stage))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=[])
        out[f"detected{stage}"] = _is_deepspeed(trainer) and trainer.is_deepspeed_enabled
        for key, options in ((f"ga2-{stage}", {}), (f"zero-{stage}", dict(fallback="zero"))):
            try:
                add_memft_to_trainer(trainer, policy="hard", **options)
                out[key] = "accepted"
            except NotImplementedError as error:
                out[key] = str(error)
        add_memft_to_trainer(trainer, policy="hard", exact_active_mean=False)  # num_items_in_batch: allowed
    return out


def _gathered(params):
    import contextlib

    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _ds_case(name, outdir, deepspeed):
    """One Trainer run of DS_CASES[name]: under DeepSpeed on this process's rank (1 row per device), or
    in one process without it (2 rows per device, the same rows per step). Returns what is compared."""
    from torch.utils.data import SequentialSampler

    class InOrder(transformers.Trainer):  # the same rows in every step, in both runs
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    stage, options, overrides = DS_CASES[name]
    ids, labels = _fsdp_rows()
    model = _ddp_lora_model()
    dataset = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    # max_grad_norm 1e6: never clips, but both runs log the step's gradient norm
    settings = dict(dict(learning_rate=0.5, gradient_accumulation_steps=1, max_grad_norm=1e6), **overrides)
    if deepspeed:
        settings.update(deepspeed=_ds_config(stage))
    else:
        settings.update(per_device_train_batch_size=2)
    before = snapshot(model)
    trainer = InOrder(model=model, args=sgd_args(outdir, **settings), train_dataset=dataset)
    add_memft_to_trainer(trainer, **options)
    trainer.train()
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]  # ZeRO-3: gathered to read them
    with _gathered(partitioned):
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(update={n: before[n] - after[n] for n in before}, logs=logs, steps=trainer.state.global_step,
                is_deepspeed=bool(trainer.is_deepspeed_enabled), world=trainer.args.world_size,
                engine=type(trainer.model_wrapped).__name__)


TRL_STAGE = 2


def _trl_case(outdir, deepspeed):
    """TRL's MemFTSFTTrainer (full fine-tuning, fused, ZeRO 2): 4 rows, 2 steps of 2 rows."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_integration_trainer import _tokenizer, rows, tiny_llama
    from torch.utils.data import SequentialSampler

    from memft_kernels.integrations.trl import MemFTSFTTrainer

    class InOrder(MemFTSFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    ids, _ = rows(seed=5, prompt=False)
    model = tiny_llama()
    settings = dict(gradient_accumulation_steps=1, max_steps=2, learning_rate=0.5, max_grad_norm=1e6,
                    dataset_num_proc=None, bf16=False)
    if deepspeed:
        settings.update(deepspeed=_ds_config(TRL_STAGE))
    else:
        settings.update(per_device_train_batch_size=2)
    before = snapshot(model)
    trainer = InOrder(model=model, args=sgd_args(outdir, cls=trl.SFTConfig, **settings),
                      train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
                      processing_class=_tokenizer(), memft=dict(policy="hard", threshold=THRESHOLD), fused=True)
    trainer.train()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(update={n: before[n] - after[n] for n in before}, logs=logs, steps=trainer.state.global_step,
                is_deepspeed=bool(trainer.is_deepspeed_enabled), world=trainer.args.world_size,
                engine=type(trainer.model_wrapped).__name__)


def _no_shm_op():
    """DeepSpeed's TorchBackend JIT-compiles a shared-memory C++ op (ninja, ~2 min on 2 cores) at init,
    used only by its inference_all_reduce; training collectives go through torch.distributed (gloo)."""
    import sys

    import deepspeed.comm.torch  # noqa: F401 (deepspeed.comm's attribute "torch" is pytorch itself)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _ds_worker(rank, port, outdir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    _no_shm_op()
    results = {"refusals": _ds_refusals(f"{outdir}/refusals-r{rank}")}
    results["trl"] = _trl_case(f"{outdir}/trl-r{rank}", deepspeed=True)
    results.update({name: _ds_case(name, f"{outdir}/{name}-r{rank}", deepspeed=True) for name in DS_CASES})
    torch.save(results, f"{outdir}/ds-rank{rank}.pt")
    from helpers import leave_gloo_rank

    leave_gloo_rank()


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    from helpers import free_port, rank_results, spawn_ranks

    outdir = tmp_path_factory.mktemp("trainer-deepspeed")
    spawn_ranks(_ds_worker, 2, (free_port(), str(outdir)), 300.0, "the 2-rank DeepSpeed Trainer runs")
    return rank_results(outdir, 2, "ds-rank{}.pt")


@pytest.mark.parametrize("name", list(DS_CASES))
def test_trainer_deepspeed_two_gloo_ranks_equal_one_process(name, ds_results, tmp_path):
    """2 ranks x 1 row per micro-batch under DeepSpeed = the same Trainer run in one process without it
    (2 rows per micro-batch): every parameter's update, the logged loss, grad_norm and metrics."""
    single = _ds_case(name, tmp_path / "single", deepspeed=False)
    assert not single["is_deepspeed"]
    max_norm = DS_CASES[name][2].get("max_grad_norm")
    if max_norm:  # clipping acts on some step (the logged norm is the one before clipping)
        assert any(log["grad_norm"] > max_norm for log in single["logs"])
    for rank, results in enumerate(ds_results):
        result = results[name]
        assert result["is_deepspeed"] and result["world"] == 2 and result["engine"] == "DeepSpeedEngine"
        assert result["steps"] == single["steps"]
        assert result["update"].keys() == single["update"].keys()
        for n, ref in single["update"].items():
            assert rel(result["update"][n], ref) < 1e-5, (rank, n, rel(result["update"][n], ref))
        assert len(result["logs"]) == len(single["logs"]) == single["steps"]
        for got, want in zip(result["logs"], single["logs"]):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            if DS_CASES[name][0] > 0:  # stage 0 in float32 clips without recording the norm: none logged
                assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            for key in ("recalled_frac", "token_accuracy", "n_active"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_trl_sft_trainer_deepspeed_equals_one_process(ds_results, tmp_path):
    """TRL's MemFTSFTTrainer under DeepSpeed ZeRO 2 (fused, full fine-tuning) = one process without it."""
    single = _trl_case(tmp_path / "single", deepspeed=False)
    assert not single["is_deepspeed"] and single["steps"] == 2
    assert all(log["n_active"] > 0 for log in single["logs"])
    for rank, results in enumerate(ds_results):
        result = results["trl"]
        assert result["is_deepspeed"] and result["world"] == 2 and result["engine"] == "DeepSpeedEngine"
        assert result["update"].keys() == single["update"].keys()
        for n, ref in single["update"].items():
            assert rel(result["update"][n], ref) < 1e-5, (rank, n, rel(result["update"][n], ref))
        for got, want in zip(result["logs"], single["logs"], strict=True):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
            for key in ("recalled_frac", "token_accuracy", "n_active"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_deepspeed_refusals_at_add_time(ds_results):
    """Real DeepSpeed Trainers (TrainingArguments(deepspeed=...), 2 ranks) are detected; with
    gradient_accumulation_steps=2 the exact active mean is refused at the call (not at the first step)
    from ZeRO stage 2 on (stages 0 and 1: trained above), and fallback="zero" at every stage;
    exact_active_mean=False is allowed."""
    for results in ds_results:
        refusals = results["refusals"]
        assert refusals["detected0"] and refusals["detected1"] and refusals["detected2"]
        assert refusals["ga2-0"] == refusals["ga2-1"] == "accepted"
        for stage in (0, 1):
            assert "fallback='zero'" in refusals[f"zero-{stage}"] and "AdamW" in refusals[f"zero-{stage}"]
        for key in ("ga2-2", "zero-2"):  # the accumulation is refused first
            assert "ZeRO stage 2" in refusals[key] and "own (partitioned) buffers" in refusals[key]
