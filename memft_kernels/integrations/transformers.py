"""Hugging Face ``transformers`` integration: train any causal LM with the MemFT loss.

Three ways in, from least to most invasive:

* ``memft_causal_lm_loss``: a drop-in for transformers' ``ForCausalLMLoss`` (label shift,
  ``num_items_in_batch`` as the denominator for gradient accumulation);
  ``use_memft(model)`` installs it as ``model.loss_function``, so the model's own forward returns
  the MemFT loss; ``memft_compute_loss_func()`` is the same for ``Trainer(compute_loss_func=...)``.
* ``apply_memft_to_model(model)``: additionally, a training forward with labels computes the loss
  from the last hidden states with ``memft_linear_loss`` and never builds the N x V logits
  (``outputs.logits`` is None there). Evaluation, generation and calls without labels run the
  model's own forward unchanged. A peft ``PeftModel`` is unwrapped to its base model; an lm_head
  that is frozen, LoRA-wrapped or in ``modules_to_save`` is handled (see ``_head_as_linear``), also
  when accelerate's device_map / offload hooks sit on it or on the model (``_HeadHooks``).

Nothing in ``memft_kernels.ops`` or the loss modules imports transformers; this module imports it
lazily, only to build the output object of the fused forward.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..dtensor import is_dtensor
from ..linear_loss import memft_linear_loss
from ..loss import memft_loss
from ..spec import LossOptions, takes_loss_options

# memft_loss keywords a causal-LM loss accepts (reduction is always "mean", as transformers' is).
LOSS_OPTIONS = (
    "policy", "threshold", "sharpness", "normalize", "fallback", "label_smoothing", "z_loss",
    "softcap", "backend", "validate", "stats_callback", "accumulator",
)
# Extra keywords of the fused path (memft_linear_loss's chunking).
LINEAR_OPTIONS = ("chunk_size", "memory_budget_bytes")
# Families whose causal-LM forward is "decoder -> last hidden -> lm_head (-> final softcap) -> loss",
# which the fused forward reproduces. Others (logit scaling, MoE aux losses...) are refused.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")


# --------------------------------------------------------------------------------------------
# The loss function (transformers' ForCausalLMLoss signature)
# --------------------------------------------------------------------------------------------


def _shifted_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Position t predicts token t + 1; the last position has nothing to predict."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _denominator(num_items_in_batch, device):
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.reshape(()).to(device)
    return num_items_in_batch


@takes_loss_options()
def memft_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: Optional[int] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    *,
    stats_callback: Optional[Callable] = None,
    accumulator=None,
    policy: str = "hard",
    threshold: float = 0.5,
    sharpness: float = 10.0,
    normalize: str = "active",
    fallback: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    validate: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """The MemFT loss with transformers' ``ForCausalLMLoss`` conventions.

    ``labels`` are the unshifted input labels (shifted here) unless ``shift_labels`` is given.
    ``num_items_in_batch`` (set by the Trainer under gradient accumulation) becomes the
    denominator: the loss is then sum_i w_i l_i / num_items, so that the micro-batch losses add up
    to the whole step's. Other keywords a model forward passes along are ignored, as transformers'
    own loss ignores them. ``stats_callback(MemFTStats)``, if given, receives the statistics.
    ``accumulator`` (a ``MemFTAccumulator``): a loss that will be backpropagated (logits that require
    grad) goes through it -- the exact active mean over the optimizer step, ``num_items_in_batch``
    unused; evaluation (no grad) computes the plain per-call loss (``num_items_in_batch`` ignored then).
    """
    num_classes = logits.shape[-1]
    if vocab_size is not None and vocab_size != num_classes:
        raise ValueError(f"vocab_size={vocab_size} but logits have {num_classes} classes in their last dimension")
    if shift_labels is None:
        if labels is None:
            raise ValueError("memft_causal_lm_loss needs labels (or shift_labels)")
        shift_labels = _shifted_labels(labels, ignore_index)
    if accumulator is not None and not logits.requires_grad:
        # Evaluation with an accumulator (add_memft_to_trainer's default): the per-call active mean.
        # transformers' prediction_step passes the batch's valid count as num_items_in_batch, which
        # would make it sum w l / n_valid (neither this loss nor cross-entropy).
        num_items_in_batch = None
    if accumulator is not None and logits.requires_grad:
        options = dict(
            threshold=threshold, sharpness=sharpness, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, backend=backend, validate=validate, ignore_index=ignore_index,
        )
        flat_logits, flat_labels = logits.reshape(-1, num_classes), shift_labels.reshape(-1).to(logits.device)
        return _accumulated(
            accumulator, stats_callback,
            lambda **kw: memft_loss(flat_logits, flat_labels, reduction="sum", **options, **kw), policy,
        )
    result = memft_loss(
        logits.reshape(-1, num_classes), shift_labels.reshape(-1).to(logits.device),
        policy=policy, threshold=threshold, sharpness=sharpness, normalize=normalize, fallback=fallback,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend, validate=validate,
        ignore_index=ignore_index, denominator=_denominator(num_items_in_batch, logits.device),
        return_stats=stats_callback is not None,
    )
    if stats_callback is None:
        return result
    loss, stats = result
    stats_callback(stats)
    return loss


def _accumulated(accumulator, stats_callback, loss_fn, policy):
    """Through a MemFTAccumulator: ``loss_fn(**kw)`` is the reduction="sum" loss with extra keywords."""
    loss_sum, stats = loss_fn(policy=policy, return_stats=True)
    if stats_callback is not None:
        stats_callback(stats)
    return accumulator.accumulate(loss_sum, stats, lambda: loss_fn(policy="none"))


def _checked_options(options: dict, allowed) -> dict:
    unknown = sorted(set(options) - set(allowed) - {"ignore_index"})
    if unknown:
        raise TypeError(f"unknown MemFT option(s) {unknown}; allowed: {', '.join(sorted(allowed))}, ignore_index")
    checked = LossOptions(**{k: v for k, v in options.items() if k in LossOptions.names()})
    checked.kernel_options()
    cb = options.get("stats_callback")
    if cb is not None and not callable(cb):
        raise TypeError(f"stats_callback must be callable, got {type(cb).__name__}")
    accumulator = options.get("accumulator")
    if accumulator is not None:
        from ..accumulate import MemFTAccumulator

        if not isinstance(accumulator, MemFTAccumulator):
            raise TypeError(f"accumulator must be a MemFTAccumulator, got {type(accumulator).__name__}")
        if checked.normalize != "active" or checked.fallback != accumulator.fallback:
            raise ValueError(
                f"with an accumulator the loss is the step's active mean with the accumulator's fallback "
                f"({accumulator.fallback!r}); got normalize={checked.normalize!r}, fallback={checked.fallback!r}"
            )
    return dict(options)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def use_memft(model: nn.Module, **options) -> nn.Module:
    """Make ``model``'s own forward return the MemFT loss (sets ``model.loss_function``).

    Works for any causal LM whose forward calls ``self.loss_function`` (transformers >= 4.46), also
    through a peft ``PeftModel``. The logits are materialized as usual; see
    ``apply_memft_to_model`` for the path that skips them. Returns ``model``.
    """
    options = _checked_options(options, LOSS_OPTIONS)
    base = unwrap_model(model)
    if not hasattr(base, "loss_function"):
        raise TypeError(f"{type(base).__name__} has no loss_function to replace (needs a transformers model)")
    _refuse_second_softcap(base, options)
    _refuse_accumulator_on_tensor_parallel(base, options)
    base.loss_function = functools.partial(memft_causal_lm_loss, **options)
    return model


def _refuse_accumulator_on_tensor_parallel(base: nn.Module, options: dict) -> None:
    """A ``MemFTAccumulator`` with a model loaded tensor-parallel by transformers (``tp_plan``): not
    built. Its sums and gradient reductions run over ``group`` (the world by default), where every
    rank of a tensor-parallel group holds the same batch (counted once per rank) and DTensor
    gradients; no test covers it, so it is refused rather than left silently wrong."""
    tp_size = getattr(base, "_tp_size", None) or 1
    if options.get("accumulator") is not None and tp_size > 1:
        raise ValueError(
            f"a MemFTAccumulator (exact_active_mean=True in add_memft_to_trainer) is not supported with a "
            f"tensor-parallel model (loaded with tp_plan, tp_size={tp_size}). Use the loss without it "
            f"(use_memft / apply_memft_to_model without accumulator; in add_memft_to_trainer, exact_active_mean=False)"
        )


def _refuse_second_softcap(base: nn.Module, options: dict) -> None:
    """A model that caps its own logits (Gemma-2/3's ``final_logit_softcapping``) hands the loss
    capped logits; a ``softcap`` option would cap them a second time."""
    model_softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    if model_softcap is not None and options.get("softcap") is not None:
        model_type = getattr(base.config, "model_type", type(base).__name__)
        raise ValueError(
            f"{model_type} already caps its logits (final_logit_softcapping={model_softcap}); do not pass softcap"
        )


def memft_compute_loss_func(**options) -> Callable:
    """A ``compute_loss_func`` for ``transformers.Trainer``: ``fn(outputs, labels, num_items_in_batch)``."""
    options = _checked_options(options, LOSS_OPTIONS)

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return memft_causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch, **options)

    return compute_loss


# --------------------------------------------------------------------------------------------
# The lm_head as one linear map (plain, frozen, LoRA-wrapped, modules_to_save)
# --------------------------------------------------------------------------------------------


class _HeadHooks:
    """accelerate's hooks (``_hf_hook``, put by ``dispatch_model`` / ``from_pretrained(device_map=...)`` /
    ``cpu_offload``) on the lm_head and on the modules inside it whose weights the fused loss reads
    without calling them. An ``AlignDevicesHook`` moves the module's input to its execution device in
    ``pre_forward`` and, with offload, loads the weights there (they sit on the meta device between
    calls); ``post_forward`` puts them back. ``enter`` runs ``pre_forward`` (returns the moved input),
    ``exit`` the ``post_forward`` of every entered hook, innermost first, on the loss -- after the
    loss's forward, as the model's own forward offloads the head after the logits: the autograd
    graph keeps the loaded weight for the backward either way. Modules the loss calls (LoRA's
    ``lora_A``, dropout) run their own hooks."""

    def __init__(self):
        self.entered = []
        self.refused = None  # a hook of a kind whose effect the fused loss cannot reproduce

    def enter(self, module: nn.Module, x: torch.Tensor):
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            return x
        if not _known_hook(hook):
            self.refused = f"{type(hook).__name__} on {type(module).__name__}"
            return None
        args, _ = hook.pre_forward(module, x)
        self.entered.append((module, hook))
        return args[0]

    def exit(self, output=None):
        while self.entered:
            module, hook = self.entered.pop()
            output = hook.post_forward(module, output)
        return output


def _known_hook(hook) -> bool:
    """accelerate's ``AlignDevicesHook`` (device placement, offload) and chains of them; not others (a
    hook that changes the output, casts weights in place or runs without grad: its effect on the
    logits is not what the fused loss computes)."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook

    if getattr(hook, "no_grad", False):
        return False
    if type(hook) is SequentialHook:
        return all(_known_hook(h) for h in hook.hooks)
    return type(hook) in (AlignDevicesHook, ModelHook)


