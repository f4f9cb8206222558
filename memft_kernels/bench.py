"""``memft bench``: run the benchmark scripts of the source checkout (``benchmarks/`` next to the
package, as in an editable install). The scripts are not part of the wheel; without a checkout the
command says so.

    memft bench loss --quick            # benchmarks/bench_loss.py --quick
    memft bench train-step              # benchmarks/bench_train_step.py
    memft bench linear-loss --quick     # benchmarks/bench_linear_loss.py --quick
    memft bench tune-triton             # benchmarks/tune_triton.py (GPU: launch configurations)
    memft bench report RESULTS.csv      # benchmarks/report.py RESULTS.csv
    memft bench gpu-check               # bash benchmarks/gpu_check.sh (GPU host)

Everything after the script name is passed to the script unchanged (``memft bench loss --help``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

SCRIPTS = {
    "loss": "bench_loss.py",
    "train-step": "bench_train_step.py",
    "linear-loss": "bench_linear_loss.py",
    "tune-triton": "tune_triton.py",
    "report": "report.py",
    "gpu-check": "gpu_check.sh",
}


def benchmarks_dir() -> Optional[Path]:
    """The checkout's ``benchmarks/`` folder next to the package, or None if this is not a checkout."""
    candidate = Path(__file__).resolve().parent.parent / "benchmarks"
    return candidate if (candidate / "timing.py").is_file() else None


def command_for(name: str, extra: List[str]) -> List[str]:
    """The command line that ``memft bench NAME EXTRA...`` runs (CLIError if the script is absent)."""
    from .cli import CLIError

    folder = benchmarks_dir()
    if folder is None:
        raise CLIError(
            f"no benchmarks/ folder next to the package ({Path(__file__).resolve().parent.parent}): the benchmark "
            "scripts ship with the source checkout, not the wheel; clone the repository and `pip install -e .`"
        )
    script = folder / SCRIPTS[name]
    if not script.is_file():
        raise CLIError(f"{script} is not in this checkout (benchmark {name!r} is not built yet)")
    if script.suffix == ".sh":
        return ["bash", str(script), *extra]
    return [sys.executable, str(script), *extra]


def _run(args) -> int:
    extra = list(args.script_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call(command_for(args.script, extra))


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark script (loss, train-step, linear-loss, tune-triton, report, gpu-check)",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after the script name go to the script; `memft bench loss --help` shows them.",
    )
    bench.add_argument("script", choices=list(SCRIPTS), help="which benchmark to run")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(func=_run)
