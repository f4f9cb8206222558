"""The memory plan of a run, per device: printed at the start of every run and by ``memft train --plan``.

What it counts (bytes, on each device):

* **weights**: the frozen base parameters (exact, from the built model);
* **LoRA**: the trainable parameters, their gradients and AdamW's two states (exact);
* **activations**: the tensors autograd saves for the backward. They are *measured* on the real
  model, device, dtype and attention implementation by a probe forward of one row at three short
  lengths (saved-tensor hooks count every saved storage that is not a parameter), then fitted by
  a + b T + c T^2 and extrapolated to the step's rows x length. Both with and without gradient
  checkpointing; with it, the backward also recomputes one layer at a time (one layer's share);
* **head**: materialized logits (two N x V buffers in the logits' dtype: the logits and their
  gradient; the loop frees the logits before the backward) or,
  with the fused head, one chunk of logits (``memft_linear_loss``'s chunk rows x V) plus the
  N x D float32 gradient of the hidden states.

Peak = weights + LoRA (params, grads, AdamW) + activations + head (+ one recomputed layer).
On CUDA the part still to be allocated is checked against ``torch.cuda.mem_get_info`` before the
first step; a run that cannot fit stops with exit code 2 naming the switch that would make it fit
(``--fused-head``, ``--gradient-checkpointing``, a smaller ``--batch-size``).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from .config import TrainConfig, TrainInputError

PROBE_LENGTHS = (32, 64, 128)
# Headroom kept free on CUDA: the caching allocator's fragmentation and the kernels' workspaces.
CUDA_HEADROOM = 0.92


@dataclass
class MemoryPlan:
    device: str
    tokens: int  # rows x length of one forward (per rank and micro-batch)
    weights: int
    lora_params: int
    lora_grads: int
    optimizer: int
    activations: int  # with the run's own checkpointing setting
    activations_plain: int
    activations_checkpointed: int
    recompute: int  # one layer's activations (checkpointing only)
    head: int  # with the run's own head setting
    head_logits: int
    head_fused: int
    fused_head: bool
    gradient_checkpointing: bool
    free: Optional[int] = None  # CUDA: free bytes when the plan was made

    @property
    def persistent(self) -> int:
        return self.weights + self.lora_params + self.optimizer

    def step_peak(self, fused: Optional[bool] = None, checkpointing: Optional[bool] = None) -> int:
        """Bytes a step adds to the persistent ones at its peak (for the given switches)."""
        fused = self.fused_head if fused is None else fused
        checkpointing = self.gradient_checkpointing if checkpointing is None else checkpointing
        acts = self.activations_checkpointed + self.recompute if checkpointing else self.activations_plain
        return self.lora_grads + acts + (self.head_fused if fused else self.head_logits)

    @property
    def peak(self) -> int:
        return self.persistent + self.step_peak()

    def as_dict(self) -> Dict:
        return dict(asdict(self), persistent=self.persistent, step_peak=self.step_peak(), peak=self.peak)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_plan(plan: MemoryPlan, world: int = 1, fsdp: bool = False) -> str:
    ck, fu = plan.gradient_checkpointing, plan.fused_head
    lines = [
        f"memory plan, per device ({plan.device}{f', {world} ranks' if world > 1 else ''}; "
        f"{plan.tokens} tokens per forward):",
        f"  weights (frozen{', sharded' if fsdp else ''})".ljust(32) + _mib(plan.weights),
        f"  LoRA params + grads + AdamW   {_mib(plan.lora_params)} + {_mib(plan.lora_grads)} + {_mib(plan.optimizer)}",
        f"  activations                   {_mib(plan.activations_plain)} without checkpointing, "
        f"{_mib(plan.activations_checkpointed + plan.recompute)} with{'  <- this run' if ck else ''}",
        f"  head                          logits {_mib(plan.head_logits)}, fused chunk {_mib(plan.head_fused)}"
        f"  <- this run: {'fused' if fu else 'logits'}",
        f"  peak (estimate)               {_mib(plan.peak)}" + (f"  (free now: {_mib(plan.free)})" if plan.free is not None else ""),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Activations: a probe of saved tensors
# ---------------------------------------------------------------------------------------------
def _set_checkpointing(model, enable: bool) -> Dict:
    """Turn transformers' per-layer checkpointing on/off; returns the previous state to restore."""
    from torch.utils.checkpoint import checkpoint

    previous = {}
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and type(module).__name__ != "PeftModel":
            previous[module] = (module.gradient_checkpointing, getattr(module, "_gradient_checkpointing_func", None))
            module.gradient_checkpointing = enable
            if enable and previous[module][1] is None:
                module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return previous


def _restore_checkpointing(previous: Dict) -> None:
    for module, (flag, fn) in previous.items():
        module.gradient_checkpointing = flag
        if fn is None and hasattr(module, "_gradient_checkpointing_func"):
            del module._gradient_checkpointing_func


