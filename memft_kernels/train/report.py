"""Run outputs: report.json, the markdown table, PNG plots, the adapter (safetensors), tokens.npz."""
from __future__ import annotations

import os
from typing import List

from . import checkpoint as ckpt

TABLE_COLUMNS = (
    ("loss", "loss fn", "{}"),
    ("rank", "r", "{}"),
    ("answer_tokens", "tokens", "{}"),
    ("base_loss", "base loss", "{:.3f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("dL", "dL", "{:.3f}"),
    ("token_accuracy", "argmax acc", "{:.1%}"),
    ("recalled_frac", "p>0.5", "{:.1%}"),
    ("exact_recall", "exact recall", "{:.1%}"),
    ("steps_to_all_recalled", "steps to all p>0.5", "{}"),
    ("steps_to_full_recall", "steps to 100% recall", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def markdown_table(reports: List[dict]) -> str:
    def cell(report, key, fmt):
        value = report.get(key)
        return "-" if value is None else fmt.format(value)

    head = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(r, k, f) for k, _, f in TABLE_COLUMNS) + " |" for r in reports]
    return "\n".join([head, rule] + rows)


def write_plots(history: List[dict], run_dir: str, title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval"]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train CE / token")
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o", label="eval CE / token")
    ax.axhline(0.6931, color="gray", ls="--", lw=0.8, label="ln 2 (p = 0.5)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in train], [r["recalled_frac"] for r in train], label="tokens with p > 0.5")
    ax.plot([r["step"] for r in train], [r["token_accuracy"] for r in train], label="argmax accuracy")
    ax.plot([r["step"] for r in evals], [r["argmax_exact"] for r in evals], "-", label="samples with every argmax right")
    gen = [r for r in evals if r.get("exact_recall") is not None]
    ax.plot([r["step"] for r in gen], [r["exact_recall"] for r in gen], "o", label="exact recall (greedy generation)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "recall.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_compare_plot(reports: List[dict], path: str) -> None:
    """One figure for --compare: loss and share of tokens with p > 0.5 per loss function."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_p) = plt.subplots(1, 2, figsize=(10, 3.6))
    for report in reports:
        with open(os.path.join(report["run_dir"], "metrics.jsonl"), encoding="utf-8") as f:
            train = [r for r in map(json.loads, f) if r.get("kind") == "train"]
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["ce"] for r in train], label=report["loss"])
        ax_p.plot(steps, [r["recalled_frac"] for r in train], label=report["loss"])
    ax_loss.axhline(0.6931, color="gray", ls="--", lw=0.8)
    ax_loss.set(yscale="log", xlabel="step", ylabel="train CE / token")
    ax_p.set(ylim=(-0.02, 1.02), xlabel="step", ylabel="tokens with p > 0.5")
    ax_loss.legend()
    fig.tight_layout()
    ckpt.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_tokens(per_sample: List[dict], first_wrong: List, path: str) -> None:
    """tokens.npz: per-token final stats of every answer token, samples concatenated in order."""
    import numpy as np

    prob = np.concatenate([s["prob"].numpy() for s in per_sample]).astype(np.float32)
    ce = np.concatenate([s["ce"].numpy() for s in per_sample]).astype(np.float32)
    correct = np.concatenate([s["correct"].numpy() for s in per_sample]).astype(bool)
    sample = np.concatenate([np.full(len(s["prob"]), i, dtype=np.int32) for i, s in enumerate(per_sample)])
    position = np.concatenate([np.arange(len(s["prob"]), dtype=np.int32) for s in per_sample])
    fw = np.array([-1 if f is None else f for f in first_wrong], dtype=np.int32)
    ckpt.atomic_write(path, lambda f: np.savez(f, prob=prob, ce=ce, correct=correct, sample=sample,
                                               position=position, first_wrong=fw))


def write_outputs(run, report: dict) -> None:
    config, run_dir = run.config, run.run_dir
    if config.save_tokens:
        write_tokens(run.last_eval["per_sample"], run.last_eval["first_wrong_per_sample"],
                     os.path.join(run_dir, "tokens.npz"))
        report["tokens_file"] = os.path.join(run_dir, "tokens.npz")
    if config.save_adapter:
        run.model.save_pretrained(os.path.join(run_dir, "adapter"), safe_serialization=True,
                                  state_dict=getattr(run, "adapter_state", None))  # --fsdp: the gathered LoRA
    ckpt.atomic_write_json(os.path.join(run_dir, "report.json"), report)
    table = markdown_table([report])
    ckpt.atomic_write_text(os.path.join(run_dir, "report.md"), table + "\n")
    if config.plots:  # last, and never fatal: a plot that fails (matplotlib's setup) must not lose the report
        plot_or_warn(lambda: write_plots(run.history, run_dir, f"{config.task} / {config.loss} / r={config.rank}"),
                     "loss.png and recall.png")


def plot_or_warn(draw, what: str) -> None:
    """Run ``draw()``; a failure is one warning naming ``what`` (it used to be a traceback after the run
    had trained, before its report.json was written: a bad MPLBACKEND lost the run's report)."""
    import warnings

    try:
        draw()
    except Exception as exc:  # noqa: BLE001 - any plotting failure; the numbers are already written
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        warnings.warn(f"{what} not written ({type(exc).__name__}: {text}); the run's other files are",
                      stacklevel=2)
