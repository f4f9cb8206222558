"""MemFT-SW sliding window and the phonebook curriculum: pure functions on per-token stats.

The window of a sample is anchored at its first position whose greedy (argmax) prediction is wrong,
read from the loss's own ``pred`` of the previous step (no extra pass):

    weight(t) = 1                               t < anchor
              = exp(-(t - anchor) / decay)      anchor <= t < anchor + span * e
              = floor                           beyond

``e`` grows by ``growth`` (up to ``max``) while the anchor stays on one position for ``patience`` or
more consecutive updates, else it is back to 1. A sample with no wrong prediction (or not seen yet)
gets no window (all ones). The loss multiplies these weights with the sigmoid gate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_ANCHOR = -1


@dataclass
class WindowState:
    anchor: torch.Tensor  # [S] int64, NO_ANCHOR = no window
    stay: torch.Tensor  # [S] int64, consecutive updates with the same anchor
    expand: torch.Tensor  # [S] float64, the window's e

    @classmethod
    def new(cls, n_samples: int) -> "WindowState":
        return cls(
            torch.full((n_samples,), NO_ANCHOR, dtype=torch.long),
            torch.zeros(n_samples, dtype=torch.long),
            torch.ones(n_samples, dtype=torch.float64),
        )

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "stay": self.stay.clone(), "expand": self.expand.clone()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "WindowState":
        return cls(d["anchor"].clone(), d["stay"].clone(), d["expand"].clone())


def first_wrong(pred: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B] position of the first valid label whose argmax prediction differs, NO_ANCHOR if none."""
    wrong = (pred != labels) & (labels != ignore_index)
    width = labels.shape[-1]
    pos = torch.arange(width, device=labels.device).expand_as(labels)
    first = torch.where(wrong, pos, torch.full_like(pos, width)).min(dim=-1).values
    return torch.where(first == width, torch.full_like(first, NO_ANCHOR), first)


def update_window(state: WindowState, index: torch.Tensor, anchor: torch.Tensor, *, patience: int,
                  growth: float, max_expand: float) -> WindowState:
    """New state after seeing the anchors (``first_wrong``) of samples ``index``; others unchanged."""
    anchor = anchor.to(torch.long).cpu()
    index = index.cpu()
    out = WindowState(state.anchor.clone(), state.stay.clone(), state.expand.clone())
    same = (anchor == state.anchor[index]) & (anchor != NO_ANCHOR)
    stay = torch.where(same, state.stay[index] + 1, torch.ones_like(anchor))
    grown = torch.clamp(state.expand[index] + growth, max=max_expand)
    out.anchor[index] = anchor
    out.stay[index] = stay
    out.expand[index] = torch.where(stay >= patience, grown, torch.ones_like(grown))
    return out


def window_weights(state: WindowState, index: torch.Tensor, width: int, *, span: float, decay: float,
                   floor: float) -> torch.Tensor:
    """[B, width] float32 token weights for samples ``index`` from their current window."""
    anchor = state.anchor[index.cpu()].to(torch.float64)[:, None]
    expand = state.expand[index.cpu()][:, None]
    t = torch.arange(width, dtype=torch.float64)[None, :]
    inside = torch.exp(-(t - anchor).clamp_min(0) / decay)
    w = torch.where(t < anchor, torch.ones_like(inside), inside)
    w = torch.where(t >= anchor + span * expand, torch.full_like(w, floor), w)
    w = torch.where(anchor == NO_ANCHOR, torch.ones_like(w), w)
    return w.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Curriculum (phonebook): a growing prefix of the shuffled entries, one stage per epoch(s).
# ---------------------------------------------------------------------------------------------
CURRICULUM_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def curriculum_size(n_samples: int, epoch: int, epochs_per_stage: int = 1) -> int:
    """How many of the shuffled entries epoch ``epoch`` (0-based) trains on (at least 1)."""
    stage = min(epoch // max(1, epochs_per_stage), len(CURRICULUM_FRACTIONS) - 1)
    return max(1, round(CURRICULUM_FRACTIONS[stage] * n_samples))
