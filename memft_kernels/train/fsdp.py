"""``--fsdp`` under torchrun: the base model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Units: every decoder layer, then the decoder (embeddings, final norm). The ``lm_head`` is left
replicated: it is frozen, and the fused head reads its whole weight (``memft_linear_loss``).
LoRA parameters live inside the layers and are sharded with them (DTensors); AdamW steps the
shards. Gradients are reduce-scattered with SUM (divide factor 1): each rank's loss is its rows'
sum_i w_i l_i over the *global* denominator (all-reduced stats, as in the DDP path), so the summed
gradient is the single-process gradient of the whole batch.

Every rank runs every forward (FSDP all-gathers the layers), evaluation and generation included;
rank 0 writes the files. Checkpoints hold the full (gathered) LoRA tensors and the full optimizer
state from ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict`` with
``full_state_dict``), written by rank 0 in the usual checksummed file; a resume loads them back
into the shards (``distribute_tensor`` / ``set_optimizer_state_dict``, broadcast from rank 0).
The adapter is gathered and saved by rank 0 in safetensors (peft's ``save_pretrained``).
"""
from __future__ import annotations

from typing import Dict

import torch

from .config import TrainInputError


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_model(model) -> None:
    """fully_shard each decoder layer, then the decoder; gradients summed over ranks."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .models import decoder_module

    decoder = decoder_module(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TrainInputError(f"--fsdp: {type(decoder).__name__} has no .layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(decoder)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def is_sharded(model) -> bool:
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_numel(p: torch.Tensor) -> int:
    DTensor = _dtensor()
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def full_trainable(model) -> Dict[str, torch.Tensor]:
    """The trainable parameters as whole CPU tensors (a collective under FSDP: every rank calls it)."""
    DTensor = _dtensor()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            out[name] = t.cpu().clone()
    return out


def load_trainable(model, state: Dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (sharded) trainable parameters: each rank keeps its shard."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            value = value.to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def scalar(t) -> float:
    """A (possibly replicated DTensor) scalar as a float."""
    DTensor = _dtensor()
    return float(t.full_tensor() if isinstance(t, DTensor) else t)
