"""Greedy recall of one long memorized sequence: the KV cache vs re-running the sequence per token.

``memft train`` confirms verbatim recall by greedy generation (memft_kernels/train/evaluate.py).
With the cache, recalling N tokens is one prompt forward plus N - 1 one-position forwards (about
one generation); without it every token re-runs the whole prefix (N forwards of growing length).
Both must generate the same tokens; the row says whether they did.

``memft bench recall [--model tiny] [--tokens 2048] [--vocab 4096] [--threads 1] [--csv PATH]``
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import timing

FIELDS = [
    "date", "host", "device", "device_name", "cpu_name", "cpu_count", "threads", "python", "torch", "triton", "cuda",
    "memft", "commit", "bench", "provider", "model", "V", "tokens", "status", "seconds", "ms_per_token",
    "same_tokens", "note",
]


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    from ..train.evaluate import greedy_generate
    from ..train.models import add_lora, build_model

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    info = timing.machine_info(device)
    csv_path = Path(args.csv) if args.csv else timing.default_results_path("bench_recall", info)
    writer = timing.ResultWriter(csv_path, FIELDS, jsonl=False)
    model = build_model(args.model, args.vocab, 0.2, args.seed)
    model = add_lora(model, 4, None, 0.0, ["q_proj", "v_proj"], None, args.seed).to(device).eval()
    print(f"# bench_recall on {info['device_name']}: built-in {args.model}, V={args.vocab}, {args.tokens} tokens "
          f"from a 1-token prompt; results -> {csv_path}", flush=True)
    rows, outputs = [], {}
    for provider, use_cache in (("kv-cache", True), ("uncached", False)):
        start = time.perf_counter()
        outputs[provider] = greedy_generate(model, [[1]], args.tokens, device, use_cache=use_cache)
        timing.synchronize(device.type)
        seconds = time.perf_counter() - start
        row = dict(info, bench="recall", provider=provider, model=args.model, V=args.vocab, tokens=args.tokens,
                   status="ok", seconds=seconds, ms_per_token=1000 * seconds / args.tokens, note=args.note)
        rows.append(row)
        print(f"{provider:9s} {seconds:9.2f} s  ({row['ms_per_token']:.2f} ms/token)", flush=True)
    same = bool(torch.equal(outputs["kv-cache"], outputs["uncached"]))
    for row in rows:
        row["same_tokens"] = same
        writer.write(row)
    print(f"same tokens: {same}; uncached / cached = {rows[1]['seconds'] / rows[0]['seconds']:.1f}x", flush=True)
    return rows


def parse_args(argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--model", default="tiny", choices=["nano", "tiny", "small"], help="built-in model of memft train")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="CSV to append to (default benchmarks/results/bench_recall_<machine>.csv)")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tokens < 1 or args.vocab < 2 or args.threads < 0:
        p.error("--tokens >= 1, --vocab >= 2 and --threads >= 0 are required")
    return args


def main(argv=None, prog: Optional[str] = None) -> List[Dict[str, object]]:
    return run(parse_args(argv, prog))


if __name__ == "__main__":
    main()
