"""The linear layers' weight gradients laid out like the weights (``kernels.linear``, the speed layer's default)
against MLX's matmul gradient, the transpose of a row-major product (``FastModel(row_major_weight_gradients=False)``):

    python benchmarks/weight_gradients.py [--steps 10] [--repeats 9] [--optimizers adamw quad ...]

For each optimizer (default: every registered one), ``Trainer.steps`` over ``--steps`` batches of the default run's
shapes (dim 128, depth 2, vocab 99, batch 512), as ``training.loop.train`` runs an epoch, the two kinds timed in
alternating rounds in one process. It prints ms per step (minimum and median over the rounds), their ratio, and
whether the two kinds left the same parameters and optimizer state, to the bit, after the same steps (the two
compute each gradient element as the same dot product; whether the BLAS rounds them alike is what it reports).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import training.speed  # noqa: E402,F401  (before the first evaluation: sets MLX's evaluation order)
import training.speed.trainer as speed  # noqa: E402
from config import Config, override  # noqa: E402

from rounds import compare_trainers  # noqa: E402


def trainer(row_major: bool):
    def build(name):
        fast_model = speed.FastModel
        speed.FastModel = lambda model, cfg: fast_model(model, cfg, row_major_weight_gradients=row_major)
        try:
            return speed.FastTrainer(override(Config(), {"optim.name": name}))
        finally:
            speed.FastModel = fast_model
    return build


if __name__ == "__main__":
    sys.exit(compare_trainers(__doc__, {"row-major": trainer(True), "MLX's": trainer(False)}))
