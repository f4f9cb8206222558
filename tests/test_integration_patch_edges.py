"""apply_memft_to_model's patch where other libraries handle the model's forward: accelerate's mixed
precision wrapper taken off again (``unwrap_model(keep_fp32_wrapper=False)``), and a shape-only forward
of a model built on the meta device (tiny models from configs, no downloads)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from memft_kernels.integrations.transformers import apply_memft_to_model  # noqa: E402

from test_integration_transformers import OPTIONS, V, batch, rel, tiny  # noqa: E402


@pytest.mark.parametrize("fused", [True, False])
def test_patch_survives_accelerate_mixed_precision_unwrap(fused):
    """Accelerator(mixed_precision="bf16").prepare wraps a forward that has no __func__ as is, and
    unwrap_model(keep_fp32_wrapper=False) rebinds it as MethodType(forward, model): the patch was then
    called with the model as its first argument (TypeError: multiple values for argument 'input_ids')."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ids, labels = batch()
    model = tiny("llama")
    want = model(input_ids=ids, labels=labels).loss
    apply_memft_to_model(model, policy="hard", threshold=1.0)  # p < 1 everywhere: every token active = CE
    if not fused:
        apply_memft_to_model(model, fused_linear=False, policy="hard", threshold=1.0)
    AcceleratorState._reset_state(True)  # a Trainer of an earlier test built one without mixed precision
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        prepared = accelerator.prepare_model(model)
        assert prepared(input_ids=ids, labels=labels).loss.dtype == torch.float32
        unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    finally:
        AcceleratorState._reset_state(True)
    out = unwrapped(input_ids=ids, labels=labels)
    assert (out.logits is None) == fused
    assert rel(out.loss, want) < 1e-5
    assert unwrapped(ids).logits.shape == (*ids.shape, V)  # positional input_ids, no labels


def test_fused_forward_on_meta_device():
    """A shape-only forward of a patched model built on the meta device (then materialized with
    to_empty): the fused loss asked torch whether autocast is on for 'meta' and raised."""
    ids, labels = batch()
    with torch.device("meta"):
        model = tiny("llama")
    apply_memft_to_model(model, **OPTIONS)
    out = model(input_ids=ids.to("meta"), labels=labels.to("meta"))
    assert out.logits is None and out.loss.shape == () and out.loss.device.type == "meta"
    out.loss.backward()
    assert model.lm_head.weight.grad.shape == model.lm_head.weight.shape
    reference = tiny("llama")  # the same seed: the weights to load after to_empty
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.zero_grad(set_to_none=True)
    for name, buf in reference.named_buffers():  # non-persistent buffers (rotary inv_freq)
        model.get_buffer(name).copy_(buf)
    want = apply_memft_to_model(reference, **OPTIONS)(input_ids=ids, labels=labels).loss
    got = model(input_ids=ids, labels=labels)
    assert got.logits is None and rel(got.loss, want) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_data_parallel_replica_runs_its_own_parameters(fused, monkeypatch):
    """nn.DataParallel (the Trainer on several GPUs without torchrun) replicates a module by copying its
    __dict__: the patch of each replica held the ORIGINAL model, so every replica computed with the
    first device's parameters (on GPUs: a device mismatch). torch's replicate() is run here on CPU with
    its broadcast replaced by detached copies, so that which parameters a replica used shows in .grad."""
    import importlib

    replicate_module = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):  # per device: copies that are leaves of their own
        return [[t.detach().clone().requires_grad_(t.requires_grad) for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", broadcast)
    ids, labels = batch()
    model = apply_memft_to_model(tiny("llama"), **OPTIONS)
    want = model(input_ids=ids, labels=labels)
    model.zero_grad(set_to_none=True)
    if not fused:
        apply_memft_to_model(model, fused_linear=False, **OPTIONS)
        want = model(input_ids=ids, labels=labels)
    replicas = replicate_module.replicate(model, [0, 1])
    for replica in replicas:
        out = replica(input_ids=ids, labels=labels)
        assert (out.logits is None) == fused and rel(out.loss, want.loss) < 1e-6
        out.loss.backward()
        assert replica.lm_head.weight.grad is not None  # the replica's own copy was used
    assert all(p.grad is None for p in model.parameters())  # the original was not


def _trainer_state(trainer):
    base = trainer.model
    return dict(callbacks=list(trainer.callback_handler.callbacks),
                scaled=getattr(trainer, "loss_is_scaled_for_ga", None),
                accumulator=getattr(trainer, "memft_accumulator", None),
                forward=vars(base).get("forward"), loss_function=vars(base).get("_loss_function"))


def test_refused_add_memft_to_trainer_leaves_the_trainer_as_it_was(tmp_path):
    """add_memft_to_trainer raising part way (an option misspelt, a bad value, a family the fused head
    does not support) had already told the Trainer that the loss comes divided by the accumulation steps
    (so a plain run after it summed its micro-batches' losses), and a second call had already removed
    the first call's callbacks while the model still fed their accumulator."""
    from memft_kernels.integrations.trainer import add_memft_to_trainer

    ids, labels = batch(b=4)
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, use_cpu=True,
        max_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny("llama"), args=args, train_dataset=dataset)
    before = _trainer_state(trainer)
    for bad in (dict(polcy="hard"), dict(fused=True, threshold=1.5)):
        with pytest.raises((TypeError, ValueError)):
            add_memft_to_trainer(trainer, **bad)
        assert _trainer_state(trainer) == before, bad
    add_memft_to_trainer(trainer, fused=True, **OPTIONS)  # a first call that works, then a refused one
    first = _trainer_state(trainer)
    assert first["scaled"] is True and first["accumulator"] is not None and len(first["callbacks"]) > len(before["callbacks"])
    with pytest.raises(ValueError, match="threshold"):
        add_memft_to_trainer(trainer, fused=False, policy="hard", threshold=1.5)
    assert _trainer_state(trainer) == first
