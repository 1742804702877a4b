"""Benchmark the default run: the real train step and evaluation (the trainer ``train`` builds) for every
registered optimizer, against a GEMM floor measured on the spot, in one process.

    python -m benchmarks.bench [--repeats 3] [--full]
    python benchmarks/bench.py [--repeats 3] [--full]

Prints, for the default config (``Config()``: a / b mod 97, batch 512, dim 128, depth 2):

- the matmul FLOPs of one train step (forward + backward) and of one evaluation (forward over the
  validation rows, computing shared prefixes once as the trainer's evaluator does), counted by running the
  trainer's own forward code lazily and recording every linear layer it computes;
- the GEMM floor: the model's own matmul shapes (forward, and the two backward products) timed alone
  with ``mx.matmul`` through the same BLAS, split over the same streams and BLAS threads as the trainer;
- per optimizer: ms per step and per evaluation (whole epochs as ``train`` runs them: 9 full
  batches, the partial one, then the evaluation; minimum over ``--repeats`` rounds, optimizers
  interleaved), achieved GFLOP/s, the ratio to the floor and the projected default-run time;
- the QUAD / AdamW step-time ratio;
- with ``--full``, the wall time and results of the real default run (``train``, no files).

Other processes on the machine slow every number; the load average is printed before and after.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import training.speed  # noqa: E402  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import data  # noqa: E402
from config import Config, override  # noqa: E402
from optimizers import OPTIMIZERS  # noqa: E402
from training.loop import build_trainer, train  # noqa: E402
from training.speed.trainer import FastTrainer  # noqa: E402
from training.trainer import EVAL_CHUNK, Trainer  # noqa: E402


def linear_shapes(trainer: Trainer, forward, *args) -> list:
    """``(M, K, N)`` of every linear layer that ``forward(*args)`` computes (``(M, K) @ (K, N)``): the model's code
    itself, run lazily (nothing is computed), records what it multiplies, every ``FastModel.dense`` of a
    ``FastTrainer``'s model, else every ``nn.Linear`` call."""
    shapes = []
    if isinstance(trainer, FastTrainer):
        owner, name = trainer.fast, "dense"
        original = owner.dense

        def wrapped(x, w):
            shapes.append((math.prod(x.shape[:-1]), w.shape[1], w.shape[0]))
            return original(x, w)
    else:
        owner, name = nn.Linear, "__call__"
        original = nn.Linear.__call__

        def wrapped(self, x):
            shapes.append((math.prod(x.shape[:-1]), self.weight.shape[1], self.weight.shape[0]))
            return original(self, x)
    setattr(owner, name, wrapped)
    try:
        forward(*args)
    finally:
        setattr(owner, name, original)
    return shapes


def parts(trainer: Trainer, n: int) -> list:
    return trainer.parts(n) if isinstance(trainer, FastTrainer) else [slice(0, n)]


def flops(shapes: list, backward: bool) -> int:
    """Matmul FLOPs: ``2 M K N`` forward, twice that again backward (input and weight gradients)."""
    return sum(2 * m * k * n for m, k, n in shapes) * (3 if backward else 1)


def train_work(cfg: Config, trainer: Trainer, tokens: np.ndarray) -> list:
    """``(part, shapes)`` of the matmuls of one epoch's steps over ``tokens``, split into parts as the
    trainer splits them."""
    forward = trainer.fast if isinstance(trainer, FastTrainer) else trainer.model
    work = []
    for i in range(0, len(tokens), cfg.train.batch_size):
        batch = mx.array(tokens[i:i + cfg.train.batch_size])
        work += [(part, linear_shapes(trainer, forward, batch[rows])) for part, rows in enumerate(parts(trainer, len(batch)))]
    return work


def eval_work(trainer: Trainer, tokens: np.ndarray) -> list:
    """``(part, shapes)`` of the matmuls of one evaluation as the trainer's evaluator runs it (part None:
    the shared prefixes, on the default stream)."""
    x = mx.array(tokens)
    if not isinstance(trainer, FastTrainer):
        return [(0, linear_shapes(trainer, trainer.model, x[i:i + EVAL_CHUNK])) for i in range(0, len(x), EVAL_CHUNK)]
    plan = trainer.evaluation_plan(tokens)
    fast = trainer.fast
    with trainer.eval_mode():
        if plan is None:
            return [(part, linear_shapes(trainer, fast, x[i:min(i + EVAL_CHUNK, rows.stop)]))
                    for part, rows in enumerate(trainer.parts(len(x))) for i in range(rows.start, rows.stop, EVAL_CHUNK)]
        length, prefixes, inverse = plan
        work = [(None, linear_shapes(trainer, fast.prefix_keys_values, prefixes))]
        past = fast.prefix_keys_values(prefixes)
        for part, rows in enumerate(trainer.parts(len(x))):
            for i in range(rows.start, rows.stop, EVAL_CHUNK):
                chunk = slice(i, min(i + EVAL_CHUNK, rows.stop))
                rows_past = [(k[inverse[chunk]], v[inverse[chunk]]) for k, v in past]
                work.append((part, linear_shapes(trainer, fast.logits_after, x[chunk, length:], rows_past)))
    return work


