"""The authors' MemFT-SW sliding window and their data curriculum (docs/TRAINING.md, "Paper recipes").

``SlidingWindow`` is a stateful per-token weight, meant as ``memft_loss(..., policy="sigmoid",
weight_fn=window)``: it is called once per forward with that forward's own statistics, so the
window is anchored on the greedy predictions of the very logits it weights (no lag, no extra pass):

    anchor    = first valid position whose argmax prediction is wrong (this forward)
    weight(t) = 1                                t < anchor
              = exp(-(t - anchor) / decay)       anchor <= t < anchor + span * e
              = floor                            t >= anchor + span * e
              = 1 everywhere                     a row without any wrong prediction

``e`` (the expansion) is updated *before* the weights of the call are formed: the count of
consecutive calls that saw the same anchor again goes up by one (else back to 0); while it is
>= ``patience`` (from the ``patience + 1``-th sighting on), ``e`` grows by ``growth`` up to
``max_expand``; otherwise ``e`` is 1. A row without error forgets its anchor.

State is kept per *row* of the batch by default (the authors': row i of every batch shares one
state, and a batch of another size starts from scratch), or per *sample* when the caller passes
``sample_ids``. ``state_dict`` / ``load_state_dict`` carry it through checkpoints.

The curriculum: ``curriculum_ratio`` and ``curriculum_active`` are the authors' prefix-ratio rule
(one seeded order kept every epoch; the active count ``int(n * ratio)`` floored to whole batches,
at least one batch, at most the complete batches); ``curriculum_size`` is this project's earlier
rule (stages of 20/40/60/80/100%, rounded), kept for ``--curriculum-style stages``.
"""
from __future__ import annotations

from typing import Sequence

import torch

NO_ANCHOR = -1
PAPER_RATIOS = (0.2, 0.4, 0.6, 0.8, 1.0)
PAPER_BOUNDARIES = (20, 40, 60, 80, 200)


