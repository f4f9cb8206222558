"""The native CPU kernels (csrc/cpu/) under AddressSanitizer + UndefinedBehaviorSanitizer.

The test builds only ``_native_cpu`` with ``-fsanitize=address,undefined -fno-sanitize-recover=all
-fno-omit-frame-pointer -g -O1`` (CMake option MEMFT_SANITIZE, Debug build type: no LTO, no strip)
into a temporary directory, never touching the installed module, then runs this file as a script
in a fresh Python with libasan preloaded. The script loads the sanitized module under the name the
package imports (``memft_kernels._native_cpu``) before the package itself, and drives it through
the public ``memft_loss(..., backend="cpu")`` on every code path the host has (AVX-512F, AVX2,
portable scalar via MEMFT_CPU_ISA), the three dtypes, odd V that leave partial vectors, targets at 0 and
V - 1, ignored rows, out-of-range targets (validate=False), non-contiguous row strides, every
policy and option, forward only, two-pass backward, the fused single pass and in-place backward.
Every result is compared with backend="torch", so a wrong number fails as well as a bad access.
Tensors are allocated at their exact size (strided ones over a storage that ends where the last
row ends), so a read or write past a row's end is past an allocation's end; row padding holds NaN,
so reading it shows in the numbers. A planted bug (the raw binding given a logits buffer 8 floats
short) checks that the harness does report an overflow.

Run by hand: ``python -m pytest -q tests/test_native_sanitize.py -s`` prints the cases covered.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the sanitized build is most of the ~45-60 s on 2 cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from asan_harness import asan_toolchain, assert_clean, run_driver  # noqa: E402


# ------------------------------------------------------------------------------ build (pytest side)
def _toolchain():
    """(cmake, g++, libasan path, pybind11 cmake dir), or the reason the sanitizer build cannot run."""
    cmake = shutil.which("cmake")
    if cmake is None:
        return "cmake is not installed"
    cxx = shutil.which("g++")
    tools = asan_toolchain(cxx)
    if isinstance(tools, str):
        return tools
    libasan, pybind11 = tools
    return cmake, cxx, libasan, pybind11.get_cmake_dir()


@pytest.fixture(scope="module")
def sanitized_module(tmp_path_factory):
    """Path of a freshly built, sanitized _native_cpu module and the libasan to preload."""
    tools = _toolchain()
    if isinstance(tools, str):
        pytest.skip(f"sanitizer build not possible here: {tools}")
    cmake, cxx, libasan, pybind11_dir = tools
    build = tmp_path_factory.mktemp("memft_sanitize_build")
    out = build / "out"
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Debug", "-DMEMFT_SANITIZE=ON", "-DMEMFT_BUILD_CUDA=OFF",
        f"-DCMAKE_CXX_COMPILER={cxx}", f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11_dir}", f"-DMEMFT_OUTPUT_DIR={out}",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    t0 = time.perf_counter()
    for cmd in (configure, [cmake, "--build", str(build), "--target", "_native_cpu", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    so = out / f"_native_cpu{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert so.exists(), f"CMake did not produce {so}"
    print(f"\nsanitized _native_cpu built in {time.perf_counter() - t0:.1f} s: {so}")
    return so, libasan


def _run_driver(so, libasan, *args, timeout=240):
    return run_driver(__file__, so, libasan, *args, threads=2, timeout=timeout)


def test_kernels_are_clean_under_asan_and_ubsan(sanitized_module):
    so, libasan = sanitized_module
    t0 = time.perf_counter()
    r = _run_driver(so, libasan)
    print(r.stdout[-3000:])
    report = assert_clean(r)
    m = re.search(r"SANITIZE-OK cases=(\d+) isas=(\S+) host=(\S+)", r.stdout)
    assert m, report
    cases, isas, host = int(m.group(1)), m.group(2).split(","), m.group(3)
    want = {"avx512f": ["avx512f", "avx2+fma", "scalar"], "avx2+fma": ["avx2+fma", "scalar"]}.get(host, ["scalar"])
    # 270 cases per code path (90 per dtype), and the 2 large ones on each vector path
    assert isas == want and cases == 270 * len(want) + 2 * (len(want) - 1), report
    print(f"driver: {cases} cases on {isas} in {time.perf_counter() - t0:.1f} s")


def test_harness_reports_a_planted_overflow(sanitized_module):
    """The same harness must fail on a real out-of-bounds access: a logits buffer 8 floats short."""
    so, libasan = sanitized_module
    r = _run_driver(so, libasan, "--plant-overflow", timeout=120)
    assert r.returncode != 0, f"the planted overflow went unreported:\n{r.stdout}\n{r.stderr[-4000:]}"
    # A vector load straddling the end: ASan names the access, the kernel frame and the buffer.
    assert "ERROR: AddressSanitizer" in r.stderr and "READ of size" in r.stderr, r.stderr[-4000:]
    assert "scan_row" in r.stderr, r.stderr[-4000:]
    assert re.search(r"located \d+ bytes (to the right of|after) 2016-byte region", r.stderr), r.stderr[-4000:]
    assert "planted overflow NOT detected" not in r.stdout


# ------------------------------------------------------------------------------ driver (subprocess)
def _load_sanitized(so_path):
    """Import the sanitized module as memft_kernels._native_cpu, before the package imports its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memft_kernels._native_cpu", so_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["memft_kernels._native_cpu"] = mod
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "libasan" in maps and "libubsan" in maps, "the sanitizer runtimes are not loaded"
    return mod


