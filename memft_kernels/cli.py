"""The ``memft`` command. Subcommands live next to what they run; this file only wires them.

A subcommand module exposes ``add_subcommands(subparsers)`` and its handlers raise ``CLIError`` for
bad input, which prints one line and exits with code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands (each defines add_subcommands(subparsers)).
_SUBCOMMAND_MODULES = (
    "memft_kernels.train.cli",  # memft train
    "memft_kernels.law",  # memft law sweep|fit|predict, memft phase
    "memft_kernels.bench",  # memft bench
)


class CLIError(Exception):
    """Bad input from the command line: reported in one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors in one line (no usage block), exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _info(args) -> int:
    import platform

    import torch

    from . import __version__, dispatch

    print(f"memft_kernels {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}", end="")
    try:
        import triton

        print(f"  triton {triton.__version__}")
    except ImportError:
        print("  triton not installed")
    print(f"cuda device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print("backends:")
    for name, state in dispatch.backend_report().items():
        print(f"  {name:7s} {state}")
    try:
        from .ops import native_cuda

        archs = native_cuda.built_architectures()
    except Exception:  # noqa: BLE001 - info must print whatever is or is not built
        archs = None
    print(f"CUDA architectures built: {archs or 'none'}")
    if archs:
        from .ops import cuda_driver

        print(f"CUDA runtime in the CUDA module: {cuda_driver.describe(native_cuda._C)}")
    try:
        from .ops import native_cpu

        isa = native_cpu.isa()
    except Exception:  # noqa: BLE001 - info must print whatever is or is not built
        isa = None
    print(f"CPU kernels: {isa or 'not built'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="memft", description="MemFT loss kernels, LoRA memorization training and the Parametric Memory Law.")
    parser.add_argument("--version", action="version", version=f"memft_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, backends available here and why the others are not")
    info.set_defaults(func=_info)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def _one_line_warnings(command: str):
    """warnings.formatwarning for the command: a warning raised by this package (a corrupt checkpoint
    fell back to the older one, ...) as one line "memft CMD: warning: ...", not Python's two lines of
    file:line and source; warnings of other libraries keep their usual form."""
    import os
    import warnings

    original = warnings.formatwarning
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"memft {command}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    return formatwarning


def main(argv=None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    original_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"memft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (or a run's SIGTERM): one line, no traceback (a run says how to resume)
        print(f"memft {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except BrokenPipeError:
        # `memft info | head`: the reader left; stop quietly, with stdout pointed at nothing so the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        warnings.formatwarning = original_format
