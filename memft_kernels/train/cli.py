"""`memft train`: one option per TrainConfig field, plus --compare and --resume.

Bad input (TrainInputError) becomes memft_kernels.cli.CLIError: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import time
import typing
from dataclasses import fields

from .config import LOSSES, TrainConfig, TrainInputError

HELP = {
    "model": "built-in model (nano, tiny, small) or a local transformers causal-LM folder",
    "init_range": "initializer_range of a built-in model (0.2 reaches p > 0.5; 0.02 does not)",
    "dtype": "model weights dtype: float32, bfloat16, float16",
    "device": "auto, cpu, cuda, cuda:N",
    "rank": "LoRA rank r (> 0)",
    "alpha": "LoRA alpha (default: = rank)",
    "dropout": "LoRA dropout",
    "target_modules": "comma-separated module names to adapt",
    "layers": "comma-separated layer indices for LoRA (peft layers_to_transform); 'all' = every layer",
    "task": "random | text | phonebook",
    "length": "tokens to memorize per sample (random, text)",
    "samples": "sequences (random, text) or phonebook entries",
    "data": "text task: a UTF-8 text file (default: the bundled Gettysburg Address)",
    "replace_rate": "text task: share of tokens replaced by random ones",
    "tokenizer": "auto | byte | trained | model",
    "trained_vocab": "vocabulary size of the tokenizer trained in-process",
    "vocab_size": "random task on a built-in model: vocabulary of the model and of the random ids",
    "curriculum": "train on a growing prefix of one seeded order of the samples (docs/TRAINING.md)",
    "curriculum_style": "paper (the authors': ratios by epoch boundaries, whole batches) | stages (20/40/../100%% per --curriculum-epochs)",
    "curriculum_ratios": "paper curriculum: comma-separated shares of the samples (default 0.2,0.4,0.6,0.8,1.0)",
    "curriculum_boundaries": "paper curriculum: comma-separated epochs where each ratio ends (default 20,40,60,80,200)",
    "curriculum_epochs": "stages curriculum: epochs per stage",
    "loss": "ce | memft-ot | memft-sw",
    "threshold": "recall threshold tau on the target probability",
    "sharpness": "memft-sw sigmoid gate sharpness",
    "fallback": "memft-ot when no token is active: mean (plain CE) or zero",
    "window_span": "memft-sw window length per unit of e",
    "window_decay": "memft-sw weight decay length inside the window",
    "window_floor": "memft-sw weight beyond the window",
    "window_patience": "memft-sw: steps the anchor must stay before the window grows",
    "window_growth": "memft-sw: growth of e per step",
    "window_max": "memft-sw: largest e",
    "window_state": "memft-sw window state: row (per batch row, the authors') | sample (per sample)",
    "backend": "memft_loss backend: auto, torch, triton, cuda, cpu",
    "steps": "optimizer steps",
    "lr": "AdamW learning rate (linear decay to 0)",
    "batch_size": "samples per micro-batch over all ranks (0 = all samples)",
    "grad_accum": "micro-batches per optimizer step",
    "accum_normalize": "mean: each micro-batch's MemFT mean / grad-accum (the authors') | tokens: sum w l / valid tokens of the step | active: sum w l / sum w of the whole step (exact)",
    "epochs": "train this many epochs (steps and lr schedule follow, as the authors'); 0 = use --steps",
    "recipe": "the authors' settings as defaults: paper-phonebook | paper-longcontext [:llama|:qwen [:LENGTH]]",
    "grad_clip": "gradient norm clip (0 = off)",
    "seed": "seed of the data, the model init and the LoRA init",
    "threads": "torch CPU threads (0 = torch default; 1 is fastest for the built-in models on a shared CPU)",
    "eval_every": "greedy-generation evaluation every k steps (0 = only at the end)",
    "checkpoint_every": "atomic checkpoint every k steps (0 = none)",
    "out_dir": "parent folder of new run folders",
    "run_dir": "run folder (default: <out-dir>/<timestamp>-<loss>)",
    "save_tokens": "write tokens.npz with per-token final stats",
    "save_adapter": "save the LoRA adapter (safetensors)",
    "plots": "write loss.png and recall.png",
    "progress": "show a progress bar",
    "fused_head": "loss from the last hidden states with memft_linear_loss, no N x V logits "
                  "(default: on when V x tokens per step >= 2^26, i.e. 256 MiB of float32 logits)",
    "gradient_checkpointing": "recompute each decoder layer's activations in the backward",
    "autocast": "off | bf16 (float32 weights, bfloat16 matmuls)",
    "attn": "attention implementation: auto | sdpa | eager | flash (flash_attention_2, CUDA)",
    "compile": "torch.compile the model's forward",
    "fsdp": "under torchrun: shard the base model with FSDP2, one unit per decoder layer",
}


def _list(text: str):
    return [x.strip() for x in text.split(",") if x.strip()]


def _layers(text: str):
    if text.strip().lower() in ("all", "none", ""):
        return None
    try:
        return [int(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be 'all' or comma-separated integers, got {text!r}") from None


def _floats(text: str):
    try:
        return [float(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str):
    try:
        return [int(x) for x in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _note_given(namespace, dest: str) -> None:
    """Remember which options were given on the command line (a recipe's defaults yield to them)."""
    given = set(getattr(namespace, "given_options", None) or ())
    given.add(dest)
    namespace.given_options = given


class _Store(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="LoRA memorization training with MemFT or CE (embedded default: about 1 min on a CPU core)",
        description="Fine-tune a LoRA adapter to memorize text exactly; see docs/TRAINING.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        hint = hints[f.name]
        kwargs = dict(dest=f.name, default=default, help=HELP.get(f.name, ""), action=_Store)
        if hint is bool or f.name == "fused_head":
            kwargs["action"] = _Bool
        elif f.name == "curriculum_ratios":
            kwargs["type"] = _floats
        elif f.name == "curriculum_boundaries":
            kwargs["type"] = _ints
        elif f.name == "recipe":
            kwargs["type"] = str
        elif f.name == "layers":
            kwargs["type"] = _layers
        elif f.name == "target_modules":
            kwargs["type"] = _list
        elif f.name == "alpha":
            kwargs["type"] = float
        elif f.name in ("data", "run_dir"):
            kwargs["type"] = str
        else:
            kwargs["type"] = type(default)
        p.add_argument(flag, **kwargs)
    p.add_argument("--compare", type=_list, default=None, metavar="LOSSES",
                   help="run the same setting under each loss (e.g. ce,memft-ot,memft-sw) and print one table")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a checkpointed run")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan (per device) and exit without training; every run prints it first")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..cli import CLIError
    from . import resume, train
    from .report import markdown_table

    try:
        if args.resume:
            if args.plan:  # --plan used to be ignored here: the run went on training
                raise TrainInputError(f"--plan prints a new run's memory plan and exits, --resume trains: give one "
                                      f"of them (the plan of {args.resume!r} is in its plan.json)")
            if not os.path.isdir(args.resume):
                raise TrainInputError(f"--resume {args.resume!r}: no such run folder")
            # the run continues exactly as its config.json says: a changed option would be ignored silently
            defaults = TrainConfig()
            changed = [f.name for f in fields(TrainConfig)
                       if f.name != "progress" and getattr(args, f.name) != getattr(defaults, f.name)]
            changed += ["compare"] if args.compare else []
            if changed:
                flag = "--" + changed[0].replace("_", "-")
                raise TrainInputError(f"--resume continues the run as its config.json says; {flag} cannot be "
                                      f"changed (start a new run to change it)")
            reports = [resume(args.resume)]
        else:
            given = set(getattr(args, "given_options", None) or ())
            if args.compare and "loss" in given:  # used to be ignored
                raise TrainInputError(f"--loss {args.loss} and --compare: --compare names the losses it runs; give one")
            options = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
            if args.recipe:
                from .recipes import describe, recipe_config

                given = set(getattr(args, "given_options", None) or ()) - {"recipe"}
                config = recipe_config(args.recipe, **{k: options[k] for k in given})
            else:
                config = TrainConfig(**options).validate()
            if {"steps", "epochs"} <= given and config.epochs:  # --steps used to be ignored
                raise TrainInputError(f"--steps {config.steps} and --epochs {config.epochs}: with --epochs the steps "
                                      "follow from the epochs; give one")
            if args.recipe:
                print(describe(config, given), flush=True)
            if args.plan:
                from .loop import idle_note, setup
                from .plan import format_plan

                run = setup(config, make_dir=False)
                print(format_plan(run.plan, run.world, config.fsdp))
                if idle_note(run) is not None:
                    print(idle_note(run))
                return 0
            if args.compare:
                reports = _compare(config, args.compare)
            else:
                reports = [train(config)]
    except TrainInputError as exc:
        raise CLIError(str(exc)) from None
    import torch.distributed as dist

    printer = reports[0] is not None and not (dist.is_initialized() and dist.get_rank() != 0)  # rank 0 prints
    if dist.is_initialized():
        # Under torchrun: the ranks leave together and tear gloo/NCCL down here, not in the
        # interpreter's exit (where a rank still holding connections can abort after the work is done).
        dist.barrier()
        dist.destroy_process_group()
    if not printer:
        return 0
    print()
    print(markdown_table(reports))
    if len(reports) == 1:
        print(f"\nrun folder: {reports[0]['run_dir']}")
    return 0


def _compare(config: TrainConfig, losses) -> list:
    from . import train_or_resume
    from .checkpoint import atomic_write_text
    from .report import markdown_table, plot_or_warn, write_compare_plot

    bad = [x for x in losses if x not in LOSSES]
    if bad:
        raise TrainInputError(f"--compare: unknown loss {bad[0]!r}; choose from {', '.join(LOSSES)}")
    twice = sorted({x for x in losses if losses.count(x) > 1})
    if twice:
        raise TrainInputError(f"--compare: {twice[0]!r} is listed twice (each loss runs once, in <run-dir>/<loss>)")
    base = config.run_dir or os.path.join(config.out_dir, time.strftime("%Y%m%d-%H%M%S") + "-compare")
    # The same command again (--run-dir given) continues a comparison that was stopped: finished runs
    # are kept, a checkpointed one resumes, the others start.
    from .loop import RunInterrupted

    try:
        reports = [train_or_resume(sub)
                   for sub in (config.replace(loss=loss, run_dir=os.path.join(base, loss)) for loss in losses)]
    except RunInterrupted as exc:  # Ctrl-C: the run's checkpoint is saved; the table needs every run
        given = "" if config.run_dir else f" and --run-dir {base}"
        raise RunInterrupted(f"{exc}; or finish the whole comparison: the same --compare command{given}",
                             exit_code=getattr(exc, "exit_code", 130)) from None
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_rank() != 0):
        atomic_write_text(os.path.join(base, "compare.md"), markdown_table(reports) + "\n")
        if config.plots:
            plot_or_warn(lambda: write_compare_plot(reports, os.path.join(base, "compare.png")), "compare.png")
    return reports
