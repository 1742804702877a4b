"""The Linux-CPU speed layer: the plain model's step and evaluation, computed faster on MLX's CPU backend
outside macOS, from the same parameters (same names: checkpoints are interchangeable), tested equal to the
plain path (``tests/test_speed_paths.py``). The trainer is chosen once (``training.loop.build_trainer``).

    kernels.py   fused elementwise kernels: the SiLU gate with dropout, a sigmoid from multiply-adds, a
                 gather whose gradient is one matmul, the rotary embedding on reordered features
    compiler.py  MLX's fused kernels built for this CPU (a g++ wrapper adding -march=native), and the
                 layer's own C++ built the same way
    masks.py     dropout masks drawn by native code (masks.cpp): mx.random.bernoulli's bits, faster
    native.py    MLX primitives written here (native.cpp), forward and backward: attention over a few
                 positions, the SiLU gate, RMSNorm
    quad_fit.py  QUAD's preconditioner fit as one native primitive per parameter group (quad_fit.cpp)
    model.py     FastModel: the forward pass with the last block pruned to the read-out position, the first
                 block's q/k/v looked up per token, one fused rotation, and prefixes shared across evaluation
                 rows
    trainer.py   FastTrainer: batches split over two CPU streams, dropout masks drawn a step ahead, BLAS
                 threads, glibc malloc settings, subnormals flushed to zero
"""
import os
import sys

# MLX orders each evaluation's operations breadth-first but only 20 wide by default, so the two halves
# of a split step (see FastTrainer) would run one after the other; a wide order interleaves them on the
# two CPU streams. MLX reads it at the first evaluation. It only changes the order in which independent
# operations run, never a result.
if sys.platform != "darwin":
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")

import mlx.core as mx  # noqa: E402


def available() -> bool:
    """Whether this layer pays: MLX's CPU backend outside macOS (macOS has Accelerate and Metal)."""
    return sys.platform != "darwin" and mx.default_device() == mx.cpu
