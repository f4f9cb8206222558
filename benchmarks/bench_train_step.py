"""`python benchmarks/bench_train_step.py ARGS` = `memft bench train-step ARGS` (memft_kernels/bench/train_step.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, first

from memft_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "train-step", *sys.argv[1:]]))
