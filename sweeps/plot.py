"""Sweep figures, drawn from a sweep's ``results.csv`` (and its runs' ``metrics.jsonl``).

Every function draws onto axes it is given and reads rows (dicts keyed like the results table), so
another optimizer or knob needs no edits: ``plot_sweep(ax, rows, x="model.dim", y="epochs_to_target")``.
Unsolved runs are censored: drawn as open triangles at their budget, never as solved.
"""
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from config import label, short_name  # noqa: E402
from optimizers import KNOB_FIELDS  # noqa: E402
from plot import TRAIN_COLOR, VAL_COLOR, log_steps, nan_if_none, percent, x_values  # noqa: E402
from sweeps.results import best_points, group_points, load_rows, point_key, summarize  # noqa: E402
from training.rundir import read_metrics  # noqa: E402

# The column holding the budget at which an unsolved run is censored, per plotted quantity.
CENSOR_AT = {"epochs_to_target": "train.epochs", "steps_to_target": "steps_run"}
KNOB_FREE = tuple(f"optim.{k}" for k in KNOB_FIELDS) + (
    "optim.warmup_steps", "data.p", "data.op", "data.train_fraction", "train.epochs", "train.early_stop_val_acc")
UNITS = {"epochs_to_target": "epochs", "steps_to_target": "optimizer steps"}


def target_label(rows: list[dict], y: str) -> str:
    """``"epochs to 90% validation accuracy"`` for ``y="epochs_to_target"``."""
    targets = sorted({r["target"] for r in rows})
    goal = "/".join(f"{100 * t:g}%" for t in targets)
    return f"{UNITS.get(y, y)} to {goal} validation accuracy"


def hue_colors(values) -> dict:
    """A fixed colour per hue value (sorted), shared by every figure of a sweep."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(sorted(set(values), key=str))}


def set_value_axis(ax, values, axis: str = "x") -> None:
    """Log base-2 axis when the values span a factor of 8 or more (widths, batch sizes), else linear;
    ticks at the values."""
    values = sorted(set(values))
    positive = all(v > 0 for v in values)
    if positive and values[-1] / values[0] >= 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, [f"{v:g}" for v in values])
    if axis == "x":
        ax.minorticks_off()


def plot_sweep(ax, rows: list[dict], x: str, y: str = "epochs_to_target", hue: str = "optim.name",
               colors: dict = None, censored_at: str = None, legend: bool = True) -> None:
    """``y`` against ``x`` per ``hue``: median over seeds of solved runs (line), min-max range (band), and
    unsolved runs as open triangles at their budget (``censored_at`` column, from CENSOR_AT by default)."""
    censor_key = censored_at or CENSOR_AT.get(y)
    colors = colors or hue_colors(r[hue] for r in rows)
    hues = sorted({r[hue] for r in rows}, key=str)
    xs_all = sorted({r[x] for r in rows})
    log_x = all(v > 0 for v in xs_all) and len(xs_all) > 1 and xs_all[-1] / xs_all[0] >= 8
    span = (xs_all[-1] - xs_all[0]) or 1
    any_censored = False
    for i, h in enumerate(hues):
        color, mine = colors[h], [r for r in rows if r[hue] == h]
        shift = 0.06 * (i - (len(hues) - 1) / 2)  # separate the hues' censored markers a little
        xs, med, lo, hi, cx, cy = [], [], [], [], [], []
        for xv in sorted({r[x] for r in mine}):
            here = [r for r in mine if r[x] == xv]
            solved = [r[y] for r in here if r[y] is not None]
            if solved:
                xs.append(xv)
                med.append(statistics.median(solved))
                lo.append(min(solved))
                hi.append(max(solved))
            for r in here:
                if r[y] is None and censor_key and r.get(censor_key) is not None:
                    cx.append(xv * 2 ** shift if log_x else xv + shift * span * 0.3)
                    cy.append(r[censor_key])
        ax.plot(xs, med, "-o", color=color, lw=2, ms=5, label=str(h))
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
        if cx:
            any_censored = True
            ax.scatter(cx, cy, marker="^", s=45, facecolors="none", edgecolors=color, lw=1.5, zorder=3)
    if xs_all:
        set_value_axis(ax, xs_all)
    ax.set(xlabel=label(x), ylabel=target_label(rows, y) if rows else y)
    ax.grid(alpha=0.25)
    if not legend:
        return
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color="gray", alpha=0.25, label="min-max over seeds (line: median)"))
    if any_censored:
        handles.append(Line2D([], [], ls="", marker="^", mfc="none", mec="gray", label="not reached (at budget)"))
    ax.legend(handles=handles, fontsize=8)


def plot_heatmap(ax, rows: list[dict], x: str = "optim.weight_decay", y: str = "optim.lr",
                 value: str = "epochs_to_target", norm=None, cmap: str = "viridis", budget_key: str = "train.epochs"):
    """``value`` on an ``x`` by ``y`` grid: each cell the median over its solved runs, with ``k/n`` when only
    k of n seeds reached the target; a cell no seed solved is hatched and marked ``>budget``. Returns the image."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows}, reverse=True)  # largest at the top
    grid = [[math.nan] * len(xs) for _ in ys]
    cells = {}
    for r in rows:
        cells.setdefault((ys.index(r[y]), xs.index(r[x])), []).append(r)
    for (i, j), here in cells.items():
        solved = [r[value] for r in here if r[value] is not None]
        if solved:
            grid[i][j] = statistics.median(solved)
    image = ax.imshow(grid, norm=norm, cmap=cmap, aspect="auto")
    for (i, j), here in cells.items():
        solved = [r[value] for r in here if r[value] is not None]
        if solved:
            rgba = image.cmap(image.norm(grid[i][j]))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            text = f"{grid[i][j]:.0f}" + (f"\n{len(solved)}/{len(here)}" if len(solved) < len(here) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        else:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.9", edgecolor="0.6", hatch="///", lw=0))
            budget = max(r.get(budget_key) or 0 for r in here)
            ax.text(j, i, f">{budget:g}", ha="center", va="center", fontsize=8, color="0.2")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set(xlabel=label(x), ylabel=label(y))
    return image


def plot_curves(acc_ax, loss_ax, runs: dict, target: float = None) -> None:
    """Train and validation accuracy (``acc_ax``) and loss (``loss_ax``) against epoch; ``runs`` maps a
    label (the seed) to its metrics rows. One thin line per seed."""
    log = log_steps(list(runs.values()))
    for n, (name, metrics) in enumerate(sorted(runs.items())):
        xs, xlabel = x_values(metrics, log)
        for key, text, color in (("train", "train", TRAIN_COLOR), ("val", "validation", VAL_COLOR)):
            kw = dict(color=color, lw=1.5, alpha=0.85, label=text if n == 0 else None)
            acc_ax.plot(xs, [percent(r[f"{key}_acc"]) for r in metrics], **kw)
            loss_ax.plot(xs, [nan_if_none(r[f"{key}_loss"]) for r in metrics], **kw)
    if target is not None:
        acc_ax.axhline(100 * target, color="0.4", ls="--", lw=1, label=f"target {100 * target:g}%")
    scale = "log" if log else "linear"
    acc_ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(-2, 102), xscale=scale)
    loss_ax.set(xlabel=xlabel, ylabel="cross-entropy loss", yscale="log", xscale=scale)
    acc_ax.legend(loc="lower right", fontsize=8)
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.25)