def _head_as_linear(head: nn.Module, hidden: torch.Tensor, hooks: Optional[_HeadHooks] = None):
    """``(hidden2, weight, bias)`` with ``head(hidden) == hidden2 @ weight.T + bias``, or None when the
    head is of a kind this does not know (the caller then falls back to the materialized logits).

    A LoRA head ``x W^T + s B(A(drop(x)))`` is written as one linear map of the concatenation
    ``[x, s A(drop(x))]`` with weight ``[W, B]``: exact with dropout, gradients reach A and B
    through autograd, and the extra width is only the LoRA rank. ``hooks``: accelerate's hooks of
    the modules visited are entered there (``_HeadHooks``; the caller exits them).
    """
    hooks = _HeadHooks() if hooks is None else hooks
    hidden = hooks.enter(head, hidden)
    if hidden is None:
        return None
    if isinstance(head, nn.Linear):
        return hidden, head.weight, head.bias
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper
        active = list(getattr(head, "active_adapters", []))
        if getattr(head, "disable_adapters", False) or not active or active[0] not in head.modules_to_save:
            return _head_as_linear(head.original_module, hidden, hooks)
        return _head_as_linear(head.modules_to_save[active[0]], hidden, hooks)
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):  # peft LoRA layer
        base = _head_as_linear(head.base_layer, hidden, hooks)
        if base is None or getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
            return base
        x, weight, bias = base
        if is_dtensor(weight) and any(name in head.lora_A for name in head.active_adapters):
            # peft's own forward of such a head fails too (its lora_B has the local rows, the gathered
            # logits all of them): refuse here, at the call, rather than fail inside torch.cat.
            raise ValueError(
                "apply_memft_to_model: a LoRA-wrapped lm_head whose weight is a DTensor (a tensor-parallel model, "
                "tp_plan) is not supported: peft's LoRA does not shard with the vocabulary-parallel head. Leave "
                "lm_head out of LoRA's target_modules (LoRA on the decoder's projections works), or fine-tune the head "
                "itself (unwrapped)"
            )
        hidden_parts, weight_parts = [x], [weight]
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
                return None  # DoRA and other variants are not a plain low-rank sum
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            scaling = head.scaling[name]
            down = lora_a(head.lora_dropout[name](hidden.to(lora_a.weight.dtype))) * scaling
            down = hooks.enter(lora_b, down)  # lora_B's weight is read, not called: its hook loads it
            if down is None:
                return None
            hidden_parts.append(down.to(weight.dtype))
            weight_parts.append(lora_b.weight.to(weight.dtype))
            if lora_b.bias is not None:
                extra = (lora_b.bias * scaling).to(weight.dtype)
                bias = extra if bias is None else bias + extra
        if len(hidden_parts) == 1:
            return base
        devices = {str(t.device) for t in (*hidden_parts, *weight_parts)}
        if len(devices) > 1:
            raise ValueError(
                f"apply_memft_to_model: the LoRA-wrapped lm_head's base layer and adapter are on different devices "
                f"({', '.join(sorted(devices))}). With accelerate, apply peft (get_peft_model) before dispatching the "
                "model (dispatch_model, from_pretrained(device_map=...)): peft applied to an already offloaded head "
                "leaves the adapter's weights on the meta device with no hook to load them (the model's own forward "
                "fails there too)"
            )
        return torch.cat(hidden_parts, dim=-1), torch.cat(weight_parts, dim=1), bias
    return None


