"""Analyse a run directory: read its config, metrics and snapshots, measure every snapshot, write
``analysis.jsonl``, ``analysis.json`` and the figures (every file atomically)."""
import json
import os
import re
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import data
import models
from training.speed import available as speed_layer_available
from training.speed.model import FastModel
from . import fourier
from .group import build_group
from .measures import EMBEDDING, ROW_KEYS, build_grid, snapshot_row, weight_measures

SNAPSHOT = re.compile(r"step_(\d+)\.safetensors")
SUMMARY_KEYS = ("run_dir", "group", "pairs", "frequencies", "key_frequencies", "key_rule",
                "top_logit_frequencies", "snapshots", "phases", "first", "final", "files", "seconds")
FIGURES = ("analysis_spectrum", "analysis_progress", "analysis_frequencies")  # each also as *_dark.png


class AnalysisError(ValueError):
    """Bad input: the message is printed as ``error: ...``."""


def read_config(run_dir: Path) -> dict:
    """``config.json`` with the data and model sections validated by their dataclasses."""
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir} is not a directory")
    path = run_dir / "config.json"
    if not path.exists():
        raise AnalysisError(f"{run_dir} has no config.json")
    try:
        cfg = json.loads(path.read_text())
        data.DataConfig(**cfg["data"]), models.ModelConfig(**cfg["model"]), int(cfg["seed"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AnalysisError(f"{path} is malformed ({type(e).__name__}: {e})") from None
    except ValueError as e:  # a dataclass rejecting a value: unknown op, non-prime p for /, ...
        raise AnalysisError(str(e)) from None
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluation rows of ``metrics.jsonl`` (or of ``metrics.jsonl.partial``, a run still going);
    ``[]`` when there is neither. Rows without ``epoch`` and ``val_acc`` (a summary line) are skipped."""
    for name in ("metrics.jsonl", "metrics.jsonl.partial"):
        if (run_dir / name).exists():
            rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]
            return [r for r in rows if "epoch" in r and "val_acc" in r]
    return []


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``snapshots/step_*.safetensors``, by step."""
    found = [(int(m.group(1)), f) for f in (run_dir / "snapshots").glob("step_*.safetensors")
             if (m := SNAPSHOT.fullmatch(f.name))]
    if not found:
        raise AnalysisError(f"{run_dir} has no snapshots/step_*.safetensors")
    return sorted(found)


def load_snapshot(path: Path, step: int, metrics: list[dict]) -> tuple[dict, int | float | None, int]:
    """``(arrays, epoch, step)``; epoch and step from the file's metadata, else the step from its name and
    the epoch of the metrics row at that step (None if there is none)."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise AnalysisError(f"cannot read {path}: {e}") from None
    step = int(meta.get("step", step))
    epoch = meta.get("epoch")
    if epoch is None:
        epoch = next((r["epoch"] for r in metrics if r.get("step") == step), None)
    if epoch is not None:  # a snapshot between epochs (step budgets, log-spaced) has a fractional one
        epoch = float(epoch)
        epoch = int(epoch) if epoch.is_integer() else epoch
    return arrays, epoch, step


def forward(call, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """Logits ``(B, V)`` of ``call`` (the model, or it compiled) for ``tokens`` ``(B, 4)``, ``chunk`` rows at
    a time."""
    return np.concatenate([np.array(call(mx.array(tokens[start:start + chunk])))
                           for start in range(0, len(tokens), chunk)])


def first_epoch(rows: list[dict], key: str, test) -> int | None:
    """The epoch of the first row whose ``key`` satisfies ``test`` (None if none does)."""
    return next((r["epoch"] for r in rows if r.get(key) is not None and test(r[key])), None)


def extreme(rows: list[dict], key: str, pick) -> int | None:
    """The epoch of the row where ``key`` is smallest (``pick=min``) or largest (``max``); None for no rows."""
    rows = [r for r in rows if r.get(key) is not None]
    return pick(rows, key=lambda r: r[key])["epoch"] if rows else None


def write_atomic(path: Path, text: str):
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def analyse_run(run_dir, factor: float = 2.0, max_key: int = 8, level: float = 0.5, chunk: int = 4096,
                figures: bool = True) -> dict:
    """Measure every snapshot of ``run_dir`` and write ``analysis.jsonl``, ``analysis.json`` and (with
    ``figures``) the figures there. Returns the summary (``analysis.json``).

    Key frequencies: from the last snapshot's embedding Fourier norms, by ``fourier.key_frequencies``
    (norms above ``factor`` × their median, largest first, at most ``max_key``). ``level``: the loss level
    whose first crossing is reported for the restricted loss and for the validation loss.
    """
    if not factor >= 1 or max_key < 1 or chunk < 1 or not level > 0:
        raise AnalysisError(f"need factor >= 1, max_key >= 1, chunk >= 1, level > 0 "
                            f"(got factor={factor}, max_key={max_key}, chunk={chunk}, level={level})")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    data_cfg, model_cfg = data.DataConfig(**cfg["data"]), models.ModelConfig(**cfg["model"])
    try:
        group = build_group(data_cfg.p, data_cfg.op)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    metrics, snapshots = read_metrics(run_dir), list_snapshots(run_dir)
    mx.set_default_device(mx.cpu)  # backend-safe: the forward runs on the CPU everywhere (the maths is NumPy)

    tokens, labels = data.modular_arithmetic(data_cfg)
    x_train = data.split(data_cfg, np.random.default_rng([cfg["seed"], 0]))[0]  # the split the run used
    grid = build_grid(group, tokens, labels, x_train)

    last, last_epoch, last_step = load_snapshot(snapshots[-1][1], snapshots[-1][0], metrics)
    if EMBEDDING not in last:
        raise AnalysisError(f"{snapshots[-1][1]} has no parameter {EMBEDDING!r}")
    embed_norms = weight_measures({k: np.array(v) for k, v in last.items()}, group)["embed_norms"]
    key_freqs, share = fourier.key_frequencies(embed_norms, factor, max_key)

    model = models.Transformer(model_cfg, data_cfg.vocab_size)
    model.eval()
    # The speed layer's forward where it pays (the same logits to float rounding); compiled with the parameters as
    # inputs, so every snapshot reuses one trace (tested equal to an eager forward of the plain model).
    forward_fn = FastModel(model, model_cfg) if speed_layer_available() else model
    call = mx.compile(lambda t: forward_fn(t), inputs=model.state)
    rows = []
    for step, path in snapshots:
        arrays, epoch, step = load_snapshot(path, step, metrics)
        try:
            model.load_weights(list(arrays.items()))
        except ValueError as e:
            raise AnalysisError(f"{path} does not fit the model of config.json: {e}") from None
        logits = forward(call, grid.tokens, chunk)
        rows.append(snapshot_row(epoch, step, {k: np.array(v) for k, v in arrays.items()}, logits, grid, key_freqs))
    write_atomic(run_dir / "analysis.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    top_logit, _ = fourier.key_frequencies(np.array(rows[-1]["logit_amplitudes"]), factor, max_key)
    scalars = [k for k in ROW_KEYS if not isinstance(rows[-1][k], list)]
    timed = [r for r in rows if r["epoch"] is not None]
    train99 = first_epoch(metrics, "train_acc", lambda v: v >= 0.99)
    after_memorising = [] if train99 is None else [r for r in timed if r["epoch"] >= train99]
    summary = dict(
        run_dir=str(run_dir),
        group=dict(name=group.name, p=group.p, op=group.op, order=group.n, primitive_root=group.root,
                   index="residue" if group.root is None else f"discrete log base {group.root}",
                   excluded_residues=[] if group.root is None else [0]),
        pairs=dict(grid=len(grid.z), train=int(grid.is_train.sum())),
        frequencies=list(range(1, group.n // 2 + 1)),
        key_frequencies=key_freqs,
        key_rule=dict(source="embedding Fourier norms of the last snapshot", step=last_step, epoch=last_epoch,
                      factor=factor, max_key=max_key, share=share),
        top_logit_frequencies=top_logit,
        snapshots=len(rows),
        phases=dict(
            level=level,
            train_acc_99_epoch=train99,
            val_acc_99_epoch=first_epoch(metrics, "val_acc", lambda v: v >= 0.99),
            val_loss_below_level_epoch=first_epoch(metrics, "val_loss", lambda v: v < level),
            restricted_loss_below_level_epoch=first_epoch(timed, "restricted_loss_all", lambda v: v < level),
            restricted_loss_min_epoch=extreme(timed, "restricted_loss_all", min),
            excluded_loss_train_peak_epoch=extreme(after_memorising, "excluded_loss_train", max),
            sum_sq_weights_peak_epoch=extreme(timed, "sum_sq_weights", max)),
        first={k: rows[0][k] for k in scalars},
        final={k: rows[-1][k] for k in scalars},
        files=["analysis.jsonl", "analysis.json"],
        seconds=None)
    if figures:
        from . import figures as figs  # matplotlib only when drawing
        summary["files"] += [p.name for p in figs.draw_all(run_dir, rows, metrics, summary)]
    summary["seconds"] = round(time.perf_counter() - start, 3)
    assert tuple(summary) == SUMMARY_KEYS
    write_atomic(run_dir / "analysis.json", json.dumps(summary, indent=1) + "\n")
    return summary
