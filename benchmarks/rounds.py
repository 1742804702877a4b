"""The harness of ``quad_step.py``, ``dropout_masks.py``, ``update_streams.py`` and ``weight_gradients.py``: variants
timed in one process, in alternating rounds, so that load from other processes hits them alike. Its importers put the
repository on ``sys.path`` and import ``fastblas`` first."""
import argparse
import os
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

import fastblas
import training.speed
from optimizers import OPTIMIZERS
from training.speed.trainer import blas_threads

VOCAB, SEQ, BATCH = 99, 4, 512  # the grokking defaults: p = 97 plus two tokens, [a, op, b, =]


def alternate_rounds(runs: dict, calls: int, rounds: int, warmup: int = 5) -> dict:
    """``{label: (min, median)}`` of the wall ms per call of each zero-argument ``runs[label]``, over ``rounds``
    rounds of ``calls`` calls, the variants in turn, after ``warmup`` unmeasured calls of each (tracing, kernel
    builds)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    wall = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            tick = time.perf_counter()
            for _ in range(calls):
                run()
            wall[label].append(1e3 * (time.perf_counter() - tick) / calls)
    return {label: (min(ms), statistics.median(ms)) for label, ms in wall.items()}


def epoch_of(trainer, batches: int):
    """A call that runs ``trainer.steps`` over the same ``batches`` batches of a fixed random data set of the default
    run's shapes each time, as ``training.loop.train`` runs an epoch (each step's evaluation started asynchronously,
    the next step built meanwhile), and evaluates the trainer's state."""
    x = mx.random.randint(0, VOCAB, (batches * BATCH, SEQ), key=mx.random.key(0))
    y = mx.random.randint(0, VOCAB, (batches * BATCH,), key=mx.random.key(1))
    order = mx.arange(batches * BATCH)

    def run():
        mx.eval(trainer.steps(x, y, order, BATCH), trainer.state)
    return run


def same_state(a, b) -> bool:
    """Whether trainers ``a`` and ``b`` hold the same parameters and optimizer state, to the bit."""
    left, right = (dict(tree_flatten([t.model.parameters(), t.optimizer.state])) for t in (a, b))
    return left.keys() == right.keys() and all(mx.array_equal(v, right[k]).item() for k, v in left.items())


def compare_trainers(doc: str, kinds: dict, argv=None) -> int:
    """The command line of ``update_streams.py`` and ``weight_gradients.py`` (``doc``: its usage): for each optimizer
    of ``--optimizers`` (default: every registered one), two trainers ``kinds[label](optimizer name)`` trained over
    the same ``--steps`` batches (and dropout masks), their states compared to the bit, then timed in
    ``--repeats`` alternating rounds of ``epoch_of``, with one BLAS thread; prints ms per step (minimum / median) of
    each, the first kind's over the second's, and whether the two states agreed."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
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
    (first, build_first), (second, build_second) = kinds.items()
    with blas_threads(1):
        for name in args.optimizers:
            trainers = build_first(name), build_second(name)
            runs = [epoch_of(trainer, args.steps) for trainer in trainers]
            for run in runs:  # the same steps (and dropout masks) for both, to compare their states
                mx.random.seed(0)
                run()
            same = same_state(*trainers)
            ms = alternate_rounds(dict(zip((first, second), runs)), 1, args.repeats, warmup=1)
            (low, median), (low_other, median_other) = ms[first], ms[second]
            print(f"  {name:6s} {first} {low / args.steps:6.2f} / {median / args.steps:6.2f} ms   {second} "
                  f"{low_other / args.steps:6.2f} / {median_other / args.steps:6.2f} ms   ratio "
                  f"{low / low_other:.3f} / {median / median_other:.3f}   same bits: {same}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0
