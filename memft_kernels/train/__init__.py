"""LoRA memorization training with the MemFT loss (docs/TRAINING.md).

Stable API::

    from memft_kernels.train import TrainConfig, train, resume
    report = train(TrainConfig(task="random", length=256, rank=2, loss="memft-ot", steps=200))

``train(config) -> dict`` (keys documented in docs/TRAINING.md: rank, lora_params, length, task,
loss, seed, base_loss, final_loss, dL, token_accuracy, recalled_frac, exact_recall,
steps_to_full_recall, run_dir, ...). ``resume(run_dir) -> dict`` continues a checkpointed run.
Bad input raises ``TrainInputError`` (a ValueError).
"""
from __future__ import annotations

import os

from .config import TrainConfig, TrainInputError


def train(config: TrainConfig) -> dict:
    """Run one memorization training and return its report (also written to run_dir/report.json)."""
    from .loop import run_training

    return run_training(config)


def resume(run_dir: str) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint; same result as never stopping."""
    from . import checkpoint as ckpt
    from .loop import run_training

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise TrainInputError(f"{run_dir!r} is not a run folder (no config.json)")
    config = TrainConfig.load(path)
    state = ckpt.load_checkpoint(run_dir)
    return run_training(config, resume_state=state)


__all__ = ["TrainConfig", "TrainInputError", "train", "resume"]
