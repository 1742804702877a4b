"""Figures for one run, drawn from its ``metrics.jsonl``: ``python plot.py RUN_DIR [--out media/grokking.png]``."""
import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.rundir import CONFIG, METRICS, read_json, read_metrics  # noqa: E402

TRAIN_COLOR, VAL_COLOR = "#1b9e77", "#d95f02"  # green train, orange validation, as in the original figure


def log_steps(runs: list, mode: str = "auto") -> bool:
    """Whether to draw against optimizer steps on a log axis (else against epochs, linearly): ``mode`` "log",
    or "auto" and the runs span more than two decades of steps."""
    if mode not in ("auto", "linear", "log"):
        raise ValueError(f"x axis {mode!r}: choose from auto, linear, log")
    steps = [r["step"] for metrics in runs for r in metrics if r["step"] > 0]
    return mode == "log" or (mode == "auto" and bool(steps) and max(steps) / min(steps) > 100)


def x_values(metrics: list[dict], log: bool) -> tuple:
    """The x values of ``metrics`` and the axis label."""
    return ([r["step"] for r in metrics], "optimizer step") if log else ([r["epoch"] for r in metrics], "epoch")


def draw_run(metrics: list[dict], title: str, dark: bool = False, x_axis: str = "auto"):
    """Accuracy (left) and loss (right) against epoch (or optimizer steps, log axis) for train and validation."""
    style = "dark_background" if dark else "default"
    log = log_steps([metrics], x_axis)
    with plt.style.context(style):
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
        xs, xlabel = x_values(metrics, log)
        for key, label, color in (("train", "train", TRAIN_COLOR), ("val", "validation", VAL_COLOR)):
            acc_ax.plot(xs, [percent(r[f"{key}_acc"]) for r in metrics], color=color, lw=2, label=label)
            loss_ax.plot(xs, [nan_if_none(r[f"{key}_loss"]) for r in metrics], color=color, lw=2, label=label)
        acc_ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(-2, 102), xscale="log" if log else "linear")
        loss_ax.set(xlabel=xlabel, ylabel="cross-entropy loss", yscale="log", xscale="log" if log else "linear")
        acc_ax.legend(loc="lower right")
        fig.suptitle(title, fontsize=10)
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.25)
            if dark:
                for spine in ax.spines.values():
                    spine.set_color("white")
        fig.tight_layout()
    return fig


def nan_if_none(value) -> float:
    return math.nan if value is None else value


def percent(value) -> float:
    return 100 * nan_if_none(value)


def run_title(run_dir) -> str:
    cfg = read_json(Path(run_dir) / CONFIG)
    d, m, o = cfg["data"], cfg["model"], cfg["optim"]
    opt = f"{o['name']} lr={o['lr']:g} wd={o['weight_decay']:g}"
    return (f"a {d['op']} b mod {d['p']}, train fraction {d['train_fraction']:g}; "
            f"dim {m['dim']}, depth {m['depth']}, heads {m['heads']}; {opt}")


def save_light_and_dark(draw, out_path, dpi: int = 150) -> list[Path]:
    """Save ``draw(dark=False)`` at ``out_path`` and ``draw(dark=True)`` beside it (``*_dark.png``), atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    saved = []
    for dark, path in ((False, out_path), (True, out_path.with_name(out_path.stem + "_dark" + out_path.suffix))):
        fig = draw(dark)
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        fig.savefig(tmp, dpi=dpi)
        plt.close(fig)
        tmp.replace(path)
        saved.append(path)
    return saved


def plot_run(run_dir, out_path, x_axis: str = "auto") -> list[Path]:
    """Save the light figure at ``out_path`` and a dark-mode variant beside it (``*_dark.png``)."""
    metrics, title = read_metrics(run_dir), run_title(run_dir)
    return save_light_and_dark(lambda dark: draw_run(metrics, title, dark, x_axis), out_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Redraw a run's figures from its results files.")
    parser.add_argument("run_dir", help="a run directory holding config.json and metrics.jsonl")
    parser.add_argument("--out", default="media/grokking.png", help="figure path (default: %(default)s)")
    parser.add_argument("--x-axis", choices=("auto", "linear", "log"), default="auto",
                        help="auto: optimizer steps on a log axis when the run spans more than two decades")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / METRICS).exists():
        print(f"error: {args.run_dir} has no metrics.jsonl", file=sys.stderr)
        return 2
    for path in plot_run(args.run_dir, args.out, args.x_axis):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