# --------------------------------------------------------------------------------------------
# The fused forward
# --------------------------------------------------------------------------------------------


def _output_class(decoder_output):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(decoder_output)}
    return CausalLMOutputWithCrossAttentions if "cross_attentions" in names else CausalLMOutputWithPast


def _fsdp2_head_call(self, compute, hidden):
    """Installed on an FSDP2-sharded lm_head as an FSDP forward method (see ``_fused_loss``)."""
    return compute(hidden)


def _fused_loss(model, hidden, labels, shift_labels, num_items_in_batch, options, model_softcap):
    head = model.lm_head
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp_module is not None and isinstance(head, fsdp_module):
        # FSDP2 (accelerate shards the lm_head as a unit of its own) gathers a unit's parameters
        # only around its forward methods, and this loss reads the head's weight without calling
        # head.forward: run it as a registered FSDP forward method of the head (all-gathered
        # weight, the backward hooks that reduce-scatter a LoRA head's gradients).
        if "_memft_head_call" not in vars(head):
            head._memft_head_call = _fsdp2_head_call.__get__(head)
            torch.distributed.fsdp.register_fsdp_forward_method(head, "_memft_head_call")
        return head._memft_head_call(
            lambda h: _fused_loss_here(model, h, labels, shift_labels, num_items_in_batch, options, model_softcap),
            hidden,
        )
    return _fused_loss_here(model, hidden, labels, shift_labels, num_items_in_batch, options, model_softcap)