def first_wrong(pred: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[..., T] -> [...]: first valid position whose argmax prediction differs, NO_ANCHOR if none."""
    wrong = (pred != labels) & (labels != ignore_index)
    width = labels.shape[-1]
    pos = torch.arange(width, device=labels.device).expand_as(labels)
    first = torch.where(wrong, pos, torch.full_like(pos, width)).min(dim=-1).values
    return torch.where(first == width, torch.full_like(first, NO_ANCHOR), first)


class SlidingWindow:
    """The authors' MemFT-SW window as a ``weight_fn``: ``window(target, stats[, sample_ids])``.

    ``target``: [..., T] int (rows are the flattened leading dims, positions the last dim);
    ``stats``: anything with a ``pred`` tensor of ``target``'s shape (a ``MemFTStats``). Returns
    float32 weights of ``target``'s shape on its device. ``window.weights(pred, target)`` is the
    same from a bare prediction tensor; ``window.bind(sample_ids)`` a two-argument ``weight_fn``
    keyed per sample. After a call, ``window.last`` holds that call's ``anchor`` (NO_ANCHOR for a
    row without error), ``expand`` and ``repeats`` per row.
    """

    def __init__(self, span: float = 50, decay: float = 20.0, floor: float = 0.01, patience: int = 3,
                 growth: float = 0.5, max_expand: float = 4.0, ignore_index: int = -100):
        checks = [
            (span > 0, f"span={span!r} must be > 0"),
            (decay > 0, f"decay={decay!r} must be > 0"),
            (0.0 <= floor <= 1.0, f"floor={floor!r} must be in [0, 1]"),
            (isinstance(patience, int) and patience >= 1, f"patience={patience!r} must be an integer >= 1"),
            (growth >= 0, f"growth={growth!r} must be >= 0"),
            (max_expand >= 1, f"max_expand={max_expand!r} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.span, self.decay, self.floor = float(span), float(decay), float(floor)
        self.patience, self.growth, self.max_expand = patience, float(growth), float(max_expand)
        self.ignore_index = ignore_index
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every anchor (as a fresh window)."""
        self.keyed = None  # None (no state yet), "row" or "sample"
        self.repeats = torch.zeros(0, dtype=torch.long)  # consecutive calls that saw the same anchor again
        self.expand = torch.ones(0, dtype=torch.float32)  # e
        self.anchor = torch.zeros(0, dtype=torch.long)  # last anchor, NO_ANCHOR = none
        self.last = {}

    def state_dict(self) -> dict:
        return {"keyed": self.keyed, "repeats": self.repeats.cpu().clone(), "expand": self.expand.cpu().clone(),
                "anchor": self.anchor.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.keyed = state["keyed"]
        self.repeats = state["repeats"].clone()
        self.expand = state["expand"].clone()
        self.anchor = state["anchor"].clone()
        self.last = {}

    def _fresh(self, n: int, device) -> None:
        self.repeats = torch.zeros(n, dtype=torch.long, device=device)
        self.expand = torch.ones(n, dtype=torch.float32, device=device)
        self.anchor = torch.full((n,), NO_ANCHOR, dtype=torch.long, device=device)

    def _slots(self, rows: int, sample_ids, device) -> torch.Tensor:
        """Indices into the state for these rows; (re)allocates the state as the authors do."""
        if self.repeats.device != device:
            self.repeats, self.expand, self.anchor = (t.to(device) for t in (self.repeats, self.expand, self.anchor))
        if sample_ids is None:
            if self.keyed != "row" or self.repeats.numel() != rows:  # another batch size: start over
                self.keyed = "row"
                self._fresh(rows, device)
            return torch.arange(rows, device=device)
        ids = torch.as_tensor(sample_ids, device=device).reshape(-1).long()
        if ids.numel() != rows:
            raise ValueError(f"sample_ids has {ids.numel()} entries but target has {rows} rows")
        if rows and (int(ids.min()) < 0 or ids.unique().numel() != rows):
            raise ValueError(f"sample_ids must be distinct integers >= 0, got {ids.tolist()}")
        if self.keyed != "sample":
            self.keyed = "sample"
            self._fresh(0, device)
        need = int(ids.max()) + 1 if rows else 0
        if need > self.repeats.numel():  # grow: new samples start without an anchor
            old = (self.repeats, self.expand, self.anchor)
            self._fresh(need, device)
            k = old[0].numel()
            self.repeats[:k], self.expand[:k], self.anchor[:k] = old
        return ids

    # -- the weights ---------------------------------------------------------------------------
    def weights(self, pred: torch.Tensor, target: torch.Tensor, sample_ids=None) -> torch.Tensor:
        """Update the state from this forward's ``pred`` and return the window weights."""
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
        if target.dim() == 0:
            raise ValueError("target must have at least one (position) dimension")
        width = target.shape[-1]
        rows_target = target.reshape(-1, width)
        rows_pred = pred.reshape(-1, width)
        rows, device = rows_target.shape[0], target.device
        slot = self._slots(rows, sample_ids, device)

        with torch.no_grad():
            anchor = first_wrong(rows_pred, rows_target, self.ignore_index)
            has_error = anchor != NO_ANCHOR
            again = has_error & (anchor == self.anchor[slot])
            repeats = torch.where(again, self.repeats[slot] + 1, torch.zeros_like(anchor))
            grown = torch.clamp(self.expand[slot] + self.growth, max=self.max_expand)
            expand = torch.where(repeats >= self.patience, grown, torch.ones_like(grown))
            self.repeats[slot], self.expand[slot], self.anchor[slot] = repeats, expand, anchor

            t = torch.arange(width, device=device, dtype=torch.float32)[None, :]
            rel = t - anchor.clamp_min(0).to(torch.float32)[:, None]
            inside = torch.exp(-rel.clamp_min(0) / self.decay)
            w = torch.where(rel < self.span * expand[:, None], inside, torch.full_like(inside, self.floor))
            w = torch.where(has_error[:, None], w, torch.ones_like(w))
        self.last = {"anchor": anchor, "expand": expand, "repeats": repeats}
        return w.reshape(target.shape)

    def __call__(self, target: torch.Tensor, stats, sample_ids=None) -> torch.Tensor:
        return self.weights(stats.pred, target, sample_ids)

    def bind(self, sample_ids):
        """A two-argument ``weight_fn`` whose rows are the samples ``sample_ids``."""
        return lambda target, stats: self.weights(stats.pred, target, sample_ids)

    def __repr__(self) -> str:
        return (f"SlidingWindow(span={self.span:g}, decay={self.decay:g}, floor={self.floor:g}, "
                f"patience={self.patience}, growth={self.growth:g}, max_expand={self.max_expand:g})")


# ---------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------
def curriculum_ratio(epoch: int, ratios: Sequence[float] = PAPER_RATIOS,
                     boundaries: Sequence[int] = PAPER_BOUNDARIES) -> float:
    """The ratio of epoch ``epoch`` (0-based): the first ratio whose boundary is above the epoch, else the last."""
    if len(ratios) != len(boundaries) or not ratios:
        raise ValueError(f"curriculum ratios {list(ratios)} and boundaries {list(boundaries)} must be non-empty "
                         "and of the same length")
    for ratio, boundary in zip(ratios, boundaries):
        if epoch < boundary:
            return float(ratio)
    return float(ratios[-1])


def curriculum_active(n_samples: int, batch_size: int, ratio: float, drop_last: bool = True) -> int:
    """Samples trained in an epoch of ratio ``ratio``: a whole number of batches (at least one)."""
    if batch_size <= 0:
        raise ValueError(f"the curriculum needs batch_size > 0, got {batch_size}")
    complete = (n_samples // batch_size) * batch_size if drop_last else n_samples
    if complete < batch_size:
        raise ValueError(f"the curriculum needs at least one full batch: {n_samples} samples, batch_size={batch_size}")
    active = (int(n_samples * ratio) // batch_size) * batch_size
    return min(complete, max(batch_size, active))


CURRICULUM_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def curriculum_size(n_samples: int, epoch: int, epochs_per_stage: int = 1) -> int:
    """``--curriculum-style stages``: how many of the entries epoch ``epoch`` (0-based) trains on (>= 1)."""
    stage = min(epoch // max(1, epochs_per_stage), len(CURRICULUM_FRACTIONS) - 1)
    return max(1, round(CURRICULUM_FRACTIONS[stage] * n_samples))

