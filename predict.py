"""Ask a trained model: ``python predict.py RUN_DIR "20/74" "3 / 5" ...`` prints, per prompt, the model's answer,
its probability, the top three and the true answer; ``--all`` prints accuracy by split and draws where the
model is wrong (``RUN_DIR/predictions.png``). Parameters: the run's final checkpoint, else its last snapshot,
or ``--checkpoint PATH`` (a checkpoint directory or a snapshot file). Runs on the CPU, on any machine.
"""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import argparse
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import data
import models
from config import config_from_dict
from training import checkpoints, rundir

PROMPT = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*$")


def parameters_path(run_dir: Path, checkpoint=None) -> Path:
    """The safetensors file to load: ``checkpoint`` (a directory or a file), else the newest checkpoint's
    model, else the newest snapshot."""
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path / "model.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint directory or snapshot file")
        return path
    found = checkpoints.checkpoint_dirs(run_dir)
    if found:
        return found[-1] / "model.safetensors"
    snapshots = sorted((run_dir / checkpoints.SNAPSHOTS).glob("step_*.safetensors"))
    if snapshots:
        return snapshots[-1]
    raise ValueError(f"{run_dir} holds no checkpoint or snapshot (train with --checkpoint-every or --snapshot-every)")


def load_model(run_dir: Path, checkpoint=None):
    """``(config, model)`` of a run directory, in eval mode on the CPU."""
    if not (run_dir / rundir.CONFIG).exists():
        raise ValueError(f"{run_dir} is not a run directory (no {rundir.CONFIG})")
    cfg = config_from_dict(rundir.read_json(run_dir / rundir.CONFIG))
    model = models.Transformer(cfg.model, cfg.data.vocab_size)
    path = parameters_path(run_dir, checkpoint)
    try:
        model.load_weights(str(path))
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not parameters of this run's model ({str(error).splitlines()[0]})") from None
    model.eval()
    return cfg, model, path


def parse_prompt(text: str, cfg: data.DataConfig) -> tuple[int, int]:
    """``(a, b)`` of ``"a op b"``; ValueError naming what is wrong."""
    match = PROMPT.match(text)
    if not match:
        raise ValueError(f"prompt {text!r} is not 'a {cfg.op} b' with whole numbers a, b")
    a, op, b = int(match[1]), match[2], int(match[3])
    if op != cfg.op:
        raise ValueError(f"prompt {text!r}: this run learned '{cfg.op}', not '{op}'")
    for name, value in (("a", a), ("b", b)):
        if not 0 <= value < cfg.p:
            raise ValueError(f"prompt {text!r}: {name}={value} is outside 0..{cfg.p - 1}")
    if op == "/" and b == 0:
        raise ValueError(f"prompt {text!r}: b=0 has no inverse mod {cfg.p}")
    return a, b


def answer(a: int, b: int, cfg: data.DataConfig) -> int:
    p = cfg.p
    return {"+": (a + b) % p, "-": (a - b) % p, "*": (a * b) % p, "/": a * pow(b, p - 2, p) % p}[cfg.op]


def probabilities(model, tokens: np.ndarray, p: int) -> np.ndarray:
    """Softmax over the residues ``0..p-1`` (the two special tokens are never answers), ``(N, p)``."""
    out = []
    for i in range(0, len(tokens), 4096):
        logits = model(mx.array(tokens[i:i + 4096]))[:, :p]
        out.append(np.asarray(mx.softmax(logits, axis=-1)))
    return np.concatenate(out)


def draw_errors(cfg, tokens, labels, predicted, train_mask, path: Path) -> list[Path]:
    """A ``p x p`` map of (a, b): wrong answers coloured, training pairs marked; light and dark variants."""
    import matplotlib
    import matplotlib.pyplot as plt

    import plot
    p = cfg.data.p
    grid = np.full((p, p), np.nan)  # 0 right, 1 wrong; NaN: not a pair (b = 0 for /)
    grid[tokens[:, 0], tokens[:, 2]] = (predicted != labels).astype(float)

    def draw(dark: bool):
        with plt.style.context("dark_background" if dark else "default"):
            fig, ax = plt.subplots(figsize=(6.2, 5.6))
            ax.imshow(grid.T, origin="lower", cmap=matplotlib.colors.ListedColormap(["0.85", "#d62728"]),
                      vmin=0, vmax=1, interpolation="nearest")
            ax.scatter(tokens[train_mask, 0], tokens[train_mask, 2], s=(120 / p) ** 2,
                       c="0.95" if dark else "0.2", marker="o", lw=0, label="training pair")
            ax.set(xlabel="a", ylabel="b", title=f"a {cfg.data.op} b mod {p}: wrong answers in red "
                                                 f"({int(np.nansum(grid))} of {len(labels)})")
            ax.legend(loc="upper right", fontsize=7, markerscale=6)
            fig.tight_layout()
        return fig
    return plot.save_light_and_dark(draw, path, dpi=130)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory (config.json and a checkpoint or snapshot)")
    parser.add_argument("prompts", nargs="*", help='questions such as "20/74"')
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory or snapshot file to load instead")
    parser.add_argument("--all", action="store_true", help="accuracy by split and a figure of the wrong answers")
    parser.add_argument("--out", default=None, help="figure path for --all (default: RUN_DIR/predictions.png)")
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    run_dir = Path(args.run_dir)
    try:
        cfg, model, path = load_model(run_dir, args.checkpoint)
        pairs = [parse_prompt(text, cfg.data) for text in args.prompts]
        if not pairs and not args.all:
            raise ValueError("give prompts such as \"20/74\", or --all")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens, labels = data.modular_arithmetic(cfg.data)
    x_train = data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))[0]
    train_rows = set(map(tuple, x_train.tolist()))
    print(f"{path}")
    p, op = cfg.data.p, cfg.data.op
    for (a, b), text in zip(pairs, args.prompts):
        row = np.array([[a, p, b, p + 1]], dtype=np.int32)
        probs = probabilities(model, row, p)[0]
        top = np.argsort(-probs)[:3]
        truth = answer(a, b, cfg.data)
        split_name = "train" if tuple(row[0].tolist()) in train_rows else "validation"
        print(f"{a} {op} {b} = {top[0]} (p={probs[top[0]]:.3f}); top 3: "
              + ", ".join(f"{c} {probs[c]:.3f}" for c in top)
              + f"; true {truth} {'right' if top[0] == truth else 'WRONG'} ({split_name} pair)")
    if args.all:
        predicted = probabilities(model, tokens, p).argmax(axis=1)
        train_mask = np.array([tuple(t) in train_rows for t in tokens.tolist()])
        for name, mask in (("train", train_mask), ("validation", ~train_mask), ("all", np.ones_like(train_mask))):
            correct = int((predicted[mask] == labels[mask]).sum())
            print(f"{name:10s} accuracy {correct / mask.sum():.4f} ({correct} / {mask.sum()})")
        figure = Path(args.out) if args.out else run_dir / "predictions.png"
        for saved in draw_errors(cfg, tokens, labels, predicted, train_mask, figure):
            print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