def save(fig, path: Path) -> Path:
    """Save ``fig`` at ``path`` atomically and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def describe_config(row: dict, keys) -> str:
    return ", ".join(f"{short_name(k)} {row[k]:g}" if isinstance(row[k], (int, float))
                     else f"{k.split('.')[-1]} {row[k]}" for k in keys if row.get(k) is not None)


def varying(rows: list[dict], exclude=()) -> list:
    """Config keys that take more than one value among ``rows``."""
    keys = [k for k in rows[0] if "." in k and k not in exclude] if rows else []
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def setting(rows: list[dict]) -> str:
    r = rows[0]
    return (f"a {r['data.op']} b mod {r['data.p']}, train fraction {r['data.train_fraction']:g}, "
            f"budget {budget_text(r)}")


def budget_text(row: dict) -> str:
    return f"{row['train.epochs']} epochs" if row.get("train.epochs") else f"{row.get('train.steps')} steps"


def optimizer_figures(out: Path, rows: list[dict], media: Path, colors: dict) -> list[Path]:
    """``best_<optimizer>.png`` (curves of its best configuration), ``heatmap_<optimizer>.png`` (lr x weight
    decay) and ``best_all.png`` (validation accuracy of every optimizer's best configuration)."""
    saved, points = [], summarize(rows)
    groups = group_points(rows)
    best = best_points(points)
    compare_fig, compare_axes = plt.subplots(1, 2, figsize=(10, 3.8))
    best_curves = []
    for name, point in sorted(best.items()):
        runs = groups[point_key(point)]
        curves = {f"seed {r['seed']}": read_metrics(out / "runs" / r["run"]) for r in runs}
        hyper = [k for k in point if k.startswith("optim.") and k != "optim.name"]
        reached = (f"median {point['epochs_median']:g} epochs ({point['steps_median']:g} steps), "
                   f"{point['solved']}/{point['n']} seeds solved" if point["solved"]
                   else f"not reached by any of {point['n']} seeds")
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        plot_curves(acc_ax, loss_ax, curves, point["target"])
        n_points = sum(1 for p in points if p["optim.name"] == name)
        fig.suptitle(f"{name}: best of {n_points} configurations ({describe_config(point, hyper)})\n"
                     f"{100 * point['target']:g}% validation accuracy: {reached}; {setting(runs)}", fontsize=9)
        fig.tight_layout()
        saved.append(save(fig, media / f"best_{name}.png"))
        for n, (seed, metrics) in enumerate(sorted(curves.items())):
            kw = dict(color=colors[name], lw=1.5, alpha=0.85, label=name if n == 0 else None)
            compare_axes[0].plot([m["epoch"] for m in metrics], [percent(m["val_acc"]) for m in metrics], **kw)
            compare_axes[1].plot([m["step"] for m in metrics], [percent(m["val_acc"]) for m in metrics], **kw)
        best_curves += curves.values()
    if log_steps(best_curves):
        compare_axes[1].set_xscale("log")
    for ax, unit in zip(compare_axes, ("epoch", "optimizer step")):
        ax.set(xlabel=unit, ylabel="validation accuracy (%)", ylim=(-2, 102))
        ax.grid(alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
    compare_fig.suptitle(f"Best configuration per optimizer, one line per seed; {setting(rows)}", fontsize=9)
    compare_fig.tight_layout()
    saved.append(save(compare_fig, media / "best_all.png"))

    for name in sorted({r["optim.name"] for r in rows}):
        mine = [r for r in rows if r["optim.name"] == name]
        facets_keys = varying(mine, exclude=("optim.lr", "optim.weight_decay"))
        facets = sorted({tuple(r[k] for k in facets_keys) for r in mine})
        solved = [r["epochs_to_target"] for r in mine if r["epochs_to_target"] is not None]
        norm = Normalize(min(solved), max(max(solved), min(solved) + 1)) if solved else None
        fig, axes = plt.subplots(1, len(facets), figsize=(3 + 3.6 * len(facets), 4.4), squeeze=False,
                                 layout="constrained")
        for ax, facet in zip(axes[0], facets):
            sub = [r for r in mine if tuple(r[k] for k in facets_keys) == facet]
            image = plot_heatmap(ax, sub, norm=norm)
            ax.set_title(describe_config(sub[0], facets_keys) or name, fontsize=9)
        if solved:
            fig.colorbar(image, ax=axes[0].tolist(), label=f"median {target_label(mine, 'epochs_to_target')}"
                                                           "\n(over seeds that reached it)")
        fig.suptitle(f"{name}: {target_label(mine, 'epochs_to_target')} (lower is faster)\n"
                     f"hatched: no seed reached it; k/n: k of n seeds did. {setting(mine)}", fontsize=9)
        saved.append(save(fig, media / f"heatmap_{name}.png"))
    return saved


def architecture_figures(rows: list[dict], media: Path, colors: dict, knobs: list, center: dict) -> list[Path]:
    """``arch_<knob>.png`` per knob (epochs and steps to target against its value, the other knobs at
    ``center``) and ``arch_overview.png`` (every knob, epochs and steps)."""
    saved = []
    overview, grid = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 6.6), squeeze=False)
    for col, knob in enumerate(knobs):
        sub = [r for r in rows if all(r.get(k) == center[k] for k in knobs if k != knob)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, y in zip(axes, ("epochs_to_target", "steps_to_target")):
            plot_sweep(ax, sub, x=knob, y=y, colors=colors)
            row = ["epochs_to_target", "steps_to_target"].index(y)
            plot_sweep(grid[row][col], sub, x=knob, y=y, colors=colors, legend=(row, col) == (0, 0))
        others = describe_config(center, [k for k in knobs if k != knob])
        fig.suptitle(f"{label(knob)}: time to target per optimizer at its best configuration\n"
                     f"others at {others}; {setting(sub)}", fontsize=9)
        fig.tight_layout()
        saved.append(save(fig, media / f"arch_{knob.split('.')[-1]}.png"))
    overview.suptitle(f"One knob at a time around {describe_config(center, knobs)}; {setting(rows)}", fontsize=10)
    overview.tight_layout()
    saved.append(save(overview, media / "arch_overview.png"))
    return saved


def save_figures(out, media) -> list[Path]:
    """Draw a sweep's figures from ``out/results.csv`` into ``media``; the kind of sweep and its center
    come from ``out/sweep.json`` (inferred from the rows when absent)."""
    out, media = Path(out), Path(media)
    rows = load_rows(out)
    if not rows:
        return []
    meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    spec = meta.get("spec", {})
    colors = hue_colors(r["optim.name"] for r in rows)
    if meta.get("kind", "architecture" if varying(rows, exclude=KNOB_FREE) else "optimizers") == "architecture":
        knobs = [k for k in spec.get("vary") or varying(rows, exclude=KNOB_FREE) if len({r.get(k) for r in rows}) > 1]
        center = {k: spec.get("center", {}).get(k, statistics.mode(r[k] for r in rows)) for k in knobs}
        return architecture_figures(rows, media, colors, knobs, center)
    return optimizer_figures(out, rows, media, colors)
