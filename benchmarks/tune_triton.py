"""`python benchmarks/tune_triton.py ARGS` = `memft bench tune-triton ARGS` (memft_kernels/bench/tune_triton.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, first

from memft_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "tune-triton", *sys.argv[1:]]))
