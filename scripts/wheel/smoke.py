"""Smoke test of an installed memft_kernels wheel (run by scripts/build_wheel.sh in a fresh venv).

Checks that the package comes from the venv, that the native CPU module loads and agrees with the
float64 reference (forward and backward, several OpenMP threads), that the CUDA module, if the
wheel has one, imports, and reports which libgomp copies the process mapped.
"""
import os
import sys
import zipfile

# A development machine may have an editable install of the project in the site-packages this venv
# inherits (for torch); its import hook would serve modules missing from the wheel out of the
# source tree. Drop it: only the wheel's files may be imported.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]

import torch  # noqa: E402

import memft_kernels  # noqa: E402
from memft_kernels import memft_loss  # noqa: E402
from memft_kernels.ops import native_cpu  # noqa: E402

wheel = sys.argv[1] if len(sys.argv) > 1 else None
assert memft_kernels.__file__.startswith(sys.prefix), f"not the installed wheel: {memft_kernels.__file__}"
assert native_cpu.availability() is None, native_cpu.availability()

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(64, 1001, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 1001, (64,))
    loss = memft_loss(x, y, backend="cpu", policy="sigmoid", threshold=0.01)
    loss.backward()
    xr = x.detach().double().requires_grad_(True)
    ref = memft_loss(xr, y, backend="torch", policy="sigmoid", threshold=0.01)
    ref.backward()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (dtype, loss.item(), ref.item())
    err = ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
    assert err <= tol, (dtype, err)

names = zipfile.ZipFile(wheel).namelist() if wheel else []
if any("_native_cuda" in n for n in names):
    from memft_kernels.ops import native_cuda

    print("cuda module:", native_cuda.availability() or "available", "| built for", native_cuda.built_architectures())

from memft_kernels.cli import main as memft_main  # noqa: E402

memft_main(["info"])
outside = sorted(m.__file__ for name, m in sys.modules.items()
                 if name.startswith("memft_kernels") and getattr(m, "__file__", None) and not m.__file__.startswith(sys.prefix))
assert not outside, f"modules imported from outside the venv: {outside}"

maps = open("/proc/self/maps").read().splitlines()
gomp = sorted({line.split()[-1] for line in maps if "gomp" in line.split()[-1]})
print("libgomp mapped:", *gomp, sep="\n  ")
print("ok", native_cpu.isa(), "threads", torch.get_num_threads(), memft_kernels.__file__, f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
