"""Atomic checkpoints: write to a temp file in the same folder, fsync, then ``os.replace``.

A crash at any moment leaves either the previous checkpoint or the new one, never half of one
(``os.replace`` is atomic on POSIX within one file system).
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from .config import TrainInputError

CHECKPOINT = "checkpoint.pt"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def save_checkpoint(run_dir: str, state: dict) -> str:
    path = os.path.join(run_dir, CHECKPOINT)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(run_dir: str) -> dict:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise TrainInputError(f"no checkpoint in {run_dir!r} (expected {CHECKPOINT}); was it run with --checkpoint-every?")
    return torch.load(path, map_location="cpu", weights_only=False)


def atomic_write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
