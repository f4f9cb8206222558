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