def _plant_overflow(C):
    """Call the raw binding with a logits buffer 8 floats shorter than n_rows x n_cols says."""
    import ctypes

    n, v = 2, 256
    logits = (ctypes.c_float * (n * v - 8))()  # PYTHONMALLOC=malloc: an exact-size malloc block
    target = (ctypes.c_int64 * n)(0, 1)
    stats = [(ctypes.c_float * n)() for _ in range(5)]
    pred = (ctypes.c_int64 * n)()
    addr = ctypes.addressof
    inp = C.make_input(logits=addr(logits), dtype=0, n_rows=n, n_cols=v, row_stride=v, target=addr(target),
                       target_int64=True, target_stride=1, token_weight=0, token_weight_stride=1)
    opts = C.make_options(policy=1, threshold=0.5, sharpness=10.0, ce_threshold=0.6931472, ignore_index=-100,
                          label_smoothing=0.0, inv_vocab=0.0, z_loss=0.0, softcap=0.0)
    out = C.make_stats(lse=addr(stats[0]), ce=addr(stats[1]), prob=addr(stats[2]), pred=addr(pred),
                       weight=addr(stats[3]), loss=addr(stats[4]))
    C.row_forward(inp, opts, out, threads=1)
    print("planted overflow NOT detected")


VS = [1, 3, 15, 17, 31, 33, 63, 65, 2053]  # partial vectors of 16 and 8; 2053: two 2048-blocks + a tail
OPTION_SETS = [
    dict(policy="hard"),
    dict(policy="none", label_smoothing=0.1),
    dict(policy="sigmoid", threshold=0.7, sharpness=4.0, z_loss=1e-3),
    dict(policy="hard", softcap=5.0, label_smoothing=0.05, z_loss=1e-4),
    dict(policy="sigmoid", softcap=3.0, token_weight=True),
    dict(policy="none", z_loss=1e-4, token_weight=True),
]
PATHS = [  # (name, memft_loss arguments, needs a gradient)
    ("forward", dict(reduction="none"), False),
    ("two-pass mean/active", dict(reduction="mean", normalize="active"), True),
    ("two-pass none", dict(reduction="none"), True),
    ("fused sum", dict(reduction="sum"), True),
    ("fused mean/valid", dict(reduction="mean", normalize="valid"), True),
    ("fused denominator", dict(reduction="mean", denominator=7.0, fallback="zero"), True),
    ("in-place two-pass", dict(reduction="mean", normalize="active", inplace_backward=True), True),
    ("in-place fused", dict(reduction="mean", normalize="valid", inplace_backward=True), True),
]
LAYOUTS = ["contiguous", "one row", "row stride", "row stride 0"]
TARGET_KINDS = ["int64", "int32 strided", "out of range int64", "out of range int32"]
# Over 32 MiB of logits: the gradient takes non-temporal stores (vector paths only; the scalar path
# has none, so it skips these); odd V leaves every other row unaligned, which then stores normally.
LARGE = [
    ("float32", 64, 131073, dict(reduction="sum", label_smoothing=0.1)),  # fused sweep from kept exps
    ("bfloat16", 128, 131073, dict(policy="sigmoid", softcap=20.0, z_loss=1e-4)),  # two-pass, capped
]


