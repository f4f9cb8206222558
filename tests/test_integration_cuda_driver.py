"""The driver check of the native CUDA module (memft_kernels/ops/cuda_driver.py), on a CPU-only
machine: faked runtime / driver versions and GPU architectures."""
import pytest

from memft_kernels.ops import cuda_driver as cd


def test_parse_versions():
    assert cd.parse_version("13.0.88") == (13, 0)
    assert cd.parse_version("12.4") == (12, 4)
    assert cd.parse_version("") is None and cd.parse_version(None) is None and cd.parse_version("x.y") is None
    assert cd.from_driver_int(12040) == (12, 4)
    assert cd.from_driver_int(13000) == (13, 0)
    assert cd.from_driver_int(0) is None and cd.from_driver_int(None) is None


@pytest.mark.parametrize("runtime,driver,arch,ok", [
    ((13, 0), (13, 0), "sm_90", True),
    ((13, 0), (13, 1), "sm_100", True),     # newer driver: PTX JIT allowed
    ((12, 8), (12, 4), "sm_90", True),      # minor-version compatibility: SASS runs
    ((12, 8), (12, 4), "sm_100", False),    # no SASS for the GPU: PTX needs driver >= runtime
    ((12, 8), (12, 4), None, True),         # GPU unknown: only the major rule
    ((13, 0), (12, 9), "sm_90", False),     # older major: refused
    ((12, 4), (11, 8), "sm_80", False),
    ((13, 0), None, "sm_90", False),        # no driver answered
    (None, (12, 4), "sm_90", True),         # module without a recorded runtime: nothing to check
])
def test_problem_rule(runtime, driver, arch, ok):
    message = cd.problem(runtime, driver, arch, ("sm_80", "sm_90"))
    assert (message is None) == ok, message
    if not ok:
        assert cd.fmt(runtime) in message and "driver" in message


def test_refusal_names_runtime_driver_and_way_out():
    message = cd.problem((13, 0), (12, 4), "sm_90", ("sm_90",))
    assert "CUDA 13.0 runtime" in message and "580.65.06" in message and "supports CUDA 12.4" in message
    assert "Update the NVIDIA driver" in message and "12.x" in message


def test_driver_version_without_libcuda(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cd.ctypes, "CDLL", no_library)
    assert cd.driver_version() is None


def test_driver_version_reads_libcuda(monkeypatch):
    class FakeLibcuda:
        def cuDriverGetVersion(self, pointer):
            pointer._obj.value = 12060
            return 0

    monkeypatch.setattr(cd.ctypes, "CDLL", lambda name: FakeLibcuda())
    assert cd.driver_version() == (12, 6)


class FakeCudaModule:
    """Stands for memft_kernels._native_cuda built with CUDA 13.0 for sm_90 (+ compute_90 PTX)."""

    BUILT_ARCHITECTURES = "90-real 90-virtual"
    CUDA_RUNTIME_VERSION = "13.0.88"
    ABI = 3  # memft_kernels.ops.native.ABI: built from these sources


@pytest.fixture
def gpu_host(monkeypatch):
    """A host where torch sees an sm_90 GPU; the driver version is the test's to set."""
    import torch

    from memft_kernels.ops import native_cuda

    monkeypatch.setattr(native_cuda, "_C", FakeCudaModule)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Faked H100")

    def set_driver(version):
        monkeypatch.setattr(cd, "driver_version", lambda: version)

    return native_cuda, set_driver


def test_backend_unavailable_with_old_driver(gpu_host):
    native_cuda, set_driver = gpu_host
    set_driver((12, 4))
    message = native_cuda.availability()
    assert message is not None and "CUDA 13.0 runtime" in message and "supports CUDA 12.4" in message
    set_driver((13, 0))
    assert native_cuda.availability() is None
    set_driver(None)
    assert "no NVIDIA driver" in native_cuda.availability()


def test_memft_info_names_runtime_and_refusal(gpu_host, capsys):
    from memft_kernels.cli import main

    _, set_driver = gpu_host
    set_driver((12, 4))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA runtime in the CUDA module: 13.0 (needs an NVIDIA driver for CUDA >= 13.0 (Linux driver >= 580.65.06); " \
           "this host's driver supports CUDA 12.4)" in out
    cuda_line = [line for line in out.splitlines() if line.startswith("  cuda ")][0]
    assert "CUDA 13.0 runtime" in cuda_line and "Update the NVIDIA driver" in cuda_line
