"""The Parametric Memory Law toolkit: sweep the training loop over ranks x lengths, fit
dL = C * r^alpha * len^(-beta) + b, invert the fit, and check the phase transition (p > 0.5 means
greedy recall) on per-token stats.

Modules: results (the sweep's JSON-lines file), sweep, fit (fit, predict, plot), phase, cli.
"""
from .cli import add_subcommands
from .fit import LawFit, fit_law, fit_results_file, load_fit, longest_length, smallest_capacity
from .phase import PhaseReport, analyze_phase, load_token_stats, phase_from_path
from .results import LawInputError, load_results
from .sweep import SweepGrid, run_sweep

__all__ = [
    "add_subcommands", "LawFit", "fit_law", "fit_results_file", "load_fit", "longest_length",
    "smallest_capacity", "PhaseReport", "analyze_phase", "load_token_stats", "phase_from_path",
    "LawInputError", "load_results", "SweepGrid", "run_sweep",
]
