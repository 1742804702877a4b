"""Time QUAD against AdamW on the default grokking model: the compiled optimizer update alone, and
the whole compiled train step (forward, backward, update) as ``main.train`` runs it.

    python benchmarks/quad_step.py [--steps 20] [--repeats 15]

The two optimizers are timed in alternating rounds of ``--steps`` steps, so that load from other
processes hits both alike; it prints milliseconds per step (minimum and median over the rounds),
the process CPU time per step, and the QUAD / AdamW ratios.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import models  # noqa: E402
from optimizers import OptimConfig, build_optimizer  # noqa: E402

VOCAB, SEQ, BATCH = 99, 4, 512  # the grokking defaults: p = 97 plus two tokens, [a, op, b, =]


def update_only(name: str):
    """A function running one compiled ``apply_gradients`` on the model's parameter tree."""
    mx.random.seed(0)
    params = models.Transformer(models.ModelConfig(), VOCAB).trainable_parameters()
    grads = tree_map(lambda p: 1e-2 * mx.random.normal(p.shape), params)
    optimizer = build_optimizer(OptimConfig(name=name))
    optimizer.init(params)
    state = [optimizer.state]
    step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)
    box = [params]

    def run():
        box[0] = step(grads, box[0])
        mx.eval(box[0], state)
    return run


def train_step(name: str):
    """A function running one compiled train step as ``main.train`` does: loss, gradients, update."""
    mx.random.seed(0)
    model = models.Transformer(models.ModelConfig(), VOCAB)
    optimizer = build_optimizer(OptimConfig(name=name))
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    x = mx.random.randint(0, VOCAB, (BATCH, SEQ))
    y = mx.random.randint(0, VOCAB, (BATCH,))

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    model.train()

    def run():
        loss = step(x, y)
        mx.eval(state, loss)
    return run


def compare(make, steps: int, repeats: int, warmup: int = 5) -> dict:
    """Per optimizer: wall ms per step (min, median over rounds) and CPU ms per step (median)."""
    runs = {name: make(name) for name in ("adamw", "quad")}
    for run in runs.values():
        for _ in range(warmup):  # the first steps trace, compile kernels and run the startup
            run()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            tick, cpu_tick = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run()
            wall[name].append(1e3 * (time.perf_counter() - tick) / steps)
            cpu[name].append(1e3 * (time.process_time() - cpu_tick) / steps)
    return {name: (min(wall[name]), statistics.median(wall[name]), statistics.median(cpu[name]))
            for name in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=15, help="rounds per optimizer")
    args = parser.parse_args()
    print(f"device {mx.default_device()}, BLAS {fastblas.LOADED}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for label, make in (("optimizer update", update_only), ("train step", train_step)):
        ms = compare(make, args.steps, args.repeats)
        (a_min, a_med, a_cpu), (q_min, q_med, q_cpu) = ms["adamw"], ms["quad"]
        print(f"{label:16s} adamw {a_min:7.2f} / {a_med:7.2f} ms (cpu {a_cpu:7.2f})   "
              f"quad {q_min:7.2f} / {q_med:7.2f} ms (cpu {q_cpu:7.2f})   "
              f"ratio min {q_min / a_min:.3f}, median {q_med / a_med:.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
