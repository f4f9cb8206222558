"""LoRA memorization training with the MemFT loss (docs/TRAINING.md).

Stable API::

    from memft_kernels.train import TrainConfig, train, resume
    report = train(TrainConfig(task="random", length=256, rank=2, loss="memft-ot", steps=200))

``train(config) -> dict`` (keys documented in docs/TRAINING.md: rank, lora_params, length, task,
loss, seed, base_loss, final_loss, dL, token_accuracy, recalled_frac, exact_recall,
steps_to_full_recall, run_dir, ...). ``resume(run_dir) -> dict`` continues a checkpointed run.
Bad input raises ``TrainInputError`` (a ValueError). ``recipe_config(name, **overrides)``: the
authors' settings (``--recipe``); ``SlidingWindow``: their MemFT-SW window, a ``weight_fn``.
"""
from __future__ import annotations

import os

from .config import TrainConfig, TrainInputError
from .recipes import recipe_config
from .windows import SlidingWindow


def train(config: TrainConfig) -> dict:
    """Run one memorization training and return its report (also written to run_dir/report.json)."""
    from .loop import run_training

    return run_training(config)


def resume(run_dir: str) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint; same result as never stopping.

    The newest usable checkpoint is used (the older one, with a warning, if the newest is
    corrupt); a corrupt ``config.json`` is replaced by the copy stored in the checkpoint. A run
    that already finished is not trained again: its report is returned, with a warning.
    """
    import warnings

    from . import checkpoint as ckpt
    from .loop import run_training

    if not os.path.isdir(run_dir):
        raise TrainInputError(f"{run_dir!r}: no such run folder")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path) and not any(os.path.isfile(os.path.join(run_dir, n)) for n in (ckpt.CHECKPOINT, ckpt.PREVIOUS)):
        raise TrainInputError(f"{run_dir!r} is not a run folder (no config.json)")
    state = ckpt.load_checkpoint(run_dir)
    try:
        config = TrainConfig.load(path).validate()
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:  # missing, not JSON, wrong keys or types
        stored = state.get("config")
        if stored is None:
            raise TrainInputError(f"{path!r} is unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}) "
                                  "and the checkpoint holds no copy of the config") from None
        warnings.warn(f"{path!r} is unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                      "using the copy of the config stored in the checkpoint", stacklevel=2)
        config = TrainConfig.from_dict(stored)
        ckpt.atomic_write_json(path, dict(config.to_dict(), run_dir=config.run_dir or run_dir))
    if config.run_dir is None or os.path.abspath(config.run_dir) != os.path.abspath(run_dir):
        config = config.replace(run_dir=run_dir)  # the folder was moved or renamed: keep writing here
    report = finished_report(config)
    if report is not None:  # nothing left to train: retraining from the last checkpoint would only repeat it
        warnings.warn(f"{run_dir!r}: the run already finished ({report['steps']} steps); nothing to resume, "
                      "its report is returned", stacklevel=2)
        return _rank0_report(report)
    return run_training(config, resume_state=state)


def _rank0_report(report: dict):
    """A finished run's report, returned by rank 0 alone (under torchrun rank 0 reports)."""
    return report if int(os.environ.get("RANK", "0")) == 0 else None


def finished_report(config: TrainConfig):
    """The report of the finished run in ``config.run_dir`` made with these very settings, else
    None: its report.json, with a config.json that ``differing_setting`` finds equal, written after
    the newest checkpoint (an older one belongs to an earlier run in that folder)."""
    import json

    from . import checkpoint as ckpt

    run_dir = config.run_dir
    path = os.path.join(run_dir, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            same = differing_setting(json.load(f), config) is None
        checkpoints = [os.path.getmtime(p) for p in (os.path.join(run_dir, n) for n in (ckpt.CHECKPOINT, ckpt.PREVIOUS))
                       if os.path.isfile(p)]
        newer = not checkpoints or os.path.getmtime(path) >= max(checkpoints)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return report if same and newer and isinstance(report, dict) else None


def differing_setting(stored: dict, config: TrainConfig):
    """The first option (name, stored value, wanted value) in which the run settings ``stored`` (a
    config.json or a checkpoint's copy) differ from ``config``, or None. ``run_dir`` and
    ``progress`` do not change a run; ``steps`` is resolved from ``epochs`` when that is set."""
    earlier = TrainConfig.from_dict(stored).to_dict()
    wanted = config.to_dict()
    ignored = {"run_dir", "progress"} | ({"steps"} if config.epochs else set())
    for key in wanted:
        if key not in ignored and earlier.get(key) != wanted[key]:
            return key, earlier.get(key), wanted[key]
    return None


def train_or_resume(config: TrainConfig) -> dict:
    """``train(config)``, or ``resume(config.run_dir)`` when that folder holds a checkpoint of a run
    with these very settings (a killed earlier attempt), or that folder's report when it holds the
    finished run of these very settings; a checkpoint (or finished run) of other settings is refused."""
    from . import checkpoint as ckpt

    run_dir = config.run_dir
    report = finished_report(config) if run_dir is not None else None
    if report is not None:  # the same run, already done (e.g. a law sweep cell whose result line was not written)
        return _rank0_report(report)
    if run_dir is None or not any(os.path.isfile(os.path.join(run_dir, n)) for n in (ckpt.CHECKPOINT, ckpt.PREVIOUS)):
        return train(config)
    stored = ckpt.config_from_checkpoint(run_dir)
    try:
        differ = ("settings", "unreadable", "") if stored is None else differing_setting(stored, config)
    except (TypeError, ValueError):
        differ = ("settings", "unreadable", "")
    if differ is None:
        return resume(run_dir)
    key, old, new = differ
    raise TrainInputError(f"the run folder {run_dir!r} holds a checkpoint of other settings ({key}={old!r}, "
                          f"here {new!r}); remove it or use another folder")


__all__ = ["TrainConfig", "TrainInputError", "train", "resume", "train_or_resume", "recipe_config", "SlidingWindow"]
