"""The CUDA kernels of csrc/cuda/memft_cuda.cu, run on the CPU through a CUDA emulation shim.

No GPU is needed: the unmodified kernel source is compiled as C++ (``g++ -x c++``) against the shim
headers in tests/cuda_emu/ (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h come first on the include
path), after one textual rewrite of the launch syntax ``k<<<grid, block, shm, stream>>>(args);`` into
``::emu::launch(::emu::LaunchConfig{grid, block, shm, stream}, k, args);`` (every ``<<<`` must be
rewritten, or the build fails). The emulator runs the blocks of a grid one after another and the
threads of a block as concurrent OS threads, with __syncthreads() as a block barrier and
__shfl_down_sync as a warp exchange; a divergent barrier or shuffle aborts (see cuda_runtime.h).

The module (csrc/bindings.cpp with MEMFT_MODULE_CUDA, module name ``_memft_cuda_emu``) is built
with ``-fsanitize=address,undefined -fno-sanitize-recover=all -g -O1`` into a temporary directory,
never over the installed modules. This file then runs itself as a script in a fresh Python with
libasan preloaded; the script calls the raw entry points the way memft_kernels/ops/native_cuda.py
does (the same argument helpers, CPU addresses where it passes device ones, stream 0) and compares
every output with the PyTorch reference on float64 inputs. Outputs are poisoned (NaN, pred -1)
before each call; tensors are allocated at their exact size so that any access past a row's end is
past an allocation's end; padding between strided rows holds NaN (logits) or a sentinel (gradient,
checked unchanged). A planted bug (an output buffer one row short) checks that the harness fails.

What this proves and what it cannot: docs/BUILDING.md, "Running the CUDA kernel without a GPU".
Run by hand: ``python -m pytest -q tests/test_cuda_emulated.py -s`` prints the cases and errors.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "memft_cuda.cu"
SHIM = ROOT / "tests" / "cuda_emu"
MODULE = "_memft_cuda_emu"
sys.path.insert(0, str(ROOT / "tests"))
from asan_harness import asan_toolchain, assert_clean, run_driver  # noqa: E402

# kernel<...><<<config>>>(args);  ->  ::emu::launch(::emu::LaunchConfig{config}, kernel<...>, args);
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<([^;]*?)>>>\s*\(([^;]*?)\)\s*;")


def rewrite_launches(src: str) -> str:
    out, n = LAUNCH.subn(lambda m: f"::emu::launch(::emu::LaunchConfig{{{m.group(2)}}}, {m.group(1)}, {m.group(3)});", src)
    assert n == src.count("<<<") and n > 0, f"rewrote {n} launches but the file has {src.count('<<<')} '<<<'"
    return out


# ------------------------------------------------------------------------------ build (pytest side)
def _toolchain():
    """(g++, libasan path, pybind11 include), or the reason the emulated build cannot run."""
    cxx = shutil.which("g++")
    tools = asan_toolchain(cxx)
    if isinstance(tools, str):
        return tools
    libasan, pybind11 = tools
    return cxx, libasan, pybind11.get_include()


def build(out_dir: Path, cxx: str, pybind11_include: str) -> Path:
    kernel = out_dir / "memft_cuda_emu.cpp"
    # #line keeps diagnostics and ASan stacks pointing at the real file and line
    kernel.write_text(f'#line 1 "{KERNEL}"\n' + rewrite_launches(KERNEL.read_text()))
    flags = [
        "-std=c++20", "-fPIC", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer", "-fno-strict-aliasing",  # the kernel reads uint4 packs as T[] (as CUDA code does)
        "-Wall", "-Wextra", "-Wno-unknown-pragmas",  # #pragma unroll
        "-DMEMFT_MODULE_CUDA", f"-DMEMFT_MODULE_NAME={MODULE}", '-DMEMFT_CUDA_ARCHS_STRING="emulated"',
        '-DMEMFT_CUDA_RUNTIME_STRING="emulated"',
        "-I", str(SHIM),  # first: <cuda_runtime.h> etc. are the shim
        "-iquote", str(KERNEL.parent),  # the copy's #include "../memft_native.h"
        "-I", sysconfig.get_paths()["include"], "-I", pybind11_include,
    ]
    objects = [out_dir / "kernel.o", out_dir / "bindings.o"]
    jobs = [
        subprocess.Popen([cxx, *flags, "-x", "c++", "-c", str(kernel), "-o", str(objects[0])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([cxx, *flags, "-c", str(ROOT / "csrc" / "bindings.cpp"), "-o", str(objects[1])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    for job in jobs:
        log = job.communicate()[0]
        assert job.returncode == 0, f"{' '.join(job.args)} failed:\n{log[-6000:]}"
    so = out_dir / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    r = subprocess.run([cxx, "-shared", "-fsanitize=address,undefined", *map(str, objects), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return so


def _run_driver(so, libasan, *args, timeout=240):
    return run_driver(__file__, so, libasan, *args, threads=1, timeout=timeout)


if __name__ != "__main__":
    import pytest

    @pytest.fixture(scope="module")
    def emulated_module():
        tools = _toolchain()
        if isinstance(tools, str):
            pytest.skip(f"emulated CUDA build not possible here: {tools}")
        cxx, libasan, pybind11_include = tools
        with tempfile.TemporaryDirectory(prefix="memft_cuda_emu_") as tmp:
            t0 = time.perf_counter()
            so = build(Path(tmp), cxx, pybind11_include)
            print(f"\nemulated CUDA module built in {time.perf_counter() - t0:.1f} s: {so}")
            yield so, libasan

    def test_launch_rewrite_is_complete():
        src = KERNEL.read_text()
        out = rewrite_launches(src)
        assert "<<<" not in out and ">>>" not in out
        assert out.count("::emu::launch(") == src.count("<<<")

    def test_cuda_kernels_match_reference_under_asan(emulated_module):
        so, libasan = emulated_module
        t0 = time.perf_counter()
        r = _run_driver(so, libasan)
        report = assert_clean(r, extra_marks=("CUDA-EMU ERROR",), stdout_tail=4000)
        m = re.search(r"EMU-OK cases=(\d+) launches=(\d+)", r.stdout)
        assert m and int(m.group(1)) == EXPECTED_CASES, report
        print(r.stdout[-2500:])
        print(f"driver: {m.group(1)} cases, {m.group(2)} kernel launches in {time.perf_counter() - t0:.1f} s")

    def test_harness_reports_a_planted_overflow(emulated_module):
        """The same harness must fail on a real out-of-bounds access: a per-row output one row short."""
        so, libasan = emulated_module
        r = _run_driver(so, libasan, "--plant-overflow", timeout=120)
        assert r.returncode != 0, r.stdout[-2000:]
        assert "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-6000:]
        assert "row_kernel" in r.stderr, r.stderr[-6000:]  # the access is the kernel's, not the driver's


# ------------------------------------------------------------------------------ driver (subprocess)
DTYPES = ("float32", "bfloat16", "float16")
VOCAB = (1, 3, 7, 8, 9, 31, 33, 100, 1000, 4099)
OPTION_SETS = (
    dict(policy="hard"),
    dict(policy="none", label_smoothing=0.1),
    dict(policy="sigmoid", threshold=0.7, sharpness=4.0, z_loss=1e-3),
    dict(policy="hard", softcap=5.0, label_smoothing=0.05, z_loss=1e-4),
)
# Each (dtype, V) runs two of the option sets, in turn, so each set meets every dtype and most V
# (the script with --all-options runs all four everywhere).
EXPECTED_CASES = len(DTYPES) * len(VOCAB) * 2 + 4  # + V = 16411 (1024 threads), a row past element 2^31, a slice, scale_rows


def option_sets_for(dtype_index: int, v_index: int):
    first = (dtype_index + v_index) % len(OPTION_SETS)
    return first, (first + 1 + v_index % 2) % len(OPTION_SETS)


def _driver(so_path: str, plant_overflow: bool, only=None) -> None:
    import importlib.util
    import math

    import torch

    from memft_kernels.ops import native as helpers  # the argument helpers native_cuda.py uses
    from memft_kernels.ops import reference
    from memft_kernels.spec import KernelOptions, RowStats

    spec = importlib.util.spec_from_file_location(MODULE, so_path)
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    torch.set_num_threads(1)
    dtypes = {name: getattr(torch, name) for name in DTYPES}
    launches = 0
    worst = {}  # (dtype, what) -> worst relative error (gradient: ratio to torch's own error)

    def strided(n, v, dtype, offset, pad, fill):
        """[n, v] with row stride v + pad over a storage that ends where the last row ends, and that
        storage (flat); the padding and the first `offset` elements hold `fill`."""
        base = torch.full((offset + (n - 1) * (v + pad) + v,), fill, dtype=dtype)
        return base.as_strided((n, v), (v + pad, 1), offset), base

    def poisoned_stats(logits):
        stats = helpers.new_row_stats(logits)
        for t in stats:
            t.fill_(-1 if t.dtype == torch.int64 else math.nan)
        return stats

    def make_case(dtype, v, k):
        g = torch.Generator().manual_seed(1000 * v + k)
        n = 16
        x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        t = torch.randint(0, v, (n,), generator=g)
        t[0], t[1] = 0, v - 1
        t[2] = -100  # ignored
        t[3], t[4], t[5] = v, -7, (1 << 40) if k % 2 == 0 else 2**31 - 1  # out of range (validate=False)
        x[6, torch.tensor([v // 3, 2 * v // 3, v - 1])] = 20.0  # ties: the lowest index wins
        x[7, torch.tensor([v // 2, v - 1])] = math.nan
        x[8, (int(t[8]) + 1) % v] = math.inf
        x[9, v // 2:] = -math.inf
        t[9] = 0
        x[10] = -math.inf
        x[11, t[11]] += 12.0  # confident: weight 0 under the hard policy
        x[12, t[12]] += 12.0
        return x, t

    def rel_finite(a, b, what, pattern=None):
        """||a - b|| / ||b|| over the finite entries, after checking that a's NaN and inf entries are
        exactly those of `pattern` (default b; for low precision, b rounded to it: a float64
        value past the float16 range is inf there)."""
        a, b = a.double(), b.double()
        p = b if pattern is None else pattern.double()
        bad = (a.isnan() != p.isnan()) | (a.isinf() != p.isinf()) | (a.isinf() & p.isinf() & (a != p))
        assert not bad.any(), f"{what}: NaN/inf differ at {bad.nonzero().tolist()[:8]}: got {a[bad][:8].tolist()} want {p[bad][:8].tolist()}"
        fa = a.isfinite()
        a, b = a[fa], b[fa]
        nb = float(b.norm())
        return float((a - b).norm()) / nb if nb > 0 else float((a - b).norm())

    def note(dtype, what, err):
        key = (str(dtype).replace("torch.", ""), what)
        worst[key] = max(worst.get(key, 0.0), err)

    def check_stats(got, want, dtype, what):
        for name in ("lse", "ce", "prob", "weight", "loss"):
            err = rel_finite(getattr(got, name), getattr(want, name), f"{what} {name}")
            assert err < 1e-5, (what, name, err)
            note(dtype, "stats", err)
        assert torch.equal(got.pred, want.pred), (what, got.pred, want.pred)

    def check_grad(out, ref64, torch_lp, coef, dtype, what):
        """out vs the float64 reference; rows with coef 0 must be exact zeros, whatever they hold."""
        assert torch.all(out[coef == 0] == 0), (what, "coef-0 rows are not exact zeros")
        err = rel_finite(out, ref64, what, pattern=ref64.to(dtype))
        if dtype == torch.float32:
            assert err < 1e-5, (what, err)
            note(dtype, "grad", err)
        else:  # the rounding of the float32 gradient to bf16/fp16: PyTorch's own error is the yardstick
            own = rel_finite(torch_lp, ref64, what + " torch", pattern=ref64.to(dtype))
            assert err <= 1.5 * own + 1e-6, (what, err, own)
            note(dtype, "grad", err)
            note(dtype, "grad/torch", err / own if own else 0.0)

    def call_forward(logits, target, tw, args):
        nonlocal launches
        stats = poisoned_stats(logits)
        C.row_forward(helpers.make_input(C, logits, target, tw), helpers.make_options(C, args),
                      helpers.stats_args(C, stats), stream=0)
        launches += 1
        return RowStats(*stats)

    def call_backward(logits, target, lse, coef, grad, args):
        nonlocal launches
        helpers.check_grad(grad, logits)
        C.row_backward(helpers.make_input(C, logits, target, None), helpers.make_options(C, args),
                       lse=lse.data_ptr(), coef=coef.data_ptr(), grad=grad.data_ptr(),
                       grad_row_stride=grad.stride(0), stream=0)
        launches += 1

    def call_fused(logits, target, tw, scale, grad, args):
        nonlocal launches
        helpers.check_grad(grad, logits)
        stats = poisoned_stats(logits)
        C.row_forward_backward(helpers.make_input(C, logits, target, tw), helpers.make_options(C, args),
                               helpers.stats_args(C, stats), scale=scale.data_ptr(), grad=grad.data_ptr(),
                               grad_row_stride=grad.stride(0), stream=0)
        launches += 1
        return RowStats(*stats)

    if plant_overflow:  # row_forward told there are 8 rows while `loss` holds 7
        x, t = make_case(torch.float32, 33, 0)
        logits, target = x[:8].float().contiguous(), t[:8].clone()
        stats = list(poisoned_stats(logits))
        stats[5] = torch.empty(7)
        C.row_forward(helpers.make_input(C, logits, target, None),
                      helpers.make_options(C, KernelOptions().scalars(33)),
                      helpers.stats_args(C, stats), stream=0)
        print("planted overflow went unnoticed")
        return

    cases = 0
    for d, dtype_name in enumerate(DTYPES):
        dtype = dtypes[dtype_name]
        for vi, v in enumerate(VOCAB):
            for k in option_sets_for(d, vi):
                opt_set = OPTION_SETS[k]
                if only and (dtype_name, v) != only:
                    continue
                what = f"{dtype_name} V={v} {opt_set}"
                opts = KernelOptions(**opt_set)
                args = opts.scalars(v)
                x64, t = make_case(dtype, v, k)
                n = x64.shape[0]
                odd = (k + v) % 2 == 1
                logits, _ = strided(n, v, dtype, offset=1 if odd else 0, pad=3 if odd else 0, fill=math.nan)
                logits.copy_(x64.to(dtype))
                x = logits.double()  # the exact values the kernel reads
                target = t.to(torch.int32) if k % 2 else t
                if k == 2:  # a strided target
                    target = torch.stack([target, torch.full_like(target, 5)], 1)[:, 0]
                tw = None
                if k % 2 == 1:
                    tw = torch.rand(n, generator=torch.Generator().manual_seed(v)) * 2
                    tw[13] = 0.0
                tw64 = None if tw is None else tw.double()

                # forward
                got = call_forward(logits, target, tw, args)
                want = reference.row_forward(x, target, tw64, opts)
                check_stats(got, want, dtype, what + " forward")

                # backward, into a separate (strided when odd) gradient whose padding must survive
                coef = torch.randn(n, generator=torch.Generator().manual_seed(7 * v + k))
                coef[::3] = 0.0
                grad, base = strided(n, v, dtype, offset=2 if odd else 0, pad=5 if odd else 0, fill=7.0)
                grad.fill_(math.nan)
                untouched = base == 7.0
                call_backward(logits, target, got.lse, coef, grad, args)
                ref = reference.row_backward(x, target, want.lse, coef.double(), opts)
                torch_lp = reference.row_backward(logits, target, want.lse.float(), coef, opts)
                check_grad(grad, ref, torch_lp, coef, dtype, what + " backward")
                assert torch.all(base[untouched] == 7.0), what + " gradient padding overwritten"

                # backward in place: the gradient over the logits' own storage, bitwise as above
                inplace, _ = strided(n, v, dtype, 1 if odd else 0, 3 if odd else 0, math.nan)
                inplace.copy_(logits)
                call_backward(inplace, target, got.lse, coef, inplace, args)
                assert torch.equal(inplace.isnan(), grad.isnan()) and torch.equal(
                    inplace.nan_to_num(), grad.nan_to_num()), what + " in-place backward differs"

                # fused forward + backward, then in place
                scale = torch.tensor(0.37)
                fgrad = torch.full((n, v), math.nan, dtype=dtype)
                fused = call_fused(logits, target, tw, scale, fgrad, args)
                for a, b in zip(fused, got):
                    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), what
                fcoef = want.weight * 0.37
                ref = reference.row_backward(x, target, want.lse, fcoef, opts)
                torch_lp = reference.row_backward(logits, target, want.lse.float(), fcoef.float(), opts)
                check_grad(fgrad, ref, torch_lp, fcoef.float(), dtype, what + " fused")
                inplace, _ = strided(n, v, dtype, 1 if odd else 0, 3 if odd else 0, math.nan)
                inplace.copy_(logits)
                fused2 = call_fused(inplace, target, tw, scale, inplace, args)
                for a, b in zip(fused2, got):
                    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), what
                assert torch.equal(inplace.isnan(), fgrad.isnan()) and torch.equal(
                    inplace.nan_to_num(), fgrad.nan_to_num()), what + " in-place fused differs"
                cases += 1
        print(f"{dtype_name}: done", flush=True)

    if not only:  # one row length that takes 1024 threads (32 warps: the second warp stage is full)
        v, k = 16411, 3
        opts = KernelOptions(**OPTION_SETS[k])
        args = opts.scalars(v)
        x64, t = make_case(torch.float32, v, k)
        logits, target = x64[:9].float().contiguous(), t[:9].clone()
        got = call_forward(logits, target, None, args)
        want = reference.row_forward(logits.double(), target, None, opts)
        check_stats(got, want, torch.float32, f"float32 V={v} forward")
        grad = torch.full_like(logits, math.nan)
        call_fused(logits, target, None, torch.tensor(0.37), grad, args)
        ref = reference.row_backward(logits.double(), target, want.lse, want.weight * 0.37, opts)
        check_grad(grad, ref, None, (want.weight * 0.37).float(), torch.float32, f"float32 V={v} fused")
        cases += 1

    if not only:  # a row that starts past element 2^31: row * row_stride must be formed in 64 bits
        v, stride = 64, 2**31 + 64
        opts = KernelOptions(policy="none")
        args = opts.scalars(v)
        storage = torch.empty(stride + v, dtype=torch.bfloat16)  # 4 GiB, virtual: two rows touched
        logits = storage.as_strided((2, v), (stride, 1))
        x64, t = make_case(torch.bfloat16, v, 0)
        logits.copy_(x64[:2].to(torch.bfloat16))
        target = t[:2].clone()
        dense = logits.double()
        got = call_forward(logits, target, None, args)
        want = reference.row_forward(dense, target, None, opts)
        check_stats(got, want, torch.bfloat16, "bfloat16 row past element 2^31 forward")
        coef = torch.tensor([0.5, 2.0])
        grad = torch.full((2, v), math.nan, dtype=torch.bfloat16)
        call_backward(logits, target, got.lse, coef, grad, args)
        ref = reference.row_backward(dense, target, want.lse, coef.double(), opts)
        torch_lp = reference.row_backward(logits.contiguous(), target, want.lse.float(), coef, opts)
        check_grad(grad, ref, torch_lp, coef, torch.bfloat16, "bfloat16 row past element 2^31 backward")
        del storage, logits
        cases += 1

    if not only:  # a vocabulary slice: eps / V with the global V (100), not the slice's 33 columns
        v = 33
        opts = KernelOptions(policy="none", label_smoothing=0.2, vocab_size=100)
        x64, t = make_case(torch.float32, v, 1)
        logits, target = x64.float().contiguous(), t.clone()
        want = reference.row_forward(logits.double(), target, None, opts)
        coef = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(7))
        grad = torch.full_like(logits, math.nan)
        call_backward(logits, target, want.lse.float(), coef, grad, opts.scalars(v))
        ref = reference.row_backward(logits.double(), target, want.lse, coef.double(), opts)
        check_grad(grad, ref, None, coef, torch.float32, "float32 slice of V=100 backward")
        cases += 1

    if not only:  # scale_rows: grad *= factor read on the device; 1 writes nothing; padding untouched
        for dtype in dtypes.values():
            for factor in (1.0, 0.37, -2.5):
                g0, base = strided(5, 40, dtype, offset=1, pad=3, fill=7.0)
                g0.copy_(torch.randn(5, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype))
                want_rows = (g0.float() * factor).to(dtype)
                f = torch.tensor(factor, dtype=torch.float32)
                C.scale_rows(grad=g0.data_ptr(), dtype=helpers.DTYPE_CODES[dtype], n_rows=5, n_cols=40,
                             row_stride=g0.stride(0), factor=f.data_ptr(), stream=0)
                launches += 1
                assert torch.equal(g0, want_rows), (dtype, factor)
                pad = torch.ones_like(base, dtype=torch.bool)
                pad.as_strided((5, 40), (43, 1), 1).fill_(False)
                assert (base[pad] == 7.0).all(), (dtype, factor, "scale_rows wrote outside the rows")
        cases += 1

    for (dt, what), err in sorted(worst.items()):
        print(f"worst {dt:9s} {what:10s} {err:.3g}")
    print(f"EMU-OK cases={cases} launches={launches}")


if __name__ == "__main__":
    only = [a.split("=", 1)[1].split(",") for a in sys.argv[2:] if a.startswith("--only=")]  # debugging
    if "--all-options" in sys.argv[2:]:  # every option set for every (dtype, V): 120 cases, ~1 min
        option_sets_for = lambda d, vi: range(len(OPTION_SETS))  # noqa: E731
    _driver(sys.argv[1], "--plant-overflow" in sys.argv[2:], (only[0][0], int(only[0][1])) if only else None)
