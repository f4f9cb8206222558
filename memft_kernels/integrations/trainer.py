"""MemFT in a ``transformers.Trainer``: the exact active mean per optimizer step and recall metrics
in the Trainer's own logs.

* ``MemFTMetricsCallback``: a ``TrainerCallback`` whose ``record`` is the loss's ``stats_callback``;
  at every logging step it adds ``recalled_frac``, ``token_accuracy`` (shares of the trained tokens
  since the last log, over every micro-batch and rank) and ``n_active`` (active tokens per
  optimizer step, averaged since the last log) to the Trainer's ``logs``, so every ``report_to``
  integration and ``trainer.state.log_history`` get them. From the statistics the loss computes
  anyway: no extra pass, no host read per micro-batch (one small all-reduce per log).
* ``add_memft_to_trainer(trainer, ...)``: the one call that makes a built Trainer (or TRL
  ``SFTTrainer``) train its model with MemFT: ``use_memft`` / ``apply_memft_to_model`` on the model,
  optionally a ``MemFTAccumulator`` for the exact active mean over the whole optimizer step
  (gradient accumulation and data parallelism: DDP, FSDP2), and the metrics callback.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..accumulate import MemFTAccumulator
from .transformers import apply_memft_to_model, _restore_original_forward, unwrap_model, use_memft

# Index of each running sum in MemFTMetricsCallback's vector.
_N_VALID, _RECALLED, _CORRECT, _N_ACTIVE = range(4)


class MemFTMetricsCallback(TrainerCallback):
    """Logs ``recalled_frac``, ``token_accuracy`` and ``n_active`` at every Trainer logging step.

    Pass ``callback.record`` as the MemFT loss's ``stats_callback`` (``add_memft_to_trainer`` does).
    Statistics of losses computed without gradient (evaluation) are not counted. The keys are
    added to the Trainer's ``logs`` in ``on_log``: a callback sees them only if it runs after this
    one, so put this callback FIRST (``add_memft_to_trainer`` does; ``callbacks=[...]`` in the
    Trainer's constructor places it after the ``report_to`` integrations, which then miss them).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self._sums: Optional[torch.Tensor] = None  # float64 running sums on the loss's device
        self._steps = 0

    def record(self, stats) -> None:
        """The loss's ``stats_callback``: adds one micro-batch's counts (tensor ops, no host read)."""
        if not torch.is_grad_enabled():
            return
        n_valid = stats.n_valid.double()
        counts = torch.stack([
            n_valid,
            stats.recalled_frac.double() * n_valid,
            stats.token_accuracy.double() * n_valid,
            stats.n_active.double(),
        ]).detach()
        self._sums = counts if self._sums is None else self._sums + counts

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1

    def metrics(self) -> dict:
        """The window's metrics (all-reduced over the ranks), and starts a new window."""
        sums = self._sums if self._sums is not None else torch.zeros(4, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = sums.cpu().tolist()
        steps = max(self._steps, 1)
        n = max(sums[_N_VALID], 1.0)
        self._sums, self._steps = None, 0
        p = self.prefix
        return {
            f"{p}recalled_frac": sums[_RECALLED] / n,
            f"{p}token_accuracy": sums[_CORRECT] / n,
            f"{p}n_active": sums[_N_ACTIVE] / steps,
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only (eval logs have eval_loss)
            return
        metrics = self.metrics()
        logs.update(metrics)
        # Trainer.log stored a copy in the history before the callbacks ran: keep it complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(metrics)


class _MemFTStepCallback(TrainerCallback):
    """Closes the accumulator's step before the optimizer step (the gradients were already scaled
    before the step's last backward, so the Trainer's clipping saw the final gradients).

    ``trainer``: the Trainer, whose model's parameters the accumulator takes at the start of
    training (FSDP replaces them with sharded ones when the Trainer prepares the model).
    ``sync_each_batch``: make the Trainer reduce the gradients after every micro-batch (FSDP2 with
    gradient accumulation: under ``no_sync`` FSDP2 keeps the earlier micro-batches' gradients in its
    unsharded parameters, out of the accumulator's reach); the setting lives in accelerate's
    process-wide ``GradientState``, so it is set at every step and restored at the end of training.
    """

    def __init__(self, accumulator: MemFTAccumulator, trainer=None, sync_each_batch: bool = False):
        self.accumulator = accumulator
        self.trainer = trainer
        self.sync_each_batch = sync_each_batch
        self._saved_sync = None
        self.last_step: Optional[dict] = None

    def _plugin_kwargs(self):
        return self.trainer.accelerator.gradient_state.plugin_kwargs

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None:
            self.accumulator.params = MemFTAccumulator._trainable(self.trainer.model)
            if self.sync_each_batch:
                self._saved_sync = (self._plugin_kwargs().get("sync_each_batch", False),)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sync_each_batch:
            self._plugin_kwargs()["sync_each_batch"] = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._saved_sync is not None:
            self._plugin_kwargs()["sync_each_batch"] = self._saved_sync[0]
            self._saved_sync = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.last_step = step = self.accumulator.finish_step()
        if step["n_valid"] == 0 or (step["fell_back"] and self.accumulator.fallback == "zero"):
            # Nothing to train in this step: no gradient at all, as the authors' zero_bp (a constant's
            # backward), so the optimizer leaves the weights and their moments alone (a zero
            # gradient would still move them by AdamW's momentum).
            for p in self.accumulator.params:
                p.grad = None


def _is_deepspeed(trainer) -> bool:
    kind = str(getattr(getattr(trainer, "accelerator", None), "distributed_type", ""))
    return bool(getattr(trainer, "is_deepspeed_enabled", False)) or "DEEPSPEED" in kind


def _deepspeed_zero_stage(trainer) -> Optional[int]:
    """The ZeRO stage of the Trainer's DeepSpeed plugin (accelerate's), or None when it cannot be read."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return int(stage) if stage is not None else None


def _trainer_keeps_deepspeed_from_scaling() -> bool:
    """Whether transformers' ``Trainer.training_step`` passes ``scale_wrt_gas=False`` to DeepSpeed's
    backward (transformers PR 35808): else the engine divides every loss by the accumulation steps."""
    import inspect

    from transformers import Trainer

    try:
        return "scale_wrt_gas" in inspect.getsource(Trainer.training_step)
    except (OSError, TypeError):
        return False


def _check_deepspeed(trainer, accumulating: bool, fallback: str) -> None:
    """What ``exact_active_mean=True`` refuses under DeepSpeed. Its engine runs the optimizer step
    (clipping included) inside accelerate's backward of the step's last micro-batch, before the
    Trainer's ``on_pre_optimizer_step`` callbacks; the Trainer passes ``scale_wrt_gas=False``, so the
    engine does not divide the loss by the accumulation steps. The accumulator scales the gradients
    before that last backward, so the engine's step sees the final gradients (tested: ZeRO 0 to 3
    with one micro-batch per step, ZeRO 0 and 1 with several)."""
    stage = _deepspeed_zero_stage(trainer)
    if accumulating and (stage is None or stage >= 2):
        raise NotImplementedError(
            f"add_memft_to_trainer(exact_active_mean=True) with gradient_accumulation_steps > 1 under DeepSpeed "
            f"ZeRO stage {stage if stage is not None else '(unknown)'}: from stage 2 on, DeepSpeed's engine moves each "
            "micro-batch's gradients into its own (partitioned) buffers during that micro-batch's backward, not "
            "in the parameters' .grad, so the step's denominator (known only at its last micro-batch) cannot be "
            "applied to the earlier micro-batches' gradients (measured: a wrong update, relative error ~38). Use "
            "ZeRO stage 0 or 1, FSDP2, gradient_accumulation_steps=1, or exact_active_mean=False (the 'valid' "
            "normalization across micro-batches, num_items_in_batch)")
    if accumulating and not _trainer_keeps_deepspeed_from_scaling():
        raise NotImplementedError(
            "add_memft_to_trainer(exact_active_mean=True) with gradient_accumulation_steps > 1 under DeepSpeed: this "
            "transformers' Trainer does not pass scale_wrt_gas=False to DeepSpeed's backward (added by transformers "
            "PR 35808, early 2025), so the engine would divide every loss by gradient_accumulation_steps again; upgrade transformers, "
            "or use gradient_accumulation_steps=1 or exact_active_mean=False")
    if fallback == "zero":
        raise NotImplementedError(
            "add_memft_to_trainer(exact_active_mean=True, fallback='zero') under DeepSpeed: its engine steps the "
            "optimizer inside the backward, before the Trainer's callbacks, so a step with nothing to train gets a "
            "zero gradient instead of none, and AdamW's weight decay and momentum still move the weights (measured). "
            "Use fallback='mean' (the default)")


def _fsdp_version(trainer) -> Optional[int]:
    """1 or 2 when the Trainer trains with accelerate's FSDP plugin, else None."""
    accelerator = getattr(trainer, "accelerator", None)
    kind = str(getattr(accelerator, "distributed_type", ""))
    if not (getattr(trainer, "is_fsdp_enabled", False) or "FSDP" in kind):
        return None
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def _insert_first(trainer, callback) -> None:
    trainer.callback_handler.callbacks.insert(0, callback)


def add_memft_to_trainer(
    trainer,
    *,
    fused: bool = False,
    exact_active_mean: bool = True,
    metrics: bool = True,
    fallback: str = "mean",
    **options,
):
    """Train ``trainer.model`` with the MemFT loss; returns ``trainer``. Call it after building the
    Trainer (or TRL ``SFTTrainer``: use ``memft_kernels.integrations.trl.MemFTSFTTrainer``) and before
    ``train()``.

    ``fused``: ``apply_memft_to_model`` (no logits in training; Llama-like families and GPT-2)
    instead of ``use_memft`` (logits, any causal LM). ``exact_active_mean``: the loss of every
    optimizer step is ``sum w l / sum w`` over all its micro-batches and ranks (``MemFTAccumulator``,
    docs/INTEGRATIONS.md), gradients final before the Trainer clips them (under FSDP2 with gradient
    accumulation the Trainer then reduce-scatters after every micro-batch; refused: FSDP1 with gradient
    accumulation, DeepSpeed ZeRO stage 2 or 3 with gradient accumulation, DeepSpeed with
    ``fallback="zero"``); otherwise transformers'
    ``num_items_in_batch`` convention (the "valid" normalization across micro-batches). ``metrics``:
    add ``MemFTMetricsCallback``. Other keywords are the loss's (``policy``, ``threshold``, ...).
    """
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("add_memft_to_trainer: the Trainer already has a compute_loss_func; the MemFT loss is "
                         "computed by the model's own forward here, so build the Trainer without it")
    smoothing = getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0
    if smoothing != 0.0 or getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(f"add_memft_to_trainer: TrainingArguments(label_smoothing_factor={smoothing}) makes the Trainer "
                         "compute its own loss instead of the model's (the MemFT loss would never run); leave it at "
                         f"0 and pass label_smoothing={smoothing} here (the MemFT loss's own label smoothing; "
                         f"MemFTSFTTrainer: memft={{'label_smoothing': {smoothing}}})")
    if getattr(trainer.args, "use_liger_kernel", False):
        raise ValueError("add_memft_to_trainer: TrainingArguments(use_liger_kernel=True) replaces the model's forward "
                         "with Liger's fused cross-entropy, which never calls the MemFT loss; turn it off (fused=True "
                         "is this package's fused head)")
    if not exact_active_mean and options.get("normalize") == "active" and getattr(trainer, "model_accepts_loss_kwargs", True):
        raise ValueError("add_memft_to_trainer(exact_active_mean=False, normalize='active'): the Trainer passes "
                         "num_items_in_batch with every batch that has labels (also with gradient_accumulation_steps=1), "
                         "which makes the loss sum w l / num_items_in_batch, the 'valid' normalization; for the active "
                         "mean use exact_active_mean=True (the default), or leave normalize out for the 'valid' one")
    if "stats_callback" in options or "accumulator" in options:
        raise TypeError("add_memft_to_trainer sets stats_callback and accumulator itself")
    saved = _Saved(trainer)
    try:
        return _add_memft_to_trainer(trainer, fused, exact_active_mean, metrics, fallback, options)
    except BaseException:  # a refused call (an unknown option, a bad value, ...) leaves the Trainer as it was
        saved.restore()
        raise


class _Saved:
    """What ``add_memft_to_trainer`` changes on the Trainer and its model, to put back when it raises
    part way (else the Trainer was left not dividing its own loss by the accumulation steps, or without
    an earlier call's callbacks while its model still fed their accumulator)."""

    TRAINER = ("loss_is_scaled_for_ga", "_memft_loss_is_scaled_for_ga", "memft_callbacks", "memft_accumulator",
               "model_init")
    MODEL = ("forward", "_old_forward", "loss_function", "_loss_function", "_memft_original_forward", "_memft_options", "_replicate_for_data_parallel")

    def __init__(self, trainer):
        self.trainer, self.base = trainer, unwrap_model(trainer.model)
        self.callbacks = list(trainer.callback_handler.callbacks)
        self.trainer_state = {k: vars(trainer)[k] for k in self.TRAINER if k in vars(trainer)}
        self.model_state = {k: vars(self.base)[k] for k in self.MODEL if k in vars(self.base)}

    def restore(self) -> None:
        self.trainer.callback_handler.callbacks[:] = self.callbacks
        for obj, names, state in ((self.trainer, self.TRAINER, self.trainer_state),
                                  (self.base, self.MODEL, self.model_state)):
            for name in names:
                if name in state:
                    vars(obj)[name] = state[name]
                else:
                    vars(obj).pop(name, None)


class _MemFTModelInit:
    """``Trainer(model_init=...)``: ``train()`` (and ``hyperparameter_search``) replaces ``trainer.model``
    with a fresh ``model_init()`` model, which lost the MemFT loss (plain cross-entropy; with the
    accumulator the first step failed: no micro-batch accumulated). This wraps ``model_init`` so that
    every fresh model gets the same ``use_memft`` / ``apply_memft_to_model`` call (the accumulator
    takes the new model's parameters at the start of training)."""

    def __init__(self, model_init, fused: bool, options: dict):
        self.model_init, self.fused, self.options = model_init, fused, options

    def __call__(self, trial=None):
        from transformers.trainer_utils import number_of_arguments

        model = self.model_init() if number_of_arguments(self.model_init) == 0 else self.model_init(trial)
        if model is None:
            return model  # the Trainer says what is wrong
        return (apply_memft_to_model if self.fused else use_memft)(model, **self.options)


def _add_memft_to_trainer(trainer, fused, exact_active_mean, metrics, fallback, options):
    # Called again (new options): the previous call's callbacks go, else two accumulators would
    # close each step (one of them empty) and the metrics would be counted twice.
    for old in getattr(trainer, "memft_callbacks", ()):
        if old in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.remove(old)
    trainer.memft_callbacks, trainer.memft_accumulator = [], None
    if "_memft_loss_is_scaled_for_ga" in vars(trainer):  # the Trainer's own setting, before the first call
        trainer.loss_is_scaled_for_ga = trainer._memft_loss_is_scaled_for_ga
    else:
        trainer._memft_loss_is_scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    callbacks = []
    if metrics:
        metrics_callback = MemFTMetricsCallback()
        options["stats_callback"] = metrics_callback.record
        callbacks.append(metrics_callback)
    if exact_active_mean:
        accumulating = trainer.args.gradient_accumulation_steps > 1
        fsdp_version = _fsdp_version(trainer)
        if _is_deepspeed(trainer):
            _check_deepspeed(trainer, accumulating, fallback)
        if accumulating and fsdp_version is not None and fsdp_version != 2:
            raise NotImplementedError(
                f"add_memft_to_trainer(exact_active_mean=True) with gradient_accumulation_steps > 1 under FSDP version "
                f"{fsdp_version}: only FSDP2 is supported and tested (fsdp_config={{'version': 2}}, transformers' "
                "default); or use exact_active_mean=False")
        world = max(int(trainer.args.world_size), 1)
        # Trainer.compute_loss multiplies the loss by the process count when it averages tokens
        # across devices and the model takes loss kwargs (num_items_in_batch is then set whenever the
        # batch has labels); a model with accepts_loss_kwargs=False (or a forward without **kwargs)
        # gets no factor, and dividing by one anyway made its gradients world times too small.
        multiplier = world if (world > 1 and getattr(trainer.args, "average_tokens_across_devices", False)
                               and getattr(trainer, "model_accepts_loss_kwargs", True)) else 1
        accumulator = MemFTAccumulator(
            trainer.model, fallback=fallback, grad_reduction="mean" if world > 1 else "none",
            backward_multiplier=multiplier, last_micro_batch=lambda: trainer.accelerator.sync_gradients,
            returned_value="step",
        )
        options["accumulator"] = accumulator
        # The returned loss is final for the step: the Trainer must not divide it by the number of
        # accumulation steps.
        trainer.loss_is_scaled_for_ga = True
        step_callback = _MemFTStepCallback(accumulator, trainer, sync_each_batch=accumulating and fsdp_version == 2)
        callbacks.append(step_callback)
        trainer.memft_accumulator = accumulator
    options["fallback"] = fallback
    if fused:
        apply_memft_to_model(trainer.model, **options)
    else:
        _restore_original_forward(trainer.model)  # an earlier fused=True call: its forward goes
        use_memft(trainer.model, **options)
    model_init = getattr(trainer, "model_init", None)
    if model_init is not None:
        if isinstance(model_init, _MemFTModelInit):  # called again: wrap the user's own model_init
            model_init = model_init.model_init
        trainer.model_init = _MemFTModelInit(model_init, fused, options)
    for callback in reversed(callbacks):
        _insert_first(trainer, callback)
    trainer.memft_callbacks = callbacks
    return trainer
