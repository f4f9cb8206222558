"""Where the training loss gets its logits: materialized, or fused into the loss (``--fused-head``).

A forward returns a *head*: something the MemFT loss is computed from.

* ``LogitsHead``: the model's own forward, the N x V logits, ``memft_loss`` on them.
* ``FusedHead``: the decoder's last hidden states and the ``lm_head`` weight; ``memft_linear_loss``
  computes the loss and every per-token statistic (ce, prob, pred, lse, weight) chunk by chunk,
  so the N x V logits never exist. The loop reads recall, the memft-sw window and the phase data
  from those statistics: no second forward.

Default (``fused_head=None``): fused when the step's logits would hold at least
``FUSED_HEAD_AUTO_ELEMENTS`` = 2^26 elements (V x tokens per rank and micro-batch; 256 MiB in
float32, e.g. V = 32000 at 2048 tokens, V = 151936 at 442 tokens), the ``lm_head`` is a plain
``nn.Linear`` (a LoRA-wrapped head needs the materialized logits here) and the model's family is
one whose logits are the head's output and nothing else (``known_head``; ``--fused-head`` and
``--compile`` are refused for the others).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..integrations.transformers import SUPPORTED_MODEL_TYPES, unwrap_model
from ..linear_loss import memft_linear_loss
from ..loss import memft_loss
from .config import TrainConfig, TrainInputError

FUSED_HEAD_AUTO_ELEMENTS = 1 << 26


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class LogitsHead:
    """Materialized logits [B, T, V]."""

    fused = False

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def loss(self, labels, **options):
        return memft_loss(self.logits, labels, **options)

    def argmax(self) -> torch.Tensor:
        return self.logits.detach().argmax(-1)

    def accepts(self, name: str) -> bool:
        return _accepts(memft_loss, name)


class FusedHead:
    """Last hidden states [B, T, D] and the head's weight [V, D] (+ bias, + the model's softcap)."""

    fused = True

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias, softcap=None):
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, softcap

    def loss(self, labels, **options):
        if self.softcap is not None:
            options["softcap"] = self.softcap
        return memft_linear_loss(self.hidden, self.weight, labels, self.bias, **options)

    def argmax(self) -> torch.Tensor:
        """Each row's argmax, from one more chunked pass over the head (no logits kept)."""
        with torch.no_grad():
            labels = torch.zeros(self.hidden.shape[:-1], dtype=torch.long, device=self.hidden.device)
            _, stats = self.loss(labels, policy="none", reduction="sum", return_stats=True, validate=False)
        return stats.pred

    def accepts(self, name: str) -> bool:
        return _accepts(memft_linear_loss, name)


def head_module(model) -> nn.Module:
    return unwrap_model(model).lm_head


def known_head(model) -> bool:
    """Whether the model's logits are ``lm_head(last hidden)`` (+ ``final_logit_softcapping``) and
    nothing else: the families ``apply_memft_to_model`` supports. Others (Cohere's ``logit_scale``,
    Granite's ``logits_scaling``, ...) change the logits in their own forward, which a loss computed
    from the decoder's output and the head's weight would silently leave out."""
    return getattr(unwrap_model(model).config, "model_type", None) in SUPPORTED_MODEL_TYPES


def can_fuse(model) -> bool:
    """Whether the head is a plain nn.Linear (not LoRA-wrapped, not a custom module) of a known family."""
    return type(head_module(model)) is nn.Linear and known_head(model)


def use_fused_head(config: TrainConfig, model, tokens_per_forward: int) -> bool:
    """The ``--fused-head`` decision for this run (see the module docstring for the default)."""
    vocab = head_module(model).weight.shape[0]
    if config.fused_head is None:
        return can_fuse(model) and vocab * tokens_per_forward >= FUSED_HEAD_AUTO_ELEMENTS
    if config.fused_head and not known_head(model):
        raise TrainInputError(_unknown_head_message(model, "--fused-head") + "; use --no-fused-head")
    if config.fused_head and not can_fuse(model):
        raise TrainInputError(f"--fused-head needs a plain nn.Linear lm_head; this one is "
                              f"{type(head_module(model)).__name__} (lm_head in --target-modules?); use --no-fused-head")
    return bool(config.fused_head)


def check_compile(config: TrainConfig, model) -> None:
    """``--compile`` runs the compiled decoder and applies the head itself: known families only."""
    if config.compile and not known_head(model):
        raise TrainInputError(_unknown_head_message(model, "--compile"))


def _unknown_head_message(model, flag: str) -> str:
    model_type = getattr(unwrap_model(model).config, "model_type", None)
    return (f"{flag} computes the logits from the decoder's last hidden states and the lm_head, which is exact "
            f"for the model types {', '.join(SUPPORTED_MODEL_TYPES)}; this model is {model_type!r}, whose forward "
            f"may change its logits (scaling, capping) in ways the loss would miss")


def autocast_context(config: TrainConfig, device: torch.device):
    if config.autocast == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_head(model, input_ids, attention_mask, fused: bool, decoder=None, autocast: bool = False):
    """One forward to the head: ``FusedHead`` (decoder only) or ``LogitsHead`` (the model's forward).

    ``decoder`` replaces the model's decoder module (the compiled one under ``--compile``).
    Under autocast the fused head runs in bfloat16, as the lm_head would.
    """
    base = unwrap_model(model)
    if not fused and decoder is None:
        return LogitsHead(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)
    decoder = decoder if decoder is not None else getattr(base, base.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = base.lm_head
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if not fused:  # the compiled decoder, then the model's own head
        logits = head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return LogitsHead(logits)
    weight, bias = head.weight, head.bias
    if autocast:
        dtype = torch.bfloat16
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return FusedHead(hidden, weight, bias, softcap)
