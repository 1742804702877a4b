"""Benchmark the default run: the real train step and evaluation (``main.Trainer``) for every
registered optimizer, against a GEMM floor measured on the spot, in one process.

    python -m benchmarks.bench [--repeats 3] [--full]
    python benchmarks/bench.py [--repeats 3] [--full]

Prints, for the default config (``main.Config()``: a / b mod 97, batch 512, dim 128, depth 2):

- the matmul FLOPs of one train step (forward + backward) and of one evaluation (forward over the
  validation rows, computing shared prefixes once as ``Trainer.evaluate`` does), counted from the config;
- the GEMM floor: the model's own matmul shapes (forward, and the two backward products) timed alone
  with ``mx.matmul`` through the same BLAS, split over the same streams and BLAS threads as the trainer;
- per optimizer: ms per step and per evaluation (whole epochs as ``main.train`` runs them: 9 full
  batches, the partial one, then the evaluation; minimum over ``--repeats`` rounds, optimizers
  interleaved), achieved GFLOP/s, the ratio to the floor and the projected default-run time;
- the QUAD / AdamW step-time ratio;
- with ``--full``, the wall time and results of the real default run (``main.train``, no files).

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

import main  # noqa: E402  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from optimizers import OPTIMIZERS  # noqa: E402


def first_qkv_looked_up(cfg: main.Config) -> bool:
    """Whether the model looks its first block's q/k/v up per token (``Transformer.first_qkv``)."""
    return models.Transformer.lookup_first_qkv and models.use_fast_cpu_kernels() and cfg.model.depth > 1


def linear_shapes(cfg: main.Config, rows: int, length: int = 4) -> list:
    """``(M, K, N)`` of every ``nn.Linear`` in a forward pass over ``rows`` sequences of ``length`` tokens
    (``(M, K) @ (K, N)``), the last block pruned to the last position as the model does, and the first
    block's q/k/v projected per vocabulary entry when the model looks them up per token."""
    m, vocab = cfg.model, cfg.data.vocab_size
    d, h, tokens = m.dim, m.mlp_dim, rows * length
    full_block = [(tokens, d, d)] * 4 + [(tokens, d, h)] * 2 + [(tokens, h, d)]
    first_block = ([(vocab, d, d)] * 3 + full_block[3:]) if first_qkv_looked_up(cfg) else full_block
    # The last block projects keys and values at every position, the rest at the last one only.
    last_block = [(tokens, d, d)] * 2 + [(rows, d, d)] * 2 + [(rows, d, h)] * 2 + [(rows, h, d)]
    return (first_block + full_block * (m.depth - 2) if m.depth > 1 else []) + last_block + [(rows, d, vocab)]


def prefix_shapes(cfg: main.Config, prefixes: int, length: int) -> list:
    """The same for ``Transformer.prefix_keys_values`` over ``prefixes`` distinct prefixes of ``length``."""
    d, h, tokens = cfg.model.dim, cfg.model.mlp_dim, prefixes * length
    full_block = [(tokens, d, d)] * 4 + [(tokens, d, h)] * 2 + [(tokens, h, d)]
    return full_block * (cfg.model.depth - 1) + [(tokens, d, d)] * 4


def flops(shapes: list, backward: bool) -> int:
    """Matmul FLOPs: ``2 M K N`` forward, twice that again backward (input and weight gradients)."""
    return sum(2 * m * k * n for m, k, n in shapes) * (3 if backward else 1)


def train_work(cfg: main.Config, trainer: main.Trainer, n_train: int) -> list:
    """``(part, shapes)`` of the matmuls of one epoch's steps, split into parts as the trainer splits them."""
    rows = [min(cfg.train.batch_size, n_train - i) for i in range(0, n_train, cfg.train.batch_size)]
    return [(part, linear_shapes(cfg, r.stop - r.start)) for n in rows for part, r in enumerate(trainer.parts(n))]


