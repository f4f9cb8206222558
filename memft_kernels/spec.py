"""Option names, input validation and the statistics type of the MemFT loss (docs/SPEC.md).

This module imports nothing of the package: every backend and every integration shares it.
Validation raises where the bad value enters, naming the argument, the value and what is allowed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple, Optional

import torch

POLICIES = ("none", "hard", "sigmoid")
REDUCTIONS = ("none", "sum", "mean")
NORMALIZES = ("active", "valid")
FALLBACKS = ("mean", "zero")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
# Target dtypes accepted at the API (F.cross_entropy also takes uint8); uint8 becomes int32 there.
TARGET_DTYPES = INT_DTYPES + (torch.uint8,)
# Every float option reaches the kernels as a float32: a value float32 rounds to 0 or inf would
# silently change the math (a sharpness of 1e39 is inf there, and inf * 0 is a NaN weight).
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)
# The policy as the integer every compiled kernel takes (Triton constexpr, csrc RowOptions.policy).
POLICY_CODES = {"none": 0, "hard": 1, "sigmoid": 2}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row statistics and reductions: float64 for float64 inputs (the tests' ground
    truth), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    # The whole vocabulary V of the label-smoothing term eps / V; None: the logits' own width. The
    # vocab-parallel loss passes the global V, so one kernel serves a vocabulary slice.
    vocab_size: Optional[int] = None

    @property
    def ce_threshold(self) -> float:
        """ln(1/threshold): ce above this means p below threshold."""
        return -math.log(self.threshold)

    def inv_vocab(self, n_cols: int) -> float:
        """1 / V for the eps / V term, V the global vocabulary (``vocab_size``) or ``n_cols``."""
        return 1.0 / (self.vocab_size if self.vocab_size is not None else max(1, n_cols))

    def scalars(self, n_cols: int) -> "KernelScalars":
        """These options as the plain scalars every compiled kernel takes (softcap 0.0: none)."""
        return KernelScalars(
            POLICY_CODES[self.policy], float(self.threshold), float(self.ce_threshold), float(self.sharpness),
            int(self.ignore_index), float(self.label_smoothing), float(self.inv_vocab(n_cols)), float(self.z_loss),
            float(self.softcap or 0.0),
        )


class KernelScalars(NamedTuple):
    """KernelOptions as the arguments of the custom ops and kernels (Triton and native alike)."""

    policy: int
    threshold: float
    ce_threshold: float
    sharpness: float
    ignore_index: int
    label_smoothing: float
    inv_vocab: float
    z_loss: float
    softcap: float  # 0.0: no soft cap


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


def _finite(x) -> bool:
    """math.isfinite written with comparisons, which torch.compile(dynamic=True) traces on a
    symbolic float (math.isfinite it cannot)."""
    return x == x and -math.inf < x < math.inf


def _float32_range(value: float, name: str, what: str) -> None:
    """Refuse a positive option that float32 (what every kernel computes in) would make inf or 0."""
    if value > _F32_MAX or 0.0 < value < _F32_TINY:
        raise ValueError(f"{name}={value!r} must be {what} within float32's range "
                         f"[{_F32_TINY:.3g}, {_F32_MAX:.3g}] (the kernels compute in float32)")


def _number(value, name: str) -> float:
    # bool is an int and "0.5" converts with float(): both are mistakes, not numbers.
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _integer(value, name: str) -> int:
    """An int in int64's range (the kernels' and the targets' type), or anything that is one exactly
    (numpy integers, a one-element integer tensor), as F.cross_entropy takes them; never a bool or a
    float."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{name}={value} is outside int64's range [{_INT64[0]}, {_INT64[1]}]")
        return value
    if torch.compiler.is_compiling():
        # Dynamo traces a numpy integer or a tensor as a symbolic value, which the compiled kernels'
        # integer argument cannot take.
        raise ValueError(f"{name} must be a Python int under torch.compile: pass int({name})")
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool:
            return int(value.item())
    elif not isinstance(value, bool):
        try:
            index = operator.index(value)
        except TypeError:
            pass
        else:
            return _integer(index, name)
    raise ValueError(f"{name}={value!r} must be an int")


