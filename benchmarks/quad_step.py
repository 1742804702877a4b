"""Time QUAD against AdamW on the default grokking model: the compiled optimizer update alone, and
the whole compiled train step (forward, backward, update) as ``main.train`` runs it.

    python benchmarks/quad_step.py [--steps 200] [--repeats 5]

Prints milliseconds per step (median over repeats) and the QUAD / AdamW ratio.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import models  # noqa: E402
from optimizers import OptimConfig, build_optimizer  # noqa: E402

VOCAB, SEQ, BATCH = 99, 4, 512


def time_steps(run, steps: int, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds per call of ``run`` (which evaluates its own outputs)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for _ in range(steps):
            run()
        samples.append(1e3 * (time.perf_counter() - tick) / steps)
    return statistics.median(samples)


def update_only(name: str, steps: int, repeats: int) -> float:
    """The compiled ``apply_gradients`` on the model's parameter tree with fixed random gradients."""
    mx.random.seed(0)
    params = models.Transformer(models.ModelConfig(), VOCAB).trainable_parameters()
    grads = tree_map(lambda p: 1e-2 * mx.random.normal(p.shape), params)
    optimizer = build_optimizer(OptimConfig(name=name))
    optimizer.init(params)
    box = [params]
    state = [optimizer.state]

    step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)

    def run():
        box[0] = step(grads, box[0])
        mx.eval(box[0], state)
    return time_steps(run, steps, repeats)


def train_step(name: str, steps: int, repeats: int) -> float:
    """The compiled train step of ``main.train``: loss, gradients and the optimizer update."""
    mx.random.seed(0)
    model = models.Transformer(models.ModelConfig(), VOCAB)
    optimizer = build_optimizer(OptimConfig(name=name))
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    x = mx.random.randint(0, VOCAB, (BATCH, SEQ))
    y = mx.random.randint(0, VOCAB, (BATCH,))

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    def _step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(_step, inputs=state, outputs=state)
    model.train()

    def run():
        loss = step(x, y)
        mx.eval(state, loss)
    return time_steps(run, steps, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device {mx.default_device()}, BLAS {fastblas.LOADED}")
    for label, fn in (("optimizer update", update_only), ("train step", train_step)):
        ms = {name: fn(name, args.steps, args.repeats) for name in ("adamw", "quad")}
        print(f"{label:17s} adamw {ms['adamw']:7.2f} ms  quad {ms['quad']:7.2f} ms  "
              f"ratio {ms['quad'] / ms['adamw']:.3f}")


if __name__ == "__main__":
    main()
