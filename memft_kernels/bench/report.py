"""Turn benchmark CSVs into a markdown table and one PNG of plots (time and memory vs V).

    memft bench report benchmarks/results/bench_loss_cpu-amd-epyc.csv
    memft bench report RESULTS.csv --md out.md --png out.png --mode fwd+bwd --dtype bf16

(``python benchmarks/report.py ...`` is the same.)

For each (machine, N, dtype, mode) a table: one line per provider, one column per V with the
median time, the peak extra memory and the achieved share of the copy bandwidth; then, per V, each
memft kernel against the targets (``TARGETS``: share of the copy bandwidth, speedup over plain
PyTorch, torch.compile and Liger + mask). When a CSV holds several runs of the same measurement,
the latest row wins. Rows of the train-step and linear-loss benchmarks go into tables of their
own (the linear one against its targets: memory and time vs the materialized logits, time vs the
plain-CE fused peers).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import timing

_LOSS_KEY = ("device_name", "threads", "provider", "mode", "dtype", "N", "V")
_GROUP = ("device_name", "threads", "N", "dtype", "mode")


def load(paths: Sequence[Path]) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for path in paths:
        try:
            rows += timing.read_rows(Path(path))
        except (UnicodeDecodeError, csv.Error) as exc:  # used to be a traceback
            raise SystemExit(f"{path}: not a CSV of benchmark results ({type(exc).__name__}: {exc})") from None
    return rows


def latest(rows: List[Dict[str, str]], key: Tuple[str, ...]) -> List[Dict[str, str]]:
    """The last row (file order, then date) for each key: re-runs replace earlier numbers."""
    kept: "OrderedDict[tuple, Dict[str, str]]" = OrderedDict()
    for row in sorted(rows, key=lambda r: r.get("date", "")):
        kept[tuple(row.get(k, "") for k in key)] = row
    return list(kept.values())


def _num(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _cell(row: Optional[Dict[str, str]]) -> str:
    if row is None:
        return ""
    if row.get("status") != "ok":
        status = row.get("status", "")
        return "skipped" if status.startswith("skipped") else "error"
    ms = _num(row["median_ms"])
    mem = _num(row.get("peak_mem_bytes", ""))
    frac = _num(row.get("frac_copy", ""))
    parts = [f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"]
    if mem is not None:
        parts.append(f"{mem / 2**20:,.0f} MiB")
    if frac is not None:
        parts.append(f"{100 * frac:.0f}% copy")
    return " / ".join(parts)


def _loss_groups(rows: List[Dict[str, str]], *, mode: Optional[str], dtype: Optional[str], n: Optional[int],
                 ok_only: bool) -> "OrderedDict[tuple, List[Dict[str, str]]]":
    """The newest bench_loss rows (only the measured ones with ``ok_only``), filtered by mode, dtype
    and N where given, grouped by (machine, threads, N, dtype, mode) in first-seen order."""
    rows = [r for r in latest(rows, _LOSS_KEY)
            if r.get("bench") == "loss" and (not ok_only or r.get("status") == "ok")]
    if mode:
        rows = [r for r in rows if r["mode"] == mode]
    if dtype:
        rows = [r for r in rows if r["dtype"] == dtype]
    if n:
        rows = [r for r in rows if int(r["N"]) == n]
    groups: "OrderedDict[tuple, List[Dict[str, str]]]" = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r[k] for k in _GROUP), []).append(r)
    return groups


def loss_tables(rows: List[Dict[str, str]], *, mode: Optional[str] = None, dtype: Optional[str] = None, n: Optional[int] = None) -> str:
    """Markdown tables of bench_loss rows, one per (machine, threads, N, dtype, mode)."""
    groups = _loss_groups(rows, mode=mode, dtype=dtype, n=n, ok_only=False)
    out: List[str] = []
    for (device_name, threads, n_rows, dt, md), grp in groups.items():
        first = grp[0]
        vs = sorted({int(r["V"]) for r in grp})
        providers = list(OrderedDict.fromkeys(r["provider"] for r in grp))
        by = {(r["provider"], int(r["V"])): r for r in grp}
        where = f"{device_name}" + (f", {threads} threads" if first["device"] == "cpu" else "")
        copies = sorted(c for c in (_num(r.get("copy_gbps", "")) for r in grp) if c)
        copy = "" if not copies else f", copy {copies[0]:.0f} GB/s" if copies[0] == copies[-1] else f", copy {copies[0]:.0f}-{copies[-1]:.0f} GB/s"
        out.append(f"**{md}, {dt}, N = {n_rows}** on {where} ({first['date'][:10]}, torch {first['torch']}{copy})")
        out.append("")
        out.append("| provider | " + " | ".join(f"V = {v}" for v in vs) + " |")
        out.append("| --- | " + " | ".join("---" for _ in vs) + " |")
        for p in providers:
            if all(by.get((p, v), {}).get("status", "").startswith("skipped") for v in vs):
                continue  # not available on this machine: listed below instead
            out.append(f"| {p} | " + " | ".join(_cell(by.get((p, v))) for v in vs) + " |")
        skipped = sorted({f"{r['provider']} ({r['status'][len('skipped: '):]})" for r in grp
                          if r["status"].startswith("skipped") and all(by.get((r['provider'], v), {}).get("status", "").startswith("skipped") for v in vs)})
        errors = sorted({f"{r['provider']} V={r['V']}: {r['status']}" for r in grp if r["status"].startswith("error")})
        if skipped:
            out.append("")
            out.append("Not run: " + "; ".join(skipped))
        if errors:
            out.append("")
            out.append("Errors: " + "; ".join(errors))
        # each distinct remark once, in first-seen order (a row's note may join several with "; ")
        notes = list(dict.fromkeys(part for r in grp for part in r.get("note", "").split("; ") if part))
        if notes:
            out.append("")
            out.append("Note: " + "; ".join(notes))
        out.append("")
    return "\n".join(out)


# Issue 13's targets for the memft kernels (a measurement below one is marked "miss").
TARGETS = {"frac_copy": 0.85, "torch-plain": 4.0, "torch-compile": 1.5, "liger": 1.3}
LINEAR_TARGETS = {"mem_vs_materialized": 0.15, "time_vs_materialized": 1.1}


def _mark(ok: bool) -> str:
    return "" if ok else " (miss)"


def targets_tables(rows: List[Dict[str, str]], *, mode: Optional[str] = None, dtype: Optional[str] = None,
                   n: Optional[int] = None) -> str:
    """Per (machine, N, dtype, mode): each memft kernel (``memft-<triton|cuda|cpu>[-inplace]``) at
    each V, its share of the copy bandwidth and its speedups over the peers, against ``TARGETS``.
    A peer that did not run leaves its column at "-"."""
    groups = _loss_groups(rows, mode=mode, dtype=dtype, n=n, ok_only=True)
    out: List[str] = []
    peers = [p for p in TARGETS if p != "frac_copy"]
    for (device_name, _threads, n_rows, dt, md), grp in groups.items():
        by = {(r["provider"], int(r["V"])): r for r in grp}
        kernels = [r for r in grp if r["provider"].startswith("memft-") and r["provider"] != "memft-torch"]
        if not kernels:
            continue
        out.append(f"**targets (set for the GPU), {md}, {dt}, N = {n_rows}** on {device_name}: share of copy bandwidth >= "
                   f"{TARGETS['frac_copy']:.0%}, speedup >= " + ", ".join(f"{TARGETS[p]:g}x {p}" for p in peers))
        out.append("")
        out.append("| V | provider | median ms | GB/s | % copy | " + " | ".join(f"vs {p}" for p in peers) + " |")
        out.append("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in peers) + " |")
        for r in sorted(kernels, key=lambda r: (int(r["V"]), r["provider"])):
            v, ms, frac = int(r["V"]), float(r["median_ms"]), _num(r.get("frac_copy", ""))
            cells = []
            for p in peers:
                peer = by.get((p, v))
                if peer is None:
                    cells.append("-")
                    continue
                speedup = float(peer["median_ms"]) / ms
                cells.append(f"{speedup:.2f}x{_mark(speedup >= TARGETS[p])}")
            frac_txt = "-" if frac is None else f"{100 * frac:.0f}%{_mark(frac >= TARGETS['frac_copy'])}"
            gbps = _num(r.get("gbps", ""))
            ms_txt = f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"
            out.append(f"| {v} | {r['provider']} | {ms_txt} | {'-' if gbps is None else f'{gbps:,.0f}'} | {frac_txt} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _is_linear(row: Dict[str, str]) -> bool:
    return row.get("bench") in (None, "") and "weight" in row and "d" in row


def linear_table(rows: List[Dict[str, str]]) -> str:
    """The linear-loss rows (``memft bench linear-loss``; files written before the ``status`` column
    count as ok): memory and time vs the materialized path, and memft-fused's speedup over each."""
    rows = [r for r in latest([r for r in rows if _is_linear(r)],
                              ("device_name", "threads", "provider", "weight", "n", "v", "d", "dtype"))]
    if not rows:
        return ""
    out = ["**Linear loss** (hidden @ weight.T -> loss, forward + backward); targets for memft-fused: extra memory "
           f"<= {LINEAR_TARGETS['mem_vs_materialized']:.0%} of the materialized path's at <= "
           f"{LINEAR_TARGETS['time_vs_materialized']:g}x its time, faster than the plain-CE peers", "",
           "| machine | provider | weight | N x V x D | dtype | peak extra MiB | mem vs materialized | median ms | "
           "time vs materialized | memft-fused speedup |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fused = {(r["device_name"], r["threads"], r["weight"], r["n"], r["v"], r["d"], r["dtype"]): r
             for r in rows if r["provider"] == "memft-fused" and r.get("status", "ok") in ("", "ok")}
    for r in rows:
        head = f"| {r['device_name']} | {r['provider']} | {r['weight']} | {r['n']} x {r['v']} x {r['d']} | {r['dtype']} |"
        if r.get("status", "ok") not in ("", "ok"):
            out.append(f"{head} {r['status']} | | | | |")
            continue
        mem, ms = _num(r.get("peak_extra_mib", "")), float(r["median_ms"])
        mem_rel, time_rel = _num(r.get("mem_vs_materialized", "")), _num(r.get("time_vs_materialized", ""))
        is_fused = r["provider"] == "memft-fused"
        mem_txt = "-" if mem_rel is None else f"{mem_rel:.1%}" + (_mark(mem_rel <= LINEAR_TARGETS["mem_vs_materialized"]) if is_fused else "")
        time_txt = "-" if time_rel is None else f"{time_rel:.2f}x" + (_mark(time_rel <= LINEAR_TARGETS["time_vs_materialized"]) if is_fused else "")
        f = fused.get((r["device_name"], r["threads"], r["weight"], r["n"], r["v"], r["d"], r["dtype"]))
        speed = "-"
        if f is not None and not is_fused:
            x = ms / float(f["median_ms"])
            speed = f"{x:.2f}x" + (_mark(x > 1.0) if r["provider"] in ("liger-flce", "torch-linear-ce") else "")
        out.append(f"{head} {'-' if mem is None else f'{mem:,.1f}'} | {mem_txt} | {ms:.1f} | {time_txt} | {speed} |")
    return "\n".join(out) + "\n"


