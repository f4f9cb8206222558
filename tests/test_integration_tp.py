"""MemFT on a transformers causal LM loaded tensor-parallel (``from_pretrained(path, tp_plan="auto")``).

ONE spawn of 2 gloo ranks on CPU (float32) loads a tiny Llama saved with ``save_pretrained`` (no hub)
tensor-parallel over both ranks (transformers' plan: the lm_head ``colwise_gather_output``, its weight a
DTensor ``Shard(0)``, the logits gathered to plain full tensors; the decoder's projections
colwise/rowwise) and runs

* ``use_memft(model)``: the loss on the model's own (plain, gathered) logits;
* ``apply_memft_to_model(model)``: the fused head (hidden states, then the DTensor lm_head weight
  through the vocabulary-parallel linear loss); its loss must come back a plain tensor, as
  transformers' own does (it used to be a Replicate() DTensor);
* ``model.generate()`` after the patch;
* both with peft LoRA on q_proj/v_proj (every LoRA weight set from a generator);
* the fused path with LoRA on the lm_head, which must be refused at the call (peft's own forward of
  that head fails on the tensor-parallel model too); a MemFTAccumulator, refused too (not built).

The test process runs the same model in one process; the loss and every parameter's gradient
(DTensors gathered with ``full_tensor()``) must match (relative error < 1e-5), and greedy
``generate()`` give the same tokens.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import free_port, init_gloo_rank, rank_results, rel, spawn_ranks

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memft_kernels.integrations.transformers import apply_memft_to_model, use_memft

WORLD = 2
V = 67  # odd: the lm_head's rows split 34 / 33
OPTIONS = dict(policy="hard", threshold=0.5)
# (path, LoRA target modules or None); LoRA on the lm_head of the tensor-parallel model is refused.
CASES = [("logits", None), ("fused", None), ("logits", ("q_proj", "v_proj")), ("fused", ("q_proj", "v_proj")),
         ("fused", ("q_proj", "lm_head"))]
TOL = 1e-5


def _save_tiny_llama(path):
    """The tiny Llama, and labels half of which are its own greedy predictions (p > 0.5: masked by the
    hard policy), half random (kept)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a confident head: its greedy prediction has p > 0.5
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1::2] = predicted[:, 0:-1:2]  # label t+1 is what position t predicts
    labels[0, :3] = -100
    torch.save((ids, labels), os.path.join(path, "inputs.pt"))


def _inputs(path):
    return torch.load(os.path.join(path, "inputs.pt"))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _load(path, tp):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if tp:  # transformers 5.x: tp_plan="auto" as a DistributedConfig (the bare keyword is deprecated)
        from transformers import DistributedConfig

        kwargs = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def _run_case(path, tp, fused, lora):
    """Loss, its type, the trainable parameters' full gradients, the MemFT stats and a greedy generation.
    ``lora``: None, or the LoRA target modules."""
    model = _load(path, tp)
    lora_a_init = None
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora)))
        lora_a_init = torch.stack([p.detach().sum() for n, p in model.named_parameters() if "lora_A" in n])
        # peft's own initialization draws lora_A differently on the tensor-parallel model than in one
        # process (same seed; the same on both ranks): set every LoRA weight from a generator (lora_B
        # nonzero, so that lora_A gets a gradient); a DTensor one (lora_B of a colwise projection)
        # gets its slices.
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    value = torch.randn(p.shape, generator=g) * 0.05
                    if hasattr(p, "device_mesh"):
                        from torch.distributed.tensor import distribute_tensor

                        value = distribute_tensor(value, p.device_mesh, p.placements)
                    p.copy_(value)
    stats = []
    (apply_memft_to_model if fused else use_memft)(model, stats_callback=stats.append, **OPTIONS)
    model.train()
    ids, labels = _inputs(path)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False)
    return dict(loss=_full(out.loss).detach().clone(), loss_type=type(out.loss).__name__,
                logits_type=None if out.logits is None else type(out.logits).__name__,
                head_weight_type=type(model.get_output_embeddings().weight).__name__,
                grads=grads, active=float(stats[0].n_active), generated=generated, lora_a_init=lora_a_init)


