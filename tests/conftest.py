"""Test setup: Triton runs in its CPU interpreter unless a GPU test run asks otherwise, and
hypothesis is derandomized so that every run draws the same examples."""
import os

# Must be set before any Triton kernel is imported (the @triton.jit decorator reads it).
if os.environ.get("MEMFT_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def _interpreter_numpy_problem():
    """Triton < 3.7's interpreter converts a scalar kernel argument with int() on a 1-element array,
    which NumPy >= 2.4 refuses (triton-lang/triton issue 9171; fixed in 3.7): every interpreted
    kernel with a loop bound read from an argument then fails with "only 0-dimensional arrays can
    be converted to Python scalars". Only the interpreter: compiled kernels on a GPU are unaffected."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None

    def version(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (>= 2.4; triton "
                f"issue 9171): interpreted Triton tests fail here. Use numpy<2.4, triton>=3.7, or on a GPU "
                f"MEMFT_TEST_GPU=1 (no interpreter).")
    return None


def pytest_report_header(config):
    problem = _interpreter_numpy_problem()
    return [f"WARNING: {problem}"] if problem else []


def pytest_terminal_summary(terminalreporter):
    problem = _interpreter_numpy_problem()
    if problem:
        terminalreporter.write_line(f"WARNING: {problem}", yellow=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by benchmarks/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
