"""The phase transition: greedy recall against the target probability, per token.

Under greedy decoding a token whose target probability p exceeds 0.5 is always the argmax (every
other token shares less than 0.5), so p > 0.5 implies correct prediction: a violation of that in
the stats means the stats are wrong, never the model. Below 0.5 a token may still be the argmax;
the table shows how often. Bins are right-closed, (lo, hi], so the bins above 0.5 hold exactly
the tokens with p > 0.5.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .results import LawInputError

DEFAULT_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Names tried, in order, when the phase tool is given a run folder instead of a file.
RUN_DIR_STATS_FILES = ("tokens.npz", "token_stats.jsonl", "token_stats.csv", "token_stats.safetensors", "token_stats.pt",
                       "tokens.jsonl", "per_token.jsonl", "per_token_stats.jsonl")
MAX_VIOLATIONS_LISTED = 20


@dataclass
class PhaseReport:
    edges: list
    rows: list  # dicts: lo, hi, n, n_correct, recall (None for an empty bin)
    n_tokens: int
    n_above: int  # p > 0.5
    n_above_correct: int
    violations: list = field(default_factory=list)  # indices of tokens with p > 0.5 predicted wrong
    n_violations: int = 0
    n_below: int = 0
    n_below_correct: int = 0  # p <= 0.5 but still the greedy prediction
    source: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A markdown table: one row per probability bin."""
        out = ["| target probability p | tokens | greedy-correct | recall |", "| --- | ---: | ---: | ---: |"]
        for i, r in enumerate(self.rows):
            left = "[" if i == 0 else "("
            recall = "-" if r["recall"] is None else f"{100 * r['recall']:.1f}%"
            out.append(f"| {left}{r['lo']:g}, {r['hi']:g}] | {r['n']} | {r['n_correct']} | {recall} |")
        return "\n".join(out)

    def verdict(self) -> str:
        below = (f"{self.n_below_correct} of {self.n_below} tokens with p <= 0.5 "
                 f"({_pct(self.n_below_correct, self.n_below)}) are still predicted correctly")
        if self.n_violations:
            return (f"VIOLATION: {self.n_violations} of {self.n_above} tokens with p > 0.5 are predicted wrong "
                    f"(first token indices {self.violations[:MAX_VIOLATIONS_LISTED]}): the stats are inconsistent "
                    f"(p and pred from different logits?). {below}.")
        if self.n_above == 0:
            return f"no token has p > 0.5 (nothing to check there); {below}."
        return (f"all {self.n_above} tokens with p > 0.5 are predicted correctly (as the math requires); {below}.")


def _pct(a, b):
    return f"{100 * a / b:.1f}%" if b else "n/a"


def analyze_phase(prob, correct, edges: Sequence[float] = DEFAULT_EDGES, source: str = "") -> PhaseReport:
    """Recall per probability bin and the p > 0.5 => correct check, from per-token arrays."""
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct).reshape(-1).astype(bool)
    if prob.size == 0:
        raise LawInputError(f"{source or 'stats'}: no tokens")
    if prob.size != correct.size:
        raise LawInputError(f"{source or 'stats'}: {prob.size} probabilities but {correct.size} correctness values")
    bad = np.flatnonzero(~np.isfinite(prob) | (prob < 0) | (prob > 1))
    if bad.size:
        raise LawInputError(f"{source or 'stats'}: token {bad[0]} has probability {float(prob[bad[0]])!r}, outside [0, 1]")
    edges = check_edges(edges)
    # right-closed bins: p in (edges[k], edges[k+1]] -> k; p == edges[0] goes to the first bin
    idx = np.clip(np.searchsorted(edges, prob, side="left") - 1, 0, len(edges) - 2)
    rows = []
    for k in range(len(edges) - 1):
        in_bin = idx == k
        n, n_correct = int(in_bin.sum()), int((in_bin & correct).sum())
        rows.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "n": n, "n_correct": n_correct,
                     "recall": (n_correct / n) if n else None})
    above = prob > 0.5
    violations = np.flatnonzero(above & ~correct)
    return PhaseReport(
        edges=[float(e) for e in edges], rows=rows, n_tokens=int(prob.size),
        n_above=int(above.sum()), n_above_correct=int((above & correct).sum()),
        violations=[int(v) for v in violations[:MAX_VIOLATIONS_LISTED]], n_violations=int(violations.size),
        n_below=int((~above).sum()), n_below_correct=int((~above & correct).sum()), source=source,
    )