def _plain_loss(result):
    """The loss as transformers' own is: a plain tensor. A tensor-parallel lm_head (``tp_plan``: its
    weight a ``Shard(0)`` DTensor) makes ``memft_linear_loss`` return a ``Replicate()`` DTensor, whose
    local value is the whole loss on every rank; ``to_local()`` is differentiable (the gradient
    returns as the replicated DTensor). A DTensor loss would not mix with the plain tensors a
    Trainer adds it to. ``result``: a loss, or ``(loss, stats)``."""
    loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
    if is_dtensor(loss):
        loss = loss.to_local()
    return loss if rest is None else (loss, *rest)


def _fused_loss_here(model, hidden, labels, shift_labels, num_items_in_batch, options, model_softcap):
    loss_options = {k: v for k, v in options.items() if k not in ("stats_callback", "accumulator")}
    callback = options.get("stats_callback")
    accumulator = options.get("accumulator")
    ignore_index = loss_options.pop("ignore_index", -100)
    if model_softcap is not None:
        loss_options["softcap"] = model_softcap
    if shift_labels is None:
        shift_labels = _shifted_labels(labels, ignore_index)
    hooks = _HeadHooks()
    try:
        parts = _head_as_linear(model.lm_head, hidden, hooks)
        if parts is not None:
            loss = _linear_head_loss(parts, shift_labels, num_items_in_batch, loss_options, callback, accumulator,
                                     ignore_index)
    except BaseException:
        hooks.exit()  # offloaded weights back to the meta device
        raise
    if parts is not None:
        return hooks.exit(loss)
    hooks.exit()  # the head's own forward below runs its hooks itself
    if hooks.refused is not None:
        reason = f"has an accelerate hook the fused loss does not reproduce ({hooks.refused})"
    else:
        reason = f"of type {type(model.lm_head).__name__} is not a (LoRA-wrapped) nn.Linear"
    warnings.warn(f"apply_memft_to_model: lm_head {reason}; computing the loss from materialized logits instead",
                  stacklevel=3)
    logits_options = {k: v for k, v in loss_options.items() if k not in LINEAR_OPTIONS}
    return memft_causal_lm_loss(
        model.lm_head(hidden), None, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index, stats_callback=callback, accumulator=accumulator, **logits_options,
    )