def train_table(rows: List[Dict[str, str]]) -> str:
    rows = [r for r in latest(rows, ("device_name", "threads", "provider", "dtype", "batch", "seq")) if r.get("bench") == "train_step"]
    if not rows:
        return ""
    first = rows[0]
    out = [f"**LoRA train step**, tiny Llama V = {first['V']}, hidden {first['hidden']}, {first['layers']} layers, r = {first['lora_r']}, "
           f"batch {first['batch']} x {first['seq']}", "", "| machine | provider | dtype | tokens | step ms (p20-p80) | peak MiB | loss |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['device_name']} | {r['provider']} | {r['dtype']} | {r.get('tokens', '')} | {r['status']} | | |")
            continue
        mem = _num(r.get("peak_mem_bytes", ""))
        out.append(f"| {r['device_name']} | {r['provider']} | {r['dtype']} | {r['tokens']} | {float(r['median_ms']):.1f} "
                   f"({float(r['p20_ms']):.1f}-{float(r['p80_ms']):.1f}) | {'' if mem is None else f'{mem / 2**20:,.0f}'} | {float(r['loss']):.4f} |")
    return "\n".join(out) + "\n"


def plot(rows: List[Dict[str, str]], png: Path) -> bool:
    """One PNG: for each (machine, N, dtype, mode) time vs V and peak memory vs V, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest(rows, _LOSS_KEY) if r.get("bench") == "loss" and r.get("status") == "ok"]
    groups: "OrderedDict[tuple, List[Dict[str, str]]]" = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r[k] for k in _GROUP), []).append(r)
    if not groups:
        return False
    names = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(names)}  # one color per provider everywhere
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (device_name, threads, n_rows, dt, md), (ax_t, ax_m) in zip(groups, axes):
        grp = groups[(device_name, threads, n_rows, dt, md)]
        for p in OrderedDict.fromkeys(r["provider"] for r in grp):
            pts = sorted((int(r["V"]), float(r["median_ms"]), _num(r.get("peak_mem_bytes", ""))) for r in grp if r["provider"] == p)
            ax_t.plot([v for v, _, _ in pts], [t for _, t, _ in pts], marker="o", label=p, color=colors[p])
            mem = [(v, m / 2**20) for v, _, m in pts if m is not None]  # symlog axis: 0 MiB is drawn
            if mem:
                ax_m.plot([v for v, _ in mem], [m for _, m in mem], marker="o", label=p, color=colors[p])
        title = f"{md} {dt} N={n_rows} | {device_name}" + (f" ({threads} thr)" if grp[0]["device"] == "cpu" else "")
        ax_t.set_title("time: " + title, fontsize=8)
        ax_m.set_title("peak extra memory: " + title, fontsize=8)
        ax_t.set_ylabel("median ms")
        ax_m.set_ylabel("MiB")
        ax_t.set_yscale("log")
        ax_m.set_yscale("symlog", linthresh=1.0)  # linear below 1 MiB: no extra memory shows as 0
        for ax in (ax_t, ax_m):
            ax.set_xlabel("V")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


def main(argv=None, prog: Optional[str] = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="result CSVs (bench_loss, bench_linear_loss, bench_train_step)")
    p.add_argument("--md", help="write the markdown here too (default: print only)")
    p.add_argument("--png", help="write the plots here (default: next to the first CSV, same name .png)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--mode", help="only this mode (fwd or fwd+bwd)")
    p.add_argument("--dtype", help="only this dtype (bf16, fp16, fp32)")
    p.add_argument("--n", type=int, help="only this N")
    args = p.parse_args(argv)
    missing = [c for c in args.csv if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"no such CSV: {missing}")
    rows = load([Path(c) for c in args.csv])
    sections = [loss_tables(rows, mode=args.mode, dtype=args.dtype, n=args.n),
                targets_tables(rows, mode=args.mode, dtype=args.dtype, n=args.n), linear_table(rows), train_table(rows)]
    text = "\n".join(s.rstrip("\n") + "\n" for s in sections if s.strip())
    if not text.strip():  # used to print nothing and exit 0
        filters = " matching --mode/--dtype/--n" if (args.mode or args.dtype or args.n) else ""
        raise SystemExit(f"no benchmark rows{filters} in {', '.join(args.csv)} (result CSVs of memft bench loss, "
                         "linear-loss or train-step)")
    print(text)
    if args.md:
        try:
            Path(args.md).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"cannot write --md {args.md}: {exc.strerror or exc}") from None
    if not args.no_png:
        png = Path(args.png) if args.png else Path(args.csv[0]).with_suffix(".png")
        if plot(rows, png):
            print(f"plots: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