def _cases():
    """The same list of cases for every code path: each option set meets each path and each V
    meets each path, layout and target kind (the pairings rotate with the indices)."""
    cases = []
    for d, dtype in enumerate(("float32", "bfloat16", "float16")):
        for vi, v in enumerate(VS):
            for pi, (name, kwargs, needs_grad) in enumerate(PATHS):
                layout = LAYOUTS[(2 * vi + pi + d) % len(LAYOUTS)]
                if kwargs.get("inplace_backward"):
                    layout = "one row" if vi % 2 else "contiguous"  # in place needs contiguous logits
                cases.append(dict(kind="loss", dtype=dtype, v=v, path=name, kwargs=kwargs, needs_grad=needs_grad,
                                  opt=OPTION_SETS[(vi + pi + 3 * d) % len(OPTION_SETS)], layout=layout,
                                  target=TARGET_KINDS[(vi + 2 * pi + d) % len(TARGET_KINDS)], seed=len(cases)))
            for fused in (False, True):  # the raw ops with a strided gradient (memft_loss passes dense ones)
                cases.append(dict(kind="raw", dtype=dtype, v=v, fused=fused, seed=len(cases),
                                  opt=OPTION_SETS[(vi + fused) % len(OPTION_SETS)]))
    for dtype, n, v, kwargs in LARGE:
        cases.append(dict(kind="large", dtype=dtype, n=n, v=v, kwargs=kwargs, seed=len(cases)))
    return cases


