"""One LoRA training step of a tiny Llama (V = 32000): time and peak memory per loss.

Providers (same model, same batch, same adapter and optimizer; only the loss changes):

* ``hf-default``: ``model(input_ids, labels=labels).loss`` (transformers' own causal-LM loss,
  which upcasts the logits to float32);
* ``memft``: the model's logits, then ``memft_loss`` on them (labels shifted, last position ignored);
* ``memft-linear``: the last hidden states and the lm_head weight into ``memft_linear_loss`` (no
  logits tensor).

The providers are ``PROVIDERS``, a list of ``TrainProvider(name, loss, what, unavailable, prepare)``:
a new row (another head, checkpointing) is one more entry, whose ``loss(model, input_ids, labels)``
returns the step's loss, whose ``unavailable()`` says why it cannot run here (None when it can) and
whose optional ``prepare(model)`` changes the fresh model first (e.g. gradient checkpointing).

A step is zero_grad, forward, loss, backward, AdamW step. The model is built from a config with
random weights (no download), so no token is memorized yet: every token is active and the MemFT
losses equal the plain cross-entropy mean, a check that the three compute the same thing.

``memft bench train-step [--device cpu|cuda] [--quick] [--csv PATH]`` (or
``python benchmarks/bench_train_step.py``)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import timing

IGNORE_INDEX = -100

FIELDS = [
    "date", "host", "device", "device_name", "cpu_name", "cpu_count", "threads", "python", "torch", "triton", "cuda",
    "memft", "commit", "bench", "provider", "dtype", "batch", "seq", "tokens", "V", "hidden", "layers", "lora_r",
    "status", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mem_bytes", "mem_method", "loss", "note",
    "model", "plan_peak_bytes",
]


def build_model(vocab: int, hidden: int, layers: int, lora_r: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A Llama-style model from a config (random init) with a LoRA adapter on the attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: position t predicts labels[t + 1]; the last is ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _loss_hf(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def _loss_memft(model, ids, labels):
    from memft_kernels import memft_loss

    logits = model(input_ids=ids).logits
    return memft_loss(logits, shifted_labels(labels))


def _loss_memft_linear(model, ids, labels):
    from memft_kernels import memft_linear_loss

    causal_lm = model.get_base_model()  # unwrap peft to the real LlamaForCausalLM
    hidden = causal_lm.model(input_ids=ids).last_hidden_state
    target = shifted_labels(labels)
    return memft_linear_loss(hidden.reshape(-1, hidden.shape[-1]), causal_lm.lm_head.weight, target.reshape(-1))


@dataclass
class TrainProvider:
    name: str
    loss: Callable  # (model, input_ids, labels) -> scalar loss of one step
    what: str = ""
    unavailable: Callable[[], Optional[str]] = field(default=lambda: None)  # why not here, or None
    # called once on the fresh (peft-wrapped) model before the optimizer is built, e.g. to turn on
    # gradient checkpointing; None: the model as built
    prepare: Optional[Callable[[torch.nn.Module], None]] = None
    # the memory plan's estimate of the step's extra peak (memft_kernels/train/plan.py), or None
    plan: Optional[Callable[[torch.nn.Module, torch.Tensor], int]] = None


# memft train's own forward and loss (memft_kernels/train/head.py): the model's logits, or the fused
# head (memft_linear_loss on the decoder's last hidden states), with or without gradient checkpointing.
def _train_loss(fused: bool):
    def loss(model, ids, labels):
        from memft_kernels.train.config import TrainConfig
        from memft_kernels.train.head import forward_head
        from memft_kernels.train.loop import memorization_loss

        head = forward_head(model, ids, torch.ones_like(ids), fused)
        return memorization_loss(head, shifted_labels(labels), None, TrainConfig(loss="memft-ot"))[0]

    return loss


def _train_checkpointing(model) -> None:
    from memft_kernels.train.models import configure_model

    configure_model(model.get_base_model(), "auto", True)


def _train_plan(fused: bool, checkpointing: bool):
    def plan(model, ids) -> int:
        from memft_kernels.train.config import TrainConfig
        from memft_kernels.train.plan import make_plan

        config = TrainConfig(gradient_checkpointing=checkpointing, fused_head=fused)
        return make_plan(config, model, ids.shape[0], ids.shape[1], ids.device, fused).step_peak()

    return plan


PROVIDERS: List[TrainProvider] = [
    TrainProvider("hf-default", _loss_hf, "model(input_ids, labels=labels).loss (transformers' causal-LM loss)"),
    TrainProvider("memft", _loss_memft, "the model's logits into memft_loss"),
    TrainProvider("memft-linear", _loss_memft_linear, "last hidden states and lm_head weight into memft_linear_loss"),
    TrainProvider("train-logits", _train_loss(False), "memft train's step with materialized logits",
                  plan=_train_plan(False, False)),
    TrainProvider("train-fused", _train_loss(True), "memft train --fused-head", plan=_train_plan(True, False)),
    TrainProvider("train-fused-ckpt", _train_loss(True), "memft train --fused-head --gradient-checkpointing",
                  prepare=_train_checkpointing, plan=_train_plan(True, True)),
]


def provider_names() -> List[str]:
    return [p.name for p in PROVIDERS]


def get_provider(name: str) -> TrainProvider:
    for p in PROVIDERS:
        if p.name == name:
            return p
    raise SystemExit(f"unknown provider {name!r}; choose from {provider_names()}")


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        timing.tune_malloc_for_rss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    selected = [get_provider(name) for name in args.providers or provider_names()]  # unknown names: refused here
    info = timing.machine_info(device)
    csv_path = Path(args.csv) if args.csv else timing.default_results_path("bench_train_step", info)
    writer = timing.ResultWriter(csv_path, FIELDS, jsonl=not args.no_jsonl)
    print(f"# bench_train_step on {info['device_name']} ({info['device']}, {info['threads']} threads): "
          f"{'built-in ' + args.model if args.model else 'tiny'} Llama "
          f"V={args.vocab} hidden={args.hidden} layers={args.layers} LoRA r={args.lora_r}, batch {args.batch} x {args.seq}, "
          f"{args.dtype}; results -> {csv_path}", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    labels = ids.clone()
    rows: List[Dict[str, object]] = []
    for provider in selected:
        name = provider.name
        row: Dict[str, object] = dict(info)
        row.update(
            bench="train_step", provider=name, dtype=args.dtype, batch=args.batch, seq=args.seq, tokens=args.batch * args.seq,
            V=args.vocab, hidden=args.hidden, layers=args.layers, lora_r=args.lora_r, mem_method=timing.memory_method(device.type),
            note=args.note, model=args.model or "",
        )
        reason = provider.unavailable()
        if reason:
            row["status"] = f"skipped: {reason}"
        else:
            try:
                row.update(_measure(provider, args, dtype, device, ids, labels))
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the others
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        writer.write(row)
        rows.append(row)
        if row["status"] == "ok":
            mem = row.get("peak_mem_bytes")
            mem_txt = f"{mem / 2**20:8.1f} MiB" if isinstance(mem, int) else "n/a"
            plan = row.get("plan_peak_bytes")
            plan_txt = f"  plan {plan / 2**20:.1f} MiB" if isinstance(plan, int) else ""
            print(f"{name:13s} {row['median_ms']:9.1f} ms [{row['p20_ms']:.1f}, {row['p80_ms']:.1f}]  peak {mem_txt}{plan_txt}  loss {row['loss']:.4f}", flush=True)
        else:
            print(f"{name:13s} {row['status']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(provider: TrainProvider, args, dtype, device, ids, labels) -> Dict[str, object]:
    # A fresh model per provider: same seed, so the same weights, adapter and first step.
    if args.model:  # a built-in model of memft train, LoRA on its seven linear modules
        from memft_kernels.train.models import add_lora
        from memft_kernels.train.models import build_model as build_builtin

        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        model = build_builtin(args.model, args.vocab, 0.02, args.seed, name)
        model = add_lora(model, args.lora_r, None, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj"], None, args.seed).to(device)
    else:
        model = build_model(args.vocab, args.hidden, args.layers, args.lora_r, dtype, device, args.seed)
    if provider.prepare is not None:
        provider.prepare(model)
    model.train()
    plan_peak = provider.plan(model, ids) if provider.plan is not None else ""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    loss_fn = provider.loss
    first_loss: List[float] = []

    def step(i: int):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids, labels)
        loss.backward()
        opt.step()
        if not first_loss:
            first_loss.append(float(loss.detach()))
        return loss

    t = timing.time_calls(step, device_type=device.type, warmup=args.warmup, reps=args.reps, budget_s=args.budget_s)
    peak = timing.peak_memory_bytes(lambda: step(0), device.type)
    model = opt = None  # free this provider's model and optimizer state before the next one
    return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, peak_mem_bytes=peak if peak is not None else "",
                loss=first_loss[0], plan_peak_bytes=plan_peak)


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--providers", nargs="+", help=f"subset of {provider_names()}")
    p.add_argument("--quick", action="store_true", help="smaller batch (CPU: 2 x 128 tokens)")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch (tests)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model", default=None, choices=["nano", "tiny", "small"],
                   help="a built-in model of memft train (LoRA on its 7 linear modules) instead of --hidden/--layers")
    p.add_argument("--hidden", type=int, default=None, help="default 256 CPU, 1024 GPU")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="model dtype; default fp32 CPU, bf16 GPU")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--csv", help="CSV to append to (default benchmarks/results/bench_train_step_<machine>.csv in a "
                   "checkout, ./bench_results/ otherwise)")
    p.add_argument("--no-jsonl", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    timing.check_ranges(args, positive=("vocab", "hidden", "layers", "lora_r", "batch", "seq", "reps", "budget_s"),
                        nonnegative=("threads", "warmup"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    gpu = args.device.startswith("cuda")
    if args.smoke:
        defaults = dict(hidden=64, batch=1, seq=16, warmup=1, reps=2, vocab=512)
    elif args.quick:
        defaults = dict(hidden=1024 if gpu else 128, batch=4 if gpu else 2, seq=1024 if gpu else 128, warmup=2, reps=5)
    else:
        defaults = dict(hidden=1024 if gpu else 256, batch=8 if gpu else 4, seq=1024 if gpu else 256, warmup=3 if gpu else 1, reps=20 if gpu else 5)
    for key, value in defaults.items():
        if key == "vocab":
            if args.vocab == 32000:
                args.vocab = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.model:
        from memft_kernels.train.models import BUILTIN_MODELS

        args.hidden, args.layers = BUILTIN_MODELS[args.model]["hidden_size"], BUILTIN_MODELS[args.model]["num_hidden_layers"]
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    if args.budget_s is None:
        args.budget_s = 5.0 if gpu else 20.0
    return args


def main(argv=None, prog: Optional[str] = None) -> List[Dict[str, object]]:
    return run(parse_args(argv, prog))


if __name__ == "__main__":
    main()