def check_edges(edges) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or np.any(np.diff(edges) <= 0):
        raise LawInputError(f"bin edges must rise strictly from 0 to 1, got {edges.reshape(-1).tolist()}")
    if 0.5 not in edges:
        raise LawInputError(f"bin edges must include 0.5 (the phase threshold), got {edges.reshape(-1).tolist()}")
    return edges


def parse_bins(text: str) -> np.ndarray:
    """'10' -> 10 equal bins; '0,0.1,0.5,1' -> those edges."""
    try:
        if "," not in text:
            n = int(text)
            if n < 2 or n % 2:
                raise LawInputError(f"--bins: an even count >= 2 keeps 0.5 on an edge, got {n}")
            return np.linspace(0.0, 1.0, n + 1)
        return check_edges([float(v) for v in text.split(",")])
    except ValueError as exc:
        if isinstance(exc, LawInputError):
            raise
        raise LawInputError(f"--bins: expected a count or comma-separated edges, got {text!r}") from None


# --- reading stats -----------------------------------------------------------------------------

def _correct_from(record: dict, where: str):
    if "correct" in record:
        return record["correct"]
    if "pred" in record and "target" in record:
        pred, target = np.asarray(record["pred"]), np.asarray(record["target"])
        if pred.shape != target.shape:
            raise LawInputError(f"{where}: pred and target have different shapes {pred.shape} vs {target.shape}")
        return pred == target
    raise LawInputError(f"{where}: needs 'correct', or 'pred' and 'target', next to 'prob'")


def _csv_bool(text: str) -> bool:
    """A CSV 'correct' cell: true/false, yes/no, or a number equal to 1 or 0 ("1.0" as pandas writes a
    float column). Anything else raises ValueError (it used to read as False: "1.0" became a wrong
    prediction, a violation of p > 0.5 => correct that was not there)."""
    word = text.strip().lower()
    if word in ("true", "yes"):
        return True
    if word in ("false", "no"):
        return False
    value = float(word)
    if value not in (0.0, 1.0):
        raise ValueError(word)
    return value == 1.0


def _from_records(records, where_of) -> tuple[np.ndarray, np.ndarray]:
    probs, corrects = [], []
    for i, rec in enumerate(records):
        where = where_of(i)
        if not isinstance(rec, dict) or "prob" not in rec:
            raise LawInputError(f"{where}: missing field 'prob'")
        p = np.asarray(rec["prob"], dtype=object).reshape(-1)
        try:
            p = p.astype(np.float64)
        except (TypeError, ValueError):
            raise LawInputError(f"{where}: 'prob' must be numbers, got {rec['prob']!r}") from None
        c = np.asarray(_correct_from(rec, where)).reshape(-1)
        if c.size != p.size:
            raise LawInputError(f"{where}: {p.size} probabilities but {c.size} correctness values")
        if c.dtype.kind not in "bui" or (c.dtype.kind in "ui" and np.any((c != 0) & (c != 1))):
            raise LawInputError(f"{where}: 'correct' must be true/false (or 0/1)")
        bad = np.flatnonzero(~np.isfinite(p) | (p < 0) | (p > 1))
        if bad.size:
            raise LawInputError(f"{where}: probability {float(p[bad[0]])!r} is outside [0, 1]")
        probs.append(p)
        corrects.append(c.astype(bool))
    if not probs:
        raise LawInputError("no token records")
    return np.concatenate(probs), np.concatenate(corrects)


def _tensors_to_record(tensors: dict) -> dict:
    rec = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in tensors.items()}
    if "valid" in rec:  # drop ignored positions when the file marks them
        keep = rec.pop("valid").astype(bool).reshape(-1)
        rec = {k: v.reshape(-1)[keep] for k, v in rec.items()}
    return rec