def _linear_head_loss(parts, shift_labels, num_items_in_batch, loss_options, callback, accumulator, ignore_index):
    """The loss of ``hidden2 @ weight.T + bias`` (``parts``, from ``_head_as_linear``) on the head's device."""
    x, weight, bias = parts
    if accumulator is not None and not torch.is_grad_enabled():
        num_items_in_batch = None  # as memft_causal_lm_loss: without gradient, the per-call active mean
    denominator = _denominator(num_items_in_batch, x.device)
    device_type = x.device.type
    # Under autocast the head would run in the autocast dtype; otherwise in the weight's dtype. A
    # device without autocast (meta: a shape-only forward) has none to ask about or to turn off.
    if not torch.amp.is_autocast_available(device_type):
        device_type = "cpu"
    if torch.is_autocast_enabled(device_type) and x.device.type != "meta":
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    if accumulator is not None and torch.is_grad_enabled():
        policy = loss_options.pop("policy", "hard")
        for name in ("normalize", "fallback"):
            loss_options.pop(name, None)
        bias = None if bias is None else bias.to(dtype)

        def linear_sum(**kw):
            with torch.autocast(device_type, enabled=False):
                return _plain_loss(memft_linear_loss(x.to(dtype), weight.to(dtype), shift_labels.to(x.device), bias,
                                                     ignore_index=ignore_index, reduction="sum", **loss_options, **kw))

        return _accumulated(accumulator, callback, linear_sum, policy)
    with torch.autocast(device_type, enabled=False):
        result = memft_linear_loss(
            x.to(dtype), weight.to(dtype), shift_labels.to(x.device), None if bias is None else bias.to(dtype),
            ignore_index=ignore_index, denominator=denominator, return_stats=callback is not None, **loss_options,
        )
    result = _plain_loss(result)
    if callback is None:
        return result
    loss, stats = result
    callback(stats)
    return loss


