"""Put the repository root on the path and load the optimized BLAS before anything imports mlx."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastblas  # noqa: E402,F401