def _driver(so_path):
    import math

    C = _load_sanitized(so_path)
    sys.path.insert(0, str(ROOT))
    import torch

    from memft_kernels import memft_loss
    from memft_kernels.ops import native, native_cpu, reference
    from memft_kernels.spec import KernelOptions

    assert native_cpu._C is C, "memft_kernels did not pick up the sanitized module"
    torch.set_num_threads(2)  # OpenMP over rows; one-row cases take the serial loop

    # Per-row outputs and fresh gradient buffers are poisoned, so an element the kernel skips shows.
    new_row_stats = native.new_row_stats

    def poisoned_stats(logits):
        stats = new_row_stats(logits)
        for t in stats:
            t.fill_(-1 if t.dtype == torch.int64 else math.nan)
        return stats

    native.new_row_stats = poisoned_stats
    backend = native_cpu.BACKEND
    row_backward, row_forward_backward = backend.row_backward, backend.row_forward_backward

    def poisoned_backward(logits, target, lse, coef, opts, out=None):
        if out is None:
            out = torch.full_like(logits, math.nan, memory_format=torch.contiguous_format)
        return row_backward(logits, target, lse, coef, opts, out=out)

    def poisoned_forward_backward(logits, target, token_weight, opts, scale, grad):
        if grad.data_ptr() != logits.data_ptr():
            grad.fill_(math.nan)
        return row_forward_backward(logits, target, token_weight, opts, scale, grad)

    # Instance attributes shadow the methods: memft_loss (which calls the backend object) and the
    # module functions used below both go through the poisoned versions.
    backend.row_backward, backend.row_forward_backward = poisoned_backward, poisoned_forward_backward
    native_cpu.row_backward, native_cpu.row_forward_backward = poisoned_backward, poisoned_forward_backward

    def storage_view(flat, n, v, stride):
        """[n, v] rows `stride` apart over `flat`, which ends exactly where the last row does."""
        assert flat.numel() == (n - 1) * stride + v
        return flat.as_strided((n, v), (stride, 1))

    def make_target(gen, n, v, kind, seed):
        """0, v - 1 and an ignored row always; out-of-range values for the validate=False kinds."""
        t = torch.randint(0, v, (n,), generator=gen)
        special = [0, v - 1, -100]
        if kind.startswith("out of range"):
            big = 1 << 40 if kind.endswith("int64") else (1 << 31) - 1
            special += [v, -1, big, -big - 1, v + 1000]
        if n == 1:
            t[0] = special[seed % 3]
        else:
            for r in range(min(n, len(special))):
                t[r] = special[(r + seed) % len(special)]
        if kind == "int32 strided":
            flat = torch.zeros((n - 1) * 2 + 1, dtype=torch.int32)
            view = flat.as_strided((n,), (2,))
            view.copy_(t)
            return view
        return t.to(torch.int32) if kind.endswith("int32") else t

    def make_logits(gen, n, v, dtype, layout, target, special_values):
        """(leaf logits of the layout, the storage under them); some rows made confident (p > 0.5)."""
        vals = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
        t = target.long()
        conf = ((torch.rand(n, generator=gen) < 0.4) & (t >= 0) & (t < v)).nonzero().flatten()
        vals[conf, t[conf]] += 8.0
        if special_values and v > 2:
            vals[0, 1] = -math.inf
            vals[n - 1, v // 2] = math.nan
        if layout == "row stride":
            stride = v + 5  # odd padding: rows start unaligned; the padding holds NaN
            flat = torch.full(((n - 1) * stride + v,), math.nan, dtype=dtype)
            x = storage_view(flat, n, v, stride)
            x.copy_(vals.to(dtype))
            return x.requires_grad_(True), flat
        if layout == "row stride 0":
            base = vals[:1].to(dtype)
            return base.expand(n, v).requires_grad_(True), base
        x = vals.to(dtype).requires_grad_(True)
        return x, x.detach()

    def close(a, b, rtol, atol, what):
        a, b = a.detach(), b.detach()
        if a.dtype == torch.int64:
            ok = a.shape == b.shape and torch.equal(a, b)
        else:
            a, b = a.double(), b.double()
            ok = a.shape == b.shape and bool(torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True).all())
        if not ok:
            raise AssertionError(f"{what}: cpu {a.flatten()[:40].tolist()} vs torch {b.flatten()[:40].tolist()}")

    def run(backend, leaf, target, tw, kwargs, needs_grad, seed):
        """(loss, stats, grad) of memft_loss; the torch backend runs on a dense copy."""
        x = leaf.detach().clone().requires_grad_(needs_grad) if backend == "torch" else leaf
        if not needs_grad:
            x = x.detach()
        loss, stats = memft_loss(x, target, backend=backend, token_weight=tw, return_stats=True, **kwargs)
        grad = None
        if needs_grad:
            storage = x.detach()
            loss.backward(torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
            grad = x.grad
            if kwargs.get("inplace_backward") and backend == "cpu":
                assert grad.data_ptr() == storage.data_ptr(), "in-place backward did not reuse the storage"
        return loss.detach(), stats, grad

    def bits(t):
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    def loss_case(c, want):
        dtype, v = getattr(torch, c["dtype"]), c["v"]
        n = 1 if c["layout"] == "one row" else 7
        gen = torch.Generator().manual_seed(c["seed"])
        target = make_target(gen, n, v, c["target"], c["seed"])
        opt = dict(c["opt"])
        special = c["seed"] % 3 == 0 and not opt.get("label_smoothing")  # -inf and NaN logits
        leaf, storage = make_logits(gen, n, v, dtype, c["layout"], target, special)
        tw = None
        if opt.pop("token_weight", False):
            wflat = torch.rand((n - 1) * 3 + 1, generator=gen) * 2
            wflat[0] = 0.0  # weight 0: the row's gradient is exact zeros
            tw = wflat.as_strided((n,), (3,))
        kwargs = dict(c["kwargs"], **opt, validate=not c["target"].startswith("out of range"))
        before = storage.detach().clone()
        if want is None:
            want = run("torch", leaf, target, tw, kwargs, c["needs_grad"], c["seed"])
        got = run("cpu", leaf, target, tw, kwargs, c["needs_grad"], c["seed"])
        what = f"{c['path']} {c['opt']} {c['layout']}, {c['target']} targets"
        close(got[0], want[0], 1e-4, 2e-5, f"{what}: loss")
        for field in ("ce", "prob", "lse", "weight", "pred"):
            close(getattr(got[1], field), getattr(want[1], field), 1e-4, 2e-5, f"{what}: {field}")
        if c["needs_grad"]:
            close(got[2], want[2], 1e-4 if dtype == torch.float32 else 1.6e-2, 1e-6, f"{what}: grad")
        if not c["kwargs"].get("inplace_backward"):  # the input, row padding included, is untouched
            assert torch.equal(bits(storage.detach()), bits(before)), f"{what}: the kernel wrote into its input"
        return want

    def raw_case(c, want):
        dtype, v, fused = getattr(torch, c["dtype"]), c["v"], c["fused"]
        opt = KernelOptions(**{k: val for k, val in c["opt"].items() if k != "token_weight"})
        n, stride = 5, v + 3
        gen = torch.Generator().manual_seed(c["seed"])
        target = make_target(gen, n, v, "out of range int64", c["seed"])
        logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
        coef = torch.rand(n, generator=gen)
        coef[1] = 0.0
        if want is None:
            ref = reference.row_forward(logits, target, None, opt)
            want_coef = ref.weight * 0.3 if fused else coef
            want = ref, reference.row_backward(logits, target, ref.lse, want_coef, opt)
        ref, want_grad = want
        gflat = torch.full(((n - 1) * stride + v,), math.nan, dtype=dtype)
        grad = storage_view(gflat, n, v, stride)
        what = f"raw {'fused' if fused else 'backward'} {c['opt']}, gradient row stride {stride}"
        if fused:
            stats = native_cpu.row_forward_backward(logits, target, None, opt, torch.tensor(0.3), grad)
            for field in ("lse", "ce", "prob", "weight", "loss", "pred"):
                close(getattr(stats, field), getattr(ref, field), 1e-4, 2e-5, f"{what}: {field}")
        else:
            native_cpu.row_backward(logits, target, ref.lse, coef, opt, out=grad)
        close(grad, want_grad, 1e-4 if dtype == torch.float32 else 1.6e-2, 1e-6, f"{what}: grad")
        pad = torch.ones_like(gflat, dtype=torch.bool)
        pad[storage_view(torch.arange(gflat.numel()), n, v, stride).flatten()] = False
        assert torch.isnan(gflat[pad].float()).all(), f"{what}: wrote into the gradient's row padding"
        return want

    def large_case(c, want):
        dtype, n, v = getattr(torch, c["dtype"]), c["n"], c["v"]
        gen = torch.Generator().manual_seed(c["seed"])
        logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
        assert logits.numel() * logits.element_size() >= 32 << 20
        target = torch.randint(0, v, (n,), generator=gen)
        target[0], target[1], target[2] = 0, v - 1, -100
        if want is None:
            want = run("torch", logits, target, None, c["kwargs"], True, c["seed"])
        got = run("cpu", logits.requires_grad_(True), target, None, c["kwargs"], True, c["seed"])
        what = f"large {c['dtype']} {n} x {v} {c['kwargs']}"
        close(got[0], want[0], 1e-4, 2e-5, f"{what}: loss")
        # rtol: the scalar path sums a row's 131073 exps serially (lse good to ~1e-5 relative), and
        # most gradient elements here are q - eps/V with q ~ eps/V (cancellation).
        close(got[2], want[2], 1e-3 if dtype == torch.float32 else 1.6e-2, 1e-9, f"{what}: grad")
        return want

    host = native_cpu.isa()
    isas = {"avx512f": ["avx512f", "avx2+fma", "scalar"], "avx2+fma": ["avx2+fma", "scalar"]}.get(host, ["scalar"])
    env_for = {"avx512f": None, "avx2+fma": "avx2", "scalar": "scalar"}
    cases = _cases()
    wants = [None] * len(cases)  # the torch backend's results, computed once and kept for every path
    handlers = {"loss": loss_case, "raw": raw_case, "large": large_case}
    t0, done = time.perf_counter(), 0
    for isa in isas:
        if env_for[isa] is None:
            os.environ.pop("MEMFT_CPU_ISA", None)
        else:
            os.environ["MEMFT_CPU_ISA"] = env_for[isa]
        assert native_cpu.isa() == isa, (native_cpu.isa(), isa)
        spent = dict.fromkeys(handlers, 0.0)
        for k, c in enumerate(cases):
            if c["kind"] == "large" and isa == "scalar":
                continue
            t1 = time.perf_counter()
            try:
                wants[k] = handlers[c["kind"]](c, wants[k])
            except Exception as exc:
                raise AssertionError(f"[{isa}, {c['dtype']}, V={c['v']}, case {k}] {exc}") from exc
            spent[c["kind"]] += time.perf_counter() - t1
            done += 1
        print(f"{isa}: {done} cases passed so far ({', '.join(f'{k} {t:.1f} s' for k, t in spent.items())}), "
              f"{time.perf_counter() - t0:.1f} s in all", flush=True)
    print(f"SANITIZE-OK cases={done} isas={','.join(isas)} host={host}")


if __name__ == "__main__":
    if "--plant-overflow" in sys.argv[2:]:
        _plant_overflow(_load_sanitized(sys.argv[1]))
    else:
        _driver(sys.argv[1])
