"""The analysis figures, light and dark (``*_dark.png``, matplotlib's dark_background, as plot.py does):
the final Fourier spectrum, the progress measures under the accuracy curves, and per-frequency heat maps."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_COLOR, VAL_COLOR = "#1b9e77", "#d95f02"  # as plot.py
KEY_COLOR, OTHER_COLOR = "#e7298a", "#7570b3"


def _title(summary: dict) -> str:
    g = summary["group"]
    return f"a {g['op']} b mod {g['p']} in {g['name']}\nkey frequencies {summary['key_frequencies']}"


def snapshot_epochs(rows: list[dict]) -> np.ndarray:
    """Each snapshot's epoch (its index where a snapshot has none)."""
    return np.array([i if r["epoch"] is None else r["epoch"] for i, r in enumerate(rows)], dtype=float)


def draw_spectrum(rows: list[dict], summary: dict, dark: bool):
    """Embedding and read-out Fourier norms per frequency at the last snapshot, key frequencies marked."""
    freqs, keys = np.array(summary["frequencies"]), set(summary["key_frequencies"])
    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for ax, key, label in zip(axes, ("embed_norms", "unembed_norms"), ("embedding", "read-out")):
        norms = np.array(rows[-1][key])
        ax.bar(freqs, norms, color=[KEY_COLOR if k in keys else OTHER_COLOR for k in freqs], width=0.8)
        for k in sorted(keys):
            ax.annotate(str(k), (k, norms[k - 1]), ha="center", va="bottom", fontsize=8)
        ax.set(ylabel=f"{label} norm")
        ax.grid(alpha=0.25, axis="y")
    axes[-1].set(xlabel="frequency k (angular 2πk/n)")
    epoch = rows[-1]["epoch"]
    fig.suptitle(f"Fourier spectrum at epoch {epoch} (step {rows[-1]['step']}): " + _title(summary), fontsize=9)
    return fig


def draw_progress(rows: list[dict], metrics: list[dict], summary: dict, dark: bool):
    """Train/validation accuracy, then restricted/excluded loss, Gini and weight norm against epoch."""
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True, height_ratios=(1.2, 1.2, 1, 1))
    acc, loss, gini, norm = axes
    epochs = snapshot_epochs(rows)
    if metrics:
        me = [m["epoch"] for m in metrics]
        for key, label, color in (("train", "train", TRAIN_COLOR), ("val", "validation", VAL_COLOR)):
            acc.plot(me, [100 * m[f"{key}_acc"] for m in metrics], color=color, lw=2, label=label)
            loss.plot(me, [m[f"{key}_loss"] for m in metrics], color=color, lw=1, alpha=0.5,
                      label=f"{label} loss (metrics)")
        acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    acc.set(ylabel="accuracy (%)", ylim=(-2, 102))
    loss.plot(epochs, [r["restricted_loss_all"] for r in rows], "o-", ms=3, color=KEY_COLOR,
              label="restricted loss (all pairs)")
    loss.plot(epochs, [r["excluded_loss_train"] for r in rows], "s-", ms=3, color=OTHER_COLOR,
              label="excluded loss (train pairs)")
    loss.axhline(np.log(summary["group"]["p"]), ls=":", color="gray", lw=1, label="log p (chance)")
    loss.set(ylabel="cross-entropy", yscale="log")
    loss.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    gini.plot(epochs, [r["embed_gini"] for r in rows], "o-", ms=3, label="embedding")
    gini.plot(epochs, [r["unembed_gini"] for r in rows], "s-", ms=3, label="read-out")
    gini.set(ylabel="Gini of Fourier norms", ylim=(0, 1))
    gini.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    norm.plot(epochs, [r["sum_sq_weights"] for r in rows], "o-", ms=3, color="gray")
    norm.set(ylabel="sum of squared weights", xlabel="epoch")
    val99 = summary["phases"]["val_acc_99_epoch"]
    for ax in axes:
        ax.grid(alpha=0.25)
        if val99 is not None:
            ax.axvline(val99, color=VAL_COLOR, ls="--", lw=1)
    fig.suptitle(_title(summary) + ("" if val99 is None else f"; dashed: validation ≥ 99 % (epoch {val99})"),
                 fontsize=9)
    return fig


def draw_frequencies(rows: list[dict], summary: dict, dark: bool):
    """Heat maps of the embedding Fourier norms and the logit amplitudes per frequency against epoch."""
    epochs = snapshot_epochs(rows)
    freqs = np.array(summary["frequencies"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in zip(axes, ("embed_norms", "logit_amplitudes"), ("embedding Fourier norm",
                                                                          "logit amplitude")):
        z = np.array([r[key] for r in rows]).T  # (frequencies, snapshots)
        mesh = ax.pcolormesh(epochs, freqs, z, shading="nearest", cmap="magma")
        fig.colorbar(mesh, ax=ax, label=label)
        ax.set(xlabel="epoch", title=label)
    axes[0].set(ylabel="frequency k")
    axes[0].set_yticks(summary["key_frequencies"] or [1])
    fig.suptitle(_title(summary) + " (y ticks: key frequencies)", fontsize=9)
    return fig


def save_light_and_dark(draw, path: Path) -> list[Path]:
    """``draw(dark)`` saved at ``path`` and at ``*_dark.png``, each through a temporary file."""
    saved = []
    for dark, out in ((False, path), (True, path.with_name(path.stem + "_dark" + path.suffix))):
        with plt.style.context("dark_background" if dark else "default"):
            fig = draw(dark)
            fig.tight_layout()
            tmp = out.with_name(out.stem + ".tmp" + out.suffix)
            fig.savefig(tmp, dpi=120)
            plt.close(fig)
        os.replace(tmp, out)
        saved.append(out)
    return saved


def draw_all(run_dir: Path, rows: list[dict], metrics: list[dict], summary: dict) -> list[Path]:
    """The three figures in ``run_dir``, light and dark; returns the paths written."""
    draws = {"analysis_spectrum": lambda dark: draw_spectrum(rows, summary, dark),
             "analysis_progress": lambda dark: draw_progress(rows, metrics, summary, dark),
             "analysis_frequencies": lambda dark: draw_frequencies(rows, summary, dark)}
    return [p for name, draw in draws.items() for p in save_light_and_dark(draw, Path(run_dir) / f"{name}.png")]
