"""``python -m memft_kernels.bench NAME [args]`` is ``memft bench NAME [args]``."""
import sys

from . import main

sys.exit(main())