_SIGNATURES: dict = {}


def _forward_signature(forward):
    key = getattr(forward, "__func__", forward)
    if key not in _SIGNATURES:
        signature = inspect.signature(forward)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD), None)
        _SIGNATURES[key] = (signature, var_kw)
    return _SIGNATURES[key]


def _without_self(model, args):
    """``args`` without a leading ``model``: accelerate binds a forward that has no ``__func__`` as a
    method of its model (``MethodType(forward, model)``, e.g. ``unwrap_model(keep_fp32_wrapper=False)``
    after mixed precision), so the patch is then called with the model first."""
    return args[1:] if args and args[0] is model else args


class _ClassForward:
    """``model``'s class forward bound to ``model``: what ``model.forward`` was before the patch, in a
    form that pickles. (A bound method pickles as ``getattr(model, "forward")``, which after the patch
    is the patch itself, so a saved model would call itself forever.)"""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        return type(self.model).forward(self.model, *_without_self(self.model, args), **kwargs)

    @property
    def __func__(self):  # as a bound method has: the plain function (the signature cache's key)
        return type(self.model).forward

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward.__get__(self.model))


class _ReplicateWithPatch:
    """``model._replicate_for_data_parallel`` (what ``nn.DataParallel``'s ``replicate`` calls per module,
    e.g. the Trainer with several GPUs and no torchrun): the replica is a shallow copy of the model's
    ``__dict__``, so its patch would still hold (and run) the original model, on the first device's
    parameters; here the replica's patch objects hold the replica instead."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self):
        model = self.model
        replica = type(model)._replicate_for_data_parallel(model)
        state = vars(replica)
        state.pop("_replicate_for_data_parallel", None)
        for name in ("forward", "_old_forward", "_memft_original_forward"):
            patch = state.get(name)
            if isinstance(patch, (_FusedForward, _ClassForward)) and patch.model is model:
                state[name] = type(patch)(replica)
        return replica


class _FusedForward:
    """``model.forward`` after ``apply_memft_to_model``: the causal LM's forward with the loss computed
    from the last hidden states (no logits) when training with labels, else the previous forward.

    A plain object holding the model (not a closure), so that ``copy.deepcopy``, ``torch.save`` and
    pickling of the model keep the patch; its signature is the previous forward's (the Trainer reads
    it to decide which dataset columns reach the model). The previous forward and the options live
    on the model (``_memft_original_forward``, ``_memft_options``).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self):
        return inspect.signature(self.model._memft_original_forward)

    def __call__(self, *args, **kwargs):
        model = self.model
        args = _without_self(model, args)
        original = model._memft_original_forward
        signature, var_kw = _forward_signature(original)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        if var_kw is not None:
            arguments.update(arguments.pop(var_kw, {}))
        labels = arguments.get("labels")
        shift_labels = arguments.get("shift_labels")
        keep = arguments.get("logits_to_keep", 0)
        fused = (
            model.training
            and (labels is not None or shift_labels is not None)
            and isinstance(keep, int) and keep == 0
            and arguments.get("return_dict", True) is not False
        )
        if not fused:
            return original(*args, **kwargs)
        for name in ("labels", "shift_labels", "logits_to_keep", "return_dict"):
            arguments.pop(name, None)
        num_items_in_batch = arguments.pop("num_items_in_batch", None)
        decoder = getattr(model, model.base_model_prefix)
        outputs = decoder(**arguments)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        loss = _fused_loss(model, outputs.last_hidden_state, labels, shift_labels, num_items_in_batch,
                           model._memft_options, softcap)
        cls = _output_class(outputs)
        carried = {f.name for f in dataclasses.fields(cls)} - {"loss", "logits"}
        fields = {name: getattr(outputs, name) for name in carried if hasattr(outputs, name)}
        return cls(loss=loss, logits=None, **fields)


