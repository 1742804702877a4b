"""What checkpoints and snapshots cost on the default run, measured in one process:

    python benchmarks/checkpoint_cost.py [--repeats 5]

Per registered optimizer: one epoch of training (the default model and batch), then the time and size of a
checkpoint (parameters, optimizer state, loop state; written, checksummed and renamed as the loop does it) and
of a snapshot (parameters only), the median over ``--repeats``; and what the defaults of ``python main.py``
(a checkpoint every 10 epochs, a snapshot every 5) add to a 150-epoch run, as a share of its epochs.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import training.speed  # noqa: E402,F401  (before the first evaluation: sets MLX's evaluation order)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
from config import Config, override  # noqa: E402
from optimizers import OPTIMIZERS  # noqa: E402
from training import checkpoints  # noqa: E402
from training.loop import Loop, build_trainer, save  # noqa: E402


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.iterdir())
    return sum(f.stat().st_size for f in files) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for name in OPTIMIZERS:
        cfg = override(Config(), {"optim.name": name}).resolved()
        x, y, _, _ = map(mx.array, data.split(cfg.data, np.random.default_rng([cfg.seed, 0])))
        trainer = build_trainer(cfg)
        order = mx.array(np.random.default_rng(0).permutation(len(y)))
        with trainer.running(), tempfile.TemporaryDirectory() as out:
            mx.eval(trainer.steps(x, y, order, cfg.train.batch_size))  # traces and compiles
            tick = time.perf_counter()
            mx.eval(trainer.steps(x, y, order, cfg.train.batch_size), trainer.state)
            epoch_s = time.perf_counter() - tick
            loop = Loop(cfg, trainer, Path(out), np.random.default_rng(1), 10, 1500, step=10, order=order)
            ckpt_s, snap_s = [], []
            for i in range(args.repeats):
                loop.step = 10 * (i + 1)
                tick = time.perf_counter()
                path = save(loop)
                ckpt_s.append(time.perf_counter() - tick)
                tick = time.perf_counter()
                snapshot = checkpoints.save_snapshot(Path(out), trainer.model, i, loop.step)
                snap_s.append(time.perf_counter() - tick)
            ckpt, snap = statistics.median(ckpt_s), statistics.median(snap_s)
            default = (15 * ckpt + 31 * snap) / (150 * epoch_s)
            print(f"{name:6s} epoch {1e3 * epoch_s:7.1f} ms   checkpoint {1e3 * ckpt:6.1f} ms "
                  f"({size_mb(path):.1f} MB)   snapshot {1e3 * snap:5.1f} ms ({size_mb(snapshot):.1f} MB)   "
                  f"defaults add {100 * default:.2f} % to the run's epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
