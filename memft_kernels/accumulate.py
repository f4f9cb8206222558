"""The exact "active" mean of a whole optimizer step: gradient accumulation and data parallelism.

``memft_loss(normalize="active")`` divides by the sum of weights of ONE call. Over an optimizer
step made of K micro-batches on W data-parallel ranks, the paper's loss is

    L = sum_{k, r} sum_i w_i l_i  /  sum_{k, r} sum_i w_i

whose denominator is known only after the step's last micro-batch. ``MemFTAccumulator`` computes
it exactly: every micro-batch backpropagates its own ``sum w l`` (``memft_loss(reduction="sum",
return_stats=True)``, the gradient unscaled); the step's weight sum is accumulated and all-reduced
over the ranks with the statistics (one small all-reduce per micro-batch); the gradients are
scaled once, by ``1 / sum w``, before the optimizer step.

The fallback rule applies to the whole step. If no token of the step is active on any rank (all
recalled), ``fallback="mean"`` trains on the plain mean of the per-row loss over every valid row of
the step (as one ``memft_loss`` call over the whole batch would), ``"zero"`` gives zero gradients.
Which of the two a micro-batch backpropagates is decided from the all-reduced weight sums seen so
far: while no rank has seen an active token in this step, a micro-batch backpropagates its plain
loss sum (computed only then, by a second ``memft_loss`` call on the same logits); the first
micro-batch with an active token anywhere zeroes those fallback gradients and from then on only
``sum w l`` is backpropagated. Zeroing and scaling are linear and every rank decides them from the
same all-reduced totals, so they are exact whether the gradients are still local (DDP's no_sync,
``grad_reduction="sum"``) or were already reduced after every micro-batch (FSDP2 reduce-scattering
each micro-batch into the sharded ``.grad``: each rank zeroes or scales its own shard).

Two ways to end the step:

* ``finish_step()`` after the last backward: all-reduces the gradients (``grad_reduction="sum"``),
  then scales them. For hand-written loops and ``memft train``.
* ``loss(..., last=True)`` on the last micro-batch: scales the gradients already accumulated and the
  returned loss before the last backward, so that the gradients are final when that backward
  returns. For frameworks that clip and step right after the last backward (the Trainer).
  ``finish_step()`` is then still called (it resets and, with ``grad_reduction="sum"``, reduces).

``grad_reduction`` says who reduces gradients over the ranks: ``"sum"`` (this object all-reduces
them in ``finish_step``), ``"mean"`` (DDP averages them during the last backward: the scale
becomes ``W / sum w``), ``"none"`` (nobody: one process, or the caller sums them).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .loss import memft_loss
from .spec import MemFTStats

# Per-micro-batch totals, all-reduced (float64): indices into the vector.
_WEIGHT_SUM, _N_VALID, _N_ACTIVE, _RECALLED, _CORRECT, _LOSS_SUM = range(6)
_N_TOTALS = 6
# memft_loss keywords the accumulator sets itself.
_OWN_KEYWORDS = ("reduction", "normalize", "denominator", "fallback", "return_stats")


def _plain_options(options: dict) -> dict:
    """The options of the fallback's plain loss: every weight gone (policy, token_weight, weight_fn),
    as memft_loss's own fallback has w_i = 1 on every valid row."""
    return {k: v for k, v in options.items() if k not in ("policy", "threshold", "sharpness", "token_weight", "weight_fn")}


