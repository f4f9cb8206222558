"""The sweep results file: one JSON object per line, one line per finished (rank, length, ...) cell.

Shared by the sweep (which appends to it and resumes from it) and the fit (which reads it). Every
problem in the file is reported with the file name and the line number, so a user can find it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional

# The grid parameters that identify a cell; a re-run skips a cell whose key is already in the file.
GRID_KEYS = ("rank", "length", "task", "replace_rate", "loss", "seed")
# What train() reports per cell (the list); the sweep writes the grid params and these.
RESULT_KEYS = (
    "rank", "lora_params", "length", "task", "loss", "seed", "base_loss", "final_loss", "dL",
    "token_accuracy", "recalled_frac", "exact_recall", "steps_to_full_recall",
)
# What the fit needs at the least (lora_params only with --capacity lora_params).
FIT_REQUIRED = ("rank", "length", "dL", "base_loss")
POSITIVE_KEYS = ("rank", "length", "lora_params", "base_loss")


class LawInputError(ValueError):
    """Bad input to the law tools (a results file, a fit file, a stats file or an argument).

    The message is one line and names the file and line where it can; the CLI prints it and exits 2.
    """


def cell_key(cell: dict) -> str:
    """The identity of a grid cell as a string (the same for the spec of a cell and its result;
    replace_rate 0 and 0.0 are the same cell)."""
    key = {k: cell.get(k) for k in GRID_KEYS}
    if _is_number(key["replace_rate"]):
        key["replace_rate"] = float(key["replace_rate"])
    return json.dumps(key, sort_keys=True)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LawWarning(UserWarning):
    """Something the law tools worked around and the user should know (one line; the CLI prints it)."""


def read_jsonl(path, *, allow_cut_last: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error.

    ``allow_cut_last``: a last line that is not valid JSON and has no newline after it is what a crash
    in the middle of writing leaves (a results file is appended to one whole line at a time). It is
    then left out with a LawWarning that names it, instead of refusing the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise LawInputError(f"{path}: no such file")
    data = path.read_bytes()
    cut = cut_line_offset(path, data) if allow_cut_last else None
    if cut is not None:
        data = data[:cut]
    try:
        text_all = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LawInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    for lineno, text in enumerate(text_all.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LawInputError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise LawInputError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if cut is not None:  # said only once the rest of the file has read well
        lineno = data.count(b"\n") + 1
        warnings.warn(f"{path} line {lineno} is cut short (a crash while it was written?): read up to "
                      f"line {lineno - 1}, line {lineno} left out", LawWarning, stacklevel=2)
    return rows


def cut_line_offset(path, data: Optional[bytes] = None) -> Optional[int]:
    """The byte offset where a cut last line (see ``read_jsonl``) starts, or None if the file ends
    with a whole line (or with valid JSON missing only its newline)."""
    data = Path(path).read_bytes() if data is None else data
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return start
    return None


def load_results(path, required: Iterable[str] = FIT_REQUIRED) -> list[dict]:
    """Read and check a results file; each returned cell gets its ``_line`` number.

    Checks: every ``required`` key present and a finite number; rank, length, lora_params and
    base_loss (where present) positive. dL may be any finite number here: whether a non-positive
    dL is a problem depends on the use (the fit's log-linear start needs it positive).
    """
    path = Path(path)
    cells = []
    for lineno, obj in read_jsonl(path, allow_cut_last=True):
        where = f"{path} line {lineno}"
        for key in required:
            if key not in obj or obj[key] is None:
                raise LawInputError(f"{where}: missing field {key!r}")
        for key, value in obj.items():
            if key in required or (key in POSITIVE_KEYS and value is not None):
                if not _is_number(value) or not math.isfinite(value):
                    raise LawInputError(f"{where}: field {key!r} must be a finite number, got {value!r}")
                if key in POSITIVE_KEYS and value <= 0:
                    raise LawInputError(f"{where}: field {key!r} must be positive, got {value!r}")
        for key in ("exact_recall", "recalled_frac"):
            value = obj.get(key)
            if value is not None and not (_is_number(value) and 0 <= value <= 1):
                raise LawInputError(f"{where}: field {key!r} must be a number in [0, 1], got {value!r}")
        cells.append({**obj, "_line": lineno})
    return cells


def _plain(value):
    """JSON for what train() may return besides plain numbers: numpy/torch scalars, paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def append_line(path, obj: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync): a crash loses at most this cell.

    The line is written with one write() call on an O_APPEND file, so a reader never sees two
    writers' lines interleaved."""
    line = json.dumps(obj, sort_keys=True, default=_plain) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
