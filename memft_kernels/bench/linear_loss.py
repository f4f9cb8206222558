"""Memory proof and timing of the fused linear MemFT loss (``memft_linear_loss``).

One forward + backward of the language-model head's loss, ``hidden[N, D] @ weight[V, D].T -> loss``,
for each provider (``providers.LINEAR_PROVIDERS``):

* ``memft-fused``: ``memft_linear_loss`` (row chunks, no N x V tensor);
* ``memft-materialized``: ``memft_loss(hidden @ weight.T, target)``, what one writes without it
  (the N x V logits and their N x V gradient exist);
* ``torch-linear-ce``: torch's own chunked ``F.linear_cross_entropy`` (plain cross-entropy, not
  MemFT; torch >= 2.13 with ``LinearCrossEntropyOptions``), where it exists;
* ``liger-flce``: Liger-Kernel's fused linear cross-entropy (plain CE), GPU only, when installed.

A provider that cannot run here gets a row with ``status = "skipped: <reason>"``, one that fails
``"error: ..."``. Both with a frozen weight (the LoRA case: gradient for ``hidden`` only) and a
trainable one. Memory is the peak extra bytes of one call over what was allocated before it
(``timing.peak_memory_bytes``: ``max_memory_allocated`` on GPU, peak RSS on CPU); the targets are
fused <= 15% of the materialized path's extra memory at <= 1.1x its time, and faster than the two
plain-CE peers. Sizes: CPU N=4096, V=32000, D=512 float32; GPU N=8192, V=128256, D=4096 bfloat16
(a Llama-3 head); ``--quick`` is smaller.

``memft bench linear-loss [--quick] [--device cpu|cuda] [--out results.csv]`` (or
``python benchmarks/bench_linear_loss.py``) prints a markdown table and appends the rows to the CSV.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import timing
from .providers import LINEAR_PROVIDERS, LinearProvider

SIZES = {
    ("cpu", False): dict(n=4096, v=32000, d=512, dtype="float32"),
    ("cuda", False): dict(n=8192, v=128256, d=4096, dtype="bfloat16"),
    ("cpu", True): dict(n=1024, v=8000, d=256, dtype="float32"),
    ("cuda", True): dict(n=4096, v=32000, d=1024, dtype="bfloat16"),
}
SMOKE_SIZE = dict(n=64, v=97, d=16, dtype="float32")  # checks that everything runs (Triton's interpreter too)
FIELDS = [
    "provider", "weight", "n", "v", "d", "dtype", "peak_extra_mib", "mem_vs_materialized", "median_ms", "p20_ms",
    "p80_ms", "reps", "time_vs_materialized", "loss_rel_err", "memory_method", "date", "device", "device_name",
    "threads", "torch", "triton", "commit", "status", "note",
]


def providers(device: str) -> Dict[str, LinearProvider]:
    """Every linear provider (those that cannot run on ``device`` are reported as skipped)."""
    return dict(LINEAR_PROVIDERS)


# ---------------------------------------------------------------------------------------------
# Measurement


def make_inputs(n, v, d, dtype, device, trainable, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # Scaled so that the logits have a spread like a real head's (std about 2).
    weight = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(device=device, dtype=dtype).requires_grad_(trainable)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::17] = -100
    return hidden, weight, target


def measure(name, loss_fn, inputs, device, reps, warmup) -> Dict[str, object]:
    hidden, weight, target = inputs

    def clear():
        hidden.grad = None
        weight.grad = None

    def call(_i=0):
        loss = loss_fn(hidden, weight, target)
        loss.backward()
        return loss

    clear()
    loss = call().detach().float().cpu()  # first call: warm-up and the value for the error column
    clear()
    peak = timing.peak_memory_bytes(lambda: call(), device)
    clear()
    t = timing.time_calls(call, device_type=device, warmup=warmup, reps=reps, min_reps=min(2, reps), prepare=lambda i: clear())
    clear()
    return {
        "provider": name, "loss": loss,
        "peak_extra_mib": None if peak is None else peak / 2**20,
        "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
    }


def run(args) -> List[Dict[str, object]]:
    device = args.device
    size = dict(SMOKE_SIZE if args.smoke else SIZES[(device, args.quick)])
    for key in ("n", "v", "d"):
        if getattr(args, key):
            size[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype or size["dtype"])
    info = timing.machine_info(torch.device(device))
    out_path = Path(args.out) if args.out else timing.default_results_path("bench_linear_loss", info)
    names = args.only or list(providers(device))
    unknown = [n for n in names if n not in LINEAR_PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(LINEAR_PROVIDERS)}")
    writer = timing.ResultWriter(out_path, FIELDS, jsonl=False)
    rows = []
    for trainable in {"frozen": (False,), "trainable": (True,), "both": (False, True)}[args.weight]:
        results = []
        for name in names:
            provider = LINEAR_PROVIDERS[name]
            reason = provider.unavailable(device, args.smoke)
            if reason is not None:
                results.append({"provider": name, "status": f"skipped: {reason}"})
                continue
            inputs = make_inputs(size["n"], size["v"], size["d"], dtype, device, trainable)
            try:
                results.append({**measure(name, provider.make(), inputs, device, args.reps, args.warmup), "status": "ok"})
            except Exception as exc:  # noqa: BLE001 - one provider's failure must not lose the others' rows
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                results.append({"provider": name, "status": f"error: {type(exc).__name__}: {first}"})
                print(f"# {name} ({'trainable' if trainable else 'frozen'} weight) failed: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in results if r["provider"] == "memft-materialized" and r["status"] == "ok"), None)
        for r in results:
            row = {
                **{k: v for k, v in r.items() if k != "loss"},
                "weight": "trainable" if trainable else "frozen", "n": size["n"], "v": size["v"], "d": size["d"],
                "dtype": str(dtype).replace("torch.", ""), "memory_method": timing.memory_method(device),
                **{k: info[k] for k in ("date", "device", "device_name", "threads", "torch", "triton", "commit")},
                "note": args.note,
            }
            if base is not None and r["status"] == "ok":
                if base["peak_extra_mib"] and r["peak_extra_mib"] is not None:
                    row["mem_vs_materialized"] = r["peak_extra_mib"] / base["peak_extra_mib"]
                row["time_vs_materialized"] = r["median_ms"] / base["median_ms"]
                row["loss_rel_err"] = abs(float(r["loss"]) - float(base["loss"])) / abs(float(base["loss"]))
            writer.write(row)
            rows.append(row)
    print(markdown_table(rows))
    print(f"\n{info['device_name']}, torch {info['torch']}, {info['threads']} threads; memory: "
          f"{timing.memory_method(device)}. torch-linear-ce and liger-flce compute plain CE (their "
          f"loss_rel_err is against the MemFT loss, not an error). Rows appended to {out_path}")
    return rows


def markdown_table(rows: List[Dict[str, object]]) -> str:
    def num(x, fmt):
        return "-" if x is None or x == "" else format(x, fmt)

    lines = [
        "| provider | weight | N x V x D | dtype | peak extra MiB | vs materialized | median ms | vs materialized |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['provider']} | {r['weight']} | {r['n']} x {r['v']} x {r['d']} | {r['dtype']} | "
                         f"{r['status']} | | | |")
            continue
        lines.append(
            f"| {r['provider']} | {r['weight']} | {r['n']} x {r['v']} x {r['d']} | {r['dtype']} | "
            f"{num(r.get('peak_extra_mib'), '.1f')} | {num(r.get('mem_vs_materialized'), '.1%')} | "
            f"{num(r['median_ms'], '.1f')} | {num(r.get('time_vs_materialized'), '.2f')}x |"
        )
    return "\n".join(lines)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (CPU N=1024 V=8000 D=256; GPU N=4096 V=32000 D=1024)")
    p.add_argument("--smoke", action="store_true", help="N=64 V=97 D=16, 1 rep: checks that everything runs (with "
                   "TRITON_INTERPRET=1 on a CPU the GPU-only providers too, in Triton's interpreter)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--out", default=None, help="CSV file to append rows to (default benchmarks/results/ in a checkout, "
                   "./bench_results/ otherwise)")
    p.add_argument("--note", default="", help="free text stored in every row")
    p.add_argument("--n", type=int, default=None, help="rows (tokens); default by device")
    p.add_argument("--v", type=int, default=None, help="vocabulary size; default by device")
    p.add_argument("--d", type=int, default=None, help="hidden size; default by device")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32 CPU, bfloat16 GPU")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 3 CPU, 10 GPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (besides the first)")
    p.add_argument("--only", nargs="*", default=None, help=f"run only these providers, of {list(LINEAR_PROVIDERS)}")
    p.add_argument("--weight", default="both", choices=["frozen", "trainable", "both"],
                   help="lm_head weight frozen (LoRA: gradient for hidden only), trainable, or both")
    return p


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    timing.check_ranges(args, positive=("n", "v", "d", "reps"), nonnegative=("warmup",))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        args.device = "cuda"
    elif args.device != "cpu":
        raise SystemExit(f"--device must be cpu, cuda or auto, got {args.device!r}")
    if args.smoke:
        args.reps, args.warmup = args.reps or 1, 0
    if args.reps is None:
        args.reps = 10 if args.device == "cuda" else 3
    return args


def main(argv=None, prog: Optional[str] = None) -> List[Dict[str, object]]:
    return run(parse_args(argv, prog))


if __name__ == "__main__":
    main()
