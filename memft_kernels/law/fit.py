"""Fit and invert the Parametric Memory Law dL(r, len) = C * r^alpha * len^(-beta) + b.

The fit runs in two steps: a log-linear start (ordinary least squares of log dL on log r and
log len, with b = 0), then nonlinear least squares (scipy.optimize.least_squares) on dL itself,
with C kept positive by fitting log C. Confidence intervals come from a case bootstrap (cells
resampled with replacement, fixed seed). Saturated cells are left out by SATURATION_RULE: once a
text is fully memorized, dL is capped by the base loss and says nothing about capacity.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .results import LawInputError, cell_key, load_results

CAPACITIES = ("rank", "lora_params")
SATURATED_RECALLED_FRAC = 0.99  # share of tokens with p > 0.5
SATURATED_DL_FRACTION = 0.95  # dL at or above this share of the base loss
SATURATION_RULE = (
    f"a cell is saturated (left out) if exact_recall == 1, or recalled_frac >= {SATURATED_RECALLED_FRAC}, "
    f"or dL >= {SATURATED_DL_FRACTION} * base_loss"
)
PARAM_NAMES = ("C", "alpha", "beta", "b")


def is_saturated(cell: dict) -> bool:
    """SATURATION_RULE for one results cell (fields that are absent do not count)."""
    if cell.get("exact_recall") is not None and cell["exact_recall"] >= 1:
        return True
    if cell.get("recalled_frac") is not None and cell["recalled_frac"] >= SATURATED_RECALLED_FRAC:
        return True
    return cell["dL"] >= SATURATED_DL_FRACTION * cell["base_loss"]


def law(capacity, length, C, alpha, beta, b):
    """dL predicted by the law (numpy broadcasting)."""
    return C * np.power(capacity, alpha) * np.power(length, -beta) + b


@dataclass
class LawFit:
    """A fitted law. ``ci`` maps each parameter to its (low, high) bootstrap interval."""

    C: float
    alpha: float
    beta: float
    b: float
    r2: float
    capacity: str
    fit_offset: bool
    n_cells: int
    rmse: float
    ci: dict = field(default_factory=dict)
    ci_level: float = 0.95
    n_boot: int = 0
    n_boot_used: int = 0
    log_linear_start: dict = field(default_factory=dict)
    excluded_lines: list = field(default_factory=list)
    saturation_rule: str = SATURATION_RULE
    params_per_rank: Optional[float] = None  # lora_params / rank, when the same for every cell
    residuals: list = field(default_factory=list)
    repeated_lines: list = field(default_factory=list)  # [line, earlier line of the same cell], left out

    def predict(self, capacity, length):
        return law(np.asarray(capacity, dtype=float), np.asarray(length, dtype=float), self.C, self.alpha, self.beta, self.b)

    def to_json(self) -> dict:
        """A dict for json.dumps: a number that is not finite (NaN, inf) becomes null, as JSON has none."""
        return _finite_or_none(asdict(self))

    def summary(self) -> str:
        def fmt(name):
            value = getattr(self, name)
            lo, hi = self.ci.get(name, (float("nan"), float("nan")))
            return f"{name} = {value:.4g}  [{lo:.4g}, {hi:.4g}]"

        lines = [f"dL = C * {self.capacity}^alpha * length^(-beta) + b   ({self.n_cells} cells, "
                 f"{len(self.excluded_lines)} saturated left out)"]
        names = PARAM_NAMES if self.fit_offset else PARAM_NAMES[:3]
        lines += [f"  {fmt(n)}" for n in names]
        if not self.fit_offset:
            lines.append("  b = 0 (fixed)")
        lines.append(f"  R^2 = {self.r2:.4f}   RMSE = {self.rmse:.4g}   "
                     f"({int(self.ci_level * 100)}% bootstrap CIs from {self.n_boot_used}/{self.n_boot} resamples)")
        return "\n".join(lines)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _log_linear(x, length, y):
    """OLS of log y = log C + alpha log x - beta log len: the start point (b = 0)."""
    A = np.column_stack([np.ones_like(x), np.log(x), -np.log(length)])
    coef, *_ = np.linalg.lstsq(A, np.log(y), rcond=None)
    return float(math.exp(coef[0])), float(coef[1]), float(coef[2])


def _nonlinear(x, length, y, start, fit_offset):
    """least_squares on dL itself; returns (C, alpha, beta, b) or raises RuntimeError."""
    from scipy.optimize import least_squares

    lx, ll = np.log(x), np.log(length)

    def unpack(theta):
        return theta[0], theta[1], theta[2], (theta[3] if fit_offset else 0.0)

    def residual(theta):
        logc, a, be, b = unpack(theta)
        return np.exp(logc + a * lx - be * ll) + b - y

    def jacobian(theta):
        logc, a, be, _ = unpack(theta)
        t = np.exp(logc + a * lx - be * ll)
        cols = [t, t * lx, -t * ll] + ([np.ones_like(t)] if fit_offset else [])
        return np.column_stack(cols)

    C0, a0, b0 = start[:3]
    theta0 = [math.log(C0), a0, b0] + ([start[3]] if fit_offset else [])
    sol = least_squares(residual, theta0, jac=jacobian, method="lm" if len(y) > len(theta0) else "trf",
                        x_scale="jac", max_nfev=2000)
    if not sol.success or not np.all(np.isfinite(sol.x)):
        raise RuntimeError(f"least_squares did not converge: {sol.message}")
    logc, a, be, b = unpack(sol.x)
    return float(math.exp(logc)), float(a), float(be), float(b)


def _check_design(x, length, n_params):
    if len(x) < n_params + 1:
        raise LawInputError(f"too few cells to fit: {len(x)}, need at least {n_params + 1} "
                            f"({n_params} parameters + 1)")
    for name, values in (("capacity (rank)", x), ("length", length)):
        if len(np.unique(values)) < 2:
            raise LawInputError(f"every fitted cell has the same {name} ({values[0]:g}): "
                                f"its exponent cannot be fitted; sweep at least two values")


def _check_response(y):
    if np.ptp(y) <= 1e-12 * max(float(np.max(np.abs(y))), 1e-300):
        raise LawInputError(f"every fitted cell has the same dL ({y[0]:.6g}): dL does not vary with rank or "
                            f"length, so the law's exponents (and R^2) are undefined; check the sweep "
                            f"(too few steps? a broken run?)")


def fit_arrays(x, length, y, *, fit_offset=True) -> tuple[float, float, float, float]:
    """Point estimate (C, alpha, beta, b) on arrays; the degenerate checks of ``fit_law`` apply."""
    x, length, y = (np.asarray(v, dtype=float) for v in (x, length, y))
    n_params = 4 if fit_offset else 3
    _check_design(x, length, n_params)
    if np.any(y <= 0):
        raise LawInputError("dL must be positive in every fitted cell (log-linear start)")
    _check_response(y)
    C0, a0, b0 = _log_linear(x, length, y)
    try:
        return _nonlinear(x, length, y, (C0, a0, b0, 0.0), fit_offset)
    except RuntimeError as exc:
        hint = "; try without the offset (--no-offset)" if fit_offset else ""
        raise LawInputError(f"the law's fit did not converge on these cells ({exc}){hint}") from None


def _bootstrap(x, length, y, point, *, fit_offset, n_boot, seed, level):
    """Percentile intervals from refits on resampled cells; degenerate resamples are skipped."""
    rng = np.random.default_rng(seed)
    n = len(y)
    n_params = 4 if fit_offset else 3
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        xs, ls, ys = x[idx], length[idx], y[idx]
        if len(np.unique(xs)) < 2 or len(np.unique(ls)) < 2 or len(set(zip(xs, ls))) < n_params:
            continue
        try:
            draws.append(_nonlinear(xs, ls, ys, point, fit_offset))
        except RuntimeError:
            continue
    if not draws:
        return {}, 0
    draws = np.array(draws)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail], axis=0)
    names = PARAM_NAMES if fit_offset else PARAM_NAMES[:3]
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(names)}, len(draws)


def matches(value, wanted) -> bool:
    """A --where test: numbers compare as numbers (replace_rate=0 matches 0.0), the rest as text."""
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value) == str(wanted)


def select_cells(cells: Sequence[dict], where: Optional[dict] = None, keep_saturated: bool = False):
    """(fitted cells, saturated cells) after the ``where`` filter (field -> wanted value as text).

    Cells that mix values of task, loss or replace_rate are refused: one law per setting.
    """
    if where:
        cells = [c for c in cells if all(matches(c.get(k), v) for k, v in where.items())]
        if not cells:
            raise LawInputError(f"no cell matches {' '.join(f'{k}={v}' for k, v in where.items())}")
    for key in ("task", "loss", "replace_rate"):
        values = sorted({str(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                         for v in (c.get(key) for c in cells)})
        if len(values) > 1:
            raise LawInputError(f"the cells mix {key} values ({', '.join(values)}): fit one setting at a "
                                f"time, e.g. --where {key}={values[0]}")
    if keep_saturated:
        return list(cells), []
    return [c for c in cells if not is_saturated(c)], [c for c in cells if is_saturated(c)]


def drop_repeats(cells: Sequence[dict]) -> tuple[list, list]:
    """(cells, repeats): a line for a grid cell (rank, length, task, replace_rate, loss, seed) that an
    earlier line already holds is left out -- two sweeps writing one file, or a file concatenated
    twice, would otherwise count a cell twice and narrow the intervals. ``repeats`` holds
    [line, earlier line] pairs. Lines of one cell run with different fixed settings are refused."""
    first: dict = {}
    kept, repeats = [], []
    for c in cells:
        key = cell_key(c)
        if key in first:
            earlier = first[key]
            if c.get("sweep") != earlier.get("sweep"):
                raise LawInputError(f"line {c.get('_line', '?')} and line {earlier.get('_line', '?')} are the "
                                    f"same cell run with other fixed settings: two experiments in one file; "
                                    f"fit them separately")
            repeats.append([c.get("_line"), earlier.get("_line")])
        else:
            first[key] = c
            kept.append(c)
    return kept, repeats


def required_fields(capacity: str) -> tuple:
    """The fields every line of a results file needs for a fit on ``capacity``."""
    return ("rank", "length", "dL", "base_loss") + (("lora_params",) if capacity == "lora_params" else ())


def fit_law(cells: Sequence[dict], *, capacity="rank", fit_offset=True, n_boot=300, seed=0, level=0.95,
            where: Optional[dict] = None, keep_saturated=False) -> LawFit:
    """Fit the law to results cells (as ``load_results`` returns them); repeated cells are left out
    (``drop_repeats``) and named in ``repeated_lines``."""
    if capacity not in CAPACITIES:
        raise LawInputError(f"capacity must be one of {', '.join(CAPACITIES)}, got {capacity!r}")
    cells, repeats = drop_repeats(cells)
    fitted, saturated = select_cells(cells, where, keep_saturated)
    for c in fitted:
        if c.get(capacity) is None:
            raise LawInputError(f"line {c.get('_line', '?')}: missing field {capacity!r} (needed by --capacity {capacity})")
        if c["dL"] <= 0:
            raise LawInputError(f"line {c.get('_line', '?')}: dL = {c['dL']!r} is not positive; the law is "
                                f"fitted to positive loss reductions (did training diverge?)")
    n_params = 4 if fit_offset else 3
    if len(fitted) < n_params + 1:
        raise LawInputError(f"too few cells to fit: {len(fitted)} unsaturated of {len(fitted) + len(saturated)}, "
                            f"need at least {n_params + 1} ({n_params} parameters + 1)")
    x = np.array([c[capacity] for c in fitted], dtype=float)
    length = np.array([c["length"] for c in fitted], dtype=float)
    y = np.array([c["dL"] for c in fitted], dtype=float)
    C0, a0, b0 = _log_linear(x, length, y) if np.all(y > 0) else (float("nan"),) * 3
    C, alpha, beta, b = fit_arrays(x, length, y, fit_offset=fit_offset)
    pred = law(x, length, C, alpha, beta, b)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ci, used = _bootstrap(x, length, y, (C, alpha, beta, b), fit_offset=fit_offset, n_boot=n_boot, seed=seed, level=level)
    ratios = {c["lora_params"] / c["rank"] for c in cells if c.get("lora_params") and c.get("rank")}
    return LawFit(
        C=C, alpha=alpha, beta=beta, b=b,
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        capacity=capacity, fit_offset=fit_offset, n_cells=len(fitted),
        rmse=math.sqrt(ss_res / len(y)), ci=ci, ci_level=level, n_boot=n_boot, n_boot_used=used,
        log_linear_start={"C": C0, "alpha": a0, "beta": b0, "b": 0.0},
        excluded_lines=[c.get("_line") for c in saturated],
        params_per_rank=ratios.pop() if len(ratios) == 1 else None,
        residuals=[
            {"line": c.get("_line"), "rank": c["rank"], "capacity": float(xi), "length": float(li),
             "dL": float(yi), "predicted": float(pi), "residual": float(yi - pi)}
            for c, xi, li, yi, pi in zip(fitted, x, length, y, pred)
        ],
        repeated_lines=repeats,
    )


def fit_results_file(path, **kwargs) -> LawFit:
    return fit_law(load_results(path, required=required_fields(kwargs.get("capacity", "rank"))), **kwargs)


def load_fit(path) -> LawFit:
    """Read a fit written by ``memft law fit --json``; checks the keys predict needs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise LawInputError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise LawInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise LawInputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise LawInputError(f"{path}: expected a JSON object")
    for key in PARAM_NAMES + ("r2",):
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise LawInputError(f"{path}: field {key!r} must be a finite number, got {value!r}")
    if data["C"] <= 0:
        raise LawInputError(f"{path}: C must be positive, got {data['C']!r}")
    known = {f for f in LawFit.__dataclass_fields__}
    defaults = {"capacity": "rank", "fit_offset": True, "n_cells": 0, "rmse": float("nan")}
    return LawFit(**{**defaults, **{k: v for k, v in data.items() if k in known}})