def eval_work(cfg: main.Config, trainer: main.Trainer, tokens: np.ndarray) -> list:
    """``(part, shapes)`` of the matmuls of one evaluation as ``Trainer.evaluate`` runs it (part None:
    the shared prefixes, on the default stream)."""
    n, length = tokens.shape
    plan = trainer.shared_prefix_plan(tokens)
    work, suffix = ([], length) if plan is None else ([(None, prefix_shapes(cfg, len(plan[1]), plan[0]))],
                                                      length - plan[0])
    for part, r in enumerate(trainer.parts(n)):
        for i in range(r.start, r.stop, main.EVAL_CHUNK):
            work.append((part, linear_shapes(cfg, min(main.EVAL_CHUNK, r.stop - i), suffix)))
    return work


def gemm_floor(work: list, trainer: main.Trainer, backward: bool) -> float:
    """Seconds for the matmuls of ``work`` (forward, and backward), each part on the trainer's stream for
    it; the best of 5 rounds."""
    arrays = []
    for part, shapes in work:
        with trainer.part_stream(part) if part is not None else contextlib.nullcontext():
            for m, k, n in shapes:
                arrays.append((part, mx.random.normal((m, k)), mx.random.normal((n, k)), mx.random.normal((m, n))))
    mx.eval([a for item in arrays for a in item[1:]])

    def run():
        outs = []
        for part, x, w, g in arrays:
            with trainer.part_stream(part) if part is not None else contextlib.nullcontext():
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
    results = {name: ([], []) for name in trainers}
    for round_ in range(repeats + 1):  # round 0 traces, compiles and runs QUAD's startup
        for name, trainer in trainers.items():
            order = mx.array(rng.permutation(len(y_train)))
            tick = time.perf_counter()
            mx.eval(trainer.epoch(x_train, y_train, order, batch_size))
            tock = time.perf_counter()
            mx.eval(trainer.evaluate(x_val, y_val))
            if round_:
                results[name][0].append(tock - tick)
                results[name][1].append(time.perf_counter() - tock)
    return {name: (min(train), min(evaluation)) for name, (train, evaluation) in results.items()}


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per optimizer (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="also time the real default run (main.train)")
    args = parser.parse_args(argv)

    cfg = main.Config().resolved()
    split = tuple(map(mx.array, data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))))
    n_train, n_val, batch_size = len(split[1]), len(split[3]), cfg.train.batch_size
    steps = math.ceil(n_train / batch_size)
    trainers = {name: main.Trainer(main.override(main.Config(), {"optim.name": name})) for name in OPTIMIZERS}
    reference = next(iter(trainers.values()))
    layout = "2 CPU streams x 1 BLAS thread" if reference.streams else "1 stream"
    print(f"device {mx.default_device()}, BLAS {fastblas.LOADED}, {layout}, load average {os.getloadavg()[0]:.2f}")

    training, evaluation = train_work(cfg, reference, n_train), eval_work(cfg, reference, np.asarray(split[2]))
    step_flops = sum(flops(shapes, True) for _, shapes in training) / steps
    eval_flops = sum(flops(shapes, False) for _, shapes in evaluation)
    whole_eval_flops = flops(linear_shapes(cfg, n_val), False)
    print(f"matmul FLOPs: {step_flops / 1e9:.2f} G per step (forward + backward, mean of {steps} batches), "
          f"{eval_flops / 1e9:.2f} G per evaluation ({n_val} rows; {whole_eval_flops / 1e9:.2f} G without "
          f"sharing prefixes)")

    with main.blas_threads(1) if reference.streams else contextlib.nullcontext():
        floor_step = gemm_floor(training, reference, True) / steps
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
        summary = main.train(cfg, out_dir=None, progress=False)
        print("default run (main.train): " + ", ".join(
            f"{k} {summary[k]}" for k in ("wall_s", "ms_per_step", "ms_per_eval", "epochs_to_99", "final_val_acc")))
        print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
