"""Option names, input validation and the statistics type of the MemFT loss (docs/SPEC.md).

This module imports nothing of the package: every backend and every integration shares it.
Validation raises where the bad value enters, naming the argument, the value and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch

POLICIES = ("none", "hard", "sigmoid")
REDUCTIONS = ("none", "sum", "mean")
NORMALIZES = ("active", "valid")
FALLBACKS = ("mean", "zero")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class KernelOptions:
    """The per-row part of the loss: everything a kernel needs to know, nothing about reduction.

    Every backend's ``row_forward`` / ``row_backward`` / ``row_forward_backward`` takes one of these.
    """

    policy: str = "hard"
    threshold: float = 0.5
    sharpness: float = 10.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None

    @property
    def ce_threshold(self) -> float:
        """ln(1/threshold): ce above this means p below threshold."""
        return -math.log(self.threshold)


class RowStats(NamedTuple):
    """What a backend's row_forward returns; each a 1-D tensor of N rows.

    lse, ce, prob, loss, weight are float32 (float64 for float64 logits on the reference);
    pred is int64. At ignored rows lse = ce = prob = loss = 0 and weight = 0 (pred is still the
    row's argmax). ``loss`` is the unweighted l_i of SPEC.md; ``weight`` is the policy weight times
    token_weight, with the NaN rule (w = 1 where ce is NaN) applied before token_weight.
    """

    lse: torch.Tensor
    ce: torch.Tensor
    prob: torch.Tensor
    pred: torch.Tensor
    weight: torch.Tensor
    loss: torch.Tensor


@dataclass
class MemFTStats:
    """Per-row and summary statistics returned by ``memft_loss(..., return_stats=True)``.

    Per-row fields have the shape of ``target``. ``weight``, ``n_active`` and ``weight_sum`` are the
    policy's (times token_weight), before any fallback. Every field is a tensor on the logits'
    device: reading them is the caller's choice of when to synchronize.
    """

    ce: torch.Tensor
    prob: torch.Tensor
    lse: torch.Tensor
    weight: torch.Tensor
    pred: torch.Tensor
    n_valid: torch.Tensor
    n_active: torch.Tensor
    weight_sum: torch.Tensor
    fell_back: torch.Tensor
    recalled_frac: torch.Tensor
    token_accuracy: torch.Tensor

    @classmethod
    def from_rows(cls, lead_shape, target, ignore_index: int, lse, ce, prob, pred, weight, fell_back) -> "MemFTStats":
        """Build the statistics from a backend's 1-D row outputs (tensor ops only: no host sync)."""
        valid = target != ignore_index
        n_valid = valid.sum()
        denom = n_valid.clamp_min(1).to(prob.dtype)
        return cls(
            ce=ce.reshape(lead_shape),
            prob=prob.reshape(lead_shape),
            lse=lse.reshape(lead_shape),
            weight=weight.reshape(lead_shape),
            pred=pred.reshape(lead_shape),
            n_valid=n_valid,
            n_active=(weight > 0).sum(),
            weight_sum=weight.sum(),
            fell_back=fell_back,
            recalled_frac=((prob > 0.5) & valid).sum().to(prob.dtype) / denom,
            token_accuracy=((pred == target.long()) & valid).sum().to(prob.dtype) / denom,
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> dict:
        """The 0-d statistics as Python numbers (synchronizes)."""
        return {
            name: getattr(self, name).item()
            for name in ("n_valid", "n_active", "weight_sum", "fell_back", "recalled_frac", "token_accuracy")
        }


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def validate_options(
    *,
    policy: str,
    threshold: float,
    sharpness: float,
    reduction: str,
    normalize: str,
    fallback: str,
    label_smoothing: float,
    z_loss: float,
    softcap,
    backend: str,
    ignore_index: int,
) -> KernelOptions:
    """Check the scalar options of SPEC.md and return the per-row part as KernelOptions."""
    _choice("policy", policy, POLICIES)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("normalize", normalize, NORMALIZES)
    _choice("fallback", fallback, FALLBACKS)
    _choice("backend", backend, BACKENDS)
    threshold = _number(threshold, "threshold")
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    sharpness = _number(sharpness, "sharpness")
    if not (sharpness > 0.0 and math.isfinite(sharpness)):
        raise ValueError(f"sharpness={sharpness!r} must be a finite number > 0")
    label_smoothing = _number(label_smoothing, "label_smoothing")
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    z_loss = _number(z_loss, "z_loss")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss={z_loss!r} must be a finite number >= 0")
    if softcap is not None:
        softcap = _number(softcap, "softcap")
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"softcap={softcap!r} must be a finite number > 0 (or None for no cap)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index={ignore_index!r} must be an int")
    return KernelOptions(
        policy=policy,
        threshold=threshold,
        sharpness=sharpness,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def validate_denominator(denominator):
    """None, a positive number, or a positive 0-d tensor (checked on the host only if it is a number
    or a CPU tensor: a device tensor is not synchronized)."""
    if denominator is None:
        return None
    if isinstance(denominator, torch.Tensor):
        if denominator.numel() != 1:
            raise ValueError(f"denominator must be a number or a 0-d tensor, got shape {tuple(denominator.shape)}")
        if denominator.device.type == "cpu" and not (float(denominator) > 0):
            raise ValueError(f"denominator={float(denominator)!r} must be > 0")
        return denominator
    d = _number(denominator, "denominator")
    if not (d > 0 and math.isfinite(d)):
        raise ValueError(f"denominator={denominator!r} must be a finite number > 0")
    return d


def validate_tensors(logits: torch.Tensor, target: torch.Tensor, token_weight, *, check_values: bool) -> None:
    """The tensor rows of SPEC.md's bad-input table. ``check_values`` gates the checks that read
    tensor contents (and so synchronize): target range and token_weight values."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be floating point (float16, bfloat16, float32 or float64), got {logits.dtype}")
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"target must be an integer tensor (int32 or int64), got {target.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the class dimension, last)")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has V=0 classes (shape {tuple(logits.shape)}); V must be >= 1")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target.shape={tuple(target.shape)} must equal logits.shape[:-1]={tuple(logits.shape[:-1])}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}; put both on one device")
    if token_weight is not None:
        if not isinstance(token_weight, torch.Tensor):
            raise ValueError(f"token_weight must be a tensor of shape {tuple(target.shape)}, got {type(token_weight).__name__}")
        if token_weight.device != logits.device:
            raise ValueError(f"token_weight is on {token_weight.device} but logits are on {logits.device}")
        if tuple(token_weight.shape) != tuple(target.shape):
            raise ValueError(
                f"token_weight.shape={tuple(token_weight.shape)} must equal target.shape={tuple(target.shape)}"
            )
        if not token_weight.is_floating_point():
            raise ValueError(f"token_weight must be floating point, got {token_weight.dtype}")
        if check_values and token_weight.numel() > 0:
            bad = ~torch.isfinite(token_weight) | (token_weight < 0)
            if bool(bad.any()):
                value = token_weight[bad].flatten()[0].item()
                raise ValueError(f"token_weight must be finite and >= 0; found {value!r}")


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, V) that is not ignore_index (synchronizes)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0].item())
        raise ValueError(
            f"target contains {value}, outside [0, V) with V={num_classes} "
            f"(and not ignore_index={ignore_index})"
        )