class MemFTAccumulator:
    """Exact ``normalize="active"`` MemFT loss over K micro-batches and the ranks of ``group``.

    ``params``: the model (its parameters that require grad) or an iterable of parameters: the ones
    whose ``.grad`` this object scales, reduces and (for the fallback rule) zeroes.

    Usage (every rank runs the same number of micro-batches per step)::

        accumulator = MemFTAccumulator(model)
        for inputs, labels in micro_batches:
            logits = model(inputs)
            accumulator.loss(logits, labels, policy="hard").backward()
        step = accumulator.finish_step()     # grads = d L / d params; step["loss"] = L
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        params: Union[nn.Module, Iterable[torch.Tensor]],
        *,
        fallback: str = "mean",
        group=None,
        grad_reduction: str = "sum",
        backward_multiplier: float = 1.0,
        last_micro_batch: Optional[Callable[[], bool]] = None,
        returned_value: str = "sum",
    ):
        if fallback not in ("mean", "zero"):
            raise ValueError(f"fallback={fallback!r} is not supported; choose one of 'mean', 'zero'")
        if grad_reduction not in ("sum", "mean", "none"):
            raise ValueError(f"grad_reduction={grad_reduction!r} is not supported; choose one of 'sum', 'mean', 'none'")
        if returned_value not in ("sum", "step"):
            raise ValueError(f"returned_value={returned_value!r} is not supported; choose one of 'sum', 'step'")
        if not backward_multiplier > 0:
            raise ValueError(f"backward_multiplier must be > 0, got {backward_multiplier!r}")
        self.params = self._trainable(params)
        self.fallback = fallback
        self.group = group
        self.grad_reduction = grad_reduction
        # A framework that multiplies every returned loss by a constant before backward (the
        # Trainer does for average_tokens_across_devices) sets it here; the scale divides by it.
        self.backward_multiplier = float(backward_multiplier)
        # Says whether the micro-batch being computed is the step's last (when ``last`` is not
        # passed): the Trainer's ``accelerator.sync_gradients``.
        self.last_micro_batch = last_micro_batch
        # "sum": the returned tensor's value is what it backpropagates; "step": its value is 0 except
        # on the last micro-batch, where it is the step's loss (divided by backward_multiplier), so
        # that a framework summing the returned values logs the step's loss. Same gradients.
        self.returned_value = returned_value
        self._reset()

    @staticmethod
    def _trainable(params):
        if isinstance(params, nn.Module):
            params = params.parameters()
        params = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
        if not params:
            raise ValueError("MemFTAccumulator: no parameter that requires grad was given")
        return params

    def _reset(self) -> None:
        self._totals = None  # float64 [_N_TOTALS], all-reduced sums over the step so far
        self._fallback_sum = 0.0  # all-reduced plain loss sum of the fallback micro-batches
        self._seen_active = False  # some rank had an active token in this step
        self._holds_fallback_grads = False  # .grad holds plain-loss gradients (not yet reduced)
        self._scaled = False  # the scale was applied by loss(last=True)
        self.micro_batches = 0

    # ------------------------------------------------------------------------------------------
    # Collectives
    # ------------------------------------------------------------------------------------------
    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    # ------------------------------------------------------------------------------------------
    # One micro-batch
    # ------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor, *, last: Optional[bool] = None, **options) -> torch.Tensor:
        """The tensor to backpropagate for this micro-batch (``memft_loss`` keywords in ``options``).

        Its gradient is this micro-batch's ``sum_i w_i l_i`` (or, while the step has no active
        token, its plain loss sum); with ``last=True`` it and the accumulated gradients are already
        scaled by the step's factor. ``reduction``, ``normalize``, ``denominator`` and ``fallback``
        belong to the accumulator and are refused here. ``inplace_backward=True`` takes effect only
        once the step has an active token (or with ``fallback="zero"``): before that the fallback's
        plain loss may still need to read the logits.
        """
        self._check_options(options)
        if options.get("inplace_backward") and self._may_fall_back():
            # reduction="sum" writes the gradient over the logits during the forward, and the
            # fallback's plain loss (decided after it) would then read a gradient as logits.
            options = dict(options, inplace_backward=False)
        loss_sum, stats = memft_loss(logits, target, reduction="sum", return_stats=True, **options)
        plain = _plain_options(options)
        return self.accumulate(
            loss_sum, stats,
            lambda: memft_loss(logits, target, policy="none", reduction="sum", **plain),
            last=last,
        )

    def linear_loss(self, hidden, weight, target, bias=None, *, last: Optional[bool] = None, **options) -> torch.Tensor:
        """``loss`` for ``memft_linear_loss(hidden, weight, target, bias)`` (no logits materialized)."""
        from .linear_loss import memft_linear_loss

        self._check_options(options)
        loss_sum, stats = memft_linear_loss(hidden, weight, target, bias, reduction="sum", return_stats=True, **options)
        plain = _plain_options(options)
        return self.accumulate(
            loss_sum, stats,
            lambda: memft_linear_loss(hidden, weight, target, bias, policy="none", reduction="sum", **plain),
            last=last,
        )

    def _may_fall_back(self) -> bool:
        """Whether this step's next micro-batch may need the fallback's plain loss (nothing active yet)."""
        return self.fallback == "mean" and not self._seen_active

    @staticmethod
    def _check_options(options) -> None:
        own = sorted(set(options) & set(_OWN_KEYWORDS))
        if own:
            raise TypeError(
                f"MemFTAccumulator sets {', '.join(own)} itself (reduction='sum', the step's active mean); "
                "pass fallback to MemFTAccumulator(...)"
            )

    def accumulate(
        self,
        loss_sum: torch.Tensor,
        stats: MemFTStats,
        plain_sum: Optional[Callable[[], torch.Tensor]] = None,
        *,
        last: Optional[bool] = None,
    ) -> torch.Tensor:
        """The general form of ``loss``: ``loss_sum`` = sum_i w_i l_i of a ``reduction="sum"`` call
        with its ``stats``; ``plain_sum()`` computes the same call's loss with ``policy="none"`` and
        no token weight (needed only for ``fallback="mean"``, called only while the step has no
        active token). ``last=None`` asks ``last_micro_batch()`` (False without one). Returns the
        tensor to backpropagate."""
        if self._scaled:
            raise RuntimeError("MemFTAccumulator: loss(last=True) was already called; call finish_step() first")
        totals = torch.stack([
            stats.weight_sum.double(),
            stats.n_valid.double(),
            stats.n_active.double(),
            (stats.recalled_frac.double() * stats.n_valid.double()),
            (stats.token_accuracy.double() * stats.n_valid.double()),
            loss_sum.detach().double(),
        ])
        totals = self._all_reduce(totals).cpu()
        self._totals = totals if self._totals is None else self._totals + totals
        self.micro_batches += 1

        if totals[_WEIGHT_SUM] > 0:
            if not self._seen_active and self._holds_fallback_grads:
                self._zero_grads()  # plain-loss gradients of earlier micro-batches: not this step's
                self._holds_fallback_grads = False
            self._seen_active = True
            out = loss_sum
        elif self._seen_active or self.fallback == "zero" or totals[_N_VALID] == 0:
            out = loss_sum  # zero weights: zero gradient, keeps every rank's backward in step
        else:
            if plain_sum is None:
                raise ValueError("MemFTAccumulator: fallback='mean' needs plain_sum (the loss with policy='none')")
            out = plain_sum()
            value = self._all_reduce(out.detach().double().reshape(1)).cpu()
            self._fallback_sum += float(value[0])
            self._holds_fallback_grads = True

        if last is None:
            last = bool(self.last_micro_batch()) if self.last_micro_batch is not None else False
        if last:
            scale = self.step_scale()
            self._scale_grads(scale)
            self._scaled = True
            out = out * scale
        if self.returned_value == "step":
            value = self.step_loss() / self.backward_multiplier if last else 0.0
            out = out + (value - out.detach())
        return out

    # ------------------------------------------------------------------------------------------
    # End of the step
    # ------------------------------------------------------------------------------------------
    def _denominator(self):
        """(D, fell_back): the step's weight sum, or its valid count on the fallback, or 0."""
        if self._totals is None:
            return 0.0, False
        weight_sum, n_valid = float(self._totals[_WEIGHT_SUM]), float(self._totals[_N_VALID])
        if weight_sum > 0:
            return weight_sum, False
        if n_valid == 0:
            return 0.0, False
        return (n_valid if self.fallback == "mean" else 0.0), True

    def step_scale(self) -> float:
        """The factor the step's gradients get (0 when nothing is trained)."""
        d, _ = self._denominator()
        if d <= 0:
            return 0.0
        ranks = self.world_size() if self.grad_reduction == "mean" else 1
        return ranks / (d * self.backward_multiplier)

    def step_loss(self) -> float:
        """The step's loss value so far (the exact active mean, or its fallback)."""
        d, fell_back = self._denominator()
        if d <= 0:
            return 0.0
        numerator = self._fallback_sum if fell_back else float(self._totals[_LOSS_SUM])
        return numerator / d

    def _grads(self):
        return [p.grad for p in self.params if p.grad is not None]

    def _zero_grads(self) -> None:
        for g in self._grads():
            g.zero_()

    def _scale_grads(self, scale: float) -> None:
        grads = self._grads()
        if not grads:
            return
        if scale == 0.0:
            for g in grads:
                g.zero_()  # also clears a NaN, as a zero gradient must
        else:
            torch._foreach_mul_(grads, scale)

    def finish_step(self) -> dict:
        """Reduce (``grad_reduction="sum"``) and scale the gradients; returns the step's statistics
        over every micro-batch and rank, and starts a new step. Call it on every rank."""
        if self.micro_batches == 0:
            raise RuntimeError("MemFTAccumulator.finish_step(): no micro-batch was accumulated in this step")
        if self.last_micro_batch is not None and not self._scaled:
            raise RuntimeError(
                "MemFTAccumulator.finish_step(): last_micro_batch() never said True in this step, so the "
                "gradients were not scaled before the framework used them (clipping): the framework never "
                "marked its last micro-batch (the Trainer's accelerator.sync_gradients); a loop that steps the "
                "optimizer without such a mark is not supported."
            )
        if self.grad_reduction == "sum" and self.world_size() > 1:
            for g in self._grads():
                dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group)
        if not self._scaled:
            self._scale_grads(self.step_scale())
        _, fell_back = self._denominator()
        totals = self._totals
        n_valid = float(totals[_N_VALID])
        n = max(n_valid, 1.0)
        info = {
            "loss": self.step_loss(),
            "weight_sum": float(totals[_WEIGHT_SUM]),
            "n_valid": int(n_valid),
            "n_active": int(totals[_N_ACTIVE]),
            "fell_back": fell_back,
            "recalled_frac": float(totals[_RECALLED]) / n,
            "token_accuracy": float(totals[_CORRECT]) / n,
            "micro_batches": self.micro_batches,
        }
        self._reset()
        return info
