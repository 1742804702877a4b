"""Time QUAD against AdamW on the default grokking model (dim 128, depth 2, vocab 99, batch 512).

    python benchmarks/quad_step.py [--steps 10] [--repeats 11]

(a) the compiled optimizer update alone on the model's parameter tree, with the BLAS threads as
    they are and with one BLAS thread (how the Linux-CPU trainer runs); QUAD also with its
    parameter groups spread over two CPU streams (``QUAD(streams=...)``), and with the speed layer's
    native preconditioner fit (``training.speed.quad_fit``);
(b) the real train step, ``Trainer.step`` (forward, backward, update) as ``training.loop.train`` runs
    it (QUAD's groups spread over the trainer's two streams, its preconditioner fitted by the speed layer's
    native primitive), QUAD on the default stream, and QUAD with the plain fit;
(c) ``Trainer.steps`` over ``--steps`` batches, as ``training.loop.train`` runs an epoch: each step's evaluation
    started asynchronously and the next step built meanwhile;
(d) printed after (a): the native fit of the dense 128 x 128 group alone, 8 tensors on one stream, 4 on one, and
    4 + 4 on two streams at once (one BLAS thread each): how far two cores speed up BLAS-bound work;
(e) what sets QUAD's ratio: its update runs between one step's backward pass and the next step's forward pass, so
    the step ratio it predicts from (a) and (b), 1 + (QUAD's update - AdamW's) / AdamW's step; and the floor of its
    preconditioner fit, the fit's matrix-product FLOPs at the rate one BLAS thread reaches on 128 x 128 products,
    spread over the two streams.

Variants are timed in alternating rounds of ``--steps`` steps, so that load from other processes
hits them alike; it prints milliseconds per step (minimum and median over the rounds) and the ratio
of the minima to the first variant's (AdamW's). The load average is printed before and after.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
from typing import Sequence  # noqa: E402

import training.speed  # noqa: E402  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import models  # noqa: E402
from config import Config, override  # noqa: E402
from optimizers import OptimConfig, build_optimizer  # noqa: E402
from training.loop import build_trainer  # noqa: E402
from training.speed import quad_fit  # noqa: E402
from training.speed.trainer import FastTrainer, blas_threads  # noqa: E402

from rounds import BATCH, SEQ, VOCAB, alternate_rounds, epoch_of  # noqa: E402


def default_parameters():
    """The default model's trainable parameters (a fresh model)."""
    return models.Transformer(models.ModelConfig(), VOCAB).trainable_parameters()


def update_only(name: str, streams: int = 0, native_fit: bool = False):
    """One compiled ``apply_gradients`` on the model's parameter tree (fixed random gradients); QUAD's
    preconditioner fitted by the plain ``quad_iteration`` or (``native_fit``) the speed layer's primitive."""
    mx.random.seed(0)
    params = default_parameters()
    grads = tree_map(lambda p: 1e-2 * mx.random.normal(p.shape), params)
    optimizer = build_optimizer(OptimConfig(name=name))
    if streams:
        optimizer.streams = [mx.new_stream(mx.cpu) for _ in range(streams)]
    if native_fit:
        quad_fit.install(optimizer)
    optimizer.init(params)
    state = [optimizer.state]
    step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)
    box = [params]

    def run():
        box[0] = step(grads, box[0])
        mx.eval(box[0], state)
    return run


def trainer_for(name: str, streams: bool = True, native_fit: bool = True):
    """The trainer ``train`` builds for optimizer ``name``; on the speed layer, with the update on the default stream
    rather than spread over the trainer's (if not ``streams``) and QUAD's plain fit and momentum rather than the
    native ones (if not ``native_fit``)."""
    cfg = override(Config(), {"optim.name": name})
    if not training.speed.available():
        return build_trainer(cfg)
    return FastTrainer(cfg, native_quad=native_fit, spread_updates=streams)


def train_step(name: str, streams: bool = True, native_fit: bool = True):
    """One ``Trainer.step`` on a fixed random batch, by ``trainer_for(name, streams, native_fit)``."""
    trainer = trainer_for(name, streams, native_fit)
    x = mx.random.randint(0, VOCAB, (BATCH, SEQ))
    y = mx.random.randint(0, VOCAB, (BATCH,))

    def run():
        loss, correct = trainer.step(x, y)
        mx.eval(trainer.state, loss, correct)
    return run


def train_epoch(name: str, batches: int, native_fit: bool = True):
    """``rounds.epoch_of`` (``Trainer.steps`` over ``batches`` batches, as ``training.loop.train`` runs an epoch) by
    ``trainer_for(name, native_fit=native_fit)``."""
    return epoch_of(trainer_for(name, native_fit=native_fit), batches)


def dense_fits(slices: Sequence[int]):
    """The native fit of stacks of the model's 128 x 128 dense-dense group (8 tensors), ``slices[i]`` of them on
    CPU stream ``i``, concurrently: how the two cores share BLAS-bound work."""
    streams = [mx.new_stream(mx.cpu) for _ in slices]
    eye = mx.eye(128)
    work = []
    for k in slices:
        G = 1e-2 * mx.random.normal((k, 128, 128))
        Q = [eye * mx.ones((k, 1, 1)) + 1e-3 * (G + G.swapaxes(-1, -2))] * 2
        L, ones = [mx.ones((k, 1, 1))] * 2, mx.ones((k,))
        work.append((G, Q, L, dict(scales=(ones, ones), gate=mx.ones((k,), mx.bool_), scale_pg=ones)))

    def run():
        outputs = []
        for stream, (G, Q, L, options) in zip(streams, work):
            with mx.stream(stream):
                outputs.append(quad_fit.quad_iteration(Q, L, G, (False, False), 1.0, 0.95, numel=G.size, **options))
        mx.eval(outputs)
    return run


