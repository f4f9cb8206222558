"""MemFTAccumulator.loss / linear_loss on one process: options that must not change the result.

(The K micro-batch and 2-rank matrix against one memft_loss call is tests/test_integration_accumulate.py.)
Here: a step where every token is recalled takes the fallback's plain loss, which must be the same
plain CE mean as memft_loss's own fallback whatever else was passed (inplace_backward, weight_fn).
"""
from __future__ import annotations

import pytest
import torch

from memft_kernels import memft_linear_loss, memft_loss
from memft_kernels.accumulate import MemFTAccumulator

from helpers import rel

N, D, V = 12, 6, 9


def _case():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g)
    target = (x @ w.T).argmax(-1)
    return x, (w * 4.0), target  # a sharp head: every token's p > 0.5 (all recalled, the fallback)


def _triple(target, stats):
    return torch.full(target.shape, 3.0)


@pytest.mark.parametrize("head,extra", [("logits", dict(inplace_backward=True)), ("logits", dict(weight_fn=_triple)),
                                        ("linear", dict(weight_fn=_triple))],  # (linear: no inplace_backward)
                         ids=["inplace_backward", "weight_fn", "linear-weight_fn"])
def test_fallback_step_equals_memft_loss_whatever_the_options(head, extra):
    x, w0, target = _case()
    w_ref = w0.clone().requires_grad_(True)
    ref = memft_loss(x @ w_ref.T, target, policy="hard", **{k: v for k, v in extra.items() if k != "inplace_backward"})
    ref.backward()
    w = torch.nn.Parameter(w0.clone())
    acc = MemFTAccumulator([w])
    if head == "logits":
        out = acc.loss(x @ w.T, target, policy="hard", **extra)
    else:
        out = acc.linear_loss(x, w, target, policy="hard", **extra)
    out.backward()
    info = acc.finish_step()
    assert info["fell_back"] is True
    # was: inplace_backward made the plain loss read the gradient written over the logits (loss ln V);
    # weight_fn's factor multiplied the plain loss (3x the gradient)
    assert abs(info["loss"] - ref.item()) < 1e-5 * abs(ref.item())
    assert rel(w.grad, w_ref.grad) < 1e-5
    assert abs(memft_linear_loss(x, w0, target, policy="hard").item() - ref.item()) < 1e-5