def stream_of(trainer: Trainer, part):
    """The stream the trainer runs part ``part`` on (None: the default stream)."""
    if part is None or not isinstance(trainer, FastTrainer):
        return contextlib.nullcontext()
    return mx.stream(trainer.streams[part])


def gemm_floor(work: list, trainer: Trainer, backward: bool) -> float:
    """Seconds for the matmuls of ``work`` (forward, and backward), each part on the trainer's stream for
    it; the best of 5 rounds."""
    arrays = []
    for part, shapes in work:
        with stream_of(trainer, part):
            for m, k, n in shapes:
                arrays.append((part, mx.random.normal((m, k)), mx.random.normal((n, k)), mx.random.normal((m, n))))
    mx.eval([a for item in arrays for a in item[1:]])

    def run():
        outs = []
        for part, x, w, g in arrays:
            with stream_of(trainer, part):
                outs.append(x @ w.T)
                if backward:
                    outs += [g @ w, g.T @ x]
        mx.eval(outs)

    run()
    times = []
    for _ in range(5):
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return min(times)


def time_epochs(trainers: dict, split, repeats: int, batch_size: int) -> dict:
    """Per optimizer: (train seconds, eval seconds) of whole epochs, the minimum over ``repeats`` rounds."""
    x_train, y_train, x_val, y_val = split
    rng = np.random.default_rng(0)
    evaluators = {name: trainer.evaluator(x_val, y_val) for name, trainer in trainers.items()}
    results = {name: ([], []) for name in trainers}
    for round_ in range(repeats + 1):  # round 0 traces, compiles and runs QUAD's startup
        for name, trainer in trainers.items():
            order = mx.array(rng.permutation(len(y_train)))
            tick = time.perf_counter()
            mx.eval(trainer.steps(x_train, y_train, order, batch_size))
            tock = time.perf_counter()
            mx.eval(evaluators[name]())
            if round_:
                results[name][0].append(tock - tick)
                results[name][1].append(time.perf_counter() - tock)
    return {name: (min(train), min(evaluation)) for name, (train, evaluation) in results.items()}


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per optimizer (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="also time the real default run (train)")
    args = parser.parse_args(argv)

    cfg = Config().resolved()
    split = tuple(map(mx.array, data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))))
    n_train, n_val, batch_size = len(split[1]), len(split[3]), cfg.train.batch_size
    steps = math.ceil(n_train / batch_size)
    trainers = {name: build_trainer(override(Config(), {"optim.name": name})) for name in OPTIMIZERS}
    reference = next(iter(trainers.values()))
    fast = isinstance(reference, FastTrainer)
    layout = f"{len(reference.streams)} CPU streams x 1 BLAS thread" if fast else "1 stream"
    print(f"device {mx.default_device()}, BLAS {fastblas.describe()}, {layout}, load average {os.getloadavg()[0]:.2f}")

    training_work, evaluation = train_work(cfg, reference, np.asarray(split[0])), eval_work(reference, np.asarray(split[2]))
    step_flops = sum(flops(shapes, True) for _, shapes in training_work) / steps
    eval_flops = sum(flops(shapes, False) for _, shapes in evaluation)
    with reference.eval_mode():
        whole_eval_flops = flops(linear_shapes(reference, reference.fast if fast else reference.model, split[2]), False)
    print(f"matmul FLOPs: {step_flops / 1e9:.2f} G per step (forward + backward, mean of {steps} batches), "
          f"{eval_flops / 1e9:.2f} G per evaluation ({n_val} rows; {whole_eval_flops / 1e9:.2f} G without "
          f"sharing prefixes)")

    with reference.running():
        floor_step = gemm_floor(training_work, reference, True) / steps
        floor_eval = gemm_floor(evaluation, reference, False)
        print(f"GEMM floor: {1e3 * floor_step:.1f} ms per step ({step_flops / floor_step / 1e9:.0f} GFLOP/s), "
              f"{1e3 * floor_eval:.1f} ms per evaluation ({eval_flops / floor_eval / 1e9:.0f} GFLOP/s)")
        timings = time_epochs(trainers, split, args.repeats, batch_size)

    epochs = cfg.train.epochs
    for name, (train_s, eval_s) in timings.items():
        step_s = train_s / steps
        print(f"{name:6s} step {1e3 * step_s:6.1f} ms ({step_flops / step_s / 1e9:4.0f} GFLOP/s, "
              f"{step_s / floor_step:.2f}x floor)   eval {1e3 * eval_s:6.1f} ms ({eval_flops / eval_s / 1e9:4.0f} "
              f"GFLOP/s, {eval_s / floor_eval:.2f}x floor)   projected default run ({epochs} epochs) "
              f"{epochs * (train_s + eval_s):.1f} s")
    if "quad" in timings and "adamw" in timings:
        print(f"quad / adamw step time: {timings['quad'][0] / timings['adamw'][0]:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f}")

    if args.full:
        summary = train(cfg, out_dir=None, progress=False)
        print("default run (train): " + ", ".join(
            f"{k} {summary[k]}" for k in ("wall_s", "ms_per_step", "ms_per_eval", "epochs_to_99", "final_val_acc")))
        print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
