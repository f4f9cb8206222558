"""The benchmark harness, shipped with the package: ``memft bench NAME [args]``.

    memft bench loss --quick            # the MemFT loss, every provider (bench/loss.py)
    memft bench loss --gpu-set          # issue 13's side-by-side GPU run (bf16, N = 16384, 4 vocabularies)
    memft bench linear-loss --quick     # fused linear loss vs the materialized logits (bench/linear_loss.py)
    memft bench train-step              # one LoRA training step per loss (bench/train_step.py)
    memft bench recall                  # greedy recall of 2048 tokens, KV cache vs uncached (bench/recall.py)
    memft bench tune-triton             # Triton launch configurations, GPU (bench/tune_triton.py)
    memft bench report RESULTS.csv      # markdown tables and a PNG from result CSVs (bench/report.py)
    memft bench results-report          # docs/RESULTS.md: law sweeps and MemFT vs CE (bench/results_report.py)
    memft bench gpu-check               # bash benchmarks/gpu_check.sh (source checkout, GPU host)

Everything after the name goes to that benchmark unchanged (``memft bench loss --help``). The
modules: ``timing`` (clocks, memory peaks, copy bandwidth, machine facts, result files),
``providers`` (what is compared, and why something cannot run here), one module per benchmark and
the two reports. Results go to ``benchmarks/results/`` in a source checkout and to
``./bench_results/`` otherwise. ``benchmarks/*.py`` in the checkout are thin entry points to the
same functions; only ``gpu_check.sh`` (which builds the checkout and runs its tests) needs one.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import subprocess
import sys
from typing import Callable, Dict, List, Optional

# name -> the module whose main(argv, prog) runs it
BENCHMARKS: Dict[str, str] = {
    "loss": "memft_kernels.bench.loss",
    "linear-loss": "memft_kernels.bench.linear_loss",
    "train-step": "memft_kernels.bench.train_step",
    "recall": "memft_kernels.bench.recall",
    "tune-triton": "memft_kernels.bench.tune_triton",
    "report": "memft_kernels.bench.report",
    "results-report": "memft_kernels.bench.results_report",
}
CHECKOUT_ONLY = {"gpu-check": "gpu_check.sh"}
NAMES = list(BENCHMARKS) + list(CHECKOUT_ONLY)


def entry_point(name: str) -> Callable[..., object]:
    """The ``main(argv=None, prog=None)`` of benchmark ``name`` (a module of this package)."""
    return importlib.import_module(BENCHMARKS[name]).main


def command_for(name: str, extra: List[str]) -> List[str]:
    """The command line of a checkout-only entry (``gpu-check``); CLIError without a checkout."""
    from ..cli import CLIError
    from .timing import checkout_root

    root = checkout_root()
    if root is None:
        raise CLIError(
            f"`memft bench {name}` runs benchmarks/{CHECKOUT_ONLY[name]} of a source checkout (it builds the "
            "native code and runs the test suite); this is an installed package. Clone the repository and run "
            f"`bash benchmarks/{CHECKOUT_ONLY[name]}` there"
        )
    return ["bash", str(root / "benchmarks" / CHECKOUT_ONLY[name]), *extra]


# Benchmarks whose rows say "error: ..." when a provider failed (a skipped one is not a failure;
# tune-triton's failing configurations are its findings).
_FAIL_ON_ERROR_ROWS = ("loss", "linear-loss", "train-step")


@contextlib.contextmanager
def _one_line_usage_errors():
    """A benchmark's own argparse errors in one line (as every `memft` error), not usage + error."""
    from ..cli import OneLineParser

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = OneLineParser.error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def run(name: str, extra: List[str]) -> int:
    """Run benchmark ``name`` with arguments ``extra`` in this process; its exit code: 0, or 1 when
    a provider failed (its rows are written all the same), 2 for bad arguments."""
    if name in CHECKOUT_ONLY:
        return subprocess.call(command_for(name, extra))
    from ..cli import CLIError
    from .timing import ResultFileError

    try:
        with _one_line_usage_errors():
            result = entry_point(name)(extra, prog=f"memft bench {name}")
    except SystemExit as exc:  # argparse (--help, bad arguments) and the benchmarks' own refusals
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        raise CLIError(str(exc.code)) from None
    except ResultFileError as exc:  # --csv naming a file of other columns: one line, not a traceback
        raise CLIError(str(exc)) from None
    if isinstance(result, int):
        return result
    if name in _FAIL_ON_ERROR_ROWS and isinstance(result, list):
        failed = sorted({str(r.get("provider")) for r in result if str(r.get("status", "")).startswith("error")})
        if failed:
            print(f"memft bench {name}: {len(failed)} provider(s) failed: {', '.join(failed)} (see their rows)",
                  file=sys.stderr)
            return 1
    return 0


def _run(args) -> int:
    extra = list(args.script_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return run(args.script, extra)


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark (" + ", ".join(NAMES) + ")",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after the name go to the benchmark; `memft bench loss --help` shows them.",
    )
    bench.add_argument("script", choices=NAMES, help="which benchmark to run")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_run)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m memft_kernels.bench NAME [args]``: the same as ``memft bench NAME [args]``."""
    from ..cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
