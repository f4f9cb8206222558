"""`python benchmarks/make_results_report.py ARGS` = `memft bench results-report ARGS` (memft_kernels/bench/results_report.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, first

from memft_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "results-report", *sys.argv[1:]]))