def _worker(rank, world, port, path, outdir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_gloo_rank(rank, world, port)
    try:
        results = {}
        for fused_name, lora in CASES:
            try:
                results[(fused_name, lora)] = _run_case(path, True, fused_name == "fused", lora)
            except Exception as exc:  # recorded, so that the test shows it (every rank reaches the same)
                results[(fused_name, lora)] = dict(error=f"{type(exc).__name__}: {exc}")
        try:  # a MemFTAccumulator with the tensor-parallel model: refused at the call
            from memft_kernels.accumulate import MemFTAccumulator

            model = _load(path, True)
            apply_memft_to_model(model, accumulator=MemFTAccumulator(model))
            results["accumulator"] = dict(error="")
        except Exception as exc:
            results["accumulator"] = dict(error=f"{type(exc).__name__}: {exc}")
        torch.save(results, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    _save_tiny_llama(str(path))
    return str(path)


@pytest.fixture(scope="module")
def spawned(tiny_path, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("tp")
    spawn_ranks(_worker, WORLD, (WORLD, free_port(), tiny_path, str(outdir)), 180.0, "the 2-rank tp_plan run")
    return rank_results(outdir, WORLD)


EQUAL_CASES = CASES[:4]


@pytest.mark.parametrize("path,lora", EQUAL_CASES, ids=[f"{p}-{'lora' if l else 'full'}" for p, l in EQUAL_CASES])
def test_tp_model_equals_one_process(spawned, tiny_path, path, lora):
    ref = _run_case(tiny_path, False, path == "fused", lora)
    assert 5 < ref["active"] < 16  # about half of the 21 labelled tokens masked: the mask matters
    expected_grads = 8 if lora else 21  # LoRA: A and B of q_proj and v_proj in 2 layers
    for rank in range(WORLD):
        res = spawned[rank][(path, lora)]
        assert "error" not in res, res.get("error")
        assert res["head_weight_type"] == "DTensor"  # the model really is tensor-parallel
        # transformers' loss type: a plain tensor on both paths (the fused loss is not left a DTensor)
        assert res["loss_type"] == "Tensor"
        assert res["logits_type"] == (None if path == "fused" else "Tensor")  # gathered: plain, full vocab
        assert rel(res["loss"], ref["loss"]) < TOL
        assert res["active"] == ref["active"]
        assert res["grads"].keys() == ref["grads"].keys() and len(res["grads"]) == expected_grads
        for name, g in ref["grads"].items():
            assert g.norm() > 0, name
            assert rel(res["grads"][name], g) < TOL, (rank, name, rel(res["grads"][name], g))
        assert torch.equal(res["generated"], ref["generated"])
    if lora:  # peft's own lora_A initialization agrees across the ranks (a replicated plain parameter)
        assert torch.equal(spawned[0][(path, lora)]["lora_a_init"], spawned[1][(path, lora)]["lora_a_init"])


def test_lora_lm_head_on_tp_model_is_refused(spawned, tiny_path):
    """A LoRA-wrapped lm_head of a tensor-parallel model: the fused path refuses it at the call on every
    rank, naming what works (it used to fail inside torch.cat, mixing a DTensor and a plain weight)."""
    for rank in range(WORLD):
        error = spawned[rank][CASES[4]].get("error", "")
        assert error.startswith("ValueError: apply_memft_to_model: a LoRA-wrapped lm_head whose weight is a DTensor"), \
            error
        assert "Leave lm_head out of LoRA's target_modules" in error
    # the same LoRA head in one process is fine
    assert _run_case(tiny_path, False, True, CASES[4][1])["loss"].isfinite()


def test_accumulator_on_tp_model_is_refused(spawned, tiny_path):
    """A MemFTAccumulator with a tensor-parallel model (its reductions would count each TP rank's
    identical batch again) is refused at the call on every rank, naming the alternative."""
    for rank in range(WORLD):
        error = spawned[rank]["accumulator"]["error"]
        assert error.startswith("ValueError: a MemFTAccumulator (exact_active_mean=True"), error
        assert "tp_size=2" in error and "exact_active_mean=False" in error
