"""TRL: ``MemFTSFTTrainer``, an ``SFTTrainer`` that trains with the MemFT loss.

Why a subclass: TRL's ``SFTTrainer`` (1.x) does not call the model's own loss. Its ``compute_loss``
runs the model through TRL's fused LM head (``add_fused_lm_head``: per-token log-probabilities,
entropy and top-1 flags, no logits) and computes the NLL itself, so ``use_memft(model)`` alone
changes nothing there; with a ``compute_loss_func`` it runs the model twice (once for the loss,
once more without gradient for its metrics). ``MemFTSFTTrainer.compute_loss`` is the plain
``Trainer.compute_loss``: one forward, whose loss is the MemFT loss of the model's forward --
``use_memft`` (logits) or ``apply_memft_to_model`` (``fused=True``: no logits) -- and the recall
metrics (``recalled_frac``, ``token_accuracy``, ``n_active``) come from that loss's statistics
through ``MemFTMetricsCallback``. TRL's dataset preparation, collators, packing, PEFT wrapping and
``SFTConfig`` stay TRL's.
"""
from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from .trainer import add_memft_to_trainer


class MemFTSFTTrainer(SFTTrainer):
    """``SFTTrainer(..., memft={"policy": "hard", ...}, fused=False, exact_active_mean=True)``.

    ``memft``: the MemFT loss options (``policy``, ``threshold``, ``sharpness``, ``fallback``,
    ``label_smoothing``, ``z_loss``, ``backend``...). ``fused``, ``exact_active_mean``, ``metrics``:
    as ``add_memft_to_trainer``. Every other argument is ``SFTTrainer``'s. TRL's own
    ``entropy`` / ``mean_token_accuracy`` metrics are not computed (they need TRL's forward);
    ``token_accuracy`` and ``recalled_frac`` replace them. ``SFTConfig(loss_type=...)`` must be
    ``"nll"`` (the default): the MemFT loss replaces it.
    """

    def __init__(self, *args, memft: dict | None = None, fused: bool = False, exact_active_mean: bool = True,
                 metrics: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        loss_type = getattr(self.args, "loss_type", "nll")
        if loss_type != "nll":
            raise ValueError(f"MemFTSFTTrainer: SFTConfig(loss_type={loss_type!r}) would be replaced by the MemFT loss; "
                             "use loss_type='nll' (the default)")
        add_memft_to_trainer(self, fused=fused, exact_active_mean=exact_active_mean, metrics=metrics, **(memft or {}))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
