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
import fastblas  # noqa: E402  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import os  # noqa: E402

import training.speed  # noqa: E402  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from config import Config, override  # noqa: E402
from optimizers import OPTIMIZERS  # noqa: E402
from training.speed.trainer import FastTrainer, blas_threads  # noqa: E402

from rounds import alternate_rounds  # noqa: E402

VOCAB, SEQ, BATCH = 99, 4, 512  # the grokking defaults: p = 97 plus two tokens, [a, op, b, =]


def epoch(name: str, batches: int, spread: bool):
    """``(run, trainer)``: ``run`` trains ``trainer`` on the same ``batches`` random batches each call."""
    trainer = FastTrainer(override(Config(), {"optim.name": name}), spread_updates=spread)
    x = mx.random.randint(0, VOCAB, (batches * BATCH, SEQ), key=mx.random.key(0))
    y = mx.random.randint(0, VOCAB, (batches * BATCH,), key=mx.random.key(1))
    order = mx.arange(batches * BATCH)

    def run():
        mx.eval(trainer.steps(x, y, order, BATCH), trainer.state)
    return run, trainer


def same_state(a: FastTrainer, b: FastTrainer) -> bool:
    left, right = (dict(tree_flatten([t.model.parameters(), t.optimizer.state])) for t in (a, b))
    return left.keys() == right.keys() and all(mx.array_equal(v, right[k]).item() for k, v in left.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=9, help="rounds per kind")
    parser.add_argument("--optimizers", nargs="+", default=sorted(OPTIMIZERS), metavar="NAME")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1")
    unknown = [name for name in args.optimizers if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers {' '.join(unknown)}: choose from {', '.join(sorted(OPTIMIZERS))}")
    if not training.speed.available():
        parser.error("the speed layer runs on MLX's CPU backend outside macOS only")
    print(f"device {mx.default_device()}, BLAS {fastblas.describe()}, load average {os.getloadavg()[0]:.2f}")
    with blas_threads(1):
        for name in args.optimizers:
            kinds = {spread: epoch(name, args.steps, spread) for spread in (True, False)}
            for run, _ in kinds.values():  # the same steps (and dropout masks) for both, to compare their states
                mx.random.seed(0)
                run()
            same = same_state(kinds[True][1], kinds[False][1])
            ms = alternate_rounds({spread: run for spread, (run, _) in kinds.items()}, 1, args.repeats, warmup=1)
            (low, median), (low_one, median_one) = ms[True], ms[False]
            print(f"  {name:6s} spread {low / args.steps:6.2f} / {median / args.steps:6.2f} ms   one stream "
                  f"{low_one / args.steps:6.2f} / {median_one / args.steps:6.2f} ms   ratio {low / low_one:.3f} / "
                  f"{median / median_one:.3f}   same bits: {same}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
