"""`python benchmarks/bench_train_step.py ARGS` = `memft bench train-step ARGS` (memft_kernels/bench/train_step.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, first

from memft_kernels.bench.train_step import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
