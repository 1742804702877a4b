"""Sweep figures, drawn from a sweep's ``results.csv`` (and its runs' ``metrics.jsonl``).

Every function draws onto axes it is given and reads rows (dicts keyed like the results table), so
another optimizer or knob needs no edits: ``plot_sweep(ax, rows, x="model.dim", y="epochs_to_target")``.
Runs that did not reach the target are censored: statistics are Kaplan-Meier medians over every seed,
and such runs are drawn as open triangles (or ticks) at their budget, never as reached.
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
from sweeps import results, stats, verdict  # noqa: E402
from sweeps.results import censored_statistics, load_rows, target_text  # noqa: E402
from training.rundir import read_metrics  # noqa: E402

# The column holding the budget at which an unsolved run is censored, per plotted quantity.
CENSOR_AT = {"epochs_to_target": "train.epochs", "steps_to_target": "steps_run"}
BUDGET_AT = {"epochs_to_target": "budget_epochs", "steps_to_target": "budget_steps"}  # where an open band ends
KNOB_FREE = tuple(f"optim.{k}" for k in KNOB_FIELDS) + (
    "optim.warmup_steps", "data.p", "data.op", "data.train_fraction", "train.epochs", "train.early_stop_val_acc")
UNITS = {"epochs_to_target": "epochs", "steps_to_target": "optimizer steps"}


def target_label(rows: list[dict], y: str) -> str:
    """``"epochs to 90% validation accuracy"`` for ``y="epochs_to_target"``."""
    goal = " / ".join(target_text(t) for t in sorted({r["target"] for r in rows}, key=str))
    return f"{UNITS.get(y, y)} to {goal}"


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
    """``y`` against ``x`` per ``hue``: the Kaplan-Meier median over seeds (line; a value where it is not
    identified within the budget is left out), its 95% interval (band, up to the budget where open), and
    runs that did not reach the target as open triangles at their budget (``censored_at`` column, from
    CENSOR_AT by default)."""
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
            unit = y.split("_")[0]
            km = censored_statistics(here)
            if km[f"{unit}_km_median"] is not None:
                budget_key = BUDGET_AT.get(y, censor_key)
                if not all(budget_key in r for r in here):  # rows of tables written before the budget columns
                    budget_key = censor_key
                budget = max(r.get(budget_key) or 0 for r in here) if budget_key else math.nan
                xs.append(xv)
                med.append(km[f"{unit}_km_median"])
                lo.append(km[f"{unit}_km_lower"])
                hi.append(budget if km[f"{unit}_km_upper"] is None else km[f"{unit}_km_upper"])
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
    handles.append(Patch(color="gray", alpha=0.25, label="95% interval (line: Kaplan-Meier median over seeds)"))
    if any_censored:
        handles.append(Line2D([], [], ls="", marker="^", mfc="none", mec="gray", label="not reached (at budget)"))
    ax.legend(handles=handles, fontsize=8)


EDGE_MARKERS = {("x", "low"): ("<", -0.5, 0), ("x", "high"): (">", 0.5, 0), ("y", "low"): ("v", 0, 0.5),
                ("y", "high"): ("^", 0, -0.5)}  # marker, offset in (column, row) from the cell's centre


def plot_heatmap(ax, rows: list[dict], x: str = "optim.weight_decay", y: str = "optim.lr",
                 value: str = "epochs_to_target", norm=None, cmap: str = "viridis", budget_key: str = "train.epochs",
                 best=None, edges=()):
    """``value`` on an ``x`` by ``y`` grid: each cell the Kaplan-Meier median over its seeds, with ``k/n``
    when only k of n seeds reached the target; a cell whose median is not identified within the budget is
    hatched and marked ``>budget``. ``best``: the ``(x, y)`` values of the best point, outlined; ``edges``:
    ``("x" or "y", "low" or "high")`` sides of the search the best point is on, marked by red triangles
    pointing outward. Returns the image."""
    unit = value.split("_")[0]
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows}, reverse=True)  # largest at the top
    grid = [[math.nan] * len(xs) for _ in ys]
    cells = {}
    for r in rows:
        cells.setdefault((ys.index(r[y]), xs.index(r[x])), []).append(r)
    medians = {cell: censored_statistics(here)[f"{unit}_km_median"] for cell, here in cells.items()}
    for (i, j), m in medians.items():
        if m is not None:
            grid[i][j] = m
    image = ax.imshow(grid, norm=norm, cmap=cmap, aspect="auto")
    for (i, j), here in cells.items():
        reached = sum(bool(r["reached"]) for r in here)
        count = f"\n{reached}/{len(here)}" if reached < len(here) else ""
        if medians[(i, j)] is not None:
            rgba = image.cmap(image.norm(grid[i][j]))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(j, i, f"{grid[i][j]:.0f}" + count, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
        else:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.9", edgecolor="0.6", hatch="///", lw=0))
            budget = max(r.get(budget_key) or 0 for r in here)
            ax.text(j, i, f">{budget:g}" + (count if reached else ""), ha="center", va="center", fontsize=8,
                    color="0.2")
    if best is not None and best[0] in xs and best[1] in ys:
        i, j = ys.index(best[1]), xs.index(best[0])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red" if edges else "black", lw=2.5))
        for side in edges:
            marker, dj, di = EDGE_MARKERS[side]
            ax.plot(j + dj, i + di, marker=marker, color="red", ms=11, mec="white", clip_on=False, zorder=4)
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


UNIT_LABELS = {"epochs": "epoch", "steps": "optimizer step", "seconds": "seconds (wall clock)"}


def plot_survival(axes, headline: dict, colors: dict) -> None:
    """Per optimizer, the Kaplan-Meier fraction of runs that reached the target against time, one axis per
    unit (epochs, steps, seconds), with its 95% band and a tick where a run was censored."""
    for ax, unit in zip(axes, UNIT_LABELS):
        for name, runs in sorted(headline.items()):
            times = [r.get(f"{unit}_observed") for r in runs]
            if not runs or any(t is None for t in times):
                continue
            flags = [bool(r["reached"]) for r in runs]
            km = stats.kaplan_meier(times, flags)
            t = [0.0, *km.time]
            reached = [0.0, *km.reached]
            lower = [0.0, *km.lower]
            for i in range(1, len(lower)):  # not bounded where every run at risk reached: keep the last bound
                lower[i] = lower[i - 1] if math.isnan(lower[i]) else lower[i]
            color = colors[name]
            ax.step(t, [percent(f) for f in reached], where="post", color=color, lw=2,
                    label=f"{name} ({sum(flags)}/{len(runs)} reached)")
            ax.fill_between(t, [percent(f) for f in lower], [percent(f) for f in [0.0, *km.upper]], step="post",
                            color=color, alpha=0.18, lw=0)
            censored = [ti for ti, f in zip(times, flags) if not f]
            ax.plot(censored, [percent(km.at(ti)) for ti in censored], ls="", marker="|", ms=14, mew=2,
                    color=color)
        ax.axhline(50, color="0.5", ls=":", lw=1)
        ax.set(xlabel=UNIT_LABELS[unit], ylabel="runs that reached the target (%)", ylim=(-2, 102))
        ax.grid(alpha=0.25)
    axes[0].legend(loc="upper left", fontsize=8)


def plot_sensitivity(bar_ax, curve_ax, v, colors: dict) -> None:
    """Left: the share of each optimizer's searched points whose median run reaches the target within the
    budget, with the expected number of random trials to find one. Right: the share of searched points
    whose Kaplan-Meier median epochs is at most t."""
    names = [r["optimizer"] for r in v.rows]
    shares = [r["points_reaching"] / r["points_searched"] for r in v.rows]
    bars = bar_ax.bar(names, [100 * x for x in shares], color=[colors[n] for n in names])
    for bar, r in zip(bars, v.rows):
        trials = "never" if math.isinf(r["expected_trials"]) else f"{r['expected_trials']:.2g}"
        bar_ax.annotate(f"{r['points_reaching']}/{r['points_searched']} points\nexpected trials {trials}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    bar_ax.set(ylabel="searched points reaching the target (%)", ylim=(0, 119))
    points = results.summarize(v.tuning)
    for name in names:
        medians = sorted(p["epochs_km_median"] for p in points if p["optim.name"] == name
                         and p["epochs_km_median"] is not None)
        n = sum(1 for p in points if p["optim.name"] == name)
        budget = max((p["budget_epochs"] or 0 for p in points if p["optim.name"] == name), default=0)
        curve_ax.step([0, *medians, budget], [0, *[100 * (i + 1) / n for i in range(len(medians))],
                                              100 * len(medians) / n], where="post", color=colors[name], lw=2,
                      label=name)
    curve_ax.set(xlabel="epochs (Kaplan-Meier median of a point)", ylabel="searched points with median <= t (%)",
                 ylim=(-2, 102))
    curve_ax.legend(fontsize=8)
    for ax in (bar_ax, curve_ax):
        ax.grid(alpha=0.25)


def headline_dirs(out: Path, v, name: str) -> dict:
    """``{label: metrics}`` of the runs behind an optimizer's headline (confirmation runs when confirmed)."""
    confirmed = next(r["confirmed"] for r in v.rows if r["optimizer"] == name)
    root = out / verdict.CONFIRM_DIR if confirmed else out
    return {f"seed {r['seed']}": read_metrics(root / "runs" / r["run"]) for r in v.headline[name]}