def _storage(t):
    """(data pointer, bytes) of a tensor's storage (a DTensor's local shard); (None, 0) if it has none."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except RuntimeError:  # e.g. a resized-away FSDP parameter
        return None, 0


def _saved_bytes(model, length: int, vocab_ids: int, device, fused: bool, autocast: bool) -> int:
    from .head import forward_head

    params = {_storage(p)[0] for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr is not None and ptr not in params:
            seen[ptr] = nbytes
        return t

    ids = torch.randint(0, vocab_ids, (1, length), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            head = forward_head(model, ids, torch.ones_like(ids), True, autocast=autocast)
        del head
    return sum(seen.values())


def _fit(lengths, values):
    """a + b T + c T^2 through three points (c >= 0: attention matrices only grow)."""
    x = torch.tensor(lengths, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x, x * x], dim=1)
    a, b, c = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    if c < 0:
        A2 = A[:, :2]
        a, b = torch.linalg.lstsq(A2, y[:, None]).solution[:, 0].tolist()
        c = 0.0
    return a, b, c


def activation_bytes(model, rows: int, length: int, device, checkpointing: bool, autocast: bool = False) -> int:
    """Saved-for-backward bytes of a forward over [rows, length] (decoder only: the head is counted apart)."""
    vocab = model.get_input_embeddings().num_embeddings
    was_training = model.training
    model.train()
    previous = _set_checkpointing(model, checkpointing)
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            values = [_saved_bytes(model, t, vocab, device, True, autocast) for t in PROBE_LENGTHS]
    finally:
        _restore_checkpointing(previous)
        model.train(was_training)
    _, b, c = _fit(PROBE_LENGTHS, values)
    return int(max(0.0, rows * (b * length + c * length * length)))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def _bytes(params) -> int:
    from .fsdp import local_numel

    return sum(local_numel(p) * p.element_size() for p in params)  # this device's shard under --fsdp


def make_plan(config: TrainConfig, model, rows: int, length: int, device, fused: bool) -> MemoryPlan:
    from ..integrations.transformers import unwrap_model
    from ..linear_loss import chunk_rows_for
    from .loop import logits_dtype

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes(p for p in params if not p.requires_grad)
    lora = _bytes(trainable)
    autocast = config.autocast == "bf16"
    plain = activation_bytes(model, rows, length, device, checkpointing=False, autocast=autocast)
    ckpt = activation_bytes(model, rows, length, device, checkpointing=True, autocast=autocast)
    layers = getattr(unwrap_model(model).config, "num_hidden_layers", 1) or 1
    recompute = max(0, plain - ckpt) // layers
    head = unwrap_model(model).lm_head
    vocab, dim = head.weight.shape
    n = rows * length
    ldt = logits_dtype(config)
    lsize = torch.empty((), dtype=ldt).element_size()
    # the logits and their gradient (the loop frees the logits before the backward)
    head_logits = 2 * n * vocab * lsize
    chunk = chunk_rows_for(n, vocab, dim, ldt)
    head_fused = chunk * vocab * lsize + n * dim * 4  # one chunk of logits + the float32 grad of hidden
    ck = bool(config.gradient_checkpointing)
    plan = MemoryPlan(
        device=str(device), tokens=n, weights=weights, lora_params=lora, lora_grads=lora, optimizer=2 * lora,
        activations=ckpt + recompute if ck else plain, activations_plain=plain, activations_checkpointed=ckpt,
        recompute=recompute, head=head_fused if fused else head_logits, head_logits=head_logits,
        head_fused=head_fused, fused_head=fused, gradient_checkpointing=ck,
    )
    if torch.device(device).type == "cuda":
        plan.free = torch.cuda.mem_get_info(torch.device(device))[0]
    return plan


def check_fits(plan: MemoryPlan) -> None:
    """CUDA: refuse (TrainInputError, exit 2) a run whose step cannot fit the free memory, naming
    the switch that would make it fit. The weights are already on the device when this runs."""
    if plan.free is None:
        return
    budget = plan.free * CUDA_HEADROOM
    need = plan.optimizer + plan.step_peak()
    if need <= budget:
        return
    options = []
    for fused, ckpt, flags in ((True, plan.gradient_checkpointing, "--fused-head"),
                               (plan.fused_head, True, "--gradient-checkpointing"),
                               (True, True, "--fused-head --gradient-checkpointing")):
        if (fused, ckpt) != (plan.fused_head, plan.gradient_checkpointing):
            if plan.optimizer + plan.step_peak(fused, ckpt) <= budget:
                options.append(flags)
    hint = (f"add {options[0]}" if options else
            "it does not fit even with --fused-head --gradient-checkpointing: lower --batch-size or --length, "
            "or shard the model over more GPUs")
    raise TrainInputError(f"the run needs about {_mib(need)} more on {plan.device} at its peak but {_mib(plan.free)} "
                          f"is free; {hint} (see memft train --plan)")


# ---------------------------------------------------------------------------------------------
# Measured peak (tests, benchmarks)
# ---------------------------------------------------------------------------------------------
def measure(fn, device_type: str) -> Optional[int]:
    """Extra bytes at the peak of one call of ``fn`` (CUDA allocator peak, or the CPU's peak RSS rise)."""
    from ..bench.timing import peak_memory_bytes

    return peak_memory_bytes(fn, device_type)


def plan_rows(plan: MemoryPlan) -> List[str]:
    return format_plan(plan).splitlines()