# --- predict: the law inverted ---------------------------------------------------------------

def _check_target(fit: LawFit, target_dl: float, solving_for: str):
    if not (isinstance(target_dl, (int, float)) and math.isfinite(target_dl) and target_dl > 0):
        raise LawInputError(f"target dL must be a positive number, got {target_dl!r}")
    if target_dl <= fit.b:
        raise LawInputError(
            f"target dL = {target_dl:g} is at or below the fit's floor b = {fit.b:.4g}: the law gives "
            f"dL > b for every {solving_for}, so it does not pin down a {solving_for} for this target")


def longest_length(fit: LawFit, capacity: float, target_dl: float) -> float:
    """The longest text the given capacity (rank, or LoRA parameters) brings to dL >= target."""
    if not capacity > 0:
        raise LawInputError(f"{fit.capacity} must be positive, got {capacity!r}")
    _check_target(fit, target_dl, "length")
    if fit.beta <= 0:
        raise LawInputError(f"the fit has beta = {fit.beta:.4g} <= 0: dL does not fall with length, "
                            f"so there is no longest length")
    return _finite_answer(lambda: (fit.C * capacity ** fit.alpha / (target_dl - fit.b)) ** (1.0 / fit.beta), "length")


def smallest_capacity(fit: LawFit, length: float, target_dl: float) -> float:
    """The smallest capacity (rank, or LoRA parameters, as fitted) that brings ``length`` to the target dL."""
    if not length > 0:
        raise LawInputError(f"length must be positive, got {length!r}")
    _check_target(fit, target_dl, fit.capacity)
    if fit.alpha <= 0:
        raise LawInputError(f"the fit has alpha = {fit.alpha:.4g} <= 0: dL does not grow with "
                            f"{fit.capacity}, so no {fit.capacity} reaches the target")
    return _finite_answer(lambda: ((target_dl - fit.b) * length ** fit.beta / fit.C) ** (1.0 / fit.alpha), fit.capacity)


