"""`python benchmarks/report.py ARGS` = `memft bench report ARGS` (memft_kernels/bench/report.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, first

from memft_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "report", *sys.argv[1:]]))
