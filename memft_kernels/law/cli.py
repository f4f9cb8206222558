"""`memft law sweep|fit|predict` and `memft phase`: argument parsing and printing only.

Every handler turns LawInputError (bad input) into the CLI's one-line error with exit code 2.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

from .results import LawInputError, LawWarning


def _cli_error(exc: Exception):
    from ..cli import CLIError

    return CLIError(str(exc))


def _split(text: str, kind, option: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise LawInputError(f"{option}: expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise LawInputError(f"{option}: {text!r} is not a comma-separated list of {kind.__name__}") from None


def _parse_settings(pairs, option: str) -> dict:
    """KEY=VALUE pairs; a value is read as JSON when it parses (numbers, lists, true), else as text."""
    settings = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LawInputError(f"{option}: expected KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def _prog(args) -> str:
    return "memft " + (f"law {args.law_command}" if getattr(args, "law_command", None) else args.command)


@contextlib.contextmanager
def _warnings_to_stderr(args):
    """LawWarnings raised inside: one line each on stderr, "memft law ...: warning: ..."."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LawWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, LawWarning):
                    print(f"{_prog(args)}: warning: {w.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _write(path, what: str, writer) -> None:
    """Run ``writer(path)``; an output path that cannot be written is bad input (one line)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        writer(path)
    except OSError as exc:
        raise LawInputError(f"cannot write the {what} to {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # matplotlib: an unknown image format
        raise LawInputError(f"cannot write the {what} to {path}: {exc}") from None


def _finite(value, option: str, positive: bool = True):
    if value is not None and not (math.isfinite(value) and (value > 0 or not positive)):
        raise LawInputError(f"{option} must be a finite{' positive' if positive else ''} number, got {value:g}")
    return value


def _interruptible(handler):
    """Ctrl-C in a law command: one line, exit 130, no traceback."""
    def run(args) -> int:
        try:
            return handler(args)
        except KeyboardInterrupt:
            print(f"{_prog(args)}: interrupted", file=sys.stderr)
            return 130
    run.__name__ = handler.__name__
    return run


# --- handlers ----------------------------------------------------------------------------------

def _sweep(args) -> int:
    from .sweep import SweepGrid, SweepInterrupted, run_sweep

    try:
        base = _parse_settings(args.set, "--set")
        for key, flag in (("steps", args.steps), ("model", args.model)):
            if flag is None:
                continue
            if key in base and base[key] != flag:  # the flag used to win silently
                raise LawInputError(f"--{key} {flag} and --set {key}={base[key]} contradict each other; give one")
            base[key] = flag
        if args.threads_per_worker < 0:
            raise LawInputError(f"--threads-per-worker must be >= 0, got {args.threads_per_worker}")
        base.setdefault("threads", args.threads_per_worker)
        grid = SweepGrid(
            ranks=_split(args.ranks, int, "--ranks"), lengths=_split(args.lengths, int, "--lengths"),
            tasks=_split(args.tasks, str, "--tasks"), replace_rates=_split(args.replace_rates, float, "--replace-rates"),
            losses=_split(args.losses, str, "--losses"), seeds=_split(args.seeds, int, "--seeds"), base=base,
        )
        with _warnings_to_stderr(args):
            summary = run_sweep(grid, args.out, workers=args.workers, threads_per_worker=args.threads_per_worker,
                                run_root=args.run_root, engine=args.engine, gpus=args.gpus, address=args.address,
                                gpus_per_cell=args.gpus_per_cell, cpus_per_cell=args.cpus_per_cell,
                                retries=args.retries, max_in_flight=args.max_in_flight)
    except LawInputError as exc:
        raise _cli_error(exc) from None
    except SweepInterrupted as exc:
        print(f"memft law sweep: interrupted; {exc.summary['ran']} cells of this run are in {args.out}, "
              f"re-run the same command to do the rest", file=sys.stderr)
        return 130
    print(f"{args.out}: {summary['ran']} cells run, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed")
    for failure in summary["failed"]:
        print(f"  failed {json.dumps(failure['cell'])}: {failure['error']}")
    return 1 if summary["failed"] else 0


def _fit(args) -> int:
    from .fit import fit_law, load_results, matches, plot_fit, required_fields

    try:
        where = _parse_settings(args.where, "--where")
        if args.bootstrap < 0:
            raise LawInputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        if not 0 < args.ci < 1:
            raise LawInputError(f"--ci must be in (0, 1), got {args.ci}")
        if args.seed < 0:
            raise LawInputError(f"--seed must be >= 0, got {args.seed}")
        with _warnings_to_stderr(args):
            cells = load_results(args.results, required=required_fields(args.capacity))
        fit = fit_law(cells, capacity=args.capacity, fit_offset=not args.no_offset, n_boot=args.bootstrap,
                      seed=args.seed, level=args.ci, where=where, keep_saturated=args.keep_saturated)
        print(fit.summary())
        print(f"  saturation rule: {fit.saturation_rule}; left out lines: {fit.excluded_lines or 'none'}")
        if fit.repeated_lines:
            print("  repeated cells left out (each the same grid cell as an earlier line): "
                  + ", ".join(f"line {line} (= line {first})" for line, first in fit.repeated_lines))
        print("  residuals (line, rank, length, dL, fitted, residual):")
        for r in fit.residuals:
            print(f"    {r['line']:>4}  r={r['rank']:<5g} len={r['length']:<6g} {r['dL']:.4f}  {r['predicted']:.4f}  "
                  f"{r['residual']:+.4f}")
        if args.json:
            text = json.dumps(fit.to_json(), indent=2, allow_nan=False) + "\n"
            _write(args.json, "fit", lambda path: Path(path).write_text(text, encoding="utf-8"))
            print(f"fit written to {args.json}")
        png = args.png or str(Path(args.results).with_suffix("")) + "_fit.png"
        if png != "none":
            if where:
                cells = [c for c in cells if all(matches(c.get(k), v) for k, v in where.items())]
            _write(png, "plot", lambda path: plot_fit(fit, cells, path))
            print(f"plot written to {png}")
    except LawInputError as exc:
        raise _cli_error(exc) from None
    return 0


def _predict(args) -> int:
    from .fit import load_fit, longest_length, smallest_capacity

    try:
        for option, value in (("--rank", args.rank), ("--params", args.params), ("--length", args.length),
                              ("--target-dL", args.target_dL)):
            _finite(value, option)
        fit = load_fit(args.fit)
        capacity = None
        if args.rank is not None:
            if fit.capacity == "rank":
                capacity = float(args.rank)
            elif fit.params_per_rank:
                capacity = args.rank * fit.params_per_rank
            else:
                raise LawInputError("this fit is on lora_params and does not know the parameters per rank; "
                                    "give --params instead of --rank")
        if args.params is not None:
            if fit.capacity != "lora_params":
                raise LawInputError("--params needs a fit made with --capacity lora_params; give --rank")
            capacity = float(args.params)
        if capacity is not None and args.length is not None:
            if not (capacity > 0 and args.length > 0):
                raise LawInputError("rank/params and length must be positive")
            print(f"predicted dL = {float(fit.predict(capacity, args.length)):.4f}  "
                  f"({fit.capacity} {capacity:g}, length {args.length:g})")
            return 0
        if args.target_dL is None:
            raise LawInputError("give --target-dL with --rank (or --params), or with --length")
        if capacity is not None:
            length = longest_length(fit, capacity, args.target_dL)
            if length < 1:
                raise LawInputError(f"at {fit.capacity} {capacity:g} no text of one token or more reaches dL >= "
                                    f"{args.target_dL:g} (the law's longest length is {length:.3g} tokens)")
            print(f"longest length with dL >= {args.target_dL:g} at {fit.capacity} {capacity:g}: "
                  f"{length:.1f} tokens ({math.floor(length)} whole tokens)")
        elif args.length is not None:
            need = smallest_capacity(fit, args.length, args.target_dL)
            line = f"smallest {fit.capacity} for dL >= {args.target_dL:g} at length {args.length:g}: {need:.4g}"
            rank = need if fit.capacity == "rank" else (need / fit.params_per_rank if fit.params_per_rank else None)
            if rank is not None:
                line += f" (integer rank {max(1, math.ceil(rank - 1e-9))})"
            print(line)
        else:
            raise LawInputError("give --rank (or --params) or --length")
    except LawInputError as exc:
        raise _cli_error(exc) from None
    return 0


def _phase(args) -> int:
    from .phase import DEFAULT_EDGES, parse_bins, phase_from_path, plot_phase, write_json

    try:
        edges = parse_bins(args.bins) if args.bins else DEFAULT_EDGES
        report = phase_from_path(args.path, edges)
        print(f"{report.source}: {report.n_tokens} tokens")
        print(report.table())
        print(report.verdict())
        png = args.png
        if png is None:
            src = Path(args.path)
            png = str(src / "phase.png") if src.is_dir() else str(src.with_suffix("")) + "_phase.png"
        if png != "none":
            _write(png, "plot", lambda path: plot_phase(report, path))
            print(f"plot written to {png}")
        if args.json:
            _write(args.json, "table", lambda path: write_json(report, path))
            print(f"table written to {args.json}")
    except LawInputError as exc:
        raise _cli_error(exc) from None
    return 1 if report.n_violations else 0


# --- parsers -----------------------------------------------------------------------------------

def add_subcommands(subparsers) -> None:
    law = subparsers.add_parser("law", help="the Parametric Memory Law: sweep, fit, predict")
    law_sub = law.add_subparsers(dest="law_command", required=True)

    sweep = law_sub.add_parser("sweep", help="train over a grid of ranks x lengths; one JSON line per cell")
    sweep.add_argument("--out", required=True, help="results file (JSON lines); re-running skips finished cells")
    sweep.add_argument("--ranks", required=True, help="LoRA ranks, e.g. 1,2,4,8")
    sweep.add_argument("--lengths", required=True, help="memorized lengths in tokens, e.g. 128,256,512")
    sweep.add_argument("--tasks", default="random", help="tasks (random, text); default random")
    sweep.add_argument("--replace-rates", default="0", help="text task: replace rates; default 0")
    sweep.add_argument("--losses", default="ce", help="losses (ce, memft-ot, memft-sw); default ce")
    sweep.add_argument("--seeds", default="0", help="seeds; default 0")
    sweep.add_argument("--steps", type=int, default=None, help="training steps per cell (default: train's)")
    sweep.add_argument("--model", default=None, help="built-in model name or local model folder")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any other training option for every cell, e.g. --set target_modules='[\"down_proj\"]'")
    sweep.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per cell")
    sweep.add_argument("--run-root", default=None, help="folder for the per-cell run folders (default: next to --out)")
    sweep.add_argument("--retries", type=int, default=2,
                       help="run a cell whose worker died or raised again up to this many times (default 2)")
    sweep.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: worker processes on this machine; ray: one Ray task per cell (docs/LAW.md)")
    local = sweep.add_argument_group("local engine")
    local.add_argument("--workers", type=int, default=None,
                       help="worker processes (default 1, or one per --gpus device; 0: run in this process)")
    local.add_argument("--gpus", default=None, metavar="0,1,...",
                       help="pin worker i to device i (CUDA_VISIBLE_DEVICES), round robin over this list")
    ray = sweep.add_argument_group("ray engine")
    ray.add_argument("--address", default=None,
                     help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray instance)")
    ray.add_argument("--gpus-per-cell", type=float, default=None,
                     help="GPUs per cell (default 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-cell", type=float, default=None, help="CPUs per cell (default --threads-per-worker)")
    ray.add_argument("--max-in-flight", type=int, default=None, help="cells submitted at a time (default all)")
    sweep.set_defaults(func=_interruptible(_sweep))

    fit = law_sub.add_parser("fit", help="fit dL = C r^alpha len^-beta + b to a sweep's results")
    fit.add_argument("results", help="results file written by `memft law sweep`")
    fit.add_argument("--capacity", choices=("rank", "lora_params"), default="rank",
                     help="capacity variable: LoRA rank or trainable LoRA parameters")
    fit.add_argument("--where", action="append", metavar="KEY=VALUE", help="use only cells with this field value, e.g. loss=ce")
    fit.add_argument("--no-offset", action="store_true", help="fix b = 0")
    fit.add_argument("--keep-saturated", action="store_true", help="fit saturated cells too")
    fit.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples for the CIs (0: none)")
    fit.add_argument("--ci", type=float, default=0.95, help="confidence level")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--json", default=None, help="write the fit (C, alpha, beta, b, r2, CIs, residuals) here")
    fit.add_argument("--png", default=None, help="plot file (default: RESULTS_fit.png; 'none' for no plot)")
    fit.set_defaults(func=_interruptible(_fit))

    predict = law_sub.add_parser("predict", help="invert a fit: longest length for a rank, smallest rank for a length")
    predict.add_argument("fit", help="fit file written by `memft law fit --json`")
    predict.add_argument("--target-dL", dest="target_dL", type=float, default=None, help="the loss reduction to reach")
    predict.add_argument("--rank", type=float, default=None, help="LoRA rank: gives the longest length")
    predict.add_argument("--params", type=float, default=None, help="trainable LoRA parameters (lora_params fits)")
    predict.add_argument("--length", type=float, default=None, help="text length: gives the smallest rank")
    predict.set_defaults(func=_interruptible(_predict))

    phase = subparsers.add_parser("phase", help="greedy recall vs target probability from a run's per-token stats")
    phase.add_argument("path", help="a run folder (with per-token stats) or a stats file (.jsonl, .csv, .npz, .safetensors, .pt)")
    phase.add_argument("--bins", default=None, help="bin count (even) or comma-separated edges including 0.5")
    phase.add_argument("--png", default=None, help="plot file (default: next to the stats; 'none' for no plot)")
    phase.add_argument("--json", default=None, help="write the table and checks here")
    phase.set_defaults(func=_interruptible(_phase))
    for parser in (law, sweep, fit, predict, phase):
        _one_line_errors(parser)


def _one_line_errors(parser) -> None:
    """argparse's errors (a bad flag value, a missing argument) in one line, exit 2: like every other
    bad input of these commands, without the usage block ahead of it."""
    def error(message):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
