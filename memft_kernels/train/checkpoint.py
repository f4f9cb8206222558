"""Checkpoints: atomic, checksummed, the last two kept.

Writing: the state is serialized in memory, prefixed with a header holding its SHA-256, written to
a temp file in the same folder, fsynced and renamed over ``checkpoint.pt`` after the previous one
was renamed to ``checkpoint.prev.pt``. A crash at any moment leaves at least one complete
checkpoint (``os.replace`` is atomic on POSIX within one file system).

Loading: the newest checkpoint whose checksum matches and which loads and holds the keys a resume
needs; if ``checkpoint.pt`` is unusable (truncated, empty, garbage, from another program) the
older one is used with a warning; if neither is, a one-line ``TrainInputError``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from typing import Iterable, Optional, Tuple

import torch

from .config import TrainInputError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
MAGIC = b"MEMFT-CHECKPOINT-1\n"
# What a resume reads from a checkpoint; a file without these keys is not usable.
REQUIRED_KEYS = ("step", "trainable", "optimizer", "scheduler", "rng", "sampler", "window", "base_loss")


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


def atomic_write(path: str, write, *, keep_previous: Optional[str] = None) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``.
    With ``keep_previous``, the file being replaced is first renamed to that path (kept, not lost)."""
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
        if keep_previous is not None and os.path.isfile(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def encode(state: dict) -> bytes:
    """The checkpoint file's bytes: MAGIC, the payload's SHA-256 (hex) and a newline, the payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n" + payload


def decode(data: bytes, required: Iterable[str] = REQUIRED_KEYS) -> dict:
    """The state stored by ``encode``; ValueError saying why when the bytes are not a usable checkpoint."""
    if not data.startswith(MAGIC):
        raise ValueError("not a memft checkpoint (empty, or written by something else)" if data else "empty file")
    head = len(MAGIC) + 65
    digest, payload = data[len(MAGIC):head - 1], data[head:]
    if len(data) < head or hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle makes the file unusable
        raise ValueError(f"cannot be loaded ({type(exc).__name__})") from None
    missing = [k for k in required if not (isinstance(state, dict) and k in state)]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return state


def save_checkpoint(run_dir: str, state: dict) -> str:
    """Write ``state`` as the newest checkpoint; the one it replaces becomes ``checkpoint.prev.pt``."""
    data = encode(state)  # serialize before touching any file
    path = os.path.join(run_dir, CHECKPOINT)
    atomic_write(path, lambda f: f.write(data), keep_previous=os.path.join(run_dir, PREVIOUS))
    return path


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    return decode(data)


def load_checkpoint(run_dir: str, warn=None) -> dict:
    """The newest usable checkpoint of ``run_dir`` (see the module docstring)."""
    state, _ = load_checkpoint_with_path(run_dir, warn)
    return state


def load_checkpoint_with_path(run_dir: str, warn=None) -> Tuple[dict, str]:
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    candidates = [os.path.join(run_dir, name) for name in (CHECKPOINT, PREVIOUS)]
    present = [p for p in candidates if os.path.isfile(p)]
    if not present:
        raise TrainInputError(f"no checkpoint in {run_dir!r} (expected {CHECKPOINT}); " + _why_no_checkpoint(run_dir))
    problems = []
    for path in present:
        try:
            state = _read(path)
        except ValueError as exc:
            problems.append(f"{os.path.basename(path)}: {exc}")
            continue
        if problems:
            warn(f"{problems[0]}; resuming from the older {os.path.basename(path)} (step {state['step']})")
        return state, path
    raise TrainInputError(f"no usable checkpoint in {run_dir!r}: " + "; ".join(problems))


def _why_no_checkpoint(run_dir: str) -> str:
    """What the run's config.json says about its checkpoints (the hint of the error above)."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            every = json.load(f).get("checkpoint_every")
    except (OSError, ValueError, AttributeError):
        every = None
    if isinstance(every, int) and every > 0:
        return (f"the run stopped before its first checkpoint (--checkpoint-every {every}): "
                "nothing to resume, start it again")
    if every == 0:
        return "the run was started without --checkpoint-every: nothing to resume, start it again"
    return "was it run with --checkpoint-every?"


def config_from_checkpoint(run_dir: str) -> Optional[dict]:
    """The config stored in the newest usable checkpoint (None if none holds one)."""
    try:
        state = load_checkpoint(run_dir, warn=lambda msg: None)
    except TrainInputError:
        return None
    return state.get("config")


def atomic_write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