def _kernel_options(o: "LossOptions") -> KernelOptions:
    """Check the scalar options of SPEC.md and return the per-row part as KernelOptions."""
    _choice("policy", o.policy, POLICIES)
    _choice("reduction", o.reduction, REDUCTIONS)
    _choice("normalize", o.normalize, NORMALIZES)
    _choice("fallback", o.fallback, FALLBACKS)
    _choice("backend", o.backend, BACKENDS)
    threshold = _number(o.threshold, "threshold")
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    _float32_range(threshold, "threshold", "in (0, 1] and")
    sharpness = _number(o.sharpness, "sharpness")
    if not (sharpness > 0.0 and _finite(sharpness)):
        raise ValueError(f"sharpness={sharpness!r} must be a finite number > 0")
    _float32_range(sharpness, "sharpness", "a number > 0")
    label_smoothing = _number(o.label_smoothing, "label_smoothing")
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    z_loss = _number(o.z_loss, "z_loss")
    if not (z_loss >= 0.0 and _finite(z_loss)):
        raise ValueError(f"z_loss={z_loss!r} must be a finite number >= 0")
    _float32_range(z_loss, "z_loss", "0 or a number > 0")
    softcap = o.softcap
    if softcap is not None:
        softcap = _number(softcap, "softcap")
        if not (softcap > 0.0 and _finite(softcap)):
            raise ValueError(f"softcap={softcap!r} must be a finite number > 0 (or None for no cap)")
        _float32_range(softcap, "softcap", "a number > 0")
    ignore_index = _integer(o.ignore_index, "ignore_index")
    if o.weight_fn is not None and not callable(o.weight_fn):
        raise TypeError(f"weight_fn must be callable (fn(target, stats) -> tensor) or None, got {type(o.weight_fn).__name__}")
    return KernelOptions(
        policy=o.policy,
        threshold=threshold,
        sharpness=sharpness,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


# ------------------------------------------------------------------------ the options, once
# One line of documentation per option; the entry points' docstrings get it appended.
OPTION_DOCS = {
    "policy": '"hard" (w = [p < threshold], MemFT-OT), "sigmoid" (w = sigmoid(sharpness (ce - ln 1/threshold))) '
              'or "none" (w = 1: cross-entropy)',
    "threshold": "probability threshold tau in (0, 1] of the hard and sigmoid policies",
    "sharpness": "steepness k > 0 of the sigmoid gate",
    "reduction": '"mean", "sum" or "none" (per-token w_i l_i in target\'s shape)',
    "normalize": 'denominator of "mean": "active" (sum of weights) or "valid" (non-ignored tokens)',
    "denominator": "a fixed denominator for \"mean\" (number or 0-d tensor > 0), e.g. the tokens of a whole "
                   "accumulated batch; overrides normalize (\"sum\" and \"none\" ignore it)",
    "fallback": 'when every weight is 0 under "active": "mean" (plain mean CE over valid tokens) or "zero"',
    "ignore_index": "target value that marks a token as ignored (weight 0, no gradient)",
    "label_smoothing": "eps in [0, 1): l = (1 - eps) ce + eps (lse - mean logit); the gate still uses ce",
    "z_loss": "coefficient >= 0 of the z-loss z * lse^2 added to each token's loss",
    "softcap": "cap c > 0: logits become c tanh(x / c) before everything else; None for no cap",
    "return_stats": "also return MemFTStats (per-token ce, prob, pred, lse, weight and summaries)",
    "validate": "check target range and token_weight values (reads tensor contents, so it synchronizes); "
                "False under torch.compile(fullgraph=True) and CUDA graphs",
    "inplace_backward": "write the gradient into the logits' storage (they are consumed, on the single-pass path "
                        "already by the forward call; saves an N x V buffer; an nn.Parameter is refused)",
    "backend": '"auto", "torch" (reference), "triton", "cuda" or "cpu"',
    "weight_fn": "fn(target, stats) -> a float tensor broadcastable to target that multiplies the policy weight; "
                 "called once per forward with this forward's MemFTStats (docs/SPEC.md, weight_fn)",
    "dp_group": "a data-parallel process group: with reduction=\"mean\", normalize \"active\" or \"valid\" and no "
                "denominator, the denominator and the fallback decision are summed over it (one all_reduce; every "
                "rank of it must call), so each rank's loss is its share of the global mean (their sum is the "
                "mean over all ranks' tokens); no effect otherwise (docs/SPEC.md, dp_group)",
}


@dataclass(frozen=True)
class LossOptions:
    """Every option of the MemFT loss with its default: the one source that ``memft_loss``,
    ``memft_linear_loss``, ``vocab_parallel_memft_loss``, ``MemFTLoss`` and the integrations take
    their defaults and validation from (each keeps explicit keywords; ``takes_loss_options``
    checks at import that their defaults are these). Documentation: ``OPTION_DOCS``."""

    policy: str = "hard"
    threshold: float = 0.5
    sharpness: float = 10.0
    reduction: str = "mean"
    normalize: str = "active"
    denominator: Any = None
    fallback: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    return_stats: bool = False
    validate: bool = True
    inplace_backward: bool = False
    backend: str = "auto"
    weight_fn: Optional[Callable] = None
    dp_group: Any = None

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, where: str, **kwargs) -> "LossOptions":
        """LossOptions from keywords; TypeError naming ``where`` for a keyword that is no option."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{where} got unknown option(s) {unknown}; options: {', '.join(cls.names())}")
        return cls(**kwargs)

    def kernel_options(self) -> KernelOptions:
        """Validate every option (ValueError naming the option, the value and what is allowed) and
        return the per-row part."""
        return _kernel_options(self)

    def checked(self) -> "CheckedOptions":
        """Every option validated: the per-row KernelOptions and the checked denominator."""
        return CheckedOptions(self, self.kernel_options(), validate_denominator(self.denominator))


class CheckedOptions(NamedTuple):
    options: LossOptions
    kernel: KernelOptions
    denominator: Any  # None, a float, or a 0-d tensor


def takes_loss_options(*, exclude=()):
    """Decorator for a public entry point with explicit keyword options: checks at import that every
    parameter named like a LossOptions field defaults to that field's default (so the defaults
    cannot drift apart) and appends those options' documentation to the docstring."""
    import inspect

    defaults = LossOptions()

    def wrap(fn):
        shared = []
        for name, param in inspect.signature(fn).parameters.items():
            if name in OPTION_DOCS and name not in exclude:
                if param.default != getattr(defaults, name):
                    raise AssertionError(f"{fn.__qualname__}: default {name}={param.default!r} differs from "
                                         f"LossOptions.{name}={getattr(defaults, name)!r}")
                shared.append(name)
        lines = [f"    {name}: {OPTION_DOCS[name]} (default {getattr(defaults, name)!r})" for name in shared]
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n    Options (spec.LossOptions):\n" + "\n".join(lines) + "\n"
        return fn

    return wrap


