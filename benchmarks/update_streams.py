"""The optimizers' updates spread over the Linux-CPU trainer's two streams (``FastTrainer(spread_updates=True)``, the
default: QUAD's parameter groups, every other optimizer's parameters) against all on the default stream:

    python benchmarks/update_streams.py [--steps 10] [--repeats 9] [--optimizers muon adamw ...]

For each optimizer (default: every registered one), ``Trainer.steps`` over ``--steps`` batches of the default run's
shapes (dim 128, depth 2, vocab 99, batch 512), as ``training.loop.train`` runs an epoch, the two kinds timed in
alternating rounds in one process. It prints ms per step (minimum and median over the rounds), their ratio, and
whether the two kinds left the same parameters and optimizer state, to the bit, after the same steps.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import training.speed  # noqa: E402,F401  (before the first evaluation: sets MLX's evaluation order)
from config import Config, override  # noqa: E402
from training.speed.trainer import FastTrainer  # noqa: E402

from rounds import compare_trainers  # noqa: E402


def trainer(spread: bool):
    return lambda name: FastTrainer(override(Config(), {"optim.name": name}), spread_updates=spread)


if __name__ == "__main__":
    sys.exit(compare_trainers(__doc__, {"spread": trainer(True), "one stream": trainer(False)}))