def _finite_answer(formula, what: str) -> float:
    try:
        value = float(formula())
    except (OverflowError, ZeroDivisionError):
        value = math.inf
    if not math.isfinite(value):
        raise LawInputError(f"the fit's {what} for this target is beyond floating point range; the law does not "
                            f"pin it down")
    return value


# --- plot ------------------------------------------------------------------------------------

def _PlainLogFormatter(**kwargs):
    """matplotlib's log-axis choice of which ticks get a label, written as plain numbers."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(**kwargs)


def plot_fit(fit: LawFit, cells: Sequence[dict], path) -> None:
    """dL vs capacity per length (log-log) with the fitted lines; residuals in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted_lines = {r["line"] for r in fit.residuals}
    lengths = sorted({float(c["length"]) for c in cells})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(lengths), 1)))
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    xs_all = np.array([c[fit.capacity] for c in cells], dtype=float)
    grid = np.geomspace(xs_all.min(), xs_all.max(), 100)
    for color, length in zip(colors, lengths):
        group = [c for c in cells if float(c["length"]) == length]
        used = [c for c in group if c.get("_line") in fitted_lines]
        left = [c for c in group if c.get("_line") not in fitted_lines]
        if used:
            ax.scatter([c[fit.capacity] for c in used], [c["dL"] for c in used], color=color, s=28,
                       label=f"len {length:g}")
        if left:
            ax.scatter([c[fit.capacity] for c in left], [max(c["dL"], 1e-6) for c in left], facecolors="none",
                       edgecolors=color, s=28)
        curve = fit.predict(grid, length)
        ok = curve > 0
        ax.plot(grid[ok], curve[ok], color=color, lw=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank" if fit.capacity == "rank" else "trainable LoRA parameters")
    ax.set_ylabel("dL (base loss - final loss, nats/token)")
    ax.set_title(f"alpha={fit.alpha:.3f}  beta={fit.beta:.3f}  b={fit.b:.3g}  R$^2$={fit.r2:.3f}", fontsize=10)
    ax.legend(fontsize=8, title="hollow: saturated, left out", title_fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    for color, length in zip(colors, lengths):
        rs = [r for r in fit.residuals if r["length"] == length]
        axr.scatter([r["capacity"] for r in rs], [r["residual"] for r in rs], color=color, s=20)
    axr.axhline(0, color="k", lw=0.8)
    axr.set_xscale("log")
    for axis in (ax.xaxis, ax.yaxis, axr.xaxis):  # ranks 2 and 4 read "2" and "4", not "2 x 10^0"
        axis.set_major_formatter(_PlainLogFormatter())
        axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    axr.set_xlabel(ax.get_xlabel())
    axr.set_ylabel("residual (measured - fitted dL)")
    axr.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
