"""`pip wheel .` builds a wheel that installs and runs without any build step.

Marked slow (about a minute on 2 cores: the CMake build directory under build/ is reused, so the
native code is usually not recompiled). MEMFT_CUDA=0 keeps the CUDA build out of it. When the build
requirements of pyproject.toml are importable here the build runs without isolation (no network);
otherwise pip fetches them into an isolated build environment, as a user's `pip wheel .` does.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_REQUIREMENTS_HERE = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel", "pybind11")) and bool(
    shutil.which("cmake")
)

SCRIPT = """
import sys
# An editable install of a source tree in the base interpreter (a development machine) is visible
# through --system-site-packages and its import hook would shadow the wheel: drop the hook.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
import torch, memft_kernels
from memft_kernels import memft_loss
from memft_kernels.ops import native_cpu
assert memft_kernels.__file__.startswith(sys.prefix), memft_kernels.__file__
assert native_cpu.availability() is None, native_cpu.availability()
torch.manual_seed(0)
x = torch.randn(8, 101, requires_grad=True)
y = torch.randint(0, 101, (8,))
loss = memft_loss(x, y, backend="cpu")
loss.backward()
ref = memft_loss(x.detach().double(), y, backend="torch")
assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
print("ok", native_cpu.isa(), memft_kernels.__file__)
"""

# `memft bench` from the wheel (the harness is in the package): a smoke run writes its CSV here, and
# the one checkout-only entry (gpu-check) says so instead of failing obscurely.
BENCH_SCRIPT = """
import csv, sys
from memft_kernels import cli
from memft_kernels.bench import timing
assert timing.checkout_root() is None
rc = cli.main(["bench", "loss", "--smoke", "--device", "cpu", "--providers", "memft-cpu", "torch-plain",
               "--no-memory", "--csv", "bench.csv"])
assert rc == 0, rc
rows = list(csv.DictReader(open("bench.csv")))
assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["commit"] == "unknown" for r in rows), rows
assert cli.main(["bench", "gpu-check"]) == 2
print("bench ok")
"""


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    env = dict(os.environ, MEMFT_CUDA="0")
    env.pop("MEMFT_NATIVE", None)
    dist = tmp_path / "dist"
    isolation = ["--no-build-isolation"] if BUILD_REQUIREMENTS_HERE else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(dist), "--no-deps", "-q", *isolation],
        check=True, env=env, cwd=tmp_path,
    )
    (wheel,) = dist.glob("memft_kernels-*.whl")
    assert "linux" in wheel.name or "macosx" in wheel.name, f"a wheel with native code must be platform-specific: {wheel.name}"
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("memft_kernels/_native_cpu") and n.endswith(".so") for n in names), names
    assert not any("_native_cuda" in n for n in names), "MEMFT_CUDA=0 must not build the CUDA module"

    # Without PYTHONPATH: a source tree on it (as in a development shell) would shadow the wheel.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Run from a venv: --system-site-packages exposes the base interpreter's site-packages, not
        # this venv's, where torch is. List this venv's directories (after the new venv's own, so the
        # wheel still wins over an editable install here; their .pth files are not processed).
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        Path(purelib, "_outer_venv.pth").write_text("".join(f"{d}\n" for d in site.getsitepackages()))
    # --ignore-installed: an install of memft_kernels in the base interpreter (editable, on a development
    # machine) must not make pip skip the wheel as "already satisfied".
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, cwd=tmp_path, env=clean)
    out = subprocess.run([str(python), "-c", SCRIPT], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=dict(clean, OMP_NUM_THREADS="1"))
    assert out.stdout.startswith("ok"), out.stdout + out.stderr
    out = subprocess.run([str(python), "-c", BENCH_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "bench ok" in out.stdout, out.stdout + out.stderr
    assert "source checkout" in out.stderr


def test_a_build_drops_staged_native_modules_it_does_not_make(tmp_path):
    """`setup.py build_ext --inplace` (gpu_check.sh's build) stages each module in build/lib.* as well,
    and setuptools packs whatever is there: a later `MEMFT_CUDA=0 pip wheel .` shipped the old CUDA
    module (and `MEMFT_NATIVE=0` a "pure" wheel with .so files). build_py drops them first."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "memft_kernels", src / "memft_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    package = tmp_path / "lib" / "memft_kernels"
    package.mkdir(parents=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    staged = {name: package / f"{name}{suffix}" for name in ("_native_cpu", "_native_cuda")}

    def build_py(**switches):
        for path in staged.values():
            path.write_bytes(b"a module from an earlier build")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFT_")}
        subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(package.parent)],
                       cwd=src, env={**env, **switches}, check=True, capture_output=True)
        assert (package / "loss.py").is_file()
        return {name for name, path in staged.items() if path.exists()}

    # kept: this build makes it (build_ext replaces it next)
    assert build_py(MEMFT_CUDA="0") == {"_native_cpu"}
    assert build_py(MEMFT_NATIVE="0") == set()
