"""Every shipped Triton kernel compiles to a real GPU binary (sm_80 and sm_90) without a GPU.

The interpreter tests in test_triton_ce.py prove the math; this file proves the same source goes
through Triton's GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for the configurations the
launch heuristic ships, so a kernel that only interprets cannot pass. It records each binary's
registers and local-memory (spill) bytes per thread, read from the cubin with the cuobjdump that
Triton bundles; docs/KERNELS.md holds the table (run with ``-s`` to print it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton") if __name__ != "__main__" else __import__("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from memft_kernels.ops import triton_ce  # noqa: E402

ARCHS = (80, 90)
ELEMENT = {"fp32": "fp32", "bf16": "bf16"}

# Argument types as the JIT sees them at a real launch: 16-byte aligned pointers, V and the row
# stride divisible by 16 (32000, 128256, 151936, 262144 all are: the JIT then proves the masked
# loads can be 16-byte vectors), 32-bit ints, float32 scalars.
_POINTERS = {
    "target_ptr": "*i64", "token_weight_ptr": "*fp32", "lse_ptr": "*fp32", "ce_ptr": "*fp32",
    "prob_ptr": "*fp32", "pred_ptr": "*i64", "weight_ptr": "*fp32", "loss_ptr": "*fp32",
    "coef_ptr": "*fp32", "scale_ptr": "*fp32", "factor_ptr": "*fp32",
}
_INTS = {"logits_row_stride": "i32", "grad_row_stride": "i32", "V": "i32", "ignore_index": "i32"}
_DIVISIBLE = {"logits_row_stride", "grad_row_stride", "V"}

_ALL_FEATURES = dict(POLICY=2, HAS_TOKEN_WEIGHT=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True)
_PLAIN = dict(POLICY=1, HAS_TOKEN_WEIGHT=False, HAS_SOFTCAP=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False)

# (kernel, logits dtype, feature set): every loss kernel in float32 and bfloat16 with every feature
# on, and the common bfloat16 hard-policy specialization with none; the gradient-scaling kernel.
SPECIALIZATIONS = [
    (kernel, dtype, features)
    for kernel in ("_row_forward_kernel", "_row_backward_kernel", "_row_forward_backward_kernel")
    for dtype, features in (("fp32", "all"), ("bf16", "all"), ("bf16", "plain"))
] + [("_scale_rows_kernel", "fp32", "-"), ("_scale_rows_kernel", "bf16", "-")]


def _source(kernel_name: str, dtype: str, features: str):
    fn = getattr(triton_ce, kernel_name)
    block, num_warps = triton_ce.launch_config(128256)
    flags = _PLAIN if features == "plain" else _ALL_FEATURES
    constexprs = {name: value for name, value in flags.items() if name in fn.arg_names}
    constexprs["BLOCK_V"] = block
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            signature[name] = "*" + ELEMENT[dtype]
        elif name in _POINTERS:
            signature[name] = _POINTERS[name]
        elif name in _INTS:
            signature[name] = _INTS[name]
        else:
            signature[name] = "fp32"
        if signature[name].startswith("*") or name in _DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs), num_warps


def _resource_usage(cubin: bytes) -> dict:
    """REG, LOCAL (bytes of local memory per thread: spill slots here) and STACK (the call stack
    of a non-inlined subroutine such as ptxas's slow path of an IEEE division) from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|STACK|SHARED):(\d+)", out)}


def _row_offset_types(ttir: str, fn) -> dict:
    """For each row-base pointer argument, the integer types of the scalar offsets added to it in
    the TTIR: i64 means row * row_stride is formed in 64 bits (N x V > 2^31 elements is safe)."""
    return {name: sorted(set(re.findall(rf"tt\.addptr %{name}, %[\w#]+ : !tt\.ptr<\w+>, (i\d+)", ttir)))
            for name in ("logits_ptr", "grad_ptr") if name in fn.arg_names}


def compile_all() -> list:
    """Compile every specialization for every arch; one dict per binary. Needs the real JIT, so it
    runs in a process without TRITON_INTERPRET (the test below starts one)."""
    results = []
    for arch in ARCHS:
        for kernel, dtype, features in SPECIALIZATIONS:
            src, num_warps = _source(kernel, dtype, features)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            cubin = compiled.asm["cubin"]
            usage = _resource_usage(cubin)
            ptx = compiled.asm["ptx"]
            results.append(dict(arch=arch, kernel=kernel, dtype=dtype, features=features, num_warps=num_warps,
                                cubin_bytes=len(cubin), ptx_target=re.search(r"\.target\s+(\w+)", ptx)[1],
                                vector_loads=bool(re.search(r"ld\.global[\w.:]*\.v4", ptx)),
                                n_regs=usage["REG"], n_spills=usage["LOCAL"], stack=usage["STACK"],
                                row_offsets=_row_offset_types(compiled.asm["ttir"], getattr(triton_ce, kernel))))
    return results


def test_every_kernel_compiles_for_gpu(capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, said out loud
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(ARCHS) * len(SPECIALIZATIONS)
    with capsys.disabled():
        print(f"\nTriton {triton.__version__}: arch | kernel | logits | features | warps | n_regs | "
              "n_spills (local bytes) | call stack bytes")
        for r in results:
            print(" | ".join(str(r[k]) for k in ("arch", "kernel", "dtype", "features", "num_warps", "n_regs",
                                                 "n_spills", "stack")))
    for r in results:
        assert r["cubin_bytes"] > 1000 and r["ptx_target"].startswith(f"sm_{r['arch']}"), r
        # The logits stream in 16-byte vectors; scalar loads would cap the bandwidth.
        assert r["vector_loads"], r
        # A spill would mean the launch heuristic's block is too large for the register file.
        assert r["n_spills"] == 0, r
        # Row starts are 64-bit offsets (the 32-bit row stride widened before the multiply), so a
        # row past element 2^31 is addressed correctly: the compiled form of the int64 rule.
        assert r["row_offsets"] and all(types == ["i64"] for types in r["row_offsets"].values()), r


if __name__ == "__main__":
    print(json.dumps(compile_all()))
