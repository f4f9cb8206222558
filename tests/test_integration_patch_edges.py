"""apply_memft_to_model's patch where other libraries handle the model's forward: accelerate's mixed
precision wrapper taken off again (``unwrap_model(keep_fp32_wrapper=False)``), a shape-only forward
of a model built on the meta device, nn.DataParallel's replicas, and accelerate's device / offload
hooks (``from_pretrained(device_map=...)``, ``dispatch_model``, ``cpu_offload``) on the lm_head and
on the model itself (tiny models from configs, no downloads)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.hooks import ModelHook  # noqa: E402

from memft_kernels.integrations.transformers import apply_memft_to_model, unwrap_model, use_memft  # noqa: E402

from test_integration_transformers import OPTIONS, V, batch, grads, peft, rel, tiny  # noqa: E402


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



# ---------------------------------------------------------------- accelerate's device / offload hooks
# from_pretrained(device_map=...) and accelerate's dispatch_model / cpu_offload put an AlignDevicesHook on
# the lm_head (with offload: its weight sits on the meta device, loaded by the hook's pre_forward only)
# and one on the model itself (inputs to the execution device, outputs back). The fused loss reads the
# head's weight without calling the head.


def _dispatched(setup, tmp_path, patch_first=False):
    """A tiny float64 Llama dispatched by accelerate (the same seed each call); ``patch_first``:
    apply_memft_to_model before the dispatch (whose hook then wraps the patch)."""
    from accelerate import cpu_offload, dispatch_model

    model = tiny("llama-tied" if setup == "tied_cpu_offload" else "llama").double()
    prefix = ""
    if setup == "lora_head":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)).train()
        prefix = "base_model.model."
    if setup == "from_pretrained":  # the user's path: from_pretrained(..., device_map=..., offload_folder=...)
        model.save_pretrained(tmp_path / "saved")
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", device_map={"model": "cpu", "lm_head": "disk"}, dtype=torch.float64,
            offload_folder=str(tmp_path / "from_pretrained_offload")).train()
    if patch_first:
        apply_memft_to_model(model, **OPTIONS)
    if setup in ("cpu_offload", "tied_cpu_offload"):  # every weight on meta, loaded module by module
        return cpu_offload(model, execution_device="cpu")
    # an lm_head that does not fit: what device_map="auto" does with it (disk offload, main device the CPU)
    device_map = {prefix + "model": "cpu", prefix + "lm_head": "disk"}
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / f"offload{patch_first}"))


def _head_weight(model):
    head = unwrap_model(model).lm_head
    return head.base_layer.weight if hasattr(head, "base_layer") else head.weight


@pytest.mark.parametrize("setup,order", [
    *[(setup, order) for setup in ("disk_head", "cpu_offload", "tied_cpu_offload", "lora_head")
      for order in ("dispatch_then_patch", "patch_then_dispatch")],
    ("from_pretrained", "dispatch_then_patch"),
])
def test_fused_head_offloaded_by_accelerate(setup, order, tmp_path):
    """An lm_head offloaded by accelerate (its weight on the meta device between calls): the fused loss read
    the meta weight (ValueError: hidden is on cpu but weight is on meta). Now the head's hooks load it
    around the loss and offload it again; the loss and the gradients equal the same dispatched model's
    own logits + MemFT loss (float64), whichever of the patch and the dispatch comes first. (accelerate
    gives offloaded weights no gradient: each call loads a fresh copy; the same in both.)"""
    ids, labels = batch()
    reference = use_memft(_dispatched(setup, tmp_path), **OPTIONS)
    want, want_hidden = _loss_and_last_hidden(reference, ids, labels)
    if order == "dispatch_then_patch":
        model = apply_memft_to_model(_dispatched(setup, tmp_path), **OPTIONS)
    else:
        model = _dispatched(setup, tmp_path, patch_first=True)
    assert _head_weight(model).device.type == "meta"  # offloaded
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*materialized logits")  # no fallback
        out, hidden = _loss_and_last_hidden(model, ids, labels)
    assert out.logits is None  # fused
    assert rel(out.loss, want.loss) < 1e-12
    assert _head_weight(model).device.type == "meta"  # offloaded again after the call
    assert rel(hidden.grad, want_hidden.grad) < 1e-12  # through the head's (loaded) weight
    got, ref = grads(model), grads(reference)
    assert got.keys() == ref.keys()
    assert bool(got) == (setup not in ("cpu_offload", "tied_cpu_offload"))  # those offload every weight
    for name in ref:
        assert rel(got[name], ref[name]) < 1e-12, name


def _loss_and_last_hidden(model, ids, labels):
    """The output of a training call (backpropagated) and the last hidden state, its .grad retained."""
    seen = []

    def keep(module, args, output):
        output.retain_grad()
        seen.append(output)

    handle = unwrap_model(model).model.norm.register_forward_hook(keep)
    try:
        out = model(input_ids=ids, labels=labels)
    finally:
        handle.remove()
    out.loss.backward()
    return out, seen[-1]


def test_fused_head_on_another_device_than_the_decoder():
    """The lm_head executing on another device than the decoder's last layer (device_map over several
    devices): its hook moves the head's input there. Emulated on a CPU-only machine with the head's
    execution device "meta" (no GPU has run this): the fused loss used the hidden states where the
    decoder left them (ValueError: hidden is on cpu but weight is on meta); now it runs where the model's
    own head runs, as a shape-only computation on meta, like the model's own logits."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    ids, labels = batch()
    model = tiny("llama")
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="meta", place_submodules=True))
    want = model(input_ids=ids, labels=labels)
    assert want.logits.device.type == "meta" and want.loss.device.type == "meta"
    out = apply_memft_to_model(model, **OPTIONS)(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss.shape == () and out.loss.device.type == "meta"


class _Recording(ModelHook):
    """A hook on the model itself, as dispatch_model's: records its pre_forward / post_forward calls."""

    def __init__(self):
        self.calls = []

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append("pre")
        return args, kwargs

    def post_forward(self, module, output):
        self.calls.append("post")
        return output


@pytest.mark.parametrize("order", ["hook_then_patch", "patch_then_hook"])
def test_top_level_hook_runs_around_the_patch_and_removing_it_keeps_the_patch(order):
    """A hook on the model itself (dispatch_model's: inputs to the execution device, outputs back to the
    input's): the patch replaced the hook's wrapper, so the hook did not run when it came first, nor
    after apply_memft_to_model was called again; remove_hook_from_module then put back the forward from
    before the patch (the fused path silently gone). Now the patch goes inside the hook."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    ids, labels = batch()
    want = use_memft(tiny("llama"), **OPTIONS)(input_ids=ids, labels=labels).loss
    model, recording = tiny("llama"), _Recording()
    if order == "hook_then_patch":
        add_hook_to_module(model, recording)
        apply_memft_to_model(model, **OPTIONS)
    else:
        add_hook_to_module(apply_memft_to_model(model, **OPTIONS), recording)

    def call(fused):
        del recording.calls[:]
        out = model(input_ids=ids, labels=labels)
        assert (out.logits is None) == fused and rel(out.loss, want) < 1e-6
        return list(recording.calls)

    assert call(fused=True) == ["pre", "post"]
    apply_memft_to_model(model, **OPTIONS)  # called again (new options): still inside the hook
    assert call(fused=True) == ["pre", "post"]
    apply_memft_to_model(model, fused_linear=False, **OPTIONS)  # the model's own forward, inside the hook
    assert call(fused=False) == ["pre", "post"]
    apply_memft_to_model(model, **OPTIONS)
    remove_hook_from_module(model)
    assert call(fused=True) == []  # the patch stays, the hook is gone
    apply_memft_to_model(model, fused_linear=False, **OPTIONS)
    assert call(fused=False) == []


def test_head_hook_of_unknown_kind_falls_back_to_logits():
    """A hook on the lm_head that is not accelerate's device placement (here one that scales the head's
    output) changes the logits; the fused loss ignored it (a wrong loss). Now it computes the logits
    through the head (its hook runs) and warns."""
    from accelerate.hooks import add_hook_to_module

    class Scale(ModelHook):
        def post_forward(self, module, output):
            return output * 0.5

    ids, labels = batch()
    model = tiny("llama")
    add_hook_to_module(model.lm_head, Scale())
    want = use_memft(model, **OPTIONS)(input_ids=ids, labels=labels).loss
    apply_memft_to_model(model, **OPTIONS)
    with pytest.warns(UserWarning, match="accelerate hook.*Scale.*materialized logits"):
        out = model(input_ids=ids, labels=labels)
    assert rel(out.loss, want) < 1e-6


def test_lora_added_after_the_head_was_offloaded_is_refused_clearly(tmp_path):
    """peft's get_peft_model after accelerate offloaded the lm_head leaves the head's LoRA weights on the
    meta device with no hook to load them (the model's own backward fails too): a ValueError saying to
    apply peft first, instead of torch.cat's device error."""
    from accelerate import dispatch_model

    model = dispatch_model(tiny("llama"), device_map={"model": "cpu", "lm_head": "disk"}, offload_dir=str(tmp_path))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    apply_memft_to_model(model.train(), **OPTIONS)
    ids, labels = batch()
    with pytest.raises(ValueError, match="apply peft .get_peft_model. before dispatching"):
        model(input_ids=ids, labels=labels)
    assert unwrap_model(model).lm_head.base_layer.weight.device.type == "meta"  # offloaded again


def test_trainer_on_a_model_with_an_offloaded_head(tmp_path):
    """add_memft_to_trainer(fused=True) on a LoRA model whose lm_head accelerate offloaded to disk: one SGD
    step over 2 micro-batches (the exact active mean through the accumulator) gives the update of the
    logits path (fused=False) on the same dispatched model. The fused path raised before (meta weight)."""
    from accelerate import dispatch_model

    from memft_kernels.integrations.trainer import add_memft_to_trainer

    ids, labels = batch(b=4)
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    updated = {}
    for fused in (False, True):
        model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model = dispatch_model(model, device_map={"base_model.model.model": "cpu", "base_model.model.lm_head": "disk"},
                               offload_dir=str(tmp_path / f"offload{fused}"))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
        add_memft_to_trainer(trainer, fused=fused, **OPTIONS)
        trainer.train()
        updated[fused] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    assert updated[True].keys() == updated[False].keys() and updated[True]
    for name, step in updated[False].items():
        assert step.abs().max() > 0 and rel(updated[True][name], step) < 1e-5, name