def fit_flops(optimizer) -> float:
    """The matrix products' FLOPs of one preconditioner fit of every QUAD group in ``optimizer.state``, as
    ``quad_fit.cpp`` computes them: per slice and dense side of size d (the other side e), P = Q Q (a syrk, d^3) and
    its product with the gradient (2 d^2 e) for Pg; Pg Pg^T or Pg^T Pg (a syrk, d^2 e), E Q and (E Q) E (4 d^3) for
    the factor."""
    total = 0
    for group in optimizer.state["groups"].values():
        if len(group["Q"]) != 2:  # a single diagonal factor: no products
            continue
        slices, m, n = group["m"].shape
        for (d, e), q in zip([(m, n), (n, m)], group["Q"]):
            if q.ndim == 3:  # dense
                total += slices * (d ** 3 + 2 * d * d * e + d * d * e + 4 * d ** 3)
    return float(total)


def product_rate(repeats: int) -> float:
    """GFLOP/s of one BLAS thread on a batch of 64 products of 128 x 128 matrices (the fit's size), the best of
    ``repeats`` rounds."""
    a, b = mx.random.normal((64, 128, 128)), mx.random.normal((64, 128, 128))
    best, _ = alternate_rounds({"products": lambda: mx.eval(a @ b)}, 5, repeats)["products"]
    return 64 * 2 * 128 ** 3 / (best * 1e6)


def report(title: str, ms: dict):
    base = next(iter(ms.values()))[0]  # the first variant's
    print(title)
    for label, (low, median) in ms.items():
        print(f"  {label:28s} {low:7.2f} / {median:7.2f} ms   ratio {low / base:.3f}")


def main_():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=11, help="rounds per variant")
    args = parser.parse_args()
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1")
    print(f"device {mx.default_device()}, BLAS {fastblas.describe()}, load average {os.getloadavg()[0]:.2f}")
    report("(a) optimizer update, BLAS threads as set (min / median)",
           alternate_rounds({"adamw": update_only("adamw"), "quad": update_only("quad")}, args.steps, args.repeats))
    native = quad_fit.load_extension() is not None
    with blas_threads(1):
        runs = {"adamw": update_only("adamw"), "quad": update_only("quad"), "quad, 2 streams": update_only("quad", 2)}
        if native:
            runs["quad, native fit"] = update_only("quad", native_fit=True)
            runs["quad, 2 streams, native fit"] = update_only("quad", 2, native_fit=True)
        updates = alternate_rounds(runs, args.steps, args.repeats)
        report("(a) optimizer update, one BLAS thread", updates)
        if native:
            report("(d) the native fit of the 128 x 128 dense group alone, one BLAS thread per stream",
                   alternate_rounds({"8 tensors on one stream": dense_fits([8]), "4 on one": dense_fits([4]),
                                     "4 + 4 on two streams": dense_fits([4, 4])}, args.steps, args.repeats))
    fast = training.speed.available()
    with blas_threads(1) if fast else contextlib.nullcontext():
        runs = {"adamw": train_step("adamw"), "quad": train_step("quad")}
        if fast:
            runs["quad, on the default stream"] = train_step("quad", streams=False)
            runs["quad, plain fit"] = train_step("quad", native_fit=False)
        steps = alternate_rounds(runs, args.steps, args.repeats)
        report(f"(b) train step ({'two streams, one BLAS thread each' if fast else 'one stream'})", steps)
        runs = {"adamw": train_epoch("adamw", args.steps), "quad": train_epoch("quad", args.steps)}
        if fast:
            runs["quad, plain fit"] = train_epoch("quad", args.steps, native_fit=False)
        epochs = alternate_rounds(runs, 1, args.repeats, warmup=2)
        report(f"(c) train steps as an epoch runs them, {args.steps} per round (per step)",
               {label: (low / args.steps, median / args.steps) for label, (low, median) in epochs.items()})
        if native and fast:  # (a)'s two-stream, native-fit run and one BLAS thread per stream
            quad = build_optimizer(OptimConfig(name="quad"))
            quad.init(default_parameters())
            flops, rate = fit_flops(quad), product_rate(args.repeats)
            fit_ms = 1e3 * flops / (rate * 1e9) / 2
            adamw_step = steps["adamw"][0]
            extra = updates["quad, 2 streams, native fit"][0] - updates["adamw"][0]
            print("(e) what sets QUAD's ratio (minima)")
            print(f"  its update over AdamW's (a)  {extra:7.2f} ms   predicted step ratio {1 + extra / adamw_step:.3f}")
            print(f"  its fit: {flops / 1e9:.3f} GFLOP per step, at {rate:.0f} GFLOP/s per BLAS thread {fit_ms:.2f} ms "
                  f"on two streams   floor ratio {1 + fit_ms / adamw_step:.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main_()
