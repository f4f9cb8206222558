"""TrainConfig: every option of a memorization run, as plain data with defaults that run.

The defaults are the embedded main job (`memft train` with no arguments): a random-init tiny Llama
(initializer_range 0.2, see docs/TRAINING.md for why), a random token sequence, LoRA on every
linear module, MemFT-OT. Validation raises ValueError naming the option; the CLI turns that into
a one-line error.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

LOSSES = ("ce", "memft-ot", "memft-sw")
TASKS = ("random", "text", "phonebook")
TOKENIZERS = ("auto", "byte", "trained", "model")
FALLBACKS = ("mean", "zero")
WINDOW_STATES = ("row", "sample")  # memft-sw window state: per batch row (the authors') or per sample
CURRICULUM_STYLES = ("paper", "stages")
ACCUM_NORMALIZE = ("mean", "tokens", "active")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
AUTOCASTS = ("off", "bf16")
ATTNS = ("auto", "sdpa", "eager", "flash")


def _is_device(name) -> bool:
    if not isinstance(name, str):
        return False
    if name in ("auto", "cpu", "cuda"):
        return True
    return name.startswith("cuda:") and name[5:].isdigit()


class TrainInputError(ValueError):
    """Bad input to a run (option, data file, model folder): `memft train` prints it in one line."""


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    model: str = "tiny"  # a built-in config name (see models.BUILTIN_MODELS) or a local HF folder
    init_range: float = 0.2  # initializer_range of a built-in model (0.02 never reaches p > 0.5)
    dtype: str = "float32"  # model weights: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # --- LoRA ---------------------------------------------------------------------------------
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers: Optional[List[int]] = None  # peft layers_to_transform; None = all layers
    # --- task ---------------------------------------------------------------------------------
    task: str = "random"
    length: int = 512  # tokens per sample to memorize (random/text); ignored by phonebook
    samples: int = 1  # sequences (random/text) or phonebook entries
    data: Optional[str] = None  # text task: a UTF-8 file; None = the bundled passage
    replace_rate: float = 0.0  # text task: share of tokens swapped for random ones
    tokenizer: str = "auto"  # auto (model's own for --model, else byte) | byte | trained | model
    trained_vocab: int = 512  # vocabulary of the tokenizer trained in-process
    vocab_size: int = 4096  # random task on a built-in model: ids drawn from [0, vocab_size - 2) (then <pad>, <bos>)
    curriculum: bool = False  # train on a growing prefix of one seeded order of the samples
    curriculum_style: str = "paper"  # paper: the authors' rule (below); stages: 20/40/.../100% every curriculum_epochs
    curriculum_ratios: Optional[List[float]] = None  # paper: share of the samples per period; None = 0.2,0.4,0.6,0.8,1.0
    curriculum_boundaries: Optional[List[int]] = None  # paper: epoch where each ratio ends; None = 20,40,60,80,200
    curriculum_epochs: int = 1  # stages: epochs per curriculum stage
    # --- loss ---------------------------------------------------------------------------------
    loss: str = "memft-ot"
    threshold: float = 0.5
    sharpness: float = 10.0
    fallback: str = "mean"  # memft-ot when no token is active: plain mean or zero
    window_span: float = 50.0  # memft-sw: window [anchor, anchor + span * e)
    window_decay: float = 20.0  # weight exp(-(t - anchor) / decay) inside the window
    window_floor: float = 0.01  # weight beyond the window
    window_patience: int = 3  # steps the anchor must stay put before e grows
    window_growth: float = 0.5
    window_max: float = 4.0
    window_state: str = "row"  # row: state per row of the batch (the authors'); sample: per sample
    backend: str = "auto"  # memft_loss backend
    # --- optimization -------------------------------------------------------------------------
    steps: int = 150
    lr: float = 1e-2
    batch_size: int = 0  # samples per micro-batch over all ranks; 0 = all samples (full batch)
    grad_accum: int = 1  # micro-batches per optimizer step (never across an epoch's end, as the authors')
    accum_normalize: str = "mean"  # mean: each micro-batch's loss / grad_accum (authors'); tokens: sum w l / valid tokens of the step; active: sum w l / sum w of the whole step (MemFTAccumulator)
    epochs: int = 0  # > 0: train this many epochs (steps and the lr schedule follow from it, as the authors'); 0: use steps
    grad_clip: float = 1.0
    seed: int = 0
    # torch CPU threads (0 = torch's default). 1 by default: the tiny models' matrices gain little
    # from a second thread, and on a shared CPU a second OpenMP thread spins (docs/TRAINING.md).
    threads: int = 1
    # --- memory and speed (docs/TRAINING.md, "Large models") -----------------------------------
    # The loss from the last hidden states with memft_linear_loss (no N x V logits). None = auto:
    # on when V x tokens-per-step >= FUSED_HEAD_AUTO_ELEMENTS (see plan.fused_head_default).
    fused_head: Optional[bool] = None
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward
    autocast: str = "off"  # off | bf16 (float32 weights, bfloat16 matmuls)
    attn: str = "auto"  # auto (transformers' choice) | sdpa | eager | flash (flash_attention_2)
    compile: bool = False  # torch.compile of the model's forward
    fsdp: bool = False  # under torchrun: shard the base model with FSDP2 (per decoder layer)
    # --- evaluation and output ----------------------------------------------------------------
    eval_every: int = 25  # greedy-generation evaluation every k steps (and at the end)
    checkpoint_every: int = 0  # 0 = no checkpoints
    out_dir: str = "runs"
    run_dir: Optional[str] = None  # None = <out_dir>/<timestamp>-<loss>
    save_tokens: bool = False  # write tokens.npz with per-token final stats
    save_adapter: bool = True
    plots: bool = True
    progress: bool = True
    recipe: Optional[str] = None  # informational: the --recipe these defaults came from (train/recipes.py)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad option; return self."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainInputError(msg)

        need(self.loss in LOSSES, f"loss={self.loss!r} is not supported; choose one of {', '.join(LOSSES)}")
        need(self.task in TASKS, f"task={self.task!r} is not supported; choose one of {', '.join(TASKS)}")
        need(self.tokenizer in TOKENIZERS, f"tokenizer={self.tokenizer!r} is not supported; choose one of {', '.join(TOKENIZERS)}")
        need(self.fallback in FALLBACKS, f"fallback={self.fallback!r} is not supported; choose one of {', '.join(FALLBACKS)}")
        need(self.dtype in ("float32", "bfloat16", "float16"), f"dtype={self.dtype!r} must be float32, bfloat16 or float16")
        need(isinstance(self.rank, int) and self.rank > 0, f"rank={self.rank!r} must be an integer > 0")
        need(self.alpha is None or self.alpha > 0, f"alpha={self.alpha!r} must be > 0")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout!r} must be in [0, 1)")
        need(len(self.target_modules) > 0, "target_modules must name at least one module")
        need(self.layers is None or (len(self.layers) > 0 and all(i >= 0 for i in self.layers)),
             f"layers={self.layers!r} must be a non-empty list of layer indices >= 0")
        need(self.length > 0, f"length={self.length!r} must be > 0")
        need(self.samples > 0, f"samples={self.samples!r} must be > 0")
        need(0.0 <= self.replace_rate <= 1.0, f"replace_rate={self.replace_rate!r} must be in [0, 1]")
        need(self.trained_vocab >= 260, f"trained_vocab={self.trained_vocab!r} must be >= 260 (256 bytes + specials)")
        need(self.vocab_size >= 3, f"vocab_size={self.vocab_size!r} must be >= 3 (the last two ids are <bos> and <pad>)")
        need(0.0 < self.threshold <= 1.0, f"threshold={self.threshold!r} must be in (0, 1]")
        need(self.sharpness > 0, f"sharpness={self.sharpness!r} must be > 0")
        need(self.window_span > 0 and self.window_decay > 0, "window_span and window_decay must be > 0")
        need(0.0 <= self.window_floor <= 1.0, f"window_floor={self.window_floor!r} must be in [0, 1]")
        need(self.window_patience >= 1 and self.window_growth >= 0 and self.window_max >= 1,
             "window_patience >= 1, window_growth >= 0 and window_max >= 1 are required")
        need(self.steps > 0, f"steps={self.steps!r} must be > 0")
        need(self.lr > 0, f"lr={self.lr!r} must be > 0")
        need(self.batch_size >= 0, f"batch_size={self.batch_size!r} must be >= 0 (0 = full batch)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip!r} must be >= 0 (0 = no clipping)")
        need(self.threads >= 0, f"threads={self.threads!r} must be >= 0")
        need(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must be >= 0")
        need(self.init_range > 0, f"init_range={self.init_range!r} must be > 0")
        need(self.curriculum_epochs >= 1, f"curriculum_epochs={self.curriculum_epochs!r} must be >= 1")
        need(self.window_state in WINDOW_STATES, f"window_state={self.window_state!r} must be one of {', '.join(WINDOW_STATES)}")
        need(self.curriculum_style in CURRICULUM_STYLES,
             f"curriculum_style={self.curriculum_style!r} must be one of {', '.join(CURRICULUM_STYLES)}")
        need(isinstance(self.grad_accum, int) and self.grad_accum >= 1, f"grad_accum={self.grad_accum!r} must be an integer >= 1")
        need(self.accum_normalize in ACCUM_NORMALIZE,
             f"accum_normalize={self.accum_normalize!r} must be one of {', '.join(ACCUM_NORMALIZE)}")
        need(isinstance(self.epochs, int) and self.epochs >= 0, f"epochs={self.epochs!r} must be an integer >= 0 (0 = use steps)")
        paper_lists = self.curriculum_ratios is not None or self.curriculum_boundaries is not None
        need(not paper_lists or (self.curriculum and self.curriculum_style == "paper"),
             "curriculum_ratios / curriculum_boundaries need --curriculum (style paper)")
        if self.curriculum and self.curriculum_style == "paper":
            from .windows import PAPER_BOUNDARIES, PAPER_RATIOS

            ratios = list(self.curriculum_ratios if self.curriculum_ratios is not None else PAPER_RATIOS)
            bounds = list(self.curriculum_boundaries if self.curriculum_boundaries is not None else PAPER_BOUNDARIES)
            need(len(ratios) == len(bounds) and len(ratios) > 0,
                 f"curriculum_ratios {ratios} and curriculum_boundaries {bounds} must have the same, non-zero length")
            need(all(0 < r <= 1 for r in ratios), f"curriculum_ratios={ratios} must be in (0, 1]")
            need(all(isinstance(b, int) and b > 0 for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:])),
                 f"curriculum_boundaries={bounds} must be increasing epoch numbers > 0")
            need(self.batch_size > 0, "the paper curriculum floors each epoch to whole batches: give --batch-size > 0")
        need(self.data is None or self.task == "text", f"data={self.data!r} is for the text task; this is task={self.task!r}")
        need(self.backend in BACKENDS, f"backend={self.backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
        need(_is_device(self.device), f"device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        need(self.autocast in AUTOCASTS, f"autocast={self.autocast!r} is not supported; choose one of {', '.join(AUTOCASTS)}")
        need(self.attn in ATTNS, f"attn={self.attn!r} is not supported; choose one of {', '.join(ATTNS)}")
        need(not (self.autocast != "off" and self.dtype != "float32"),
             f"autocast={self.autocast!r} is for float32 weights; the weights are {self.dtype}")
        for f in fields(self):  # inf / nan pass the range checks above (nan compares False both ways)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainInputError(f"{f.name}={value!r} must be a finite number")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainInputError(f"unknown TrainConfig option(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes) -> "TrainConfig":
        data = self.to_dict()
        data.update(changes)
        return TrainConfig.from_dict(data)
