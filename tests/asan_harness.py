"""What the two sanitizer tests share (test_native_sanitize.py: the CPU kernels; test_cuda_emulated.py:
the CUDA kernels on the CPU): finding the ASan runtime, running a test file's driver under it in a
fresh Python, and reading the verdict. Each test builds its own module and writes its own driver.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

ROOT = Path(__file__).resolve().parents[1]
# Any of these on stderr fails a run, whatever the exit code.
SANITIZER_MARKS = ("AddressSanitizer", "runtime error", "LeakSanitizer", "UndefinedBehaviorSanitizer")


def asan_toolchain(cxx: Optional[str]) -> Union[str, tuple]:
    """(libasan path, the pybind11 module), or the reason a sanitized build cannot run here."""
    if sys.platform != "linux":
        return "the harness preloads an ELF sanitizer runtime (Linux only)"
    if cxx is None:
        return "g++ is not installed"
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        return f"g++ has no AddressSanitizer runtime (libasan.so not found: {libasan!r})"
    try:
        import pybind11
    except ImportError:
        return "pybind11 (a build requirement of the native modules) is not installed"
    return libasan, pybind11


def run_driver(script: str, so: Path, libasan: str, *args: str, threads: int, timeout: float = 240):
    """``python SCRIPT SO ARGS`` with the ASan runtime preloaded; the script is the test file itself,
    whose ``__main__`` part is its driver."""
    env = dict(os.environ)
    env.pop("MEMFT_CPU_ISA", None)  # a driver chooses the CPU code path itself
    env.update(
        LD_PRELOAD=libasan,  # the ASan runtime must come first; the module pulls in libubsan itself
        ASAN_OPTIONS="detect_leaks=0",  # CPython and torch "leak" by design: noise
        UBSAN_OPTIONS="print_stacktrace=1",
        PYTHONMALLOC="malloc",  # Python's own buffers through malloc, where ASan sees them
        OMP_NUM_THREADS=str(threads),
    )
    return subprocess.run([sys.executable, str(Path(script).resolve()), str(so), *args],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)


def assert_clean(r: subprocess.CompletedProcess, extra_marks=(), stdout_tail: int = 3000) -> str:
    """No sanitizer report and exit code 0; returns the report used in assertion messages."""
    report = f"exit code {r.returncode}\nstdout:\n{r.stdout[-stdout_tail:]}\nstderr:\n{r.stderr[-12000:]}"
    for mark in SANITIZER_MARKS + tuple(extra_marks):
        assert mark not in r.stderr, report
    assert r.returncode == 0, report
    return report
