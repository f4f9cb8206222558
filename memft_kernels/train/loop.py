"""The memorization loop: read it top to bottom.

setup (data -> base model -> LoRA -> optimizer) -> base evaluation -> steps (K micro-batches of
forward, MemFT loss (memft-sw: the window from this very forward), backward; all-reduce, clip,
AdamW, log, evaluate, checkpoint) -> final evaluation, report, plots, adapter.

Distributed (torchrun): every rank holds the whole model (or, with --fsdp, its shards) and the task
and takes rows ``rank::world`` of each global batch; a rank left without a row (fewer rows than
ranks: one long text sharded over the GPUs) runs the forward/backward on an ignored row
(``forward_backward``, ``idle_note``). The loss is ``sum_i w_i l_i / D`` with D the *global* sum of weights
(all-reduced stats.weight_sum), and gradients are all-reduced with SUM, so the update equals
single-process training on the whole batch. One process is the same code with world = 1.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from ..accumulate import MemFTAccumulator
from . import checkpoint as ckpt
from .config import TrainConfig, TrainInputError
from .data import IGNORE, build_task, to_batch
from .evaluate import exact_recall, teacher_forced
from . import fsdp
from .longcontext import split_long_samples
from .plan import check_fits, format_plan, make_plan
from .head import FusedHead, LogitsHead, autocast_context, check_compile, forward_head, use_fused_head
from .models import add_lora, compile_decoder, configure_model, build_model, check_model_dir, context_length, count_trainable, is_builtin, load_model, trainable_parameters
from .windows import PAPER_BOUNDARIES, PAPER_RATIOS, SlidingWindow, curriculum_active, curriculum_ratio, curriculum_size

POLICY = {"ce": "none", "memft-ot": "hard", "memft-sw": "sigmoid"}


# ---------------------------------------------------------------------------------------------
# The loss of one step (global denominator) -- the only place memft_loss is called in training.
# ---------------------------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _Pred:
    def __init__(self, pred):
        self.pred = pred


def memorization_loss(logits, labels, token_weight, config: TrainConfig, *, weight_fn=None, denominator=None,
                      accumulator=None):
    """(loss to backpropagate, stats, global totals) for this rank's rows.

    ``memft_loss`` with reduction="sum" gives sum_i w_i l_i and, in the same pass, the stats; the
    sum of weights (and the counts for logging) is all-reduced and the local sum divided by it:
    exactly the "active" mean over the whole global batch. If no token is active anywhere (only
    possible for memft-ot), ``fallback`` decides: the plain CE mean ("mean", the authors' code) or
    zero gradient ("zero"). ``weight_fn`` (the memft-sw window) multiplies the policy weight with
    weights computed from this forward's statistics. ``denominator`` (``--accum-normalize
    tokens``) replaces the sum of weights: the loss is sum_i w_i l_i / denominator, no fallback.
    ``accumulator`` (``--accum-normalize active``): a ``MemFTAccumulator`` that gets sum_i w_i l_i
    unscaled and scales the step's gradients once by 1 / (sum of weights of the whole step, all
    micro-batches and ranks), applying the fallback to the whole step; ``info["loss"]`` is then
    this micro-batch's share and the step's value comes from ``accumulator.finish_step()``.
    """
    head = logits if isinstance(logits, (LogitsHead, FusedHead)) else LogitsHead(logits)
    extra = {}
    if weight_fn is not None:
        if head.accepts("weight_fn"):
            extra["weight_fn"] = weight_fn
        else:  # a loss without weight_fn: this forward's argmax costs one more read of the logits
            window = weight_fn(labels, _Pred(head.argmax()))
            token_weight = window if token_weight is None else token_weight * window
    loss_sum, stats = head.loss(
        labels, policy=POLICY[config.loss], threshold=config.threshold, sharpness=config.sharpness,
        token_weight=token_weight, reduction="sum", return_stats=True, backend=config.backend, **extra,
    )
    valid = labels != IGNORE
    totals = torch.stack([
        stats.weight_sum.double(),
        stats.n_valid.double(),
        stats.n_active.double(),
        stats.ce[valid].double().sum(),
        ((stats.prob > 0.5) & valid).sum().double(),
        ((stats.pred == labels) & valid).sum().double(),
        loss_sum.detach().double(),
    ])
    totals = _all_reduce(totals).cpu()  # on the logits' device: nccl reduces only CUDA tensors
    weight_sum, n_valid = float(totals[0]), float(totals[1])
    n = max(n_valid, 1.0)
    if accumulator is not None:
        loss = accumulator.accumulate(
            loss_sum, stats, lambda: head.loss(labels, policy="none", reduction="sum", backend=config.backend))
        fell_back, value = weight_sum <= 0, float(totals[6])
    elif denominator is not None:
        loss, fell_back, value = loss_sum / denominator, False, float(totals[6]) / denominator
    elif weight_sum > 0:
        loss, fell_back, value = loss_sum / weight_sum, False, float(totals[6]) / weight_sum
    elif config.fallback == "mean" and n_valid > 0:
        loss = head.loss(labels, policy="none", reduction="sum", backend=config.backend) / n_valid
        fell_back, value = True, float(totals[3]) / n
    else:
        loss, fell_back, value = loss_sum * 0.0, True, 0.0
    info = {
        "loss": value,  # the value being minimized (global)
        "ce": float(totals[3]) / n,  # plain mean CE per answer token of the batch
        "recalled_frac": float(totals[4]) / n,
        "token_accuracy": float(totals[5]) / n,
        "n_active": int(totals[2]),
        "n_valid": int(n_valid),
        "fell_back": fell_back,
        # no gradient at all: no token is weighted anywhere and nothing falls back to the plain mean
        "no_grad": weight_sum <= 0 and (denominator is not None or not (config.fallback == "mean" and n_valid > 0)),
    }
    return loss, stats, info


# ---------------------------------------------------------------------------------------------
# Batches: epochs of batches from one seeded order; the curriculum trains on a growing prefix of it.
# ---------------------------------------------------------------------------------------------
class Sampler:
    """The batches of every epoch, deterministic from the seed.

    No curriculum: all samples, reshuffled every epoch, the last batch may be short. Curriculum
    ``paper`` (the authors'): one seeded order kept every epoch; epoch e trains, in that order, on
    ``curriculum_active(n, batch, curriculum_ratio(e))`` samples (whole batches, drop_last).
    Curriculum ``stages`` (this project's earlier rule): 20/40/60/80/100% of the order, stage by
    ``epochs_per_stage``, reshuffled inside the prefix every epoch.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int, curriculum: bool = False,
                 epochs_per_stage: int = 1, style: str = "paper", ratios=None, boundaries=None):
        self.n, self.batch_size, self.seed = n_samples, batch_size, seed
        self.curriculum, self.epochs_per_stage, self.style = curriculum, epochs_per_stage, style
        self.ratios = list(PAPER_RATIOS if ratios is None else ratios)
        self.boundaries = list(PAPER_BOUNDARIES if boundaries is None else boundaries)
        self.order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
        self.epoch, self.pos = 0, 0  # pos: batches of the epoch already drawn

    def epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        if self.curriculum and self.style == "paper":
            active = curriculum_active(self.n, self.batch_size, curriculum_ratio(epoch, self.ratios, self.boundaries))
            return list(self.order[:active].split(self.batch_size))
        active = curriculum_size(self.n, epoch, self.epochs_per_stage) if self.curriculum else self.n
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        perm = self.order[:active][torch.randperm(active, generator=g)]
        return list(perm.split(self.batch_size or active))

    def next_batch(self) -> torch.Tensor:
        return self.next_step(1)[0]

    def next_step(self, micro_batches: int) -> List[torch.Tensor]:
        """Up to ``micro_batches`` batches for one optimizer step; a step never crosses an epoch's end."""
        batches = self.epoch_batches(self.epoch)
        out = batches[self.pos:self.pos + micro_batches]
        self.pos += len(out)
        if self.pos >= len(batches):
            self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = d["epoch"], d["pos"]


def schedule_length(config: TrainConfig, sampler: Sampler):
    """(optimizer steps, steps of the linear lr decay). With ``epochs`` both follow the authors:
    every epoch's batches in steps of ``grad_accum`` (the last one of an epoch may be short), and
    the decay over the sum of ``batches // grad_accum`` (so a short step past it runs at lr 0)."""
    if not config.epochs:
        return config.steps, config.steps
    counts = [len(sampler.epoch_batches(e)) for e in range(config.epochs)]
    k = config.grad_accum
    return sum(math.ceil(c / k) for c in counts), max(1, sum(c // k for c in counts))


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    config: TrainConfig
    run_dir: str
    device: torch.device
    rank: int
    world: int
    task: object
    model: object
    optimizer: object
    scheduler: object
    sampler: Sampler
    window: SlidingWindow
    window_rows: int = 0  # global batch size the row-keyed window state belongs to
    fused_head: bool = False  # the loss through memft_linear_loss (train/head.py)
    decoder: object = None  # the compiled decoder under --compile, else None (the model's own)
    plan: object = None  # the memory plan (train/plan.py)
    idle_ranks: int = 0  # ranks without a row in a full micro-batch (batch < world; idle_note)
    adapter_state: Optional[dict] = None  # --fsdp: the gathered LoRA tensors the adapter is saved from
    lr_steps: int = 0
    step: int = 0
    base_loss: float = float("nan")
    steps_to_full_recall: Optional[int] = None
    steps_to_all_recalled: Optional[int] = None
    last_generated: int = -(10**9)  # step of the last greedy-generation evaluation
    last_eval: dict = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainInputError(f"device={name!r} but no CUDA device is available")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise TrainInputError(f"device={name!r} but there are {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def logits_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the loss sees: the weights' dtype, or bfloat16 under --autocast bf16."""
    if config.autocast == "bf16":
        return torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]


def check_backend(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before anything is built or written, a loss backend that cannot run this run's logits."""
    from .. import dispatch

    probe = torch.empty((1, 8), dtype=logits_dtype(config), device=device)
    try:
        dispatch.resolve(config.backend, probe)
    except RuntimeError as exc:
        raise TrainInputError(f"{exc} (device {device}, {str(probe.dtype).replace('torch.', '')} logits)") from None


def _init_distributed(device: torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives use the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _make_run_dir(config: TrainConfig, rank: int, world: int) -> str:
    run_dir = config.run_dir
    if run_dir is None and rank == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join(config.out_dir, f"{stamp}-{config.loss}")
        base, k = run_dir, 1
        while os.path.exists(run_dir):
            run_dir, k = f"{base}-{k}", k + 1
    run_dir = _from_rank0(run_dir, world)
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as exc:  # e.g. --out-dir names a file: bad input, not a crash
            raise TrainInputError(f"cannot create the run folder {run_dir!r}: {exc.strerror}") from None
    return run_dir


def setup(config: TrainConfig, make_dir: bool = True) -> Run:
    """Everything a run needs, built deterministically from the config (no file written but the
    folder; not even that with ``make_dir=False``, as for ``memft train --plan``)."""
    config.validate()

    if config.threads:
        torch.set_num_threads(config.threads)
    device = _resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    check_backend(config, device)
    rank, world = _init_distributed(device)
    if config.fsdp and world < 2:
        raise TrainInputError("--fsdp shards the model over the ranks of torchrun: run it under torchrun with 2 or "
                              "more processes (torchrun --nproc_per_node N -m memft_kernels train --fsdp ...)")

    if not is_builtin(config.model):
        check_model_dir(config.model)  # before the tokenizer reads the folder
    task = build_task(config)
    tok = task.tokenizer
    if is_builtin(config.model):
        model = build_model(config.model, tok.vocab_size, config.init_range, config.seed, config.dtype,
                            {"bos": tok.bos, "eos": tok.eos, "pad": tok.pad})
    else:
        model = load_model(config.model, config.dtype)
        if tok.vocab_size > model.get_input_embeddings().num_embeddings:
            raise TrainInputError(f"tokenizer has {tok.vocab_size} ids but the model's embedding has "
                                  f"{model.get_input_embeddings().num_embeddings}")
    ctx = context_length(model)
    if ctx is not None and task.max_len > ctx:
        if config.task not in ("random", "text") or ctx < 4:
            raise TrainInputError(f"a sample is {task.max_len} tokens long (prompt + answer), longer than the "
                                  f"model's context of {ctx}; lower --length")
        task = split_long_samples(task, ctx)  # memorized in windows (train/longcontext.py)
    check_compile(config, model)
    configure_model(model, config.attn, config.gradient_checkpointing)
    model = add_lora(model, config.rank, config.alpha, config.dropout, config.target_modules, config.layers, config.seed)
    model.to(device).train()
    if config.fsdp:
        fsdp.shard_model(model)  # before the optimizer: it steps the LoRA shards

    batch_size = config.batch_size or len(task.samples)
    if batch_size > len(task.samples):
        raise TrainInputError(f"batch_size={config.batch_size} is larger than the {len(task.samples)} samples")
    # Fewer rows than ranks (one long text sharded over the GPUs with --fsdp): the ranks without a
    # row run the idle path of forward_backward every micro-batch (see idle_note).
    idle_ranks = max(0, world - batch_size)

    sampler = Sampler(len(task.samples), config.batch_size, config.seed, config.curriculum, config.curriculum_epochs,
                      config.curriculum_style, config.curriculum_ratios, config.curriculum_boundaries)
    try:
        steps, lr_steps = schedule_length(config, sampler)
    except ValueError as exc:  # e.g. a curriculum with fewer samples than one batch
        raise TrainInputError(str(exc)) from None
    config = config.replace(steps=steps)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / lr_steps))
    window = SlidingWindow(config.window_span, config.window_decay, config.window_floor, config.window_patience,
                           config.window_growth, config.window_max, ignore_index=IGNORE)
    rows = -(-batch_size // world)  # per rank and micro-batch (an idle rank's ignored row: 1)
    fused = use_fused_head(config, model, rows * task.max_len)
    memory = make_plan(config, model, rows, task.max_len, device, fused)
    check_fits(memory)
    decoder = compile_decoder(model) if config.compile else None
    run_dir = _make_run_dir(config, rank, world) if make_dir else None
    return Run(config, run_dir, device, rank, world, task, model, optimizer, scheduler, sampler, window,
               lr_steps=lr_steps, fused_head=fused, decoder=decoder, plan=memory, idle_ranks=idle_ranks)


def idle_note(run: "Run") -> Optional[str]:
    """The line rank 0 prints at the start when a micro-batch has fewer rows than there are ranks
    (None otherwise). Such ranks hold no row: every micro-batch they run the forward and backward
    on one row whose labels are all ignored (``forward_backward``), which adds nothing to the loss,
    its statistics, the gradients or the window, and keeps the collectives in step. Under --fsdp
    that is the point (they hold their shards of the model); without it their device is wasted."""
    if not run.idle_ranks:
        return None
    k, rows = run.idle_ranks, run.world - run.idle_ranks
    who = "1 of the {} ranks holds".format(run.world) if k == 1 else f"{k} of the {run.world} ranks hold"
    they = "it" if k == 1 else "they"
    head = (f"{who} no row of a micro-batch of {rows} row{'s' if rows > 1 else ''} (--batch-size, or all "
            f"--samples) and run{'s' if k == 1 else ''} each forward/backward on an ignored row to keep the "
            f"collectives in step")
    if run.config.fsdp:
        return f"memft train: {head}; under --fsdp {they} only shard{'s' if k == 1 else ''} the model"
    return (f"memft train: warning: {head}; without --fsdp {they} compute{'s' if k == 1 else ''} nothing and "
            f"{'its device is' if k == 1 else 'their devices are'} wasted: run {rows} process{'es' if rows > 1 else ''} "
            f"(--nproc_per_node {rows}), or add --fsdp to shard the model over all {run.world}")


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------
def _window_fn(run: Run, local_index: torch.Tensor, global_rows: int):
    """memft-sw: the authors' window, called by the loss on this forward's predictions (None on a
    rank without a row in this micro-batch)."""
    idle = len(local_index) == 0
    if run.config.window_state == "sample":
        return None if idle else run.window.bind(local_index.to(run.device))
    # The authors start over when the batch size changes. Every rank, idle or not, keeps this
    # bookkeeping: a rank idle in a short micro-batch (3 samples in batches of 2: [2, 1]) must still
    # reset its rows' state there, as one process resets every row.
    if global_rows != run.window_rows:
        run.window.reset()
        run.window_rows = global_rows
    return None if idle else run.window  # keyed by the rows of this rank's slice (a fixed map to global rows)


def _sync_sample_window(run: Run, local_index: torch.Tensor) -> None:
    """--window-state sample under torchrun: every rank updated the state of its own rows' samples;
    give every rank every update, so that a sample keeps its state when a later batch puts it on
    another rank (one all-reduce of 4 numbers per sample)."""
    window, n = run.window, len(run.task.samples)
    if window.keyed != "sample" or window.repeats.numel() < n:  # a slot for every sample (kept ones stay)
        window._slots(n, torch.arange(n, device=run.device), run.device)
    ids = local_index.to(run.device).long()
    update = torch.zeros(n, 4, dtype=torch.float64, device=run.device)
    update[ids, 0] = 1.0
    update[ids, 1] = window.repeats[ids].double()
    update[ids, 2] = window.expand[ids].double()
    update[ids, 3] = window.anchor[ids].double()
    _all_reduce(update)  # each sample is on one rank per micro-batch: the sum is that rank's values
    seen = update[:, 0] > 0
    window.repeats[seen] = update[seen, 1].long()
    window.expand[seen] = update[seen, 2].float()
    window.anchor[seen] = update[seen, 3].long()


def forward_backward(run: Run, batch_index: torch.Tensor, scale: float = 1.0, denominator=None, accumulator=None):
    """Forward + MemFT loss + backward (of ``scale`` x the loss) on this rank's rows of one
    micro-batch; gradients accumulate in ``.grad`` (not all-reduced). Returns (info, stats, batch)."""
    config, task = run.config, run.task
    local_index = batch_index[run.rank::run.world]
    # A micro-batch with fewer rows than ranks (one sample sharded over the ranks with --fsdp, the
    # short last batch of an epoch, a small curriculum stage) leaves some ranks without a row. They
    # still run the forward and backward (FSDP's all-gathers and reduce-scatters, the loss's
    # all-reduce) on one row whose labels are all ignored: it adds nothing to the loss, its
    # statistics or the gradients, and leaves the window alone.
    idle = len(local_index) == 0
    batch = to_batch(task, (batch_index[:1] if idle else local_index).tolist(), task.max_len).to(run.device)
    if idle:
        batch.labels.fill_(IGNORE)
    weight_fn = _window_fn(run, local_index, len(batch_index)) if config.loss == "memft-sw" else None
    with autocast_context(config, run.device):
        head = forward_head(run.model, batch.input_ids, batch.attention_mask, run.fused_head, run.decoder,
                            autocast=config.autocast == "bf16")
    loss, stats, info = memorization_loss(head, batch.labels, None, config, weight_fn=weight_fn,
                                          denominator=denominator, accumulator=accumulator)
    if config.loss == "memft-sw" and config.window_state == "sample" and run.world > 1:
        _sync_sample_window(run, local_index)
    del head  # the N x V logits (unfused) are not needed by the backward: free them before it
    (loss * scale if scale != 1.0 else loss).backward()
    return info, stats, batch


def _merge_infos(infos: List[dict], normalize: str, accum: int) -> dict:
    """One step's log row from its micro-batches (token-weighted means; the optimized value)."""
    if len(infos) == 1 and accum == 1:
        return infos[0]
    n = sum(i["n_valid"] for i in infos)
    out = {k: sum(i[k] * i["n_valid"] for i in infos) / max(n, 1) for k in ("ce", "recalled_frac", "token_accuracy")}
    total = sum(i["loss"] for i in infos)
    out.update(loss=total / accum if normalize == "mean" else total, n_active=sum(i["n_active"] for i in infos),
               n_valid=n, fell_back=any(i["fell_back"] for i in infos), micro_batches=len(infos))
    return out


def train_step(run: Run, on_grads=None) -> dict:
    """One optimizer step over up to ``grad_accum`` micro-batches; ``on_grads(run)`` (tests) sees
    the all-reduced, unclipped gradients."""
    config = run.config
    micro = run.sampler.next_step(config.grad_accum)
    denominator = None
    if config.accum_normalize == "tokens":  # one denominator: the valid tokens of all micro-batches
        denominator = float(sum(len(run.task.samples[i].answer) for b in micro for i in b.tolist()))
    scale = 1.0 / config.grad_accum if config.accum_normalize == "mean" else 1.0
    params = trainable_parameters(run.model)
    # active: the exact active mean of the whole step; the loop all-reduces the gradients below and
    # the accumulator only scales them (linear, so the order does not matter).
    accumulator = (MemFTAccumulator(params, fallback=config.fallback, grad_reduction="none")
                   if config.accum_normalize == "active" else None)
    infos = [forward_backward(run, b, scale, denominator, accumulator)[0] for b in micro]
    if run.world > 1:
        for p in params:
            if not config.fsdp:  # FSDP already reduce-scattered (summed) the gradients
                _all_reduce(p.grad)
    step = accumulator.finish_step() if accumulator is not None else None
    # A step that trained nothing (--fallback zero with every token recalled, or no valid token):
    # the authors' zero_bp backpropagates a constant, so the parameters have no gradient and AdamW
    # leaves them (and their moments) alone. A zero gradient would still move them by momentum.
    skipped = all(i["no_grad"] for i in infos)
    if skipped:
        for p in params:
            p.grad = None
    if on_grads is not None:
        on_grads(run)
    grad_norm = fsdp.scalar(torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf")))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    info = _merge_infos(infos, config.accum_normalize, config.grad_accum)
    info.pop("no_grad", None)
    if step is not None:  # the value minimized: the whole step's active mean (or its fallback)
        info.update(loss=step["loss"], fell_back=step["fell_back"])
    seen = torch.cat(micro)
    info.update(step=run.step, lr=lr, grad_norm=float(grad_norm), batch=len(seen), skipped=skipped,
                covers_all=len(seen.unique()) == len(run.task.samples))
    return info


# ---------------------------------------------------------------------------------------------
# Evaluation, logging, checkpoints
# ---------------------------------------------------------------------------------------------
def _teacher_forced(run: Run) -> dict:
    return teacher_forced(run.model, run.task, run.device, backend=run.config.backend, fused=run.fused_head,
                          autocast=run.config.autocast == "bf16")


def evaluate(run: Run, generate: bool) -> dict:
    """Teacher-forced stats of every sample; with ``generate`` also real greedy generation.

    ``argmax_exact`` (share of samples whose every teacher-forced argmax is right) is cheap and
    equals greedy exact recall up to numerics; ``exact_recall`` comes only from real generation
    (None when not generated): it runs at the end and whenever the argmax says all are recalled
    and that was not confirmed yet.
    """
    tf = _teacher_forced(run)
    per_sample = tf["per_sample"]
    result = {
        "kind": "eval", "step": run.step, "loss": tf["loss"], "dL": run.base_loss - tf["loss"],
        "token_accuracy": tf["token_accuracy"], "recalled_frac": tf["recalled_frac"],
        "argmax_exact": sum(bool(s["correct"].all()) for s in per_sample) / len(per_sample),
        "exact_recall": None, "whole_exact": None, "first_wrong": None,
    }
    gen = {"first_wrong": None}
    # Every argmax right (teacher-forced) makes verbatim recall likely: confirm by generating.
    if generate or (result["argmax_exact"] == 1.0 and run.steps_to_full_recall is None):
        gen = exact_recall(run.model, run.task, run.device)
        run.last_generated = run.step
        result.update(exact_recall=gen["exact_recall"], whole_exact=gen["whole_exact"],
                      first_wrong=gen["first_wrong_overall"])
        if gen["whole_exact"] and run.steps_to_full_recall is None:
            run.steps_to_full_recall = run.step
    run.last_eval = dict(result, per_sample=per_sample, first_wrong_per_sample=gen["first_wrong"])
    return result


def _log(run: Run, row: dict) -> None:
    run.history.append(row)
    if run.rank == 0:
        with open(os.path.join(run.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _checkpoint_state(run: Run) -> dict:
    trainable = fsdp.full_trainable(run.model)  # whole tensors (gathered from the shards under --fsdp)
    return {
        "step": run.step,
        "trainable": trainable,
        "optimizer": fsdp.optimizer_state(run.model, run.optimizer) if run.config.fsdp else run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sampler": run.sampler.state_dict(),
        "window": _window_checkpoint(run),
        "base_loss": run.base_loss,
        "steps_to_full_recall": run.steps_to_full_recall,
        "steps_to_all_recalled": run.steps_to_all_recalled,
        "last_generated": run.last_generated,
        "config": dict(run.config.to_dict(), run_dir=run.run_dir),
    }


def _from_rank0(obj, world: int):
    """Rank 0's ``obj`` on every rank (a collective; ``obj`` itself on one process)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (a collective; [obj] on one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _window_checkpoint(run: Run) -> dict:
    """The memft-sw window state for the checkpoint. Row-keyed state is each rank's own (its rows of
    the batch): every rank's is kept. Sample-keyed state is the same on every rank (synchronized
    after every forward, ``_sync_sample_window``)."""
    own = run.window.state_dict()
    return dict(own, rows=run.window_rows, per_rank=_gather_objects(own, run.world))


def _restore_window(run: Run, window: dict) -> None:
    per_rank = window.get("per_rank")
    if per_rank is None:  # a checkpoint from before per-rank states (one process: the same)
        run.window.load_state_dict(window)
    elif len(per_rank) == run.world:
        run.window.load_state_dict(per_rank[run.rank])
    else:  # another number of ranks: the rows of each rank differ; start over, as for another batch size
        run.window.reset()
    run.window_rows = window["rows"]


def _restore(run: Run, state: dict) -> None:
    if run.config.fsdp:
        fsdp.load_trainable(run.model, state["trainable"])
        fsdp.load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    else:
        params = dict(run.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.sampler.load_state_dict(state["sampler"])
    _restore_window(run, state["window"])
    run.step = state["step"]
    run.base_loss = state["base_loss"]
    run.steps_to_full_recall = state["steps_to_full_recall"]
    run.steps_to_all_recalled = state["steps_to_all_recalled"]
    run.last_generated = state["last_generated"]
    # metrics.jsonl may hold rows written after the checkpoint (or a torn last line): keep the rest.
    path = os.path.join(run.run_dir, "metrics.jsonl")
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= run.step:
                    rows.append(row)
    run.history = rows
    if run.rank == 0:
        ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training: the run stopped after a whole step and saved a checkpoint.
    ``exit_code``: what `memft train` exits with (130 for SIGINT, 143 for SIGTERM, as the shell's)."""

    def __init__(self, message: str = "", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class _StopOnInterrupt:
    """The first SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's stop or preemption: SLURM,
    Kubernetes) asks the loop to stop after the current step (which then checkpoints); a second one
    interrupts at once. Each is installed only in the main thread over Python's default handler of
    that signal (a handler of the embedding program's own is left alone)."""

    def __init__(self):
        self.requested, self.signum, self._previous = False, None, {}
        self.finishing = False  # past the last step: the run only evaluates and writes its folder

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self.finishing:
            self.say_finishing()

    @staticmethod
    def say_finishing():
        print("memft train: the training is done; finishing its final evaluation and run folder "
              "(press Ctrl-C again to stop at once, without them)", file=sys.stderr, flush=True)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False

    def interrupted(self, run: Run) -> RunInterrupted:
        import signal

        name, code = ("terminated (SIGTERM)", 143) if self.signum == signal.SIGTERM else ("interrupted", 130)
        return RunInterrupted(f"{name} after step {run.step} of {run.config.steps}; checkpoint saved, "
                              f"continue with: memft train --resume {run.run_dir}", exit_code=code)

    def stop(self, run: Run) -> bool:
        """Whether to stop now (agreed over ranks: one rank's Ctrl-C stops all at the same step)."""
        if run.world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _remove_if_empty(run_dir: str) -> None:
    try:
        os.rmdir(run_dir)  # only succeeds on an empty folder: never deletes anything a run wrote
    except OSError:
        pass


def _begin(run: Run, resume_state: Optional[dict]) -> None:
    """Base evaluation and the run folder's first files (new run), or the checkpoint's state (resume)."""
    config = run.config
    if resume_state is None:
        torch.manual_seed(config.seed)  # dropout stream; restored from the checkpoint on resume
        run.base_loss = _teacher_forced(run)["loss"]
        if run.rank == 0:
            ckpt.atomic_write_json(os.path.join(run.run_dir, "config.json"), dict(config.to_dict(), run_dir=run.run_dir))
            open(os.path.join(run.run_dir, "metrics.jsonl"), "w").close()
        _log(run, {"kind": "base", "step": 0, "loss": run.base_loss})
    else:
        _restore(run, resume_state)


def _refuse_earlier_checkpoint(run: Run) -> None:
    """A new run must not start in a folder holding another run's checkpoint: it would replace that
    run's config.json and metrics, and a later --resume would continue the old run's weights under
    the new run's log (or the old run would be lost by mistake). Nor in one holding a finished run's
    report.json: its report, metrics and adapter would be overwritten."""
    found = None
    if run.rank == 0:
        found = next((n for n in (ckpt.CHECKPOINT, ckpt.PREVIOUS, "report.json")
                      if os.path.isfile(os.path.join(run.run_dir, n))), None)
    found = _from_rank0(found, run.world)
    if found == "report.json":  # a finished run without checkpoints: its report, metrics and adapter would be replaced
        raise TrainInputError(f"the run folder {run.run_dir!r} holds a finished run (report.json): start the new run "
                              "in another --run-dir, or remove that folder first")
    if found is not None:
        raise TrainInputError(f"the run folder {run.run_dir!r} holds the checkpoint of an earlier run ({found}): "
                              f"continue it with --resume {run.run_dir}, or start the new run in another --run-dir")


LOCK_FILE = ".memft-train.lock"


def _lock_run_dir(run: Run):
    """Rank 0 holds an exclusive lock on the run folder while it trains (a kernel flock, gone with
    the process however it ends): a second ``memft train --resume`` (or a new run) into the same
    folder is refused instead of interleaving its checkpoints and log with the first one's.
    Returns (fd, path) on rank 0 where flock exists, else None."""
    lock, holder = None, None
    if run.rank == 0:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            fcntl = None
        if fcntl is not None:
            path = os.path.join(run.run_dir, LOCK_FILE)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "?"
                os.close(fd)
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                lock = (fd, path)
    holder = _from_rank0(holder, run.world)
    if holder is not None:
        raise TrainInputError(f"the run folder {run.run_dir!r} is being trained by another process ({holder}); "
                              "wait for it to end or use another --run-dir")
    return lock


def _unlock(lock) -> None:
    if lock is None:
        return
    fd, path = lock
    try:
        os.remove(path)  # while still held: nothing is left in the run folder
    except OSError:
        pass
    os.close(fd)


def _save(run: Run) -> None:
    state = _checkpoint_state(run)  # every rank computes it; rank 0 writes it
    if run.rank == 0:
        ckpt.save_checkpoint(run.run_dir, state)


def run_training(config: TrainConfig, resume_state: Optional[dict] = None) -> dict:
    start = time.time()
    run = setup(config)
    config = run.config
    if resume_state is None:
        _refuse_earlier_checkpoint(run)
    lock = _lock_run_dir(run)
    if run.rank == 0 and config.progress:
        print(format_plan(run.plan, run.world, config.fsdp), flush=True)
    note = idle_note(run)
    if run.rank == 0 and note is not None:
        print(note, file=sys.stderr, flush=True)
    try:
        _begin(run, resume_state)
    except BaseException:
        _unlock(lock)
        if resume_state is None and run.rank == 0:
            _remove_if_empty(run.run_dir)  # a run that failed before writing anything leaves no folder
        raise
    try:
        return _train_and_finish(run, start)
    finally:
        _unlock(lock)


def _train_and_finish(run: Run, start: float) -> dict:
    config = run.config
    if run.rank == 0:
        ckpt.atomic_write_json(os.path.join(run.run_dir, "plan.json"), run.plan.as_dict())

    bar = None
    if run.rank == 0 and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=run.step, desc=f"memft train [{config.loss}]", unit="step")
    with _StopOnInterrupt() as interrupt:
        while run.step < config.steps:
            info = train_step(run)
            if info["covers_all"] and info["recalled_frac"] == 1.0 and run.steps_to_all_recalled is None:
                # This forward saw the model after step-1 updates with every token at p > 0.5.
                run.steps_to_all_recalled = run.step - 1
            _log(run, dict(kind="train", **{k: v for k, v in info.items() if k != "covers_all"}))
            last = run.step == config.steps
            due = config.eval_every and run.step % config.eval_every == 0
            # A full batch with every argmax right means greedy recall is likely: confirm it now.
            hint = (info["covers_all"] and info["token_accuracy"] == 1.0 and run.steps_to_full_recall is None
                    and run.step - run.last_generated >= 10)
            if (run.rank == 0 or config.fsdp) and (last or due or hint):  # FSDP: every rank runs the forwards
                _log(run, evaluate(run, generate=last or hint))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{info['ce']:.3f}", acc=f"{info['token_accuracy']:.0%}",
                                p50=f"{info['recalled_frac']:.0%}", recall=f"{run.last_eval.get('argmax_exact', 0):.0%}")
            if config.checkpoint_every and run.step % config.checkpoint_every == 0 and not last:
                _save(run)
            if not last and interrupt.stop(run):
                if not (config.checkpoint_every and run.step % config.checkpoint_every == 0):
                    _save(run)
                if bar is not None:
                    bar.close()
                raise interrupt.interrupted(run)
        if bar is not None:
            bar.close()

        # A first Ctrl-C (or SIGTERM) from here on lets the finished training write its report: it
        # used to interrupt the final evaluation, losing a run that had trained to its last step.
        interrupt.finishing = True
        if interrupt.requested:  # came during the last step, which had nothing left to stop
            interrupt.say_finishing()
        report = None
        if run.rank == 0 or config.fsdp:
            if run.last_eval.get("step") != run.step or run.last_eval.get("exact_recall") is None:
                _log(run, evaluate(run, generate=True))
        if config.fsdp and config.save_adapter:
            run.adapter_state = fsdp.full_trainable(run.model)  # gathered on every rank, saved by rank 0
        if run.rank == 0:
            report = _finish(run, time.time() - start)
    report = _from_rank0(report, run.world)
    return report


def _finish(run: Run, wall_s: float) -> dict:
    from .report import write_outputs

    config, ev = run.config, run.last_eval
    report = {
        "task": config.task,
        "loss": config.loss,
        "model": config.model,
        "rank": config.rank,
        "layers": config.layers,
        "target_modules": config.target_modules,
        "lora_params": count_trainable(run.model),
        "length": config.length if config.task != "phonebook" else None,
        "samples": len(run.task.samples),
        "answer_tokens": run.task.n_answer_tokens,
        "seed": config.seed,
        "steps": config.steps,
        "base_loss": run.base_loss,
        "final_loss": ev["loss"],
        "dL": run.base_loss - ev["loss"],
        "token_accuracy": ev["token_accuracy"],
        "recalled_frac": ev["recalled_frac"],
        "exact_recall": ev["exact_recall"],
        "whole_exact": ev["whole_exact"],
        "first_wrong": ev["first_wrong"],
        "steps_to_full_recall": run.steps_to_full_recall,
        "steps_to_all_recalled": run.steps_to_all_recalled,
        "world_size": run.world,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall_s, 2),
        "run_dir": run.run_dir,
    }
    write_outputs(run, report)
    return report
