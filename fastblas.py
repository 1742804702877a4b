"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel bundles the Netlib reference BLAS, whose matmul runs ~40x slower than
OpenBLAS on the grokking shapes (6 vs 230 GFLOP/s measured here, see README). Loading an
optimized BLAS into the global symbol scope before ``mlx.core`` is first imported makes MLX's
``sgemm``/``dgemm`` calls resolve to it. Every entry module imports this one first.
macOS is never touched: MLX uses Accelerate there.
"""
import ctypes
import os
import sys

# Debian's libopenblas0-pthread installs the first; the others cover common distributions.
CANDIDATES = ("libopenblas.so.0", "libopenblasp-r0.3.so", "libopenblas.so", "libmkl_rt.so.2", "libblis.so.4")
INSTALL_HINT = "apt-get install libopenblas0-pthread"


def load_fast_blas() -> str | None:
    """Load the first optimized BLAS found into the global scope; return its name or None."""
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return name
    return None


LOADED = None
if sys.platform.startswith("linux") and os.environ.get("GROKKING_NO_FAST_BLAS") != "1":
    if "mlx.core" in sys.modules:
        print("warning: mlx.core was imported before fastblas; the optimized BLAS may not be used. "
              "Import main/models/data before mlx.", file=sys.stderr)
    LOADED = load_fast_blas()
    if LOADED is None:
        print(f"warning: no optimized BLAS found; MLX matmuls will run ~40x slower. Fast path: {INSTALL_HINT}",
              file=sys.stderr)