def headline_caption(v) -> str:
    if all(r["confirmed"] for r in v.rows):
        return f"confirmation seeds {v.confirm_seeds} only (selected on tuning seeds {v.tuning_seeds})"
    return f"NOT confirmed: tuning seeds {v.tuning_seeds}, the seeds it was selected on (optimistic)"


def optimizer_figures(out: Path, v, media: Path, colors: dict) -> list[Path]:
    """``best_<optimizer>.png`` (curves of its best configuration on the tuning seeds),
    ``heatmap_<optimizer>.png`` (lr x weight decay, the best cell outlined, red triangles where it is on an
    edge of the search), ``best_all.png`` (validation accuracy of every optimizer's best configuration on
    the confirmation seeds), ``survival.png`` and ``sensitivity.png``."""
    saved, rows = [], v.tuning
    points = results.summarize(rows)
    groups = results.group_points(rows)
    compare_fig, compare_axes = plt.subplots(1, 2, figsize=(10, 3.8))
    best_curves = []
    for name, optimum in sorted(v.optima.items()):
        point = optimum.point
        runs = groups[results.point_key(point)]
        curves = {f"seed {r['seed']}": read_metrics(out / "runs" / r["run"]) for r in runs}
        hyper = [k for k in point if k.startswith("optim.") and k != "optim.name"]
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        plot_curves(acc_ax, loss_ax, curves, point["target"] if point["target"] != "sustained95" else 0.95)
        n_points = sum(1 for p in points if p["optim.name"] == name)
        fig.suptitle(f"{name}: best of {n_points} configurations ({describe_config(point, hyper)}), tuning seeds; "
                     f"optimum {optimum.describe()}\n{target_text(point['target'])}: reached {point['reached']}/"
                     f"{point['runs']}, median epochs {point['epochs_km']}; {setting(runs)}", fontsize=8)
        fig.tight_layout()
        saved.append(save(fig, media / f"best_{name}.png"))
        headline = headline_dirs(out, v, name)
        for n, metrics in enumerate(headline[k] for k in sorted(headline)):
            kw = dict(color=colors[name], lw=1.5, alpha=0.85, label=name if n == 0 else None)
            compare_axes[0].plot([m["epoch"] for m in metrics], [percent(m["val_acc"]) for m in metrics], **kw)
            compare_axes[1].plot([m["step"] for m in metrics], [percent(m["val_acc"]) for m in metrics], **kw)
        best_curves += headline.values()
    if log_steps(best_curves):
        compare_axes[1].set_xscale("log")
    for ax, unit in zip(compare_axes, ("epoch", "optimizer step")):
        ax.set(xlabel=unit, ylabel="validation accuracy (%)", ylim=(-2, 102))
        ax.grid(alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
    compare_fig.suptitle(f"Best configuration per optimizer, one line per seed, {headline_caption(v)}\n"
                         f"{setting(rows)}", fontsize=9)
    compare_fig.tight_layout()
    saved.append(save(compare_fig, media / "best_all.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    plot_survival(axes, v.headline, colors)
    fig.suptitle(f"Runs that reached {target_text(v.rows[0]['target'])} (Kaplan-Meier, 95% band; |: censored), "
                 f"{headline_caption(v)}", fontsize=9)
    fig.tight_layout()
    saved.append(save(fig, media / "survival.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    plot_sensitivity(axes[0], axes[1], v, colors)
    fig.suptitle(f"Tuning sensitivity: searched points (tuning seeds) reaching {target_text(v.rows[0]['target'])} "
                 f"within the budget (a point reaches when more than half its seeds do)", fontsize=9)
    fig.tight_layout()
    saved.append(save(fig, media / "sensitivity.png"))

    axis_of = {"optim.weight_decay": "x", "optim.lr": "y"}
    for name in sorted({r["optim.name"] for r in rows}):
        mine = [r for r in rows if r["optim.name"] == name]
        optimum = v.optima[name]
        facets_keys = varying(mine, exclude=("optim.lr", "optim.weight_decay"))
        facets = sorted({tuple(r[k] for k in facets_keys) for r in mine})
        medians = [p["epochs_km_median"] for p in points if p["optim.name"] == name
                   and p["epochs_km_median"] is not None]
        norm = Normalize(min(medians), max(max(medians), min(medians) + 1)) if medians else None
        fig, axes = plt.subplots(1, len(facets), figsize=(3 + 3.6 * len(facets), 4.6), squeeze=False,
                                 layout="constrained")
        edges = [(axis_of[k], side) for k, sides in optimum.extensions.items() if k in axis_of for side in sides]
        for ax, facet in zip(axes[0], facets):
            sub = [r for r in mine if tuple(r[k] for k in facets_keys) == facet]
            here = tuple(optimum.point.get(k) for k in facets_keys) == facet
            best = (optimum.point.get("optim.weight_decay"), optimum.point.get("optim.lr")) if here else None
            image = plot_heatmap(ax, sub, norm=norm, best=best, edges=edges if here else ())
            ax.set_title(describe_config(sub[0], facets_keys) or name, fontsize=9)
        if medians:
            fig.colorbar(image, ax=axes[0].tolist(),
                         label=f"median {target_label(mine, 'epochs_to_target')}\n(Kaplan-Meier, every seed)")
        fig.suptitle(f"{name}: {target_label(mine, 'epochs_to_target')} (lower is faster)\noutlined: the best point, "
                     f"{optimum.describe()}\nhatched: median not reached within the budget; k/n: k of n seeds "
                     f"reached it\n{setting(mine)}", fontsize=8)
        saved.append(save(fig, media / f"heatmap_{name}.png"))
    return saved


def legend_below(fig, ax, rows: int = 1) -> None:
    """Move ``ax``'s legend under the whole (constrained-layout) figure, where it hides no panel's lines."""
    legend = ax.get_legend()
    if legend is not None:
        handles = legend.legend_handles
        legend.remove()
        fig.legend(handles=handles, loc="outside lower center", ncol=-(-len(handles) // rows), fontsize=9,
                   frameon=False)


def architecture_figures(rows: list[dict], media: Path, colors: dict, knobs: list, center: dict) -> list[Path]:
    """``arch_<knob>.png`` per knob (epochs and steps to target against its value, the other knobs at
    ``center``) and ``arch_overview.png`` (every knob, epochs and steps)."""
    saved = []
    overview, grid = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 6.6), squeeze=False,
                                  layout="constrained")
    for col, knob in enumerate(knobs):
        sub = [r for r in rows if all(r.get(k) == center[k] for k in knobs if k != knob)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
        for ax, y in zip(axes, ("epochs_to_target", "steps_to_target")):
            plot_sweep(ax, sub, x=knob, y=y, colors=colors, legend=ax is axes[0])
            row = ["epochs_to_target", "steps_to_target"].index(y)
            plot_sweep(grid[row][col], sub, x=knob, y=y, colors=colors, legend=(row, col) == (0, 0))
        others = describe_config(center, [k for k in knobs if k != knob])
        fig.suptitle(f"{label(knob)}: time to target per optimizer at its best configuration\n"
                     f"others at {others}; {setting(sub)}", fontsize=9)
        legend_below(fig, axes[0], rows=2)
        saved.append(save(fig, media / f"arch_{knob.split('.')[-1]}.png"))
    overview.suptitle(f"One knob at a time around {describe_config(center, knobs)}; {setting(rows)}", fontsize=10)
    legend_below(overview, grid[0][0])
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
    v = verdict.compute(out)
    return optimizer_figures(out, v, media, colors) if v is not None and v.rows else []
