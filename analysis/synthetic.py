"""A synthetic run directory in the trainer's format, for tests and timing:
``python -m analysis.synthetic OUT_DIR [--p 97] [--op /] [--dim 128] [--depth 2] [--snapshots 30]``.

Snapshot ``s`` holds a freshly initialised model (``mx.random.seed(seed + s)``) with its weights scaled by
``1 − s / (2·snapshots)`` (a shrinking norm); ``metrics.jsonl`` has made-up grokking-shaped curves. The
numbers mean nothing; the files have the real layout (``config.json``, ``metrics.jsonl``,
``snapshots/step_{step:09d}.safetensors`` with ``epoch``/``step`` metadata).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import fastblas  # noqa: F401  (before mlx)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402


def save_snapshot(model, path: Path, epoch: int, step: int):
    """The trainer's snapshot format: flattened parameters, ``epoch``/``step`` as string metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())),
                        metadata={"epoch": str(epoch), "step": str(step)})


def make_synthetic_run(out_dir, p: int = 97, op: str = "/", dim: int = 128, depth: int = 2, heads: int = 1,
                       mlp_ratio: int = 4, snapshots: int = 30, epochs_per_snapshot: int = 5,
                       steps_per_epoch: int = 10, seed: int = 0, train_fraction: float = 0.5) -> Path:
    """Write a synthetic run directory at ``out_dir`` (see the module docstring); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"data": {"p": p, "op": op, "train_fraction": train_fraction},
           "model": {"dim": dim, "depth": depth, "heads": heads, "dropout": 0.0, "mlp_ratio": mlp_ratio},
           "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1.0},
           "train": {"batch_size": 512, "epochs": snapshots * epochs_per_snapshot}, "seed": seed}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    vocab = data.DataConfig(**cfg["data"]).vocab_size
    last = snapshots * epochs_per_snapshot
    rows = []
    for epoch in range(1, last + 1):
        grok = 1 / (1 + math.exp(-(epoch - 0.7 * last) / (0.05 * last)))
        rows.append(dict(epoch=epoch, step=epoch * steps_per_epoch, train_loss=0.01 + 4 * math.exp(-epoch / 5),
                         train_acc=min(1.0, epoch / (0.2 * last)), val_loss=4.6 * (1 - grok) + 0.01,
                         val_acc=grok))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in range(snapshots):
        mx.random.seed(seed + s)
        model = models.Transformer(models.ModelConfig(**cfg["model"]), vocab)
        scale = 1 - s / (2 * snapshots)
        model.load_weights([(k, v * scale) for k, v in tree_flatten(model.parameters())])
        epoch = (s + 1) * epochs_per_snapshot
        save_snapshot(model, out / "snapshots" / f"step_{epoch * steps_per_epoch:09d}.safetensors", epoch,
                      epoch * steps_per_epoch)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.synthetic", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--op", default="/")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--snapshots", type=int, default=30)
    args = parser.parse_args(argv)
    path = make_synthetic_run(args.out_dir, args.p, args.op, args.dim, args.depth, snapshots=args.snapshots)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
