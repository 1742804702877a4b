"""Time QUAD against AdamW on the default grokking model (dim 128, depth 2, vocab 99, batch 512).

    python benchmarks/quad_step.py [--steps 10] [--repeats 11]

(a) the compiled optimizer update alone on the model's parameter tree, with the BLAS threads as
    they are and with one BLAS thread (how the Linux-CPU trainer runs); QUAD also with its
    parameter groups spread over two CPU streams (``QUAD(streams=...)``);
(b) the real train step, ``Trainer.step`` (forward, backward, update) as ``training.loop.train`` runs
    it (QUAD's groups spread over the trainer's two streams, its preconditioner fitted by the speed layer's
    native primitive), QUAD on the default stream, and QUAD with the plain fit.

Variants are timed in alternating rounds of ``--steps`` steps, so that load from other processes
hits them alike; it prints milliseconds per step (minimum and median over the rounds) and the ratio
of the minima to AdamW's. The load average is printed before and after.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402

import training.speed  # noqa: E402  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import models  # noqa: E402
from config import Config, override  # noqa: E402
from optimizers import OptimConfig, build_optimizer  # noqa: E402
from optimizers.quad import quad_iteration  # noqa: E402
from training.loop import build_trainer  # noqa: E402
from training.speed.trainer import blas_threads  # noqa: E402

from rounds import alternate_rounds  # noqa: E402

VOCAB, SEQ, BATCH = 99, 4, 512  # the grokking defaults: p = 97 plus two tokens, [a, op, b, =]


def update_only(name: str, streams: int = 0):
    """One compiled ``apply_gradients`` on the model's parameter tree (fixed random gradients)."""
    mx.random.seed(0)
    params = models.Transformer(models.ModelConfig(), VOCAB).trainable_parameters()
    grads = tree_map(lambda p: 1e-2 * mx.random.normal(p.shape), params)
    optimizer = build_optimizer(OptimConfig(name=name))
    if streams:
        optimizer.streams = [mx.new_stream(mx.cpu) for _ in range(streams)]
    optimizer.init(params)
    state = [optimizer.state]
    step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)
    box = [params]

    def run():
        box[0] = step(grads, box[0])
        mx.eval(box[0], state)
    return run


def train_step(name: str, streams: bool = True, native_fit: bool = True):
    """One ``Trainer.step`` on a fixed random batch; QUAD on the trainer's streams (as ``train`` runs it)
    or, if not ``streams``, on the default stream; with the speed layer's native preconditioner fit (as
    ``train`` runs it) or, if not ``native_fit``, the plain one."""
    trainer = build_trainer(override(Config(), {"optim.name": name}))
    if not streams and hasattr(trainer.optimizer, "streams"):
        trainer.optimizer.streams = None
    if not native_fit and hasattr(trainer.optimizer, "quad_iteration"):
        trainer.optimizer.quad_iteration = quad_iteration
    x = mx.random.randint(0, VOCAB, (BATCH, SEQ))
    y = mx.random.randint(0, VOCAB, (BATCH,))

    def run():
        loss, correct = trainer.step(x, y)
        mx.eval(trainer.state, loss, correct)
    return run


def report(title: str, ms: dict):
    base = ms["adamw"][0]
    print(title)
    for label, (low, median) in ms.items():
        print(f"  {label:28s} {low:7.2f} / {median:7.2f} ms   ratio {low / base:.3f}")


def main_():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=11, help="rounds per variant")
    args = parser.parse_args()
    print(f"device {mx.default_device()}, BLAS {fastblas.LOADED}, load average {os.getloadavg()[0]:.2f}")
    report("(a) optimizer update, BLAS threads as set (min / median)",
           alternate_rounds({"adamw": update_only("adamw"), "quad": update_only("quad")}, args.steps, args.repeats))
    with blas_threads(1):
        report("(a) optimizer update, one BLAS thread",
               alternate_rounds({"adamw": update_only("adamw"), "quad": update_only("quad"),
                        "quad, 2 streams": update_only("quad", streams=2)}, args.steps, args.repeats))
    fast = training.speed.available()
    with blas_threads(1) if fast else contextlib.nullcontext():
        runs = {"adamw": train_step("adamw"), "quad": train_step("quad")}
        if fast:
            runs["quad, on the default stream"] = train_step("quad", streams=False)
            runs["quad, plain fit"] = train_step("quad", native_fit=False)
        report(f"(b) train step ({'two streams, one BLAS thread each' if fast else 'one stream'})",
               alternate_rounds(runs, args.steps, args.repeats))
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main_()