def find_stats_file(path) -> Path:
    """The stats file itself, or the known stats file inside a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_DIR_STATS_FILES:
            if (path / name).is_file():
                return path / name
        hint = "; memft train writes tokens.npz with --save-tokens" if (path / "config.json").is_file() else ""
        raise LawInputError(f"{path}: no per-token stats file in this folder (looked for "
                            f"{', '.join(RUN_DIR_STATS_FILES)}){hint}")
    if not path.is_file():
        raise LawInputError(f"{path}: no such file or folder")
    return path


def load_token_stats(path) -> tuple[np.ndarray, np.ndarray, str]:
    """(prob, correct, file) from a run folder or a stats file (.jsonl, .csv, .safetensors, .pt).

    A JSONL line is one token ({"prob": p, "correct": c} or with "pred" and "target") or one
    sample with lists under the same names. A CSV has a header with the same columns.
    """
    path = find_stats_file(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        from .results import read_jsonl

        rows = read_jsonl(path)
        if not rows:
            raise LawInputError(f"{path}: no token records")
        prob, correct = _from_records([r for _, r in rows], lambda i: f"{path} line {rows[i][0]}")
    elif suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = list(csv.DictReader(fh))
        except UnicodeDecodeError as exc:
            raise LawInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        records = []
        for i, row in enumerate(reader):
            try:
                rec = {k: float(v) for k, v in row.items() if k in ("prob", "pred", "target")}
                if "correct" in row:
                    rec["correct"] = _csv_bool(row["correct"])
            except (TypeError, ValueError, AttributeError):
                raise LawInputError(f"{path} line {i + 2}: a value is not a number (or, for 'correct', "
                                    f"true/false or 1/0)") from None
            records.append(rec)
        prob, correct = _from_records(records, lambda i: f"{path} line {i + 2}")
    elif suffix in (".safetensors", ".pt", ".npz"):
        try:  # a damaged or foreign file raises whatever its reader raises: one line for the user
            if suffix == ".npz":
                with np.load(path) as npz:
                    tensors = {k: npz[k] for k in npz.files}
            elif suffix == ".safetensors":
                from safetensors.numpy import load_file

                tensors = load_file(str(path))
            else:
                import torch

                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = reason if len(reason) <= 100 else reason[:97] + "..."
            raise LawInputError(f"{path}: not a readable {suffix} file ({reason})") from None
        if suffix == ".pt":
            if not isinstance(tensors, dict):
                raise LawInputError(f"{path}: expected a dict of tensors")
        prob, correct = _from_records([_tensors_to_record(tensors)], lambda i: str(path))
    else:
        raise LawInputError(f"{path}: unknown stats format {suffix!r} (use .jsonl, .csv, .npz, .safetensors or .pt)")
    return prob, correct, str(path)


def phase_from_path(path, edges: Sequence[float] = DEFAULT_EDGES) -> PhaseReport:
    prob, correct, source = load_token_stats(path)
    return analyze_phase(prob, correct, edges, source=source)


# --- plot ------------------------------------------------------------------------------------

def plot_phase(report: PhaseReport, path, title: Optional[str] = None) -> None:
    """Recall per probability bin (bars, token counts on top), the 0.5 threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    los = np.array([r["lo"] for r in report.rows])
    his = np.array([r["hi"] for r in report.rows])
    recall = np.array([r["recall"] if r["recall"] is not None else 0.0 for r in report.rows])
    colors = ["tab:green" if lo >= 0.5 else "tab:blue" for lo in los]
    ax.bar(los, recall, width=his - los, align="edge", color=colors, edgecolor="k", linewidth=0.5)
    for lo, hi, r, rec in zip(los, his, report.rows, recall):
        if r["n"]:
            ax.text((lo + hi) / 2, min(rec + 0.02, 1.02), str(r["n"]), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axvline(0.5, color="k", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("target probability p (bins; token count above each bar)")
    ax.set_ylabel("greedy recall (argmax == target)")
    ax.set_title(title or f"phase transition: {report.n_tokens} tokens, {report.n_violations} violations of p>0.5 => recall",
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_json(report: PhaseReport, path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