def apply_memft_to_model(model: nn.Module, fused_linear: bool = True, **options) -> nn.Module:
    """Train ``model`` (a transformers causal LM, or a peft ``PeftModel`` around one) with MemFT.

    Always sets ``model.loss_function`` (``use_memft``). With ``fused_linear=True`` the training
    forward with labels also skips the logits: it runs the decoder, then ``memft_linear_loss`` on
    the last hidden states and the lm_head's weight (Gemma-2/3's ``final_logit_softcapping`` becomes
    the loss's ``softcap``); it returns ``logits=None``. ``chunk_size`` / ``memory_budget_bytes``
    set the chunking. Calling it again replaces the options. Returns ``model``.

    A model dispatched by accelerate (``from_pretrained(device_map=...)``, ``dispatch_model``,
    ``cpu_offload``), before or after this call: the lm_head's hooks load an offloaded weight and move
    the hidden states to the head's device around the fused loss (``_HeadHooks``), and the patch goes
    under a hook on the model itself (``_forward_slot``).
    """
    options = _checked_options(options, LOSS_OPTIONS + LINEAR_OPTIONS)
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"apply_memft_to_model supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r} "
            f"({type(base).__name__}). use_memft(model) works with any causal LM (logits materialized)."
        )
    if not hasattr(base, "lm_head") or not hasattr(base, getattr(base, "base_model_prefix", "") or "\0"):
        raise ValueError(f"{type(base).__name__} has no lm_head / decoder: pass a *ForCausalLM model")
    use_memft(base, **{k: v for k, v in options.items() if k not in LINEAR_OPTIONS})
    slot = _forward_slot(base)
    if "_memft_original_forward" not in vars(base):
        # an instance wrapper already there (e.g. accelerate's mixed precision), or the class's own forward
        previous = vars(base).get(slot)
        if _is_class_forward(previous, base):
            previous = None  # a bound method pickles as getattr(model, "forward"): the patch itself
        base._memft_original_forward = previous or _ClassForward(base)
    base._memft_options = options
    # fused_linear=False undoes an earlier fused patch
    setattr(base, slot, _FusedForward(base) if fused_linear else base._memft_original_forward)
    base._replicate_for_data_parallel = _ReplicateWithPatch(base)
    return model


def _forward_slot(base: nn.Module) -> str:
    """Where the patch goes. accelerate's ``add_hook_to_module`` (``dispatch_model``,
    ``from_pretrained(device_map=...)``, ``cpu_offload``, ``cpu_offload_with_hook``) replaces
    ``model.forward`` by a wrapper that runs the hook's ``pre_forward`` (inputs to the execution
    device, the model onto it), then ``model._old_forward``, then ``post_forward`` (outputs back to
    the input's device); ``remove_hook_from_module`` puts ``_old_forward`` back as ``model.forward``.
    The patch goes in ``_old_forward`` then, inside the hook: the hook runs around the fused forward
    (as it does when the hook comes after the patch), and removing the hook leaves the patch."""
    if getattr(base, "_hf_hook", None) is not None and "_old_forward" in vars(base):
        return "_old_forward"
    return "forward"


def _is_class_forward(forward, base: nn.Module) -> bool:
    return (isinstance(forward, types.MethodType) and forward.__self__ is base
            and forward.__func__ is type(base).forward)


def _restore_original_forward(model: nn.Module) -> None:
    """Undo ``apply_memft_to_model``'s fused forward (keeps ``use_memft``'s loss function)."""
    base = unwrap_model(model)
    if "_memft_original_forward" in vars(base):
        setattr(base, _forward_slot(base), base._memft_original_forward)
