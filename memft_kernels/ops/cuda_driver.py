"""Is this host's NVIDIA driver new enough for the CUDA runtime the native CUDA module carries?

The module links the CUDA runtime statically (docs/BUILDING.md): it needs no toolkit on the host,
only a driver that supports that runtime's CUDA version. torch brings its own runtime, so
``torch.cuda.is_available()`` says nothing about ours: a wheel built with CUDA 13 on a host whose
driver supports CUDA 12.4 imports fine and then fails at the first launch with
``cudaErrorInsufficientDriver``. ``problem()`` says so up front, in words, and the backend is then
unavailable (``memft info`` prints why; ``backend="auto"`` picks another one).

Rule (NVIDIA's compatibility rules for CUDA >= 11): the driver's CUDA major version must be at
least the runtime's. Within one major version an older driver still runs the machine code (SASS)
built for the GPU (minor-version compatibility), but not PTX compiled by a newer toolkit, so a GPU
whose architecture has no SASS in the module (it would JIT the PTX) needs a driver at least as new
as the runtime.

Pure functions of version numbers, so the rule is tested on a CPU-only machine with faked versions.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple

# Minimum Linux driver per CUDA major version (NVIDIA's CUDA toolkit release notes, table 3).
MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def parse_version(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'13.0.88' or '12.4' -> (13, 0) / (12, 4); None for None or an unparsable string."""
    if not text:
        return None
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def from_driver_int(value: Optional[int]) -> Optional[Tuple[int, int]]:
    """cuDriverGetVersion's integer (12040) -> (12, 4); None for None or 0 (no driver)."""
    if not value:
        return None
    return value // 1000, (value % 1000) // 10


def driver_version() -> Optional[Tuple[int, int]]:
    """The CUDA version this host's driver supports (libcuda's cuDriverGetVersion), None without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int(0)
    try:
        status = libcuda.cuDriverGetVersion(ctypes.byref(value))
    except AttributeError:
        return None
    return from_driver_int(value.value) if status == 0 else None


def fmt(version: Optional[Tuple[int, int]]) -> str:
    return "none" if version is None else f"{version[0]}.{version[1]}"


def requirement(runtime: Tuple[int, int]) -> str:
    """'an NVIDIA driver for CUDA >= 13.0 (Linux driver >= 580.65.06)'."""
    driver = MIN_LINUX_DRIVER.get(runtime[0])
    suffix = f" (Linux driver >= {driver})" if driver else ""
    return f"an NVIDIA driver for CUDA >= {runtime[0]}.0{suffix}"


def problem(
    runtime: Optional[Tuple[int, int]],
    driver: Optional[Tuple[int, int]],
    device_arch: Optional[str] = None,
    sass_archs: Sequence[str] = (),
) -> Optional[str]:
    """Why the module cannot run on this driver, or None. ``device_arch`` is the GPU's 'sm_90',
    ``sass_archs`` the module's machine-code architectures ('sm_80', 'sm_90')."""
    if runtime is None:  # a module built before it recorded its runtime: nothing to check against
        return None
    if driver is None:
        return (f"the CUDA module carries the CUDA {fmt(runtime)} runtime, but no NVIDIA driver answered "
                f"(libcuda.so.1 not loadable): it needs {requirement(runtime)}")
    if driver[0] < runtime[0]:
        return (f"the CUDA module was built with the CUDA {fmt(runtime)} runtime, which needs {requirement(runtime)}; "
                f"this host's driver supports CUDA {fmt(driver)}. Update the NVIDIA driver, or install a memft_kernels "
                f"wheel built with a CUDA {driver[0]}.x toolkit (docs/BUILDING.md)")
    if driver < runtime and device_arch is not None and device_arch not in sass_archs:
        return (f"this GPU ({device_arch}) has no machine code in the CUDA module (built for {', '.join(sass_archs) or 'none'}), "
                f"so its PTX would be compiled by the driver, which needs a driver for CUDA >= {fmt(runtime)} "
                f"(the module's runtime); this host's driver supports CUDA {fmt(driver)}. Update the driver, or rebuild "
                f"with MEMFT_CUDA_ARCHS including {device_arch.replace('sm_', '')} (docs/BUILDING.md)")
    return None


# ---------------------------------------------------------------------------------------------
# The compiled module (its CUDA_RUNTIME_VERSION attribute) and this host
# ---------------------------------------------------------------------------------------------
def module_runtime(module) -> Optional[Tuple[int, int]]:
    """The CUDA runtime version the module was built with (linked statically), from its
    ``CUDA_RUNTIME_VERSION`` attribute ('13.0.88'); None for a module that does not record it."""
    return parse_version(getattr(module, "CUDA_RUNTIME_VERSION", None))


def module_problem(module, sass_archs: Sequence[str]) -> Optional[str]:
    """``problem()`` for the built module on this host's driver and first GPU (call it only when
    torch sees a CUDA device)."""
    runtime = module_runtime(module)
    if runtime is None:
        return None
    import torch

    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    return problem(runtime, driver_version(), arch, sass_archs)


def describe(module) -> str:
    """One line for ``memft info``: the module's runtime, what it needs, what the driver supports."""
    runtime = module_runtime(module)
    if runtime is None:
        return "not recorded by this build"
    driver = driver_version()
    here = "no NVIDIA driver here" if driver is None else f"this host's driver supports CUDA {fmt(driver)}"
    return f"{fmt(runtime)} (needs {requirement(runtime)}; {here})"