def validate_denominator(denominator):
    """None, a positive number, or a positive 0-d tensor. A number or a CPU tensor is checked here; the
    value of a tensor on another device is checked by ``prepare_call`` when ``validate=True`` (it
    synchronizes), never with ``validate=False``."""
    if denominator is None:
        return None
    if isinstance(denominator, torch.Tensor):
        if denominator.numel() != 1:
            raise ValueError(f"denominator must be a number or a 0-d tensor, got shape {tuple(denominator.shape)}")
        if denominator.dtype == torch.bool:
            raise ValueError(f"denominator must be a number or a numeric 0-d tensor, got {denominator!r}")
        if denominator.device.type == "cpu" and not torch.compiler.is_compiling():
            check_denominator_value(denominator)
        return denominator
    d = _number(denominator, "denominator")
    if not (d > 0 and _finite(d)):
        raise ValueError(f"denominator={denominator!r} must be a finite number > 0")
    _float32_range(d, "denominator", "a number > 0")
    return d


def has_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds data the host can read: not a meta tensor, not a fake tensor (shape-only
    tracing, e.g. torch.export). The value checks skip tensors without data; the shape checks still run."""
    return tensor.device.type != "meta" and not torch._subclasses.fake_tensor.is_fake(tensor)


def validate_tensors(logits: torch.Tensor, target: torch.Tensor, token_weight, *, check_values: bool) -> None:
    """The tensor rows of SPEC.md's bad-input table. ``check_values`` gates the checks that read
    tensor contents (and so synchronize): target range and token_weight values."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be floating point (float16, bfloat16, float32 or float64), got {logits.dtype}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be an integer tensor (int64, int32 or uint8), got {target.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the class dimension, last)")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has V=0 classes (shape {tuple(logits.shape)}); V must be >= 1")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        hint = ""
        if logits.dim() >= 3 and tuple(target.shape) == tuple(logits.shape[:1] + logits.shape[2:]):
            # nn.CrossEntropyLoss's [B, V, T] layout: the class dimension must be last here.
            hint = "; the class dimension goes last here: for [B, V, T] logits pass logits.movedim(1, -1)"
        raise ValueError(
            f"target.shape={tuple(target.shape)} must equal logits.shape[:-1]={tuple(logits.shape[:-1])}{hint}"
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
        if token_weight.requires_grad and torch.is_grad_enabled():
            # It would silently get no gradient (the weights are constants of the loss, as
            # F.cross_entropy's class weight, which refuses a weight that requires grad too).
            raise ValueError("token_weight requires grad, but the loss treats weights as constants and gives it no "
                             "gradient: pass token_weight.detach()")
        if check_values:
            _check_token_weight_values(token_weight)


# The checks that read tensor values on the host. torch.compile runs them eagerly (a graph break);
# under fullgraph=True that is an error, and this reason is its message.
READS_VALUES = ("validate=True checks tensor values on the host (a synchronization), which "
                 "torch.compile(fullgraph=True) cannot trace: pass validate=False to memft_loss (or the "
                 "other MemFT entry points) inside a fullgraph-compiled function")


@torch.compiler.disable(reason=READS_VALUES)
def _check_token_weight_values(token_weight: torch.Tensor) -> None:
    if token_weight.numel() > 0 and has_values(token_weight):
        bad = ~torch.isfinite(token_weight) | (token_weight < 0)
        if bool(bad.any()):
            value = token_weight[bad].flatten()[0].item()
            raise ValueError(f"token_weight must be finite and >= 0; found {value!r}")


@torch.compiler.disable(reason=READS_VALUES)
def check_denominator_value(denominator: torch.Tensor) -> None:
    """Raise ValueError unless the 0-d tensor ``denominator`` is finite, > 0 and within float32's
    range (synchronizes when it is on a device; a meta or fake tensor has no value to check)."""
    if not has_values(denominator):
        return
    d = float(denominator)
    if not (d > 0 and _finite(d)):
        raise ValueError(f"denominator={d!r} must be a finite number > 0")
    _float32_range(d, "denominator", "a number > 0")


@torch.compiler.disable(reason=READS_VALUES)
def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, V) that is not ignore_index (synchronizes)."""
    if target.numel() == 0 or not has_values(target):
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0].item())
        raise ValueError(
            f"target contains {value}, outside [0, V) with V={num_classes} "
            f"(and not ignore_index={ignore_index})"
        )


# ------------------------------------------------------------------ autograd guards
DOUBLE_BACKWARD = ("the MemFT loss has no second derivative (its kernels are differentiated once): a double "
                   "backward (create_graph=True then a backward through the gradient, or nested torch.func "
                   "transforms) is not supported; use F.cross_entropy for a term that needs one")


def keep_outer_inputs(ctx, *inputs) -> None:
    """In a ``setup_context`` under a torch.func transform: remember the differentiable ``inputs``
    whose tensors outside the transform require grad (e.g. an ``nn.Parameter`` the transformed
    function closes over), for ``once_differentiable_grads`` to attach the gradient to them. A
    plain call stores nothing."""
    if torch._C._are_functorch_transforms_active():
        ctx.memft_outer_inputs = tuple(t for t in inputs if isinstance(t, torch.Tensor) and _outer_requires_grad(t))


def _outer_requires_grad(t: torch.Tensor) -> bool:
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


class _NoSecondDerivative(torch.autograd.Function):
    """``grad`` (a copy), attached to ``anchor`` (an exact 0 with the history of the inputs outside a
    torch.func transform), through a node that raises DOUBLE_BACKWARD when differentiated. An
    autograd.Function, unlike DelayedError (a node outside the dispatcher, which stays on the
    transform's own level), is recorded on the levels below the transform too."""

    @staticmethod
    def forward(grad, anchor):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(DOUBLE_BACKWARD)


def once_differentiable_grads(*grads, ctx=None):
    """The gradients a MemFT autograd.Function returns, made to refuse a second derivative.

    Under ``create_graph=True`` a gradient returned as a plain tensor would have no history, so a
    gradient penalty through it would silently lose this term; here it is the output of a node that
    raises DOUBLE_BACKWARD when differentiated (what ``once_differentiable`` does, also when the
    upstream gradient needs no grad). Nested torch.func transforms (grad of grad) raise at once:
    their outer level would otherwise see a zero derivative. Under one torch.func transform, the
    gradient depends on tensors outside it that require grad (``ctx`` from a ``setup_context`` that
    called ``keep_outer_inputs``): it gets such a node there (a backward through torch.func.grad's
    result otherwise silently lost this term). torch.compile refuses double backward itself."""
    if torch._C._are_functorch_transforms_active():
        stack = torch._C._functorch.get_interpreter_stack()
        if stack is not None and len(stack) > 1:
            raise RuntimeError(DOUBLE_BACKWARD)
        outer = getattr(ctx, "memft_outer_inputs", ())
        if not outer or not torch.is_grad_enabled():
            return grads
        # An exact 0 (a sum over an empty slice: no pass over the tensor, never NaN) with their history.
        anchor = sum((t.narrow(0, 0, 0) if t.dim() else t.reshape(1)[:0]).sum() for t in outer)
        return tuple(None if g is None else _NoSecondDerivative.apply(g, anchor) for g in grads)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    # DelayedError gives history only to inputs that have some: aliases that require grad.
    wrapped = torch._C._functions.DelayedError(DOUBLE_BACKWARD, len(present))(
        *[g.detach().requires_grad_(True) for g in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if g is None else next(wrapped) for g in grads)


NO_VMAP = ("{where} does not support torch.func.vmap (nor jacrev, jacfwd or hessian, which batch through it): its "
           "kernels work on whole row batches and have no batching rule. torch.func.grad and torch.func.vjp work; for "
           "a batch of losses put the batch into the rows (reduction=\"none\") or loop over it")


def refuse_vmap(where: str) -> None:
    """Raise NO_VMAP when a torch.func.vmap is active (the custom ops would otherwise fail with
    "Batching rule not implemented", or an out= matmul with a vmap internals error)."""
    if torch._C._are_functorch_transforms_active():
        vmap = torch._C._functorch.TransformType.Vmap
        if any(level.key() == vmap for level in torch._C._functorch.get_interpreter_stack() or ()):
            raise RuntimeError(NO_VMAP.format(where=where))


def check_inplace_target(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient over the logits' storage: refuse storage that
    belongs to an ``nn.Parameter`` (the parameter, or a view of it), whose values an optimizer reads
    and whose ``.grad`` would then be that same storage. A plain leaf (``out.detach().requires_grad_()``,
    to backpropagate its ``.grad`` by hand) is allowed: its ``.grad`` is then its own storage."""
    base = logits._base if logits._base is not None else logits
    if isinstance(base, torch.nn.Parameter) and base.requires_grad:
        what = "an nn.Parameter" if base is logits else "a view of an nn.Parameter"
        raise ValueError(f"inplace_backward=True would overwrite the logits, which are {what}: its values would "
                         "become its own gradient; pass inplace_backward=False")


# ------------------------------------------------------------------ one call-preparation step
class PreparedCall(NamedTuple):
    """What every entry point computes from its arguments before choosing a backend."""

    kernel: KernelOptions
    options: LossOptions
    denominator: Any  # None, a float, or a 0-d tensor on the logits' device
    lead_shape: torch.Size  # target's shape: per-token outputs are reshaped to it
    logits: Optional[torch.Tensor]  # [N, V] with unit column stride (None with flatten_logits=False)
    target: torch.Tensor  # [N]
    token_weight: Optional[torch.Tensor]  # [N], accumulate_dtype(logits.dtype)

    def finish(self, dtype: torch.dtype, loss, lse, ce, prob, pred, weight, fell_back):
        """What every entry point returns from its autograd Function's outputs: the loss in
        ``accumulate_dtype(dtype)`` (target's shape for ``reduction="none"``), and with
        ``return_stats`` the MemFTStats of the per-row outputs."""
        if self.options.reduction == "none":
            loss = loss.reshape(self.lead_shape)
        loss = loss.to(accumulate_dtype(dtype))
        if not self.options.return_stats:
            return loss
        return loss, MemFTStats.from_rows(self.lead_shape, self.target, self.kernel.ignore_index, lse, ce, prob, pred,
                                          weight, fell_back)


def prepare_call(logits: torch.Tensor, target: torch.Tensor, token_weight: Optional[torch.Tensor],
                 options: LossOptions, *, check_range: bool = True, flatten_logits: bool = True) -> PreparedCall:
    """Validate the options and tensors (SPEC.md's bad-input table), check the target range when
    ``options.validate`` and ``check_range`` (the vocab-parallel loss checks it against the global V
    later), move a tensor denominator to the logits' device, and flatten to rows.

    ``logits`` may be a shape-only stand-in (the fused linear loss passes a 0-stride view) with
    ``flatten_logits=False``."""
    checked = options.checked()
    validate_tensors(logits, target, token_weight, check_values=options.validate)
    if target.dtype == torch.uint8:  # accepted as F.cross_entropy accepts it; the kernels take int32/int64
        target = target.to(torch.int32)
    num_classes = logits.shape[-1]
    if options.validate and check_range:
        check_target_range(target, num_classes, checked.kernel.ignore_index)
    denominator = checked.denominator
    if isinstance(denominator, torch.Tensor):
        if options.validate and denominator.device.type != "cpu":
            check_denominator_value(denominator)  # a CPU tensor was checked with the options
        if denominator.device != logits.device:
            denominator = denominator.to(logits.device)
    logits2d = None
    if flatten_logits:
        logits2d = logits.reshape(-1, num_classes)
        if logits2d.stride(-1) != 1:
            logits2d = logits2d.contiguous()
    weight1d = None if token_weight is None else token_weight.reshape(-1).to(accumulate_dtype(logits.dtype))
    return PreparedCall(checked.kernel, options, denominator, target.shape, logits2d, target.reshape(-1), weight1d)
